"""The published DeepLab recipes (configs/segmentation/*_{cityscapes,ade20k,voc_aug}.yaml) run on tiny copies of
their datasets' layouts: one training step and a validation, with resnet18, tiny crops and narrow heads swapped in."""

from pathlib import Path

import pytest
import torch

from segmentation.benchmark_data import ADE20KDataModule, CityscapesDataModule, VOCDataModule
from segmentation.task import SegmentationTask
from tests.segmentation.layouts import make_ade20k, make_cityscapes, make_voc
from tests.tools.loader import load_tool

ROOT = Path(__file__).resolve().parents[2]
LAYOUTS = {"cityscapes": CityscapesDataModule, "ade20k": ADE20KDataModule, "voc_aug": VOCDataModule}
CONFIGS = sorted(c for c in (ROOT / "configs" / "segmentation").glob("*.yaml") if c.stem.endswith(tuple(LAYOUTS)))
# the reference mIoU (single scale, multi-scale + flip) each header must state, from MMSegmentation's tables
REFERENCES = {
    "deeplabv3_r50_os8_80k_cityscapes": ("79.32", "80.57"),
    "deeplabv3_r101_os8_80k_cityscapes": ("80.20", "81.21"),
    "deeplabv3plus_r50_os8_80k_cityscapes": ("80.09", "81.13"),
    "deeplabv3plus_r101_os8_80k_cityscapes": ("80.97", "82.03"),
    "deeplabv3plus_r101_os8_80k_ade20k": ("44.60", "46.06"),
    "deeplabv3plus_r101_os8_40k_voc_aug": ("78.62", "79.53"),
}

# With resnet18 swapped in, the configs of one architecture run the same network: one of each pair
# runs by default, the other in the slow set (their settings are checked by test_recipe_as_published).
SAME_RUN_AS_ANOTHER = {"deeplabv3_r101_os8_80k_cityscapes", "deeplabv3plus_r50_os8_80k_cityscapes"}
RUNS = [pytest.param(c, marks=[pytest.mark.slow] if c.stem in SAME_RUN_AS_ANOTHER else []) for c in CONFIGS]

train_seg = load_tool("train_seg")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    make_cityscapes(root / "cityscapes")
    make_voc(root / "VOCdevkit")
    make_ade20k(root / "ade")
    return {
        "cityscapes": root / "cityscapes",
        "voc_aug": root / "VOCdevkit" / "VOC2012",
        "ade20k": root / "ade" / "ADEChallengeData2016",
    }


def layout(config: Path) -> str:
    return next(name for name in LAYOUTS if config.stem.endswith(name))


def test_every_reference_has_its_config():
    assert sorted(c.stem for c in CONFIGS) == sorted(REFERENCES)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_recipe_as_published(config):
    text = config.read_text()
    single, multi = REFERENCES[config.stem]
    assert f"val mIoU {single} single scale, {multi} multi-scale + flip (MMSegmentation" in text
    cli = train_seg.main(["--config", str(config)], run=False)
    hp, trainer, data = cli.model.hparams, cli.trainer, cli.datamodule
    assert isinstance(data, LAYOUTS[layout(config)])
    assert (hp.lr, hp.momentum, hp.weight_decay, hp.schedule, hp.power, hp.min_lr) == (
        0.01,
        0.9,
        5e-4,
        "poly",
        0.9,
        1e-4,
    )
    assert hp.output_stride == 8 and hp.aux_loss and hp.aux_weight == 0.4 and hp.backbone.endswith("c")  # ResNetV1c
    assert trainer.max_steps == (40_000 if "_40k_" in config.stem else 80_000) and trainer.num_devices == 4
    assert "sync_batchnorm: true" in text
    crop = (512, 1024) if layout(config) == "cityscapes" else 512
    assert data.crop_size == crop and data.scale_range == (0.5, 2.0) and data.batch_size * 4 in (8, 16)


@pytest.mark.parametrize("config", RUNS, ids=lambda p: p.stem)
def test_recipe_trains_a_step_and_validates_on_its_layout(config, roots, tmp_path):
    args = ["fit", "--config", str(config), "--data.init_args.root", str(roots[layout(config)]),
            "--data.init_args.crop_size", "[32, 64]", "--data.init_args.batch_size", "2",
            "--data.init_args.num_workers", "0", "--data.init_args.base_size", "null",
            "--data.init_args.val_size", "null",
            "--model.backbone", "resnet18", "--model.backbone_weights", "null",
            "--model.model_options.aspp_channels", "32", "--model.model_options.decoder_channels", "32",
            "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.strategy", "auto", "--trainer.sync_batchnorm", "false",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]  # fmt: skip
    cli = train_seg.main(args)
    task, datamodule = cli.model, cli.datamodule
    assert (
        task.hparams.num_classes
        == datamodule.num_classes
        == {"cityscapes": 19, "ade20k": 150, "voc_aug": 21}[layout(config)]
    )
    assert task.hparams.class_names == datamodule.class_names
    metrics = cli.trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_mIoU", "val_pixel_acc"} <= set(metrics)
    assert torch.isfinite(metrics["train_loss"]) and cli.trainer.global_step == 1


def test_poly_decays_to_min_lr_as_mmsegmentation():
    task = SegmentationTask(model="deeplabv3_r18", num_classes=3, lr=0.01, min_lr=1e-4)
    schedule = task.lr_schedule(total_steps=80_000, steps_per_epoch=1)
    for step in (0, 20_000, 40_000, 79_999, 80_000):
        expected = (0.01 - 1e-4) * (1 - step / 80_000) ** 0.9 + 1e-4  # mmengine's PolyLR with eta_min
        assert 0.01 * schedule(step) == pytest.approx(expected, rel=1e-9)
    # a rate scaled by the batch ends at min_lr too
    assert 0.02 * task.lr_schedule(total_steps=10, steps_per_epoch=1, lr=0.02)(10) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match=r"min_lr=0\.1; give a rate from 0 to lr=0\.01"):
        SegmentationTask(model="deeplabv3_r18", num_classes=3, lr=0.01, min_lr=0.1)
