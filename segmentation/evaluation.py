"""Semantic segmentation metrics from a confusion matrix: mIoU, pixel accuracy, per-class IoU.

The matrix is summed over every process (``torch.distributed.all_reduce``) before the metrics are
computed, so every rank returns the same numbers. A class absent from both the ground truth and
the predictions has no IoU (nan) and is left out of the means; a class that is predicted but never
present has IoU 0 and counts.

Every metric is a function of three numbers per class: the true positives (the matrix's diagonal),
the ground-truth pixels (row sums) and the predicted pixels (column sums). With ``per_image=True``
the evaluator also keeps them per image (``class_statistics`` of each image's confusion matrix),
which is what the bootstrap intervals and the worst images of ``segmentation.report`` need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "SegmentationEvaluator",
    "class_statistics",
    "format_per_class_table",
    "metrics_from_confusion",
    "metrics_from_statistics",
]


def class_statistics(confusion: Tensor) -> Tensor:
    """True positives, ground-truth pixels and predicted pixels per class of (..., K, K) confusion matrices.

    Returns:
        (..., 3, K): the diagonal, the row sums and the column sums.
    """
    return torch.stack((confusion.diagonal(dim1=-2, dim2=-1), confusion.sum(-1), confusion.sum(-2)), dim=-2)


def metrics_from_statistics(statistics: Tensor) -> dict[str, Tensor]:
    """Metrics of (..., 3, K) ``class_statistics``, one set per leading index (e.g. per bootstrap draw).

    Returns:
        ``iou`` and ``acc`` per class (..., K) (nan where undefined), ``mIoU`` and ``mean_acc`` (nan-means
        over the classes) and ``pixel_acc`` (...), all float64.
    """
    true_positive, ground_truth, predicted = statistics.double().unbind(-2)
    union = ground_truth + predicted - true_positive
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=statistics.device)
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), nan)
    acc = torch.where(ground_truth > 0, true_positive / ground_truth.clamp(min=1), nan)
    total = ground_truth.sum(-1)
    return {
        "iou": iou,
        "acc": acc,
        "mIoU": iou.nanmean(-1),
        "mean_acc": acc.nanmean(-1),
        "pixel_acc": torch.where(total > 0, true_positive.sum(-1) / total.clamp(min=1), nan),
    }


def metrics_from_confusion(confusion: Tensor) -> dict[str, Tensor]:
    """Metrics of a (K, K) confusion matrix whose rows are ground truth and columns predictions.

    Returns:
        ``iou`` and ``acc`` per class (K,) (nan where undefined), ``mIoU`` and ``mean_acc`` (nan-means)
        and ``pixel_acc``, all float64.
    """
    return metrics_from_statistics(class_statistics(confusion))


class SegmentationEvaluator:
    """Accumulates a confusion matrix over batches; ``compute`` sums it over processes.

    Args:
        num_classes: classes, background included.
        ignore_index: ground-truth label that is not counted (255).
        class_names: a name per class for the table (default "0", "1", ...).
        per_image: also keep each image's ``class_statistics`` (the first dimension of a batch is its
            images); ``compute`` gathers them from every process into ``per_image_statistics``.

    Example:
        >>> evaluator = SegmentationEvaluator(3)
        >>> evaluator.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [2, 255]]))
        >>> evaluator.compute()
        {'mIoU': 1.0, 'pixel_acc': 1.0, 'mean_acc': 1.0}
    """

    def __init__(
        self,
        num_classes: int,
        *,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        per_image: bool = False,
    ):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.confusion = torch.zeros((num_classes, num_classes), dtype=torch.int64)
        self.total_confusion: Tensor | None = None  # summed over processes by the last compute()
        self.per_image = per_image
        self._image_statistics: list[Tensor] = []  # (n, 3, K) per batch, this process's images in order
        #: after compute() with per_image: (N, 3, K) int64 of every process's images, and their evaluation indices
        self.per_image_statistics: np.ndarray | None = None
        self.image_indices: np.ndarray | None = None

    def reset(self) -> None:
        self.confusion = torch.zeros_like(self.confusion)
        self.total_confusion = None
        self._image_statistics = []
        self.per_image_statistics = self.image_indices = None

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
        num_classes = self.num_classes
        index = targets[valid] * num_classes + predictions[valid].long()
        if self.per_image:  # one bincount for the batch, each image in its own block of K * K cells
            images = torch.arange(len(targets), device=targets.device).view(-1, *[1] * (targets.ndim - 1))
            index = images.expand_as(targets)[valid] * num_classes**2 + index
            per_image = torch.bincount(index, minlength=len(targets) * num_classes**2)
            per_image = per_image.reshape(len(targets), num_classes, num_classes)
            self._image_statistics.append(class_statistics(per_image).cpu())
            counts = per_image.sum(0)
        else:
            counts = torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)
        self.confusion = self.confusion.to(counts.device) + counts

    def compute(self) -> dict[str, float]:
        """``mIoU``, ``pixel_acc`` and ``mean_acc`` of everything seen by every process."""
        confusion = self.confusion.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(confusion, op=dist.ReduceOp.SUM)
        self.total_confusion = confusion.cpu()
        if self.per_image:
            self._gather_per_image()
        metrics = metrics_from_confusion(self.total_confusion)
        return {key: float(metrics[key]) for key in ("mIoU", "pixel_acc", "mean_acc")}

    def _gather_per_image(self) -> None:
        """Every process's per-image statistics, in evaluation order: with `eval_sampler` (rank r of W evaluates
        the dataset's images r, r + W, ...) image j of rank r is image r + j * W of the dataset."""
        empty = torch.zeros((0, 3, self.num_classes), dtype=torch.int64)
        local = torch.cat([empty, *self._image_statistics]).numpy()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        world = len(gathered)
        indices = np.concatenate([rank + world * np.arange(len(part)) for rank, part in enumerate(gathered)])
        order = np.argsort(indices, kind="stable")
        self.per_image_statistics = np.concatenate(gathered)[order]
        self.image_indices = indices[order]

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
