"""tools/export_model.py: classifier and DeepLab checkpoints and presets to .pt2 and ONNX, checked against eager."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import lightning as L
import pytest
import torch

from backbones import create_model
from backbones.classification import ClassificationTask
from backbones.export import (
    ExportMismatch,
    NormalizedModel,
    base_metadata,
    check_export,
    check_images,
    load_exported,
    sidecar_path,
    write_exported,
)
from backbones.weights_table import IMAGENET_MEAN, IMAGENET_STD
from detection.data import ShapesDataModule
from detection.task import DetectionTask
from segmentation.task import SegmentationTask
from tests.tools.loader import fit_one_step, load_tool

export_model = load_tool("export_model")
infer_det = load_tool("infer_det")
infer_seg = load_tool("infer_seg")
SUFFIX = {"export": ".pt2", "onnx": ".onnx"}


def _formats(*, slow_onnx: bool = False):
    """`slow_onnx`: the ONNX case in the slow set (the classifier's ONNX export runs by default)."""
    onnx_missing = any(_missing(p) for p in ("onnx", "onnxscript", "onnxruntime"))
    skip = pytest.mark.skipif(onnx_missing, reason="the export extra (onnx, onnxscript, onnxruntime) is not installed")
    return ["export", pytest.param("onnx", marks=[skip, pytest.mark.slow] if slow_onnx else skip)]


def _missing(package: str) -> bool:
    try:
        __import__(package)
    except ImportError:
        return True
    return False


@pytest.fixture(scope="module")
def classifier_checkpoint(classification_checkpoint):
    return classification_checkpoint.path  # the session's one-step ResNet-18 (tests/conftest.py)


@pytest.fixture(scope="module")
def segmenter_checkpoint(segmentation_checkpoint):
    """The session's one-step DeepLabV3+ (tests/conftest.py): mean (0.5, 0.4, 0.3), std (0.2, 0.25, 0.3)."""
    return segmentation_checkpoint.path, segmentation_checkpoint.images


@pytest.mark.parametrize("fmt", _formats())
def test_classifier_checkpoint_exports_with_dynamic_batch_and_size(classifier_checkpoint, tmp_path, fmt):
    output = tmp_path / f"classifier{SUFFIX[fmt]}"
    args = [
        str(classifier_checkpoint),
        "--format",
        fmt,
        "--dynamic-batch",
        "--dynamic-size",
        "--image-size",
        "64",
        "72",
    ]
    assert export_model.main([*args, "--output", str(output)]) == 0
    metadata = json.loads(sidecar_path(output).read_text())
    assert metadata["task"] == "classification" and metadata["format"] == fmt
    assert metadata["input"]["dynamic_axes"] == ["batch", "height", "width"]
    assert metadata["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert [c["name"] for c in metadata["categories"]] == ClassificationTask.load_from_checkpoint(
        classifier_checkpoint, weights_only=True
    ).hparams.class_names
    assert metadata["outputs"] == [
        {
            "name": "logits",
            "shape": [
                "N",
                len(metadata["categories"]),
            ],
            "dtype": "float32",
        }
    ]

    # what a user does next: load it and run images in [0, 1], as the task takes them (it normalizes them itself)
    task = ClassificationTask.load_from_checkpoint(classifier_checkpoint, weights_only=True).eval()
    model = load_exported(output)
    images = torch.rand(3, 3, 40, 56)
    with torch.no_grad():
        expected = task(images)
    torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", _formats(slow_onnx=True))
def test_segmenter_checkpoint_keeps_its_normalization_and_classes(segmenter_checkpoint, tmp_path, fmt):
    segmenter_checkpoint, _ = segmenter_checkpoint
    output = tmp_path / f"deeplab{SUFFIX[fmt]}"
    args = [str(segmenter_checkpoint), "--format", fmt, "--dynamic-batch", "--dynamic-size", "--image-size", "64", "80"]
    assert export_model.main([*args, "--output", str(output)]) == 0
    metadata = json.loads(sidecar_path(output).read_text())
    assert metadata["task"] == "segmentation"
    assert metadata["input"]["mean"] == pytest.approx([0.5, 0.4, 0.3])
    assert metadata["categories"][0] == {"label": 0, "name": "__background__"} and len(metadata["categories"]) == 4
    assert metadata["outputs"][0]["shape"] == ["N", 4, "H", "W"]

    task = SegmentationTask.load_from_checkpoint(segmenter_checkpoint, weights_only=True).eval()
    images = torch.rand(2, 3, 45, 61)  # a size the check did not use
    with torch.no_grad():
        expected = task(images)["out"]
    torch.testing.assert_close(load_exported(output)(images)["out"], expected, rtol=1e-4, atol=1e-4)


def test_fixed_size_export_refuses_another_size(segmenter_checkpoint, tmp_path):
    segmenter_checkpoint, _ = segmenter_checkpoint
    output = tmp_path / "fixed.pt2"
    assert (
        export_model.main(
            [str(segmenter_checkpoint), "--format", "export", "--image-size", "40", "48", "--output", str(output)]
        )
        == 0
    )
    metadata = json.loads(sidecar_path(output).read_text())
    assert metadata["input"]["dynamic_axes"] == [] and metadata["input"]["example_shape"] == [1, 3, 40, 48]
    model = load_exported(output)
    assert model(torch.rand(1, 3, 40, 48))["out"].shape == (1, 4, 40, 48)
    with pytest.raises(Exception, match=r"48|56"):
        model(torch.rand(1, 3, 40, 56))


@pytest.mark.parametrize("fmt", _formats(slow_onnx=True))
def test_preset_with_a_weights_file(tmp_path, fmt):
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(create_model("resnet18", num_classes=7).state_dict(), weights)
    output = tmp_path / f"r18{SUFFIX[fmt]}"
    args = ["resnet18", "--weights", str(weights), "--format", fmt, "--dynamic-size", "--image-size", "64", "72"]
    assert export_model.main([*args, "--output", str(output)]) == 0
    metadata = json.loads(sidecar_path(output).read_text())
    assert len(metadata["categories"]) == 7 and metadata["input"]["dynamic_axes"] == ["height", "width"]


def test_a_differing_export_exits_1_and_says_what_differed(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(create_model("resnet18", num_classes=3).state_dict(), weights)
    real = export_model.load_exported

    def off_by_a_bit(path):
        model = real(path)
        return lambda images: model(images) + 1e-2

    monkeypatch.setattr(export_model, "load_exported", off_by_a_bit)
    args = ["resnet18", "--weights", str(weights), "--format", "export", "--image-size", "32", "32"]
    assert export_model.main([*args, "--output", str(tmp_path / "r18.pt2")]) == 1
    assert "image 0 (32x32): logits differ by 0.01" in capsys.readouterr().err


def test_check_export_names_each_detection_difference():
    boxes = torch.tensor([[1.0, 2.0, 30.0, 40.0], [5.0, 5.0, 20.0, 20.0]])
    masks = torch.zeros(2, 1, 48, 48)
    masks[:, :, 5:20, 5:20] = 0.9
    expected = {"boxes": boxes, "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.8]), "masks": masks}
    image = torch.rand(3, 48, 48)

    def compare(**changes):
        check_export(lambda _: [expected], lambda _: [dict(expected, **changes)], [image], task="detection")

    compare()  # identical: no error
    with pytest.raises(ExportMismatch, match="1 detections, the eager model has 2"):
        compare(boxes=boxes[:1], labels=expected["labels"][:1], scores=expected["scores"][:1], masks=masks[:1])
    with pytest.raises(ExportMismatch, match=r"labels \[1, 3\]"):
        compare(labels=torch.tensor([1, 3]))
    with pytest.raises(ExportMismatch, match=re.escape("boxes differ by 0.5 px")):
        compare(boxes=boxes + 0.5)
    with pytest.raises(ExportMismatch, match="scores differ"):
        compare(scores=expected["scores"] + 1e-3)
    moved = masks.clone()
    moved[1, :, 5:20, 5:7] = 0.0
    with pytest.raises(ExportMismatch, match=r"mask IoU 0.86.. for detection 1"):
        compare(masks=moved)


@pytest.mark.parametrize(
    "args, message",
    [
        (["nowhere.ckpt", "--format", "onnx"], "checkpoint 'nowhere.ckpt' does not exist"),
        (["resnet18", "--format", "onnx"], "for a preset give its --weights FILE"),
        (["resnet18", "--format", "export", "--weights", "w.pth", "--output", "m.onnx"], "writes a .pt2 file"),
        (
            ["resnet18", "--format", "export", "--weights", "w.pth", "--dynamic-size", "--image-size", "32", "64"],
            "give at least 64 pixels per side with --dynamic-size",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    torch.save(create_model("resnet18", num_classes=3).state_dict(), tmp_path / "w.pth")
    assert export_model.main(args) == 2
    assert message in capsys.readouterr().err


def test_another_file_is_not_taken_for_a_checkpoint(tmp_path, capsys):
    weights = tmp_path / "plain.pth"
    torch.save(create_model("resnet18", num_classes=3).state_dict(), weights)
    assert export_model.main([str(weights), "--format", "export"]) == 2
    assert "has no task hyper-parameters" in capsys.readouterr().err


def test_onnx_without_the_extra_names_the_packages(tmp_path, monkeypatch, capsys):
    weights = tmp_path / "w.pth"
    torch.save(create_model("resnet18", num_classes=3).state_dict(), weights)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    args = ["resnet18", "--weights", str(weights), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]
    assert export_model.main(args) == 2
    assert "pip install 'resbone[export]'" in capsys.readouterr().err


def test_import_backbones_loads_no_onnx():
    code = (
        "import backbones, backbones.export, sys; "
        "print(sorted(m for m in ('onnx', 'onnxscript', 'onnxruntime') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_load_exported_needs_its_json(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=re.escape("m.onnx.json")):
        load_exported(model)
    sidecar_path(model).write_text("{not json")
    with pytest.raises(ValueError, match="not an export's metadata JSON"):
        load_exported(model)
    assert check_images([(33, 47)])[0].shape == (3, 33, 47)


def test_infer_seg_gives_the_same_masks_from_the_export(segmenter_checkpoint, tmp_path):
    checkpoint, images = segmenter_checkpoint
    exported = tmp_path / "deeplab.pt2"
    args = [
        str(checkpoint),
        "--format",
        "export",
        "--dynamic-size",
        "--image-size",
        "64",
        "64",
        "--output",
        str(exported),
    ]
    assert export_model.main(args) == 0
    infer_seg.main([str(checkpoint), str(images), "--output", str(tmp_path / "eager"), "--save-masks", "--no-fuse"])
    infer_seg.main([str(exported), str(images), "--output", str(tmp_path / "exported"), "--save-masks"])
    for name in ("000001_mask.png", "000002_mask.png"):
        assert (tmp_path / "eager" / name).read_bytes() == (tmp_path / "exported" / name).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", _formats())
def test_detection_checkpoint_to_an_export_that_infer_det_runs(tmp_path, fmt):
    L.seed_everything(0, verbose=False)
    data = ShapesDataModule(
        root=str(tmp_path / "shapes"), num_train=2, num_val=2, image_size=128, batch_size=2, num_workers=0,
        with_masks=True,
    )  # fmt: skip
    options = {"min_size": 128, "max_size": 128, "anchor_sizes": [8, 16, 32, 64, 128], "box_detections_per_img": 10,
               "box_score_thresh": 0.0, "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50}  # fmt: skip
    checkpoint = fit_one_step(DetectionTask(model="mask_rcnn_r18_fpn", model_options=options, warmup=0), data, tmp_path)
    exported = tmp_path / f"detector{SUFFIX[fmt]}"
    args = [str(checkpoint), "--format", fmt, "--image-size", "128", "128", "--output", str(exported)]
    assert export_model.main(args) == 0  # the tool's own parity check passed
    metadata = json.loads(sidecar_path(exported).read_text())
    assert metadata["categories"][0]["name"] == "__background__"
    assert metadata["categories"][1]["id"] == 1 and metadata["outputs"][-1]["shape"] == [1, 10, 1, 28, 28]
    images = data.root / "val"
    assert infer_det.main([str(checkpoint), str(images), "--output", str(tmp_path / "eager"), "--no-fuse"]) == 0
    assert infer_det.main([str(exported), str(images), "--output", str(tmp_path / "exported")]) == 0
    eager = json.loads((tmp_path / "eager" / "results.json").read_text())
    ours = json.loads((tmp_path / "exported" / "results.json").read_text())
    assert len(eager) == len(ours) == 20
    for a, b in zip(eager, ours, strict=True):
        assert a["category_id"] == b["category_id"] and a["segmentation"] == b["segmentation"]
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-2) and a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_exported_files_get_the_umask_permissions_as_other_tools_outputs(tmp_path):
    module = NormalizedModel(torch.nn.Conv2d(3, 2, 1), IMAGENET_MEAN, IMAGENET_STD).eval()
    metadata = base_metadata(
        task="classification", architecture="conv", num_classes=2, class_names=None, mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )  # fmt: skip
    output = tmp_path / "conv.pt2"
    previous = os.umask(0o022)
    try:
        write_exported(module, torch.rand(1, 3, 8, 8), output, metadata=metadata, output_names=["logits"])
    finally:
        os.umask(previous)
    for path in (output, sidecar_path(output)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path  # 0666 less the umask, not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.pt2", "conv.pt2.json"]  # no temporary left
