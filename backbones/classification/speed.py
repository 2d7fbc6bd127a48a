"""The classifiers' side of `tools/benchmark.py`: torchvision's ResNets, ImageNet's 1000 classes."""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, ClassVar

from torch import nn
from torchvision import models

from backbones.registry import create_model
from backbones.task_benchmark import TaskBenchmark

__all__ = ["ClassificationBenchmark"]


class ClassificationBenchmark(TaskBenchmark):
    """Our ResNets against torchvision's, 1000 classes; data: the synthetic six-class image folders."""

    task = "classification"
    counterparts: ClassVar[dict[str, str]] = {"resnet18": "resnet18", "resnet50": "resnet50", "resnet101": "resnet101"}
    num_classes = 1000

    def torchvision_builder(self, name: str) -> Any:
        return getattr(models, self.counterparts[name])

    def build_ours(self, name: str, image_size: int) -> nn.Module:
        return create_model(name, num_classes=self.num_classes)

    def dataset(self, name: str, root: str | None, num_images: int, image_size: int) -> tuple[Sized, str]:
        from .data import ShapesClassificationDataModule
        from .synthetic import SHAPES_CLASSIFICATION_CLASSES

        per_class = -(-num_images // len(SHAPES_CLASSIFICATION_CLASSES))
        datamodule = ShapesClassificationDataModule(
            root=root, train_per_class=per_class, val_per_class=1, image_size=image_size
        )
        datamodule.setup("fit")
        return datamodule.dataset("train"), "synthetic shapes classes, image folders"
