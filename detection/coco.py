"""COCO-format detection dataset and batching; the JSON is read and validated by `backbones.data.coco`.

Images are decoded with OpenCV; targets follow torchvision's detection convention
(``boxes`` XYXY in pixels, ``labels`` in 1..K with 0 the background, ``masks`` (N, H, W)).
COCO category ids, which need not be contiguous, are mapped to labels in id order.
The Lightning data modules that serve them are in ``detection.data``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from backbones.data.coco import (
    MAX_NAMES_IN_ERROR,
    REQUIRED_KEYS,
    AnnotationFileError,
    CocoAnnotations,
    check_images_exist,
    clip_xyxy,
    contiguous_labels,
    load_coco_annotations,
    names_and_more,
)
from backbones.data.images import read_rgb_image
from backbones.weights_table import BACKGROUND

__all__ = [
    "MAX_NAMES_IN_ERROR",
    "REQUIRED_KEYS",
    "AnnotationFileError",
    "CocoDetection",
    "collate",
    "contiguous_labels",
    "load_coco_annotations",
]

logger = logging.getLogger(__name__)


class CocoDetection(Dataset):
    """A COCO-format detection dataset.

    Crowd annotations are left out of the targets (COCO evaluation still reads them from
    the JSON); boxes are clipped to the image and those left without area are dropped.
    With masks, annotations left without a valid polygon are dropped too (as detectron2 does).
    Images without annotations are kept with empty targets. The annotations are read through
    the shared, memory-mapped store of `backbones.data.coco` (built once per file).

    Args:
        images: folder that ``file_name`` entries are relative to.
        annotations: COCO instances JSON file.
        transforms: called as ``image, target = transforms(image, target)``.
        with_masks: also return instance masks decoded from polygons or RLE.
        store: the file's already opened store (default: `load_coco_annotations(annotations)`).

    Example:
        >>> dataset = CocoDetection("val2017", "instances_val2017.json", with_masks=True)
        >>> image, target = dataset[0]
        >>> image.shape, target["boxes"].shape, target["masks"].shape
        (torch.Size([3, H, W]), torch.Size([N, 4]), torch.Size([N, H, W]))
    """

    def __init__(
        self,
        images: str | os.PathLike,
        annotations: str | os.PathLike,
        transforms: Callable | None = None,
        with_masks: bool = False,
        store: CocoAnnotations | None = None,
    ) -> None:
        self.images = Path(images)
        self.annotations = Path(annotations)
        self.transforms = transforms
        self.with_masks = with_masks
        self.store = store if store is not None else load_coco_annotations(self.annotations)
        check_images_exist(self.store, self.images)
        self.label_to_category_id = contiguous_labels(self.store.categories)
        self.category_id_to_label = {c: label for label, c in self.label_to_category_id.items()}
        self.class_names = [BACKGROUND, *(c["name"] for c in self.store.categories)]
        self._kept = self._select_annotations()

    @property
    def ids(self) -> list[int]:
        """Image ids in index order (ascending)."""
        return self.store.image_ids.tolist()

    @property
    def num_classes(self) -> int:
        """Number of categories plus one for the background."""
        return len(self.class_names)

    def __len__(self) -> int:
        return self.store.num_images

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        height, width = int(self.store.heights[index]), int(self.store.widths[index])
        pixels = read_rgb_image(self.images / self.store.file_name(index), height, width)
        image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())  # (3, H, W)
        target = self.target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def target(self, index: int) -> dict[str, Any]:
        """The target of image ``index`` before the transforms, without reading the image."""
        store = self.store
        height, width = int(store.heights[index]), int(store.widths[index])
        start, stop = store.annotation_range(index)
        kept = np.flatnonzero(self._kept[start:stop]) + start
        boxes = clip_xyxy(store.bboxes[kept], width, height).astype(np.float32)
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY", canvas_size=(height, width)),
            "labels": torch.from_numpy(store.label_of(store.category_ids[kept])),
            "image_id": int(store.image_ids[index]),
            "orig_size": torch.tensor([height, width]),
        }
        if self.with_masks:
            masks = [store.mask(a, height, width) for a in kept.tolist()]
            stacked = np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(stacked))  # (N, H, W)
        return target

    def aspect_ratio_group_ids(self) -> list[int]:
        """Group per index from the JSON sizes: 0 when width >= height, else 1."""
        return (self.store.widths < self.store.heights).astype(np.int64).tolist()

    def _select_annotations(self) -> np.ndarray:
        """Which annotations are training targets: not crowd, a box with area (and a mask, with masks)."""
        store = self.store
        boxes = store.boxes_xyxy()
        has_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        dropped = store.annotation_ids[~store.iscrowd & ~has_area].tolist()
        self.num_dropped_boxes = len(dropped)
        if dropped:
            logger.warning(
                "%s: dropped %d box(es) with zero or negative width or height inside the image (annotation ids %s)",
                self.annotations, len(dropped), names_and_more(dropped),
            )  # fmt: skip
        kept = ~store.iscrowd & has_area
        if self.with_masks:
            store.check_segmentations(kept)
            without_mask = kept & ~store.has_mask()
            if without_mask.any():
                ids = store.annotation_ids[without_mask].tolist()
                logger.warning(
                    "%s: dropped %d annotation(s) left without a valid polygon from the mask targets "
                    "(annotation ids %s)", self.annotations, len(ids), names_and_more(ids),
                )  # fmt: skip
            kept &= ~without_mask
        return kept


def collate(batch: Sequence[tuple[Any, Any]]) -> tuple[list, list]:
    """Batches detection samples as ``(list of images, list of targets)``."""
    return [image for image, _ in batch], [target for _, target in batch]
