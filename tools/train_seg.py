"""Train, validate, test or predict with DeepLabV3/V3+ from a YAML config (LightningCLI).

    python tools/train_seg.py fit --config configs/segmentation/deeplabv3plus_r18_os16_shapes.yaml
    python tools/train_seg.py validate --config configs/segmentation/deeplabv3_r50_os8_coco.yaml \
        --ckpt_path runs/deeplabv3_r50_os8_coco/lightning_logs/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from backbones.training.cli import run_cli
from segmentation.data import SegmentationDataModule
from segmentation.task import SegmentationTask


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return run_cli(SegmentationTask, SegmentationDataModule, args, run)


if __name__ == "__main__":
    main()
