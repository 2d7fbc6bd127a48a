"""Train, validate, test or predict with an ImageNet-style classifier from a YAML config (LightningCLI).

    python tools/train_cls.py fit --config configs/classification/resnet18_shapes.yaml
    python tools/train_cls.py fit --config configs/classification/resnet50_imagenet.yaml
    python tools/train_cls.py validate --config configs/classification/resnet50_imagenet.yaml \
        --ckpt_path runs/resnet50_imagenet/lightning_logs/version_0/checkpoints/last.ckpt

Then `python tools/export_backbone.py CHECKPOINT OUTPUT.pth [--ema]` writes the weights for
`create_backbone(name, weights=OUTPUT.pth)` and detection/segmentation's `backbone_weights`.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from backbones.classification import ClassificationTask, ImageFolderDataModule
from backbones.training.cli import run_cli


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return run_cli(ClassificationTask, ImageFolderDataModule, args, run)


if __name__ == "__main__":
    main()
