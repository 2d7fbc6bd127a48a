"""Detector outputs as COCO results: conversion from torchvision-style predictions, mask RLEs, validation.

A COCO result is one detection: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score`` and, for
masks, ``segmentation`` as a compressed RLE. ``detection.evaluation`` scores them and re-exports these names.
Nothing here imports torch: tensors are duck-typed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_util

__all__ = [
    "IOU_TYPES",
    "binarize_masks",
    "check_iou_types",
    "encode_masks",
    "to_coco_results",
    "validate_results",
]

IOU_TYPES = ("bbox", "segm")
_RESULT_FIELD = {"bbox": "bbox", "segm": "segmentation"}  # what COCOeval reads in a result, per iou type


def check_iou_types(iou_types: Iterable[str]) -> tuple[str, ...]:
    """Return ``iou_types`` as a tuple without repeats, or raise a ValueError naming the bad value."""
    iou_types = tuple(dict.fromkeys([iou_types] if isinstance(iou_types, str) else iou_types))
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown or not iou_types:
        raise ValueError(f"iou_types={iou_types!r}; choose one or more of {IOU_TYPES}")
    return iou_types


def to_coco_results(
    predictions: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    label_to_category_id: Mapping[int, int] | None = None,
    iou_types: Iterable[str] = ("bbox",),
    *,
    mask_threshold: float = 0.5,
) -> list[dict]:
    """Convert torchvision-style predictions to COCO results.

    Args:
        predictions: One dict per image with ``boxes`` (N, 4) XYXY in original image pixels, ``scores`` (N,),
            ``labels`` (N,) and, for ``"segm"``, ``masks``: (N, 1, H, W) probabilities or (N, H, W) bool/uint8.
            Tensors (on any device) or arrays.
        image_ids: The COCO image id of each prediction.
        label_to_category_id: Model label -> COCO category id; ``None`` means labels are category ids.
        iou_types: ``"segm"`` adds an RLE ``segmentation`` to each result.
        mask_threshold: Probability above which a mask pixel is foreground.

    Returns:
        One dict per detection: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score`` and, for
        ``"segm"``, ``segmentation`` {"size": [H, W], "counts": str}; plain Python values, ready for JSON.
    """
    if len(predictions) != len(image_ids):
        raise ValueError(f"{len(predictions)} predictions for {len(image_ids)} image ids; pass one id per image")
    with_masks = "segm" in check_iou_types(iou_types)
    results = []
    for prediction, image_id in zip(predictions, image_ids, strict=True):
        results += _image_results(prediction, image_id, label_to_category_id, with_masks, mask_threshold)
    return results


def _image_results(prediction, image_id, label_to_category_id, with_masks, mask_threshold) -> list[dict]:
    boxes = _to_numpy(prediction["boxes"]).astype(np.float64).reshape(-1, 4)
    boxes[:, 2:] -= boxes[:, :2]  # XYXY -> XYWH
    category_ids = [_category_id(label, label_to_category_id) for label in _to_numpy(prediction["labels"]).tolist()]
    results = [
        {"image_id": int(image_id), "category_id": category_id, "bbox": box, "score": score}
        for category_id, box, score in zip(
            category_ids, boxes.tolist(), _to_numpy(prediction["scores"]).tolist(), strict=True
        )
    ]
    if with_masks:
        if "masks" not in prediction:
            raise ValueError(f"iou type 'segm' needs 'masks' in the predictions; image {image_id} has none")
        rles = encode_masks(binarize_masks(prediction["masks"], mask_threshold))
        if len(rles) != len(results):
            raise ValueError(f"image {image_id}: {len(rles)} masks for {len(results)} boxes")
        for result, rle in zip(results, rles, strict=True):
            result["segmentation"] = rle
    return results


def _category_id(label: int, label_to_category_id: Mapping[int, int] | None) -> int:
    if label_to_category_id is None:
        return int(label)
    if label not in label_to_category_id:
        raise ValueError(f"label {label} is not in label_to_category_id (labels: {sorted(label_to_category_id)})")
    return int(label_to_category_id[label])


def binarize_masks(masks: Any, threshold: float = 0.5) -> np.ndarray:
    """Turn (N, 1, H, W) probabilities or (N, H, W) bool/uint8/float masks into an (N, H, W) uint8 array."""
    if masks.ndim == 4:
        masks = masks[:, 0]
    if str(masks.dtype).removeprefix("torch.") not in ("bool", "uint8"):
        masks = masks > threshold  # thresholded where the masks live, so a GPU sends 1 byte a pixel
    return _to_numpy(masks).astype(np.uint8, copy=False)


def encode_masks(masks: np.ndarray) -> list[dict]:
    """Encode (N, H, W) binary masks as compressed RLEs whose ``counts`` is a str (JSON-serialisable)."""
    if len(masks) == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8, copy=False)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def validate_results(results: Any, coco_gt: Any, iou_types: Iterable[str] = ("bbox",), *, source="results") -> None:
    """Raise a ValueError naming the first result that COCOeval cannot score against ``coco_gt``.

    Checks the structure (a list of dicts with ``image_id``, ``category_id``, ``score`` and the fields of each
    iou type), that each ``image_id`` is an image and each ``category_id`` a category of the annotations, and
    that each mask is a compressed RLE of its image's size.
    """
    if not isinstance(results, list):
        raise ValueError(f"{source}: expected a list of results, got {type(results).__name__}")
    iou_types = check_iou_types(iou_types)
    required = {"image_id", "category_id", "score"} | {_RESULT_FIELD[t] for t in iou_types}
    category_ids = set(coco_gt.getCatIds())
    for index, result in enumerate(results):
        where = f"{source}: result {index}"
        if not isinstance(result, dict) or not required <= result.keys():
            missing = sorted(required - result.keys()) if isinstance(result, dict) else sorted(required)
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        image = coco_gt.imgs.get(result["image_id"])
        if image is None:
            raise ValueError(f"{where} has image_id {result['image_id']!r}, not an image of the annotations")
        if result["category_id"] not in category_ids:
            raise ValueError(
                f"{where} has category_id {result['category_id']!r}, "
                f"not among the annotation categories {sorted(category_ids)}"
            )
        if not isinstance(result["score"], (int, float)) or not math.isfinite(result["score"]):
            raise ValueError(f"{where} has score {result['score']!r}, not a finite number")
        if "bbox" in iou_types and not _is_xywh(result["bbox"]):
            raise ValueError(
                f"{where} has bbox {result['bbox']!r}, not a list [x, y, w, h] of finite numbers, w, h >= 0"
            )
        if "segm" in iou_types:
            _check_rle(result["segmentation"], (image["height"], image["width"]), where)


def _is_xywh(box: Any) -> bool:
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        return False
    return all(math.isfinite(v) for v in box) and box[2] >= 0 and box[3] >= 0


def _check_rle(segmentation: Any, image_size: tuple[int, int], where: str) -> None:
    if not isinstance(segmentation, dict) or not isinstance(segmentation.get("counts"), str):
        raise ValueError(f"{where}: segmentation must be a compressed RLE {{'size': [H, W], 'counts': str}}")
    if list(segmentation.get("size", ())) != list(image_size):
        raise ValueError(f"{where}: segmentation size {segmentation.get('size')} is not the image's {list(image_size)}")


def _to_numpy(values: Any) -> np.ndarray:
    # Duck-typed so that scoring a JSON file (tools/eval_det.py) does not pay for importing torch.
    if hasattr(values, "detach"):
        values = values.detach().cpu()
        if values.is_floating_point() and values.element_size() < 4:  # bf16/fp16 under autocast: numpy has no bf16
            values = values.float()
        return values.numpy()
    return np.asarray(values)
