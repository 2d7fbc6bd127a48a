"""DeepLab's side of `tools/benchmark.py`: torchvision's DeepLabV3 R-50 (output stride 8), VOC's 21 classes."""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, ClassVar

from torch import nn
from torchvision.models import segmentation as tvs

from backbones.task_benchmark import TaskBenchmark

from .models import build_model

__all__ = ["SegmentationBenchmark"]


class SegmentationBenchmark(TaskBenchmark):
    """DeepLabV3 R-50 against torchvision's; a per-pixel cross-entropy step; data: the shapes label PNGs."""

    task = "segmentation"
    counterparts: ClassVar[dict[str, str]] = {"deeplabv3_r50": "deeplabv3_resnet50"}
    num_classes = 21

    def torchvision_builder(self, name: str) -> Any:
        return getattr(tvs, self.counterparts[name])

    def build_theirs(self, name: str, image_size: int) -> nn.Module:
        return self.torchvision_builder(name)(weights=None, weights_backbone=None, num_classes=self.num_classes)

    def build_ours(self, name: str, image_size: int) -> nn.Module:
        return build_model(name, num_classes=self.num_classes, output_stride=8)  # torchvision's

    def target_shape(self, batch_size: int, image_size: int) -> tuple[int, ...]:
        return (batch_size, image_size, image_size)

    def check(self, name: str, batch_size: int, modes: list[str]) -> str | None:
        if "train" in modes and batch_size < 2:
            return f"--batch-size={batch_size} cannot train DeepLab: BatchNorm after ASPP's pooling needs 2 or more"
        return None

    def dataset(self, name: str, root: str | None, num_images: int, image_size: int) -> tuple[Sized, str]:
        from .data import ShapesSegmentationDataModule

        datamodule = ShapesSegmentationDataModule(root=root, num_train=num_images, num_val=1, image_size=image_size)
        datamodule.setup("fit")
        return datamodule.dataset("train"), "synthetic shapes, label PNGs"
