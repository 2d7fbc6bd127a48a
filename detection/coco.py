"""COCO-format detection files and dataset: reading and validating the JSON, the dataset, batching.

Images are decoded with OpenCV; targets follow torchvision's detection convention
(``boxes`` XYXY in pixels, ``labels`` in 1..K with 0 the background, ``masks`` (N, H, W)).
COCO category ids, which need not be contiguous, are mapped to labels in id order.
The Lightning data modules that serve them are in ``detection.data``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors

from backbones.data.images import read_rgb_image

__all__ = [
    "MAX_NAMES_IN_ERROR",
    "REQUIRED_KEYS",
    "AnnotationFileError",
    "CocoDetection",
    "collate",
    "contiguous_labels",
    "load_coco",
]

logger = logging.getLogger(__name__)

REQUIRED_KEYS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}
MAX_NAMES_IN_ERROR = 5


class AnnotationFileError(ValueError):
    """A COCO annotation file is malformed or inconsistent."""


def load_coco(path: str | os.PathLike) -> COCO:
    """Loads and validates a COCO annotation file.

    Raises:
        FileNotFoundError: the file does not exist.
        AnnotationFileError: invalid JSON (with line and column), a missing top-level
            key or entry field, or an annotation referring to an unknown category or image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        with open(path) as f:
            dataset = json.load(f)
    except json.JSONDecodeError as error:
        raise AnnotationFileError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from error
    _check_structure(dataset, path)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    _check_references(coco, path)
    return coco


def _check_structure(dataset: Any, path: Path) -> None:
    if not isinstance(dataset, dict):
        raise AnnotationFileError(f"{path}: top level is {type(dataset).__name__}, expected a JSON object")
    for key, fields in REQUIRED_KEYS.items():
        if key not in dataset:
            raise AnnotationFileError(f"{path}: missing the top-level key '{key}'")
        for position, entry in enumerate(dataset[key]):
            missing = [field for field in fields if field not in entry]
            if missing:
                raise AnnotationFileError(f"{path}: '{key}' entry #{position} lacks {missing}: {entry}")


def _check_references(coco: COCO, path: Path) -> None:
    for annotation in coco.dataset["annotations"]:
        if annotation["category_id"] not in coco.cats:
            raise AnnotationFileError(
                f"{path}: annotation id {annotation['id']} has category_id {annotation['category_id']}, "
                f"which is not among the categories; allowed ids: {sorted(coco.cats)}"
            )
        if annotation["image_id"] not in coco.imgs:
            raise AnnotationFileError(
                f"{path}: annotation id {annotation['id']} refers to image_id "
                f"{annotation['image_id']}, which is not among the images"
            )


def contiguous_labels(categories: Iterable[dict]) -> dict[int, int]:
    """Maps contiguous labels 1..K to COCO category ids, in id order (0 is background).

    Example:
        >>> contiguous_labels([{"id": 7}, {"id": 1}, {"id": 3}])
        {1: 1, 2: 3, 3: 7}
    """
    return {label: category_id for label, category_id in enumerate(sorted(c["id"] for c in categories), 1)}


def _xyxy_in_image(bbox: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    x, y, w, h = bbox
    return (min(max(x, 0), width), min(max(y, 0), height), min(max(x + w, 0), width), min(max(y + h, 0), height))


def _has_area(box: tuple[float, float, float, float]) -> bool:
    return box[2] > box[0] and box[3] > box[1]


class CocoDetection(Dataset):
    """A COCO-format detection dataset.

    Crowd annotations are left out of the targets (COCO evaluation still reads them from
    the JSON); boxes are clipped to the image and those left without area are dropped.
    Images without annotations are kept with empty targets.

    Args:
        images: folder that ``file_name`` entries are relative to.
        annotations: COCO instances JSON file.
        transforms: called as ``image, target = transforms(image, target)``.
        with_masks: also return instance masks decoded from polygons or RLE.

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
    ) -> None:
        self.images = Path(images)
        self.annotations = Path(annotations)
        self.transforms = transforms
        self.with_masks = with_masks
        self.coco = load_coco(self.annotations)
        self.ids = sorted(self.coco.imgs)
        self._check_images_exist()
        self.label_to_category_id = contiguous_labels(self.coco.dataset["categories"])
        self.category_id_to_label = {c: label for label, c in self.label_to_category_id.items()}
        names = [self.coco.cats[c]["name"] for c in self.label_to_category_id.values()]
        self.category_names = ["__background__", *names]
        self._targets, dropped = self._select_annotations()
        self.num_dropped_boxes = len(dropped)
        if dropped:
            logger.warning(
                "%s: dropped %d box(es) with zero or negative width or height inside the image (annotation ids %s)",
                self.annotations,
                len(dropped),
                ", ".join(map(str, dropped[:MAX_NAMES_IN_ERROR]))
                + (", ..." if len(dropped) > MAX_NAMES_IN_ERROR else ""),
            )

    @property
    def num_classes(self) -> int:
        """Number of categories plus one for the background."""
        return len(self.category_names)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        height, width = info["height"], info["width"]
        pixels = read_rgb_image(self.images / info["file_name"], height, width)
        image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())  # (3, H, W)
        annotations = self._targets[image_id]
        boxes = [_xyxy_in_image(a["bbox"], width, height) for a in annotations]
        labels = [self.category_id_to_label[a["category_id"]] for a in annotations]
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": image_id,
            "orig_size": torch.tensor([height, width]),
        }
        if self.with_masks:
            target["masks"] = tv_tensors.Mask(self._masks(annotations, height, width))  # (N, H, W)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def aspect_ratio_group_ids(self) -> list[int]:
        """Group per index from the JSON sizes: 0 when width >= height, else 1."""
        return [0 if self.coco.imgs[i]["width"] >= self.coco.imgs[i]["height"] else 1 for i in self.ids]

    def _check_images_exist(self) -> None:
        if not self.images.is_dir():
            raise FileNotFoundError(f"image folder {self.images} (for {self.annotations}) does not exist")
        present = set(os.listdir(self.images))
        names = [self.coco.imgs[i]["file_name"] for i in self.ids]
        missing = [n for n in names if n not in present and not (self.images / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(names)} images listed in {self.annotations} are missing "
                f"from {self.images}, e.g. {', '.join(missing[:MAX_NAMES_IN_ERROR])}"
            )

    def _select_annotations(self) -> tuple[dict[int, list[dict]], list[int]]:
        """Per image, the annotations used as training targets; also the ids of the dropped boxes."""
        targets, dropped = {}, []
        for image_id in self.ids:
            info = self.coco.imgs[image_id]
            kept = []
            for annotation in self.coco.imgToAnns[image_id]:
                if annotation.get("iscrowd", 0):
                    continue
                if _has_area(_xyxy_in_image(annotation["bbox"], info["width"], info["height"])):
                    kept.append(annotation)
                else:
                    dropped.append(annotation["id"])
            targets[image_id] = kept
        return targets, dropped

    def _masks(self, annotations: list[dict], height: int, width: int) -> torch.Tensor:
        if not annotations:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        masks = [self.coco.annToMask(a) for a in annotations]
        for annotation, mask in zip(annotations, masks):
            if mask.shape != (height, width):  # an RLE carries its own size
                raise AnnotationFileError(
                    f"{self.annotations}: annotation id {annotation['id']} has a {mask.shape[0]}x{mask.shape[1]} (HxW) "
                    f"mask, but its image {annotation['image_id']} is {height}x{width}"
                )
        return torch.from_numpy(np.stack(masks))


def collate(batch: Sequence[tuple[Any, Any]]) -> tuple[list, list]:
    """Batches detection samples as ``(list of images, list of targets)``."""
    return [image for image, _ in batch], [target for _, target in batch]
