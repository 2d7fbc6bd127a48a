"""The detectors' side of `tools/benchmark.py`: torchvision's R-50 FPN detectors, COCO's 91 labels."""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchvision.models import detection as tvd

from backbones.task_benchmark import TaskBenchmark

from .models import build_model

__all__ = ["DetectionBenchmark"]


def _with_masks(name: str) -> bool:
    return name.startswith("mask_rcnn")


class DetectionBenchmark(TaskBenchmark):
    """Faster and Mask R-CNN R-50 FPN against torchvision's, min = max size = the image size.

    Both score with threshold 0, so every image yields `box_detections_per_img` (100) detections as a
    trained model does on a busy image: random weights would otherwise give none and hide the
    post-processing. Random weights also tie the scores, so detections reorder between the two; the
    inference parity compares the FPN features instead.
    """

    task = "detection"
    counterparts: ClassVar[dict[str, str]] = {
        "faster_rcnn_r50_fpn": "fasterrcnn_resnet50_fpn",
        "mask_rcnn_r50_fpn": "maskrcnn_resnet50_fpn",
    }
    num_classes = 91
    output_compared = "FPN features"

    @staticmethod
    def options(image_size: int) -> dict[str, Any]:
        return {"min_size": image_size, "max_size": image_size, "box_score_thresh": 0.0}

    def torchvision_builder(self, name: str) -> Any:
        return getattr(tvd, self.counterparts[name])

    def build_theirs(self, name: str, image_size: int) -> nn.Module:
        builder = self.torchvision_builder(name)
        return builder(weights=None, weights_backbone=None, num_classes=self.num_classes, **self.options(image_size))

    def build_ours(self, name: str, image_size: int) -> nn.Module:
        return build_model(name, num_classes=self.num_classes, **self.options(image_size))

    def batch(self, name: str, batch_size: int, image_size: int) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        """A list of images and, per image, 3 random boxes with labels (and box-shaped masks for Mask R-CNN)."""
        g, size = torch.Generator().manual_seed(0), image_size
        images, targets = [], []
        for _ in range(batch_size):
            xy = torch.rand(3, 2, generator=g) * size * 0.6
            wh = (0.1 + 0.3 * torch.rand(3, 2, generator=g)) * size
            boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1).round()
            target = {"boxes": boxes, "labels": torch.randint(1, self.num_classes, (3,), generator=g)}
            if _with_masks(name):
                masks = torch.zeros(3, size, size, dtype=torch.uint8)
                for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist(), strict=True):
                    mask[y1:y2, x1:x2] = 1
                target["masks"] = masks
            images.append(torch.rand(3, size, size, generator=g))
            targets.append(target)
        return images, targets

    def loss(self, model: nn.Module, inputs: Any, targets: Any) -> Tensor:
        return sum(model(inputs, targets).values())

    def compared(self, model: nn.Module, inputs: Any, output: Any) -> Any:
        with torch.inference_mode():
            return model.backbone(model.transform(inputs)[0].tensors)

    def dataset(self, name: str, root: str | None, num_images: int, image_size: int) -> tuple[Sized, str]:
        from .data import ShapesDataModule

        masks = _with_masks(name)
        datamodule = ShapesDataModule(
            root=root, num_train=num_images, num_val=1, image_size=image_size, with_masks=masks
        )
        datamodule.setup("fit")
        return datamodule.dataset("train"), "synthetic shapes, COCO JSON" + (" with masks" if masks else "")
