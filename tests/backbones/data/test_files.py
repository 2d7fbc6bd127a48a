"""backbones.data.files: the image listing and the atomic writers every tool uses."""

from __future__ import annotations

import json
import os
import re
import stat

import cv2
import numpy as np
import pytest
import torch

from backbones.data.files import IMAGE_SUFFIXES, list_images, write_atomically, write_image, write_json


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_list_images_sorted_case_insensitive_and_recursive_on_request(tmp_path):
    a, b = _touch(tmp_path / "b.JPG"), _touch(tmp_path / "a.png")
    _touch(tmp_path / "notes.txt")
    nested = _touch(tmp_path / "sub" / "deeper" / "c.webp")
    _touch(tmp_path / ".hidden" / "d.jpg")  # e.g. .ipynb_checkpoints
    assert list_images(tmp_path) == [b, a]
    assert list_images(tmp_path, recursive=True) == [b, a, nested]
    assert list_images(a) == [a]  # a file is taken as given


def test_list_images_skips_the_output_folder(tmp_path):
    image = _touch(tmp_path / "a.jpg")
    _touch(tmp_path / "out" / "a.jpg")  # a picture written by an earlier run
    assert list_images(tmp_path, recursive=True, exclude=tmp_path / "out") == [image]


def test_list_images_errors_name_the_path_and_the_way_out(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: no such image or folder"):
        list_images(tmp_path / "nope")
    _touch(tmp_path / "sub" / "a.jpg")
    with pytest.raises(FileNotFoundError, match=r"no images .*--recursive also searches its subfolders"):
        list_images(tmp_path)


def test_one_suffix_list_for_the_project():
    from backbones.classification import data as classification_data
    from segmentation import datasets

    assert datasets.IMAGE_EXTENSIONS is IMAGE_SUFFIXES and classification_data.IMAGE_EXTENSIONS is IMAGE_SUFFIXES


@pytest.mark.parametrize("data", [b"bytes", "text", "callable"])
def test_write_atomically_gives_a_normal_file_mode(tmp_path, data):
    content = (lambda tmp: torch.save({}, tmp)) if data == "callable" else data
    target = tmp_path / "sub" / "file.out"
    previous = os.umask(0o022)  # the process's umask, shared with the other tests: restored right after
    try:
        write_atomically(target, content)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # 0666 less the umask, not mkstemp's 0600
    assert os.listdir(target.parent) == ["file.out"]


def test_write_atomically_keeps_the_old_file_and_no_temporary_on_failure(tmp_path):
    target = tmp_path / "state.pth"
    target.write_bytes(b"old")

    def fails(temporary):
        temporary.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fails)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["state.pth"]
    write_atomically(target, lambda temporary: torch.save({"w": torch.ones(2)}, temporary))
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(2))


def test_write_json_writes_nan_as_null_and_nothing_when_not_serialisable(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(TypeError):
        write_json(target, {"AP": object()})
    assert os.listdir(tmp_path) == []
    write_json(target, {"AP": float("nan"), "nested": {"AR": [0.5, float("nan")]}})
    assert json.loads(target.read_text()) == {"AP": None, "nested": {"AR": [0.5, None]}}


def test_write_image_round_trips_rgb_and_labels(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200  # red
    labels = np.arange(20, dtype=np.uint8).reshape(4, 5)
    write_image(tmp_path / "picture.png", rgb)
    write_image(tmp_path / "labels.png", labels)
    assert (cv2.imread(str(tmp_path / "picture.png"))[..., ::-1] == rgb).all()
    assert (cv2.imread(str(tmp_path / "labels.png"), cv2.IMREAD_UNCHANGED) == labels).all()
    with pytest.raises(ValueError, match=re.escape("picture.xyz")):
        write_image(tmp_path / "picture.xyz", rgb)
    assert sorted(os.listdir(tmp_path)) == ["labels.png", "picture.png"]


def test_list_images_excludes_only_a_folder_inside_the_source(tmp_path):
    image = _touch(tmp_path / "images" / "a.jpg")
    assert list_images(tmp_path / "images", exclude=tmp_path / "images") == [image]  # writing beside the inputs
    assert list_images(tmp_path / "images", exclude=tmp_path) == [image]
