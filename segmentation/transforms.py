"""Segmentation transforms built on ``torchvision.transforms.v2``.

A sample is an ``(image, mask)`` pair of ``tv_tensors.Image`` (3, H, W) uint8 and
``tv_tensors.Mask`` (H, W) uint8; v2 moves the mask with the image and resizes it with
nearest-neighbour interpolation, so labels are never blended.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["IGNORE_INDEX", "RandomScale", "train_transforms", "val_transforms"]

IGNORE_INDEX = 255


class RandomScale(v2.Transform):
    """Resizes by a factor drawn uniformly from ``scale_range``, keeping the aspect ratio.

    Args:
        scale_range: (low, high) factors, e.g. (0.5, 2.0).
        base_size: if given, the factor applies to an image whose shorter side is first
            ``base_size`` (so images of any size end up at comparable scales).
    """

    def __init__(self, scale_range: Sequence[float] = (0.5, 2.0), base_size: int | None = None):
        super().__init__()
        low, high = (float(s) for s in scale_range)
        if not 0 < low <= high:
            raise ValueError(f"scale_range={tuple(scale_range)}; need 0 < low <= high")
        if base_size is not None and base_size <= 0:
            raise ValueError(f"base_size={base_size}; give a positive size or None")
        self.scale_range = (low, high)
        self.base_size = base_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _image_size(flat_inputs)
        low, high = self.scale_range
        scale = low + (high - low) * float(torch.rand(()))
        if self.base_size is not None:
            scale *= self.base_size / min(height, width)
        return {"size": [max(round(height * scale), 1), max(round(width * scale), 1)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


def _image_size(flat_inputs: list[Any]) -> tuple[int, int]:
    """(H, W) shared by the sample's images and masks (torchvision's public `get_size`)."""
    sizes = {tuple(F.get_size(inpt)) for inpt in flat_inputs if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask))}
    if len(sizes) != 1:
        raise ValueError(f"a sample needs one image size for its image and mask; found {sorted(sizes) or 'none'}")
    return sizes.pop()


def _to_float_image() -> v2.ToDtype:
    # The image to float32 in [0, 1]; the mask keeps its integer labels.
    return v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)


def train_transforms(
    crop_size: int | Sequence[int],
    *,
    scale_range: Sequence[float] = (0.5, 2.0),
    base_size: int | None = None,
    hflip: bool = True,
) -> v2.Compose:
    """Random scale, pad (image 0, mask ``IGNORE_INDEX``) and random crop, horizontal flip.

    Args:
        crop_size: side of the square crop, or (height, width).
        scale_range: random scale factors, (0.5, 2.0) as in DeepLab.
        base_size: shorter side the factor applies to (None: the image's own size).
        hflip: flip half of the samples horizontally.

    Returns:
        A transform called as ``image, mask = transform(image, mask)``; the image comes out as
        float32 in [0, 1] (3, crop_h, crop_w), the mask as uint8 (crop_h, crop_w).
    """
    size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"crop_size={crop_size}; give a positive size or (height, width)")
    steps: list[v2.Transform] = [
        RandomScale(scale_range, base_size),
        v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose([*steps, _to_float_image()])


def val_transforms(size: int | None = None) -> v2.Compose:
    """The whole image, optionally with its shorter side resized to ``size`` (the mask too, nearest)."""
    steps: list[v2.Transform] = [v2.Resize(size, antialias=True)] if size is not None else []
    return v2.Compose([*steps, _to_float_image()])
