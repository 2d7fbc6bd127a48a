"""A test run keeps its caches in its own temporary folder (tests/conftest.py), never in the user's ~/.cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import torch

from backbones.data.cache import default_cache_dir
from backbones.data.coco import load_coco_annotations
from backbones.weights import cache_dir as weights_cache_dir

USER_CACHE = Path.home() / ".cache" / "resbone"


def test_the_caches_lie_in_the_runs_temporary_folder(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    assert default_cache_dir().is_relative_to(base), default_cache_dir()
    assert weights_cache_dir().is_relative_to(base), weights_cache_dir()
    assert Path(os.environ["XDG_CACHE_HOME"]).is_relative_to(base)  # onnxruntime's and other libraries' caches


def test_a_coco_store_is_written_to_the_private_cache_not_the_users(tmp_path):
    # unique content, so that no earlier run can have left a store of this file anywhere
    coco = {
        "info": {"description": f"private cache test {uuid.uuid4()}"},
        "images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    store = load_coco_annotations(path)  # as every COCO dataset of the tests does: the default cache
    assert store.categories == coco["categories"]
    assert (default_cache_dir() / "coco" / digest).is_dir()
    assert not (USER_CACHE / "coco" / digest).exists()


def test_processes_the_tests_start_use_the_private_caches():
    # the variables are in the environment, not patched into this process only (the tools run as processes)
    names = ("RESBONE_CACHE", "TORCH_HOME", "XDG_CACHE_HOME")
    script = f"import os; print(*(os.environ[name] for name in {names}), sep=chr(10))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[:2] == [str(default_cache_dir()), str(Path(torch.hub.get_dir()).parent)]
    assert Path(out.splitlines()[2]).is_relative_to(default_cache_dir().parent)
