"""Parsing and validating a COCO instances JSON into the flat arrays of `backbones.data.coco.CocoAnnotations`.

Every error names the file, and for an entry its id (or position) and the field. Polygons with fewer than
3 points or an odd number of coordinates are left out, as detectron2 does (pycocotools would read a
2-point polygon as a box and fail, and silently drop the last number of an odd one); their annotation
ids are kept for one warning.
"""

from __future__ import annotations

import json
from array import array
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

__all__ = [
    "MAX_NAMES_IN_ERROR",
    "REQUIRED_KEYS",
    "SEGMENTATION_NONE",
    "SEGMENTATION_POLYGONS",
    "SEGMENTATION_RLE",
    "AnnotationFileError",
    "build_arrays",
    "names_and_more",
]

REQUIRED_KEYS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}
MAX_NAMES_IN_ERROR = 5
SEGMENTATION_NONE, SEGMENTATION_POLYGONS, SEGMENTATION_RLE = 0, 1, 2


class AnnotationFileError(ValueError):
    """A COCO annotation file is malformed or inconsistent."""


def names_and_more(names: list) -> str:
    """The first few of ``names`` joined by commas, with ", ..." when some are left out."""
    shown = ", ".join(map(str, names[:MAX_NAMES_IN_ERROR]))
    return shown + (", ..." if len(names) > MAX_NAMES_IN_ERROR else "")


def _read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise AnnotationFileError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from error


def _check_entry(entry: Any, key: str, position: int, path: Path) -> None:
    missing = [field for field in REQUIRED_KEYS[key] if not isinstance(entry, dict) or field not in entry]
    if missing:
        raise AnnotationFileError(f"{path}: '{key}' entry #{position} lacks {missing}: {entry}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_references(annotation: dict, category_ids: set, sizes: dict, path: Path) -> None:
    if annotation["category_id"] not in category_ids:
        raise AnnotationFileError(
            f"{path}: annotation id {annotation['id']} has category_id {annotation['category_id']}, "
            f"which is not among the categories; allowed ids: {sorted(category_ids)}"
        )
    if annotation["image_id"] not in sizes:
        raise AnnotationFileError(
            f"{path}: annotation id {annotation['id']} refers to image_id "
            f"{annotation['image_id']}, which is not among the images"
        )
    bbox = annotation["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(map(_is_number, bbox)):
        raise AnnotationFileError(
            f"{path}: annotation id {annotation['id']} has bbox {bbox}; expected 4 numbers [x, y, width, height]"
        )


def _images(entries: list, path: Path) -> dict[Any, tuple[int, int, str]]:
    sizes = {}
    for position, entry in enumerate(entries):
        _check_entry(entry, "images", position, path)
        height, width = entry["height"], entry["width"]
        if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
            raise AnnotationFileError(
                f"{path}: image id {entry['id']} has height {height} and width {width}; expected positive integers"
            )
        sizes[entry["id"]] = (height, width, entry["file_name"])  # a repeated id: the last wins, as in pycocotools
    return sizes


class _Segmentations:
    """Accumulates polygons and RLEs in compact arrays, annotation by annotation."""

    def __init__(self, path: Path):
        self.path = path
        self.kind = array("B")
        self.polygon_starts, self.polygon_offsets, self.coords = array("q", [0]), array("q", [0]), array("d")
        self.rle_index, self.rle_offsets, self.rle_sizes, self.rle_bytes = array("q"), array("q", [0]), array("i"), []
        self.rle_length = 0
        self.degenerate_ids = array("q")

    def _malformed(self, annotation: dict) -> AnnotationFileError:
        return AnnotationFileError(
            f"{self.path}: annotation id {annotation['id']} has a segmentation that is neither a list of polygons "
            f"([[x0, y0, x1, y1, ...], ...]) nor an RLE ({{'size': [height, width], 'counts': ...}}): "
            f"{str(annotation['segmentation'])[:80]}"
        )

    def add(self, annotation: dict, height: int, width: int) -> None:
        segmentation = annotation.get("segmentation")
        rle = -1
        if isinstance(segmentation, list):
            self.kind.append(SEGMENTATION_POLYGONS)
            for polygon in segmentation:
                if not isinstance(polygon, list):
                    raise self._malformed(annotation)
                if len(polygon) < 6 or len(polygon) % 2:
                    self.degenerate_ids.append(annotation["id"])
                    continue
                try:
                    self.coords.extend(polygon)
                except TypeError as error:
                    raise self._malformed(annotation) from error
                self.polygon_offsets.append(len(self.coords))
        elif isinstance(segmentation, dict):
            self.kind.append(SEGMENTATION_RLE)
            rle = self._add_rle(annotation, segmentation, height, width)
        elif segmentation is None:
            self.kind.append(SEGMENTATION_NONE)
        else:
            raise self._malformed(annotation)
        self.polygon_starts.append(len(self.polygon_offsets) - 1)
        self.rle_index.append(rle)

    def _add_rle(self, annotation: dict, rle: dict, height: int, width: int) -> int:
        size, counts = rle.get("size"), rle.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and isinstance(counts, (str, list))):
            raise self._malformed(annotation)
        if size != [height, width]:
            raise AnnotationFileError(
                f"{self.path}: annotation id {annotation['id']} has a {size[0]}x{size[1]} (HxW) mask, "
                f"but its image {annotation['image_id']} is {height}x{width}"
            )
        # Uncompressed counts (crowd regions) are compressed as pycocotools' annToRLE does.
        data = counts.encode() if isinstance(counts, str) else mask_utils.frPyObjects(rle, height, width)["counts"]
        self.rle_bytes.append(data)
        self.rle_length += len(data)
        self.rle_offsets.append(self.rle_length)
        self.rle_sizes.extend(size)
        return len(self.rle_offsets) - 2

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "segmentation_kind": np.frombuffer(self.kind, np.uint8),
            "polygon_starts": np.frombuffer(self.polygon_starts, np.int64),
            "polygon_offsets": np.frombuffer(self.polygon_offsets, np.int64),
            "polygon_coords": np.frombuffer(self.coords, np.float64),
            "rle_index": np.frombuffer(self.rle_index, np.int64),
            "rle_offsets": np.frombuffer(self.rle_offsets, np.int64),
            "rle_sizes": np.frombuffer(self.rle_sizes, np.int32).reshape(-1, 2),
            "rle_bytes": np.frombuffer(b"".join(self.rle_bytes), np.uint8),
            "degenerate_polygon_ids": np.frombuffer(self.degenerate_ids, np.int64),
        }


def build_arrays(path: Path) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Parses and validates a COCO instances JSON; returns the store's arrays and the sorted categories.

    Annotation dicts are released as they are copied into the arrays, so the peak memory is the
    parsed JSON's rather than the JSON's plus an index's.
    """
    dataset = _read_json(path)
    if not isinstance(dataset, dict):
        raise AnnotationFileError(f"{path}: top level is {type(dataset).__name__}, expected a JSON object")
    for key in REQUIRED_KEYS:
        if key not in dataset:
            raise AnnotationFileError(f"{path}: missing the top-level key '{key}'")
    for position, entry in enumerate(dataset["categories"]):
        _check_entry(entry, "categories", position, path)
    categories = sorted(dataset["categories"], key=lambda c: c["id"])
    category_ids = {c["id"] for c in categories}
    sizes = _images(dataset["images"], path)
    image_ids = sorted(sizes)
    position_of = {image_id: position for position, image_id in enumerate(image_ids)}

    annotations = dataset["annotations"]
    image_of = np.empty(len(annotations), np.int64)
    for index, annotation in enumerate(annotations):
        _check_entry(annotation, "annotations", index, path)
        _check_references(annotation, category_ids, sizes, path)
        image_of[index] = position_of[annotation["image_id"]]
    order = np.argsort(image_of, kind="stable")  # by image, each image's annotations in file order

    ids, category, bboxes, crowd = array("q"), array("q"), array("d"), array("B")
    segmentations = _Segmentations(path)
    for index in order.tolist():
        annotation, annotations[index] = annotations[index], None
        ids.append(annotation["id"])
        category.append(annotation["category_id"])
        bboxes.extend(annotation["bbox"])
        crowd.append(bool(annotation.get("iscrowd", 0)))
        height, width, _ = sizes[annotation["image_id"]]
        segmentations.add(annotation, height, width)

    names = [sizes[i][2].encode() for i in image_ids]
    arrays = {
        "image_ids": np.array(image_ids, np.int64),
        "heights": np.array([sizes[i][0] for i in image_ids], np.int32),
        "widths": np.array([sizes[i][1] for i in image_ids], np.int32),
        "file_name_offsets": np.cumsum([0, *map(len, names)], dtype=np.int64),
        "file_name_bytes": np.frombuffer(b"".join(names), np.uint8),
        "annotation_starts": np.searchsorted(image_of[order], np.arange(len(image_ids) + 1)).astype(np.int64),
        "annotation_ids": np.frombuffer(ids, np.int64),
        "category_ids": np.frombuffer(category, np.int64),
        "bboxes": np.frombuffer(bboxes, np.float64).reshape(-1, 4),
        "iscrowd": np.frombuffer(crowd, np.bool_),
        **segmentations.arrays(),
    }
    return arrays, categories
