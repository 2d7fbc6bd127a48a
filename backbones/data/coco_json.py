"""Parsing and validating a COCO instances JSON into the flat arrays of `backbones.data.coco.CocoAnnotations`.

Every error names the file, and for an entry its id (or position) and the field. Polygons with fewer than
3 points or an odd number of coordinates are left out, as detectron2 does (pycocotools would read a
2-point polygon as a box and fail, and silently drop the last number of an odd one); their annotation
ids are kept for one warning. The checks run on whole columns; the slow, per-entry ones run only to
name the culprit once a column fails.
"""

from __future__ import annotations

import contextlib
import gc
import json
from itertools import chain
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
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise AnnotationFileError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from error
    except UnicodeDecodeError as error:
        raise AnnotationFileError(f"{path}: not a JSON text file (byte {error.start} is not UTF-8)") from error


def _check_entry(entry: Any, key: str, position: int, path: Path) -> None:
    missing = [field for field in REQUIRED_KEYS[key] if not isinstance(entry, dict) or field not in entry]
    if missing:
        raise AnnotationFileError(f"{path}: '{key}' entry #{position} lacks {missing}: {entry}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_references(annotation: dict, category_ids: set, images: dict, path: Path) -> None:
    if annotation["category_id"] not in category_ids:
        raise AnnotationFileError(
            f"{path}: annotation id {annotation['id']} has category_id {annotation['category_id']}, "
            f"which is not among the categories; allowed ids: {sorted(category_ids)}"
        )
    if annotation["image_id"] not in images:
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


def _malformed_segmentation(annotation: dict, path: Path) -> AnnotationFileError:
    return AnnotationFileError(
        f"{path}: annotation id {annotation['id']} has a segmentation that is neither a list of polygons "
        f"([[x0, y0, x1, y1, ...], ...]) nor an RLE ({{'size': [height, width], 'counts': ...}}): "
        f"{str(annotation['segmentation'])[:80]}"
    )


def _rle_bytes(annotation: dict, height: int, width: int, path: Path) -> tuple[bytes, list[int]]:
    rle = annotation["segmentation"]
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and isinstance(counts, (str, list))):
        raise _malformed_segmentation(annotation, path)
    if size != [height, width]:
        raise AnnotationFileError(
            f"{path}: annotation id {annotation['id']} has a {size[0]}x{size[1]} (HxW) mask, "
            f"but its image {annotation['image_id']} is {height}x{width}"
        )
    # Uncompressed counts (crowd regions) are compressed as pycocotools' annToRLE does.
    return (counts.encode() if isinstance(counts, str) else mask_utils.frPyObjects(rle, height, width)["counts"]), size


def _segmentations(annotations: list, order: list[int], heights: np.ndarray, widths: np.ndarray, image_of: np.ndarray,
                   path: Path) -> dict[str, np.ndarray]:  # fmt: skip
    """The polygons and RLEs of the annotations taken in ``order``, in flat arrays."""
    kinds, polygon_counts, rle_index = [], [], []
    polygons, degenerate, rles, rle_sizes = [], [], [], []
    for k in order:
        annotation = annotations[k]
        segmentation = annotation.get("segmentation")
        if type(segmentation) is list:
            good = [p for p in segmentation if type(p) is list and len(p) >= 6 and not len(p) % 2]
            if len(good) < len(segmentation):
                if not all(type(p) is list for p in segmentation):
                    raise _malformed_segmentation(annotation, path)
                degenerate += [annotation["id"]] * (len(segmentation) - len(good))
            polygons += good
            kinds.append(SEGMENTATION_POLYGONS)
            polygon_counts.append(len(good))
            rle_index.append(-1)
        elif type(segmentation) is dict:
            image = image_of[k]
            data, size = _rle_bytes(annotation, int(heights[image]), int(widths[image]), path)
            kinds.append(SEGMENTATION_RLE)
            polygon_counts.append(0)
            rle_index.append(len(rles))
            rles.append(data)
            rle_sizes.append(size)
        elif segmentation is None:
            kinds.append(SEGMENTATION_NONE)
            polygon_counts.append(0)
            rle_index.append(-1)
        else:
            raise _malformed_segmentation(annotation, path)
    lengths = np.fromiter(map(len, polygons), np.int64, len(polygons))
    try:
        coords = np.fromiter(chain.from_iterable(polygons), np.float64, int(lengths.sum()))
    except (TypeError, ValueError):
        culprit = next(annotations[k] for k in order if not _numbers_only(annotations[k].get("segmentation")))
        raise _malformed_segmentation(culprit, path) from None
    return {
        "segmentation_kind": np.array(kinds, np.uint8),
        "polygon_starts": np.cumsum([0, *polygon_counts], dtype=np.int64),
        "polygon_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "polygon_coords": coords,
        "rle_index": np.array(rle_index, np.int64),
        "rle_offsets": np.cumsum([0, *map(len, rles)], dtype=np.int64),
        "rle_sizes": np.array(rle_sizes, np.int32).reshape(-1, 2),
        "rle_bytes": np.frombuffer(b"".join(rles), np.uint8),
        "degenerate_polygon_ids": np.array(degenerate, np.int64),
    }


def _numbers_only(segmentation: Any) -> bool:
    return not isinstance(segmentation, list) or all(map(_is_number, chain.from_iterable(segmentation)))


def _annotation_columns(annotations: list, category_ids: set, position_of: dict, path: Path):
    """Ids, image positions, category ids and boxes of every annotation, checked; errors name the first culprit."""
    try:
        ids, images, categories, bboxes = ([a[f] for a in annotations] for f in REQUIRED_KEYS["annotations"])
    except (KeyError, TypeError):
        for position, entry in enumerate(annotations):
            _check_entry(entry, "annotations", position, path)
        raise
    image_of = np.fromiter((position_of.get(i, -1) for i in images), np.int64, len(images))
    known = np.fromiter((c in category_ids for c in categories), bool, len(categories))
    try:
        boxes = np.array(bboxes, np.float64).reshape(-1, 4)
        boxes_ok = boxes.shape[0] == len(bboxes) and all(type(b) is list and len(b) == 4 for b in bboxes)
    except (TypeError, ValueError):
        boxes_ok = False
    bad = np.flatnonzero(~known | (image_of < 0))
    for index in [*bad[:1].tolist(), *([] if boxes_ok else range(len(annotations)))]:
        _check_references(annotations[index], category_ids, position_of, path)  # raises for the culprit
    return np.array(ids, np.int64), image_of, np.array(categories, np.int64), boxes


@contextlib.contextmanager
def _collector_paused():
    """Parsing makes millions of containers and no reference cycles: the cyclic garbage collector would
    only rescan the growing heap again and again (a third of the time of a COCO-train-size file)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def build_arrays(path: Path) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Parses and validates a COCO instances JSON; returns the store's arrays and the sorted categories."""
    with _collector_paused():
        return _build_arrays(path)


def _build_arrays(path: Path) -> tuple[dict[str, np.ndarray], list[dict]]:
    dataset = _read_json(path)
    if not isinstance(dataset, dict):
        raise AnnotationFileError(f"{path}: top level is {type(dataset).__name__}, expected a JSON object")
    for key in REQUIRED_KEYS:
        if key not in dataset:
            raise AnnotationFileError(f"{path}: missing the top-level key '{key}'")
    for position, entry in enumerate(dataset["categories"]):
        _check_entry(entry, "categories", position, path)
    categories = sorted(dataset["categories"], key=lambda c: c["id"])
    sizes = _images(dataset["images"], path)
    image_ids = sorted(sizes)
    position_of = {image_id: position for position, image_id in enumerate(image_ids)}
    heights = np.array([sizes[i][0] for i in image_ids], np.int32)
    widths = np.array([sizes[i][1] for i in image_ids], np.int32)

    annotations = dataset["annotations"]
    ids, image_of, category, bboxes = _annotation_columns(annotations, {c["id"] for c in categories}, position_of, path)
    order = np.argsort(image_of, kind="stable")  # by image, each image's annotations in file order
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in annotations])
    segmentations = _segmentations(annotations, order.tolist(), heights, widths, image_of, path)

    names = [sizes[i][2].encode() for i in image_ids]
    return {
        "image_ids": np.array(image_ids, np.int64),
        "heights": heights,
        "widths": widths,
        "file_name_offsets": np.cumsum([0, *map(len, names)], dtype=np.int64),
        "file_name_bytes": np.frombuffer(b"".join(names), np.uint8),
        "annotation_starts": np.searchsorted(image_of[order], np.arange(len(image_ids) + 1)).astype(np.int64),
        "annotation_ids": ids[order],
        "category_ids": category[order],
        "bboxes": bboxes[order],
        "iscrowd": crowd[order].astype(bool),
        **segmentations,
    }, categories
