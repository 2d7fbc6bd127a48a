"""Pretrain a few steps, export with tools/export_backbone.py, and load the export everywhere strictly;
export the backbone of a detection and a segmentation checkpoint."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import torchvision

from backbones import create_backbone, create_model
from backbones.classification import ClassificationTask, ImageFolderDataModule, generate_shapes_classification
from segmentation.data import ShapesSegmentationDataModule
from segmentation.task import SegmentationTask
from tests.tools.loader import fit_one_step, load_tool

export_backbone = load_tool("export_backbone")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A ResNet-18 trained for a few steps on tiny synthetic folders, with EMA; its checkpoint."""
    folder = tmp_path_factory.mktemp("pretrain")
    root = generate_shapes_classification(folder / "data", train_per_class=3, val_per_class=1, image_size=32, seed=3)
    data = ImageFolderDataModule(root=str(root), batch_size=6, num_workers=0, crop_size=32, resize_size=32)
    task = ClassificationTask(model="resnet18", lr=0.05, ema_decay=0.5)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
    )
    trainer.fit(task, datamodule=data)
    checkpoint = folder / "pretrained.ckpt"
    trainer.save_checkpoint(checkpoint)
    return task.eval(), checkpoint


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_export_feeds_detection_with_the_pretrained_features(pretrained, tmp_path):
    from detection.models import build_model

    task, checkpoint = pretrained
    output = tmp_path / "resnet18_shapes.pth"
    assert export_backbone.main([str(checkpoint), str(output)]) == 0
    detector = build_model(
        "faster_rcnn_r18_fpn", num_classes=3, backbone_weights=str(output), norm="bn", frozen_stages=-1
    ).eval()
    backbone = create_backbone("resnet18", weights=str(output)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = task.model.forward_feature_maps(x)  # the pretrained network itself, eval mode
        from_detector = detector.backbone.body(x)
        from_backbone = backbone(x)
    assert list(from_detector) == ["c2", "c3", "c4", "c5"]
    for name in from_detector:
        _assert_same(from_detector[name], expected[name])
        _assert_same(from_backbone[name], expected[name])


def test_export_loads_strictly_into_torchvision_timm_and_create_model(pretrained, tmp_path):
    task, checkpoint = pretrained
    output = tmp_path / "resnet18.pth"
    state = export_backbone.export_backbone(checkpoint, output)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(output.stat().st_mode) == 0o666 & ~umask  # readable by others, as a file they copy
    saved = torch.load(output, map_location="cpu", weights_only=True)
    assert list(saved)[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"] and "fc.weight" in saved
    assert set(saved) == set(state) == set(task.model.state_dict())

    reference = torchvision.models.resnet18(num_classes=6)
    reference.load_state_dict(saved, strict=True)
    timm_model = timm.create_model("resnet18", num_classes=6, pretrained=False)
    timm_model.load_state_dict(saved, strict=True)
    ours = create_model("resnet18", num_classes=6, weights=str(output)).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = task.model(x)
        _assert_same(reference.eval()(x), expected)
        _assert_same(timm_model.eval()(x), expected)
        _assert_same(ours(x), expected)


def test_export_ema_writes_the_moving_average(pretrained, tmp_path):
    task, checkpoint = pretrained
    output = tmp_path / "ema.pth"
    assert export_backbone.main([str(checkpoint), str(output), "--ema"]) == 0
    saved = torch.load(output, map_location="cpu", weights_only=True)
    ema = task.ema.module.state_dict()
    assert all(torch.equal(saved[k], ema[k]) for k in ema)
    assert not torch.equal(saved["layer1.0.conv1.weight"], task.model.state_dict()["layer1.0.conv1.weight"])
    torchvision.models.resnet18(num_classes=6).load_state_dict(saved, strict=True)


def _write_checkpoint_without_ema(checkpoint: Path, tmp_path: Path) -> Path:
    loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    loaded["state_dict"] = {k: v for k, v in loaded["state_dict"].items() if not k.startswith("ema.")}
    path = tmp_path / "no_ema.ckpt"
    torch.save(loaded, path)
    return path


class _NotAWeight:
    pass


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("garbage", "cannot read checkpoint"),
        ("pickled_object", "refused to load"),
        ("plain_state_dict", "not a Lightning checkpoint"),
        ("no_ema", "holds no EMA weights"),
        ("wrong_architecture", "do not fit 'resnet34'"),
    ],
)
def test_bad_checkpoint_exits_2_without_output(pretrained, tmp_path, capsys, case, message):
    _, checkpoint = pretrained
    path, extra = tmp_path / f"{case}.ckpt", []
    if case == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    elif case == "pickled_object":
        torch.save({"state_dict": {}, "thing": _NotAWeight()}, path)
    elif case == "plain_state_dict":
        torch.save(create_model("resnet18", num_classes=6).state_dict(), path)
    elif case == "no_ema":
        path, extra = _write_checkpoint_without_ema(checkpoint, tmp_path), ["--ema"]
    elif case == "wrong_architecture":
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
        loaded["hyper_parameters"]["model"] = "resnet34"
        torch.save(loaded, path)
    output = tmp_path / "out" / "exported.pth"
    assert export_backbone.main([str(path), str(output), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export_backbone: error: ") and message in err and err.count("\n") == 1, err
    assert not output.exists()
    assert not output.parent.exists() or not list(output.parent.iterdir())  # no temporary file left either


@pytest.fixture(scope="module")
def detection_checkpoint(detection_checkpoint):
    return detection_checkpoint.task, detection_checkpoint.path  # the session's one-step Mask R-CNN (conftest.py)


@pytest.fixture(scope="module")
def segmentation_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("segmentation")
    L.seed_everything(0, verbose=False)
    datamodule = ShapesSegmentationDataModule(
        root=str(root / "shapes"), num_train=2, num_val=1, image_size=40, batch_size=2, num_workers=0
    )
    task = SegmentationTask(
        model="deeplabv3plus_r18", output_stride=16, model_options={"decoder_channels": 32, "norm": "gn"}
    )
    return task, fit_one_step(task, datamodule, root)


@pytest.mark.parametrize("kind", ["detection", "segmentation"])
def test_export_of_a_task_checkpoint_loads_into_the_plain_backbone(
    detection_checkpoint, segmentation_checkpoint, tmp_path, capsys, kind
):
    task, checkpoint = detection_checkpoint if kind == "detection" else segmentation_checkpoint
    output = tmp_path / f"{kind}_backbone.pth"
    assert export_backbone.main([str(checkpoint), str(output)]) == 0
    options = {"norm": "gn"} if kind == "segmentation" else {}
    call = "create_backbone('resnet18', norm='gn', " if options else "create_backbone('resnet18', "
    assert f"load them with {call}weights='{output}')" in capsys.readouterr().out
    saved = torch.load(output, map_location="cpu", weights_only=True)
    assert list(saved)[:2] == ["conv1.weight", "bn1.weight"] and "fc.weight" not in saved
    create_backbone("resnet18", **options).load_state_dict(saved, strict=True)  # torch's own strict load too
    stride = {"output_stride": 16} if kind == "segmentation" else {}  # the same weights at any stride
    backbone = create_backbone("resnet18", weights=str(output), **options, **stride).eval()  # strict
    trained = task.model.backbone.body if kind == "detection" else task.model.backbone
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, actual = trained.eval()(x), backbone(x)
    for name in expected:
        _assert_same(actual[name], expected[name])


def test_export_of_a_task_checkpoint_refuses_ema(detection_checkpoint, tmp_path, capsys):
    output = tmp_path / "backbone.pth"
    assert export_backbone.main([str(detection_checkpoint[1]), str(output), "--ema"]) == 2
    assert capsys.readouterr().err == (
        "export_backbone: error: 'mask_rcnn_r18_fpn' is a detection checkpoint, which holds no EMA weights; "
        "drop --ema\n"
    )
    assert not output.exists()
