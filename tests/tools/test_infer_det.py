"""tools/infer_det.py on a checkpoint from a one-step fit: the fast path is on by default and keeps the results."""

import json

import lightning as L
import numpy as np
import pytest
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detection.data import ShapesDataModule
from detection.task import DetectionTask
from tests.tools.loader import fit_one_step, load_tool

TINY = {"min_size": 64, "max_size": 64, "anchor_sizes": [8, 16, 32, 64, 128], "box_detections_per_img": 10,
        "box_score_thresh": 0.0}  # a barely trained model: keep its low-scored detections

infer_det = load_tool("infer_det")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer_det")
    L.seed_everything(0, verbose=False)
    datamodule = ShapesDataModule(
        root=str(root / "shapes"), num_train=2, num_val=2, image_size=64, batch_size=2, num_workers=0, with_masks=True
    )
    task = DetectionTask(model="mask_rcnn_r18_fpn", model_options=TINY, warmup=0)
    return fit_one_step(task, datamodule, root), datamodule.root / "val"


def test_fast_path_by_default_and_same_results_without_it(checkpoint, tmp_path, monkeypatch):
    path, images = checkpoint
    prepared, original = [], infer_det.prepare_for_inference

    def spy(model, **kwargs):
        model = original(model, **kwargs)
        norms = sum(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in model.modules())
        prepared.append({**kwargs, "norms_left": norms})
        return model

    monkeypatch.setattr(infer_det, "prepare_for_inference", spy)
    results = {}
    for flags, name in (([], "fast"), (["--no-fuse"], "plain")):
        assert infer_det.main([str(path), str(images), "--output", str(tmp_path / name), *flags]) == 0
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
    fast, plain = prepared
    assert (fast["fuse"], fast["channels_last"], fast["compile_backbone"]) == (True, True, False)
    assert (plain["fuse"], plain["channels_last"]) == (False, False)
    assert fast["norms_left"] == 0 and plain["norms_left"] > 0
    assert len(results["fast"]) == len(results["plain"]) > 0
    assert all("segmentation" in r for r in results["fast"])
    # Scores of a barely trained model nearly tie, so their order may differ: compare them sorted.
    scores = {name: np.sort([r["score"] for r in found]) for name, found in results.items()}
    np.testing.assert_allclose(scores["fast"], scores["plain"], rtol=1e-4, atol=1e-6)
