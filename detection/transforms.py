"""Detection transforms built on ``torchvision.transforms.v2``.

The v2 transforms move ``BoundingBoxes`` and ``Mask`` targets together with the
image, so a sample is transformed as one ``(image, target)`` pair.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

__all__ = ["train_transforms", "val_transforms"]


def train_transforms(train_sizes: Sequence[int], max_size: int) -> v2.Compose:
    """Multi-scale training augmentation.

    The shorter side is resized to a size drawn from ``train_sizes`` (the longer side
    capped at ``max_size``), the sample is flipped horizontally half of the time, boxes
    left degenerate are removed with their labels and masks, and the image is scaled
    to float32 in [0, 1]. Masks and boxes keep their dtypes.

    Args:
        train_sizes: candidate lengths of the shorter side, e.g. ``(640, 672, 704)``.
        max_size: the longest the longer side may become.

    Returns:
        A transform called as ``image, target = transform(image, target)``.
    """
    sizes = tuple(int(size) for size in train_sizes)
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"train_sizes={tuple(train_sizes)}; give one or more positive sizes")
    if max_size < max(sizes):
        raise ValueError(f"max_size={max_size} is below the largest train size {max(sizes)}")
    return v2.Compose(
        [
            v2.RandomShortestSize(min_size=sizes, max_size=max_size),
            v2.RandomHorizontalFlip(),
            v2.SanitizeBoundingBoxes(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def val_transforms() -> v2.Compose:
    """Evaluation transform: only scales the image to float32 in [0, 1].

    There is deliberately no resize: the model resizes for inference and maps its
    predictions back to the original image coordinates, which COCO evaluation expects.
    """
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])
