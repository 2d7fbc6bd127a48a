"""Image decoding shared by every data module: OpenCV, RGB, and a clear error for a bad file."""

from __future__ import annotations

import os

import cv2
import numpy as np

__all__ = ["ImageFileError", "read_rgb_image"]


class ImageFileError(ValueError):
    """An image file cannot be read or decoded, is truncated or has an unexpected size."""


def read_rgb_image(path: str | os.PathLike, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Decodes an image's stored pixels with OpenCV into RGB (H, W, 3) uint8, checking its size if given.

    A JPEG's EXIF orientation is not applied: COCO annotations, pycocotools masks, label PNGs and
    torchvision's readers all use the stored pixels, and a rotated image would no longer match them.

    Raises:
        ImageFileError: the file cannot be read or decoded, is a truncated JPEG (which OpenCV
            would silently fill with grey) or its size differs from ``height`` x ``width``.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise ImageFileError(f"{path}: cannot be read ({error})") from error
    if _is_truncated_jpeg(data.tobytes()):
        raise ImageFileError(f"{path}: truncated JPEG (no end-of-image marker after the last scan)")
    # grey, CMYK and alpha images become 3-channel BGR; the EXIF orientation is left unapplied
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ImageFileError(f"{path}: cannot be decoded as an image (unreadable or corrupt)")
    if height is not None and image.shape[:2] != (height, width):
        raise ImageFileError(
            f"{path}: decoded size {image.shape[0]}x{image.shape[1]} (HxW) differs from "
            f"the {height}x{width} given in the annotation file"
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _is_truncated_jpeg(data: bytes) -> bool:
    # Entropy-coded data escapes 0xFF, so markers are unambiguous: a complete JPEG has
    # its end-of-image (FFD9) after its last start-of-scan (FFDA).
    return data.startswith(b"\xff\xd8") and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")
