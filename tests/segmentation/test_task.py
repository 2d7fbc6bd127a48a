"""Every config in configs/segmentation/ instantiates and runs a fast_dev_run on tiny data."""

import json
from pathlib import Path

import cv2
import pytest
import torch

from backbones import WEIGHTS
from segmentation.data import VOC_CATEGORY_IDS
from segmentation.task import SegmentationTask
from tests.tools.loader import load_tool

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "segmentation").glob("*.yaml"))
# the benchmark recipes read their datasets' own layouts: test_datasets_configs.py runs them on tiny copies
FOLDER_OR_COCO_CONFIGS = [c for c in CONFIGS if not c.stem.endswith(("_cityscapes", "_ade20k", "_voc_aug"))]


train_seg = load_tool("train_seg")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, small_shapes):
    """A COCO split and a folder split (Cityscapes names) made from the session's small shapes dataset."""
    root = tmp_path_factory.mktemp("segdata")
    shapes = small_shapes
    coco = json.loads(shapes.train_annotations.read_text())
    # give the shapes the ids of COCO person, bicycle and car, which the VOC subset contains too
    for category, new_id in zip(coco["categories"], (1, 2, 3), strict=True):
        for annotation in coco["annotations"]:
            if annotation["category_id"] == category["id"]:
                annotation["new_id"] = new_id
        category["id"] = new_id
    for annotation in coco["annotations"]:
        annotation["category_id"] = annotation.pop("new_id")
    coco["categories"] += [{"id": i, "name": f"voc{i}"} for i in VOC_CATEGORY_IDS if i > 3]  # no instances
    (root / "instances.json").write_text(json.dumps(coco))
    images, masks = root / "folder" / "images" / "city", root / "folder" / "masks" / "city"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for path in sorted(shapes.train_images.glob("*.jpg")):
        cv2.imwrite(str(images / f"{path.stem}_leftImg8bit.png"), cv2.imread(str(path)))
        mask = cv2.imread(str(shapes.train_masks / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(masks / f"{path.stem}_gtFine_labelTrainIds.png"), mask)
    return {"shapes": shapes.root, "coco_images": shapes.train_images, "coco_json": root / "instances.json",
            "folder": root / "folder"}  # fmt: skip


def data_overrides(config: Path, data: dict) -> list[str]:
    """Points a config's data at the tiny fixtures and keeps the run small."""
    name = config.stem
    small = [
        "--data.init_args.crop_size",
        "48",
        "--data.init_args.batch_size",
        "2",
        "--data.init_args.num_workers",
        "0",
    ]
    if name.endswith("_shapes"):
        return ["--data.init_args.root", str(data["shapes"]), "--data.init_args.num_train", "2",
                "--data.init_args.num_val", "3", "--data.init_args.image_size", "40", *small]  # fmt: skip
    small += ["--data.init_args.base_size", "null", "--data.init_args.val_size", "null"]
    if name.endswith("_coco"):
        return [*(f"--data.init_args.{split}_{kind}={data['coco_' + ('images' if kind == 'images' else 'json')]}"
                  for split in ("train", "val") for kind in ("images", "annotations")), *small]  # fmt: skip
    folder = data["folder"]
    return [*(f"--data.init_args.{split}_{kind}={folder / kind / ''}" for split in ("train", "val")
              for kind in ("images", "masks")), *small]  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_instantiates(config):
    cli = train_seg.main(["--config", str(config)], run=False)
    hparams = cli.model.hparams
    assert isinstance(cli.model, SegmentationTask) and cli.model.model is None  # built once the data is known
    assert hparams.backbone_weights is None or hparams.backbone_weights in WEIGHTS
    options = hparams.model_options or {}
    assert options.get("frozen_stages", -1) == -1
    if not config.stem.endswith("_shapes"):  # real data: ImageNet weights, BN trained
        assert hparams.backbone_weights in WEIGHTS and options.get("norm", "bn") == "bn"


@pytest.mark.parametrize("config", FOLDER_OR_COCO_CONFIGS, ids=lambda p: p.stem)
def test_config_fast_dev_run(config, tiny_data, tmp_path):
    args = ["fit", "--config", str(config), *data_overrides(config, tiny_data),
            "--model.backbone", "resnet18", "--model.backbone_weights", "null",
            "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.strategy", "auto", "--trainer.sync_batchnorm", "false",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]  # fmt: skip
    if "multi_grid: [" in config.read_text():  # resnet18's last stage has 2 blocks, not 3
        args += ["--model.model_options.multi_grid", "[1, 2]"]
    cli = train_seg.main(args)
    task, datamodule = cli.model, cli.datamodule
    assert task.hparams.num_classes == datamodule.num_classes
    assert task.hparams.class_names == datamodule.class_names
    metrics = cli.trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_mIoU", "val_pixel_acc"} <= set(metrics)
    assert torch.isfinite(metrics["train_loss"])


def test_coco_os8_config_segments_the_voc_classes():
    cli = train_seg.main(["--config", str(ROOT / "configs/segmentation/deeplabv3_r50_os8_coco.yaml")], run=False)
    assert tuple(cli.datamodule.category_ids) == VOC_CATEGORY_IDS


def test_task_loss_ignores_void_and_adds_weighted_aux():
    task = SegmentationTask(model="deeplabv3_r18", num_classes=3, aux_loss=True, aux_weight=0.5)
    task.train()
    images = torch.rand(2, 3, 32, 32)
    masks = torch.randint(0, 3, (2, 32, 32))
    masks[0] = 255
    outputs = task(images)
    losses = task._losses(outputs, masks)
    expected = torch.nn.functional.cross_entropy(outputs["out"], masks, ignore_index=255)
    assert torch.allclose(losses["loss_out"], expected)
    expected_aux = 0.5 * torch.nn.functional.cross_entropy(outputs["aux"], masks, ignore_index=255)
    assert torch.allclose(losses["loss_aux"], expected_aux)
    all_void = task._losses(outputs, torch.full_like(masks, 255))
    assert all_void["loss_out"] == 0  # not nan


def test_poly_schedule_after_warmup():
    from backbones.training import LRSchedule

    schedule = LRSchedule(total_steps=100, schedule="poly", power=0.9, warmup_steps=10, warmup_factor=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(50) == pytest.approx(0.5**0.9)
    assert schedule(100) == 0


def test_printed_metrics_are_fractions_as_logged(capsys):
    from types import SimpleNamespace

    task = SegmentationTask(model="deeplabv3plus_r18", num_classes=2, class_names=["__background__", "thing"])
    task._trainer = SimpleNamespace(is_global_zero=True, sanity_checking=False, global_step=3, loggers=[])
    task.log_dict = lambda values, **kwargs: None  # the per-class scalars: tests/segmentation/test_report.py
    evaluator = task.evaluator("val")
    evaluator.update(torch.tensor([[0, 1, 1, 1]]), torch.tensor([[0, 0, 1, 1]]))  # IoU 1/2 and 2/3
    metrics = evaluator.compute()
    task.report_evaluation("val", metrics)
    printed = capsys.readouterr().out
    assert f"val_mIoU {metrics['mIoU']:.4f}" in printed and "val_mIoU 0.5833" in printed  # not 58.33
    assert "0.6667" in printed and "66.67" not in printed  # the per-class table too
