"""tools/infer_det.py on a checkpoint from a one-step fit: the fast path, memory that does not grow with
the number of images, batches, precision, subfolders and the output layout."""

import json
import os
import shutil
import stat
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from tests.tools.loader import load_tool, run_tool

infer_det = load_tool("infer_det")


@pytest.fixture(scope="module")
def checkpoint(detection_checkpoint):
    """The session's one-step Mask R-CNN (tests/conftest.py), which keeps its low-scored detections."""
    return detection_checkpoint.path, detection_checkpoint.images


def _sorted_scores(results: list[dict]) -> np.ndarray:
    # Scores of a barely trained model nearly tie, so their order may differ: compare them sorted.
    return np.sort([r["score"] for r in results])


def _spy_on_model(monkeypatch, spy):
    """Wraps the prepared detector in `spy(model, images)`."""
    original = infer_det.prepare_for_inference

    def prepare(model, **kwargs):
        model = original(model, **kwargs)
        return lambda images: spy(model, images)

    monkeypatch.setattr(infer_det, "prepare_for_inference", prepare)


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
    np.testing.assert_allclose(_sorted_scores(results["fast"]), _sorted_scores(results["plain"]), rtol=1e-4, atol=1e-6)


def test_each_image_masks_are_encoded_and_dropped_before_the_next_image(checkpoint, tmp_path, monkeypatch):
    """Memory stays flat in the number of images: no dense mask outlives its image."""
    path, images = checkpoint
    masks, alive_at_each_call, encoded = [], [], []

    def spy(model, batch):
        alive_at_each_call.append(sum(ref() is not None for ref in masks))
        outputs = model(batch)
        masks.extend(weakref.ref(output["masks"]) for output in outputs)
        return outputs

    original_encode = infer_det.to_coco_results

    def encode(predictions, *args, **kwargs):
        masks.extend(weakref.ref(prediction["masks"]) for prediction in predictions)
        encoded.append(len(predictions))
        return original_encode(predictions, *args, **kwargs)

    _spy_on_model(monkeypatch, spy)
    monkeypatch.setattr(infer_det, "to_coco_results", encode)
    assert infer_det.main([str(path), str(images), "--output", str(tmp_path / "out")]) == 0
    assert alive_at_each_call == [0, 0, 0]  # three images, one model call each, nothing left of the earlier ones
    assert encoded == [1, 1, 1]  # each image's masks encoded as it is done
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())) == 30  # 10 detections per image


def test_batches_give_the_results_of_single_images(checkpoint, tmp_path, monkeypatch):
    path, images = checkpoint
    calls = []

    def spy(model, batch):
        calls.append(len(batch))
        return model(batch)

    _spy_on_model(monkeypatch, spy)
    results = {}
    for size in ("1", "2"):
        assert infer_det.main([str(path), str(images), "--output", str(tmp_path / size), "--batch-size", size]) == 0
        results[size] = json.loads((tmp_path / size / "results.json").read_text())
    assert calls == [1, 1, 1, 2, 1]
    written = sorted(p.name for p in (tmp_path / "2").iterdir())
    assert written == ["000001.jpg", "000002.jpg", "000003.jpg", "results.json"]
    for image_id in (1, 2, 3):
        single, batched = ([r for r in results[size] if r["image_id"] == image_id] for size in ("1", "2"))
        np.testing.assert_allclose(_sorted_scores(single), _sorted_scores(batched), rtol=1e-4, atol=1e-5)


def test_bf16_runs_the_network_in_bf16_and_returns_fp32(checkpoint, tmp_path, monkeypatch):
    path, images = checkpoint
    feature_dtypes = []

    def spy(model, batch):
        hook = model.backbone.register_forward_hook(
            lambda module, inputs, output: feature_dtypes.extend(v.dtype for v in output.values())
        )
        try:
            return model(batch)
        finally:
            hook.remove()

    _spy_on_model(monkeypatch, spy)
    detector = infer_det.load_model(path, torch.device("cpu"))
    image = infer_det.read_image(sorted(images.glob("*.jpg"))[0])
    (prediction,) = infer_det.predict(detector.model, [image], torch.device("cpu"), "bf16")
    assert set(feature_dtypes) == {torch.bfloat16}
    assert {k: v.dtype for k, v in prediction.items()} == {
        "boxes": torch.float32, "scores": torch.float32, "labels": torch.int64, "masks": torch.bool,
    }  # fmt: skip
    assert infer_det.main([str(path), str(images), "--output", str(tmp_path / "bf16"), "--precision", "bf16"]) == 0
    assert len(json.loads((tmp_path / "bf16" / "results.json").read_text())) == 30


def test_subfolders_with_recursive_and_the_output_mirrors_them(checkpoint, tmp_path, capsys):
    path, images = checkpoint
    source = tmp_path / "source"
    for sub, name in (("a", "000001.jpg"), ("b/c", "000002.jpg")):
        (source / sub).mkdir(parents=True)
        shutil.copy(images / name, source / sub / name)
    out = tmp_path / "out"
    assert infer_det.main([str(path), str(source), "--output", str(out)]) == 2
    assert "no images" in capsys.readouterr().err and not out.exists()
    assert infer_det.main([str(path), str(source), "--output", str(out), "--recursive"]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "a/000001.jpg", "b/c/000002.jpg", "results.json",
    ]  # fmt: skip
    assert "wrote 2 pictures and 20 results" in capsys.readouterr().out


def test_refuses_to_overwrite_the_input_images(checkpoint, tmp_path, capsys):
    path, images = checkpoint
    source = shutil.copytree(images, tmp_path / "images")
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    assert infer_det.main([str(path), str(source), "--output", str(source)]) == 2
    assert "000001.jpg: writing it would overwrite the input image; choose another --output" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def test_runs_as_a_script_with_a_rate_and_one_error_line(checkpoint, tmp_path):
    path, images = checkpoint
    done = run_tool("infer_det", path, images, "--output", tmp_path / "out", "--batch-size", "2")
    assert done.returncode == 0, done.stderr
    assert "wrote 3 pictures and 30 results" in done.stdout and "images/s)" in done.stdout
    umask = os.umask(0o022)
    os.umask(umask)
    for written in ("results.json", "000001.jpg"):
        assert stat.S_IMODE((tmp_path / "out" / written).stat().st_mode) == 0o666 & ~umask  # not 0600
    failed = run_tool("infer_det", path, tmp_path / "nowhere", "--output", tmp_path / "out")
    assert failed.returncode == 2
    assert failed.stderr == f"infer_det: error: {tmp_path / 'nowhere'}: no such image or folder\n"


def test_annotations_match_images_by_their_path_under_the_folder(tmp_path):
    images = [tmp_path / "a" / "0001.jpg", tmp_path / "b" / "0001.jpg", tmp_path / "b" / "0002.jpg"]
    for image in images:
        image.parent.mkdir(exist_ok=True)
        image.touch()
    annotations = tmp_path / "instances.json"
    entries = [{"id": i, "file_name": name} for i, name in ((7, "b/0001.jpg"), (3, "a/0001.jpg"), (9, "b/0002.jpg"))]
    annotations.write_text(json.dumps({"images": entries}))
    assert infer_det.image_ids_for(images, str(annotations), tmp_path) == [3, 7, 9]

    # base names only: a unique one still matches, a repeated one cannot tell its images apart
    annotations.write_text(json.dumps({"images": [{"id": 5, "file_name": "0002.jpg"}]}))
    assert infer_det.image_ids_for(images[2:], str(annotations), tmp_path) == [5]
    annotations.write_text(json.dumps({"images": [{"id": 1, "file_name": "0001.jpg"}, *entries[2:]]}))
    with pytest.raises(ValueError, match=r"file_name '0001.jpg' \(a base name\) matches 2 images: .*a/0001.jpg"):
        infer_det.image_ids_for(images, str(annotations), tmp_path)
    annotations.write_text(json.dumps({"images": entries[2:]}))
    with pytest.raises(ValueError, match=r"no image entry for a/0001.jpg, b/0001.jpg"):
        infer_det.image_ids_for(images, str(annotations), tmp_path)
