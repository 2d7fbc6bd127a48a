"""Train, validate, test or predict with Faster/Mask R-CNN from a YAML config (LightningCLI).

    python tools/train_det.py fit --config configs/detection/mask_rcnn_r18_fpn_shapes.yaml
    python tools/train_det.py validate --config configs/detection/faster_rcnn_r50_fpn_1x_coco.yaml \
        --ckpt_path runs/faster_rcnn_r50_fpn_1x_coco/lightning_logs/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from backbones.training.cli import run_cli
from detection.data import CocoDetectionDataModule
from detection.task import DetectionTask


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return run_cli(DetectionTask, CocoDetectionDataModule, args, run)


if __name__ == "__main__":
    main()
