"""Semantic segmentation metrics from a confusion matrix: mIoU, pixel accuracy, per-class IoU.

The matrix is summed over every process (``torch.distributed.all_reduce``) before the metrics are
computed, so every rank returns the same numbers. A class absent from both the ground truth and
the predictions has no IoU (nan) and is left out of the means; a class that is predicted but never
present has IoU 0 and counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["SegmentationEvaluator", "format_per_class_table", "metrics_from_confusion"]


def metrics_from_confusion(confusion: Tensor) -> dict[str, Tensor]:
    """Metrics of a (K, K) confusion matrix whose rows are ground truth and columns predictions.

    Returns:
        ``iou`` and ``acc`` per class (K,) (nan where undefined), ``mIoU`` and ``mean_acc`` (nan-means)
        and ``pixel_acc``, all float64.
    """
    confusion = confusion.double()
    true_positive = confusion.diag()
    ground_truth = confusion.sum(1)
    union = ground_truth + confusion.sum(0) - true_positive
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=confusion.device)
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), nan)
    acc = torch.where(ground_truth > 0, true_positive / ground_truth.clamp(min=1), nan)
    total = confusion.sum()
    return {
        "iou": iou,
        "acc": acc,
        "mIoU": iou.nanmean(),
        "mean_acc": acc.nanmean(),
        "pixel_acc": true_positive.sum() / total if total > 0 else nan,
    }


class SegmentationEvaluator:
    """Accumulates a confusion matrix over batches; ``compute`` sums it over processes.

    Args:
        num_classes: classes, background included.
        ignore_index: ground-truth label that is not counted (255).
        class_names: a name per class for the table (default "0", "1", ...).

    Example:
        >>> evaluator = SegmentationEvaluator(3)
        >>> evaluator.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [2, 255]]))
        >>> evaluator.compute()
        {'mIoU': 1.0, 'pixel_acc': 1.0, 'mean_acc': 1.0}
    """

    def __init__(self, num_classes: int, *, ignore_index: int = 255, class_names: Sequence[str] | None = None):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.confusion = torch.zeros((num_classes, num_classes), dtype=torch.int64)
        self.total_confusion: Tensor | None = None  # summed over processes by the last compute()

    def reset(self) -> None:
        self.confusion = torch.zeros_like(self.confusion)
        self.total_confusion = None

    @torch.no_grad()
    def update(self, predictions: Tensor, targets: Tensor) -> None:
        """Adds a batch.

        Args:
            predictions: class indices (N, H, W), or logits (N, K, H, W) whose argmax is taken.
            targets: class indices (N, H, W); ``ignore_index`` pixels are skipped.
        """
        if predictions.ndim == targets.ndim + 1:
            predictions = predictions.argmax(1)
        if predictions.shape != targets.shape:
            raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ")
        targets = targets.long()
        valid = targets != self.ignore_index
        bad = targets[valid & ((targets < 0) | (targets >= self.num_classes))]
        if bad.numel():
            raise ValueError(
                f"target labels {sorted(set(bad.tolist()))} outside 0..{self.num_classes - 1} "
                f"(ignore index {self.ignore_index})"
            )
        index = targets[valid] * self.num_classes + predictions[valid].long()
        counts = torch.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)
        self.confusion = self.confusion.to(counts.device) + counts

    def compute(self) -> dict[str, float]:
        """``mIoU``, ``pixel_acc`` and ``mean_acc`` of everything seen by every process."""
        confusion = self.confusion.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(confusion, op=dist.ReduceOp.SUM)
        self.total_confusion = confusion.cpu()
        metrics = metrics_from_confusion(self.total_confusion)
        return {key: float(metrics[key]) for key in ("mIoU", "pixel_acc", "mean_acc")}

    def per_class(self) -> dict[str, dict[str, float]]:
        """IoU, accuracy and ground-truth share per class, from the last ``compute``."""
        if self.total_confusion is None:
            raise RuntimeError("call compute() first")
        metrics = metrics_from_confusion(self.total_confusion)
        pixels = self.total_confusion.sum(1).double()
        share = pixels / pixels.sum().clamp(min=1)
        return {
            name: {"IoU": float(metrics["iou"][k]), "acc": float(metrics["acc"][k]), "gt_share": float(share[k])}
            for k, name in enumerate(self.class_names)
        }


def format_per_class_table(
    per_class: dict[str, dict[str, float]], title: str = "per-class IoU", inference: str | None = None
) -> str:
    """A text table of ``SegmentationEvaluator.per_class()`` in fractions (as logged); nan (absent class) is "-".

    Args:
        per_class: ``SegmentationEvaluator.per_class()``.
        title: the first line.
        inference: how the predictions were made (``SegmentationInference.describe()``), the second line.
    """

    def cell(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:6.4f}"

    width = max(len("class"), *(len(name) for name in per_class))
    lines = [title, *([f"inference: {inference}"] if inference else []), f"{'class':<{width}}    IoU    acc gt_share"]
    for name, values in per_class.items():
        lines.append(f"{name:<{width}} {cell(values['IoU']):>6} {cell(values['acc']):>6} {cell(values['gt_share']):>8}")
    return "\n".join(lines)
