"""How a segmentation model is run at evaluation and prediction time: whole image, sliding window, multi-scale + flip.

Plain torch, as MMSegmentation 1.x defines the modes (`EncoderDecoder.whole_inference`/`slide_inference`
and `SegTTAModel`):

- `whole`: the model sees the image as it is; the scores are its logits.
- `slide`: windows of `crop_size` every `stride` pixels, `max(H - h + sh - 1, 0) // sh + 1` per axis;
  the last window of an axis is shifted back inside the image, and a crop larger than the image is the
  image (no padding, as MMSegmentation's `slide_inference`). The logits of every window are summed into
  a full-size buffer and divided by the number of windows that cover each pixel (a mean of logits).
  Windows of every image in the batch run `window_batch_size` at a time.
- multi-scale + flip (`scales` given, or `flip`): each view (the image resized by each scale, mmcv's
  rounding `int(size * scale + 0.5)`, and with `flip` its mirror image, run in one batch with it) is
  inferred whole or by slide; its logits are un-flipped, resized to the output size, softmaxed and the
  probabilities averaged over the views. The probabilities are kept in float64 so that one view at scale 1
  gives the arg-max of `whole` exactly (float32 softmax can round two close logits to one probability).

Example:
    >>> inference = SegmentationInference(mode="slide", crop_size=(512, 1024), stride=(341, 683))
    >>> scores = inference(lambda x: model(x)["out"], images)  # (N, K, H, W) logits
    >>> SegmentationInference(scales=(0.5, 1.0, 1.5), flip=True)(forward, images).sum(1)  # all ones, float64
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["INFERENCE_MODES", "SegmentationInference", "slide_windows"]

INFERENCE_MODES = ("whole", "slide")
Forward = Callable[[Tensor], Tensor]  # (N, 3, h, w) images -> (N, K, h, w) float32 logits


def _pair(name: str, value: int | Sequence[int] | None) -> tuple[int, int] | None:
    """(h, w) of an int or a pair; the error names the option and what it takes."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name}={value!r}; give two positive integers (height, width), e.g. [512, 1024]")
    return pair


@dataclass(frozen=True)
class SegmentationInference:
    """The inference options of `SegmentationTask` (validate, test, predict) and `tools/infer_seg.py`.

    Args:
        mode: "whole" (the image at once) or "slide" (windows of `crop_size` every `stride`).
        crop_size: (h, w) of a window (slide only); an int is a square.
        stride: (h, w) between window origins (slide only), at most `crop_size` so every pixel is covered.
        scales: multi-scale: sizes relative to the image, e.g. (0.5, 0.75, 1.0, 1.25, 1.5, 1.75); each
            view is inferred by `mode`, and the output is probabilities averaged over views. None: one
            view at scale 1 and its logits (unless `flip`).
        flip: also infer each view mirrored left-right (the output is then averaged probabilities).
        window_batch_size: windows (of all images of a batch) per forward pass in slide mode.
    """

    mode: Literal["whole", "slide"] = "whole"
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] | None = None
    flip: bool = False
    window_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.mode not in INFERENCE_MODES:
            raise ValueError(f"inference mode={self.mode!r}; choose one of {', '.join(map(repr, INFERENCE_MODES))}")
        crop, stride = _pair("crop_size", self.crop_size), _pair("stride", self.stride)
        if self.mode == "slide":
            if crop is None or stride is None:
                raise ValueError(
                    f"inference mode='slide' needs crop_size and stride (got crop_size={self.crop_size!r}, "
                    f"stride={self.stride!r}), e.g. crop_size: [512, 1024], stride: [341, 683]"
                )
            for axis, (c, s) in zip(("height", "width"), zip(crop, stride, strict=True), strict=True):
                if s > c:
                    raise ValueError(
                        f"stride={list(stride)} exceeds crop_size={list(crop)} in {axis} ({s} > {c}): pixels "
                        "between windows would have no prediction; choose a stride <= the crop"
                    )
        elif crop is not None or stride is not None:
            raise ValueError(
                f"crop_size={self.crop_size!r} and stride={self.stride!r} are options of mode 'slide', but the "
                f"mode is {self.mode!r}; set mode: slide or leave them out"
            )
        scales = None if self.scales is None else tuple(self.scales)
        if scales is not None and (
            not scales or not all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in scales)
        ):
            raise ValueError(f"scales={self.scales!r}; give one or more positive factors, e.g. [0.5, 1.0, 1.5]")
        if not isinstance(self.window_batch_size, int) or self.window_batch_size < 1:
            raise ValueError(f"window_batch_size={self.window_batch_size!r}; give a positive number of windows")
        object.__setattr__(self, "crop_size", crop)  # lists from YAML become the tuples the type says
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "scales", None if scales is None else tuple(float(s) for s in scales))

    @classmethod
    def create(cls, options: SegmentationInference | Mapping[str, Any] | None) -> SegmentationInference:
        """From itself, a mapping of its fields (YAML, a checkpoint's hyperparameters) or None (whole)."""
        names = [f.name for f in fields(cls)]
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping):
            raise TypeError(f"inference={options!r}; give a mapping of {', '.join(names)}")
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"inference options {unknown} unknown; choose from {', '.join(names)}")
        return cls(**options)

    def as_dict(self) -> dict[str, Any]:
        """Plain values (lists, no tuples or dataclasses): what a checkpoint keeps (loaded with weights_only)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def averages_probabilities(self) -> bool:
        """True when the output is probabilities averaged over views (multi-scale or flip), else logits."""
        return self.scales is not None or self.flip

    def describe(self) -> str:
        """One line naming the mode, e.g. "slide (crop 512x1024, stride 341x683), scales 0.5, 1.0 + flip"."""
        text = self.mode
        if self.mode == "slide":
            text += f" (crop {self.crop_size[0]}x{self.crop_size[1]}, stride {self.stride[0]}x{self.stride[1]})"
        if self.averages_probabilities:
            scales = ", ".join(f"{s:g}" for s in self.scales or (1.0,))
            text += f", scales {scales}{' + flip' if self.flip else ''} (probabilities averaged)"
        return text

    def __call__(self, forward: Forward, images: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """Scores (N, K, *size) of images (N, 3, H, W); `size` defaults to (H, W).

        Args:
            forward: the model, images -> logits (N, K, h, w) of the same size (normalization included).
            images: a batch of one size.
            size: the output (label) size; the scores are resized there bilinearly.

        Returns:
            Logits (the dtype `forward` returns) or, with `scales` or `flip`, float64 probabilities averaged
            over the views. Either way their arg-max over dim 1 is the prediction.
        """
        size = tuple(images.shape[-2:]) if size is None else tuple(size)
        if not self.averages_probabilities:
            return _resize(self._infer(forward, images), size)
        height, width = images.shape[-2:]
        total, views = None, 0
        for scale in self.scales or (1.0,):
            scaled = (int(height * scale + 0.5), int(width * scale + 0.5))  # mmcv's rescale_size
            view = _resize(images, scaled)
            if self.flip:  # the mirror image runs in one batch with its view
                view = torch.cat([view, view.flip(-1)])
            logits = self._infer(forward, view)
            if self.flip:
                plain, mirrored = logits.chunk(2)
                logits = torch.cat([plain, mirrored.flip(-1)])
            probabilities = _resize(logits, size).double().softmax(1)
            for part in probabilities.chunk(2 if self.flip else 1):
                total = part if total is None else total + part
                views += 1
        return total / views

    def _infer(self, forward: Forward, images: Tensor) -> Tensor:
        return forward(images) if self.mode == "whole" else self._slide(forward, images)

    def _slide(self, forward: Forward, images: Tensor) -> Tensor:
        """The summed window logits over the per-pixel window count, (N, K, H, W)."""
        count, height, width = len(images), *images.shape[-2:]
        windows = slide_windows((height, width), self.crop_size, self.stride)
        crops = [(i, window) for window in windows for i in range(count)]  # window-major: one window's crops together
        summed, covered = None, images.new_zeros((1, 1, height, width))
        chunks = math.ceil(len(crops) / self.window_batch_size)  # even chunks: 9 windows at 8 a time run as 5 + 4
        bounds = [round(k * len(crops) / chunks) for k in range(chunks + 1)]
        for start, stop in itertools.pairwise(bounds):
            part = crops[start:stop]
            batch = torch.cat([images[i : i + 1, :, y1:y2, x1:x2] for i, (y1, y2, x1, x2) in part])
            logits = forward(batch)  # (len(part), K, crop h, crop w)
            if summed is None:
                summed = logits.new_zeros((count, logits.shape[1], height, width))
            for logit, (i, (y1, y2, x1, x2)) in zip(logits, part, strict=True):
                summed[i, :, y1:y2, x1:x2] += logit
        for y1, y2, x1, x2 in windows:
            covered[..., y1:y2, x1:x2] += 1
        assert bool((covered > 0).all()), "a stride <= crop covers every pixel"  # checked in __post_init__
        return summed / covered.to(summed.dtype)


def slide_windows(size: Sequence[int], crop_size: Sequence[int], stride: Sequence[int]) -> list[tuple[int, ...]]:
    """Windows (y1, y2, x1, x2) of MMSegmentation's `slide_inference` over an image of `size` (H, W).

    Example:
        >>> slide_windows((4, 11), (4, 4), (3, 3))  # the last window shifted back to end at 11
        [(0, 4, 0, 4), (0, 4, 3, 7), (0, 4, 6, 10), (0, 4, 7, 11)]
    """
    per_axis = []
    for length, crop, step in zip(size, crop_size, stride, strict=True):
        grids = max(length - crop + step - 1, 0) // step + 1
        spans = []
        for index in range(grids):
            end = min(index * step + crop, length)
            spans.append((max(end - crop, 0), end))
        per_axis.append(spans)
    return [(y1, y2, x1, x2) for y1, y2 in per_axis[0] for x1, x2 in per_axis[1]]


def _resize(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """Bilinear (align_corners=False, no antialias: mmcv's cv2 resize and MMSegmentation's logit resize)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
