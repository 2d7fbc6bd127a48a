"""A tiny COCO set with each detection error planted once, for the analysis and report tests.

Three categories, two supercategories: circle and square are "shape", car is "vehicle". Image 1 holds one error
of every TIDE type (Cls, Loc, Both, Dupe, Bkg, Miss), image 2 three true positives (one only at IoU 0.5) and,
with ``crowd``, a crowd region with a detection on it; image 3 is empty. The false positives outscore true
positives, so each fix changes the AP and each analyzer curve lies above the one before it somewhere.
"""

from __future__ import annotations

import json

import numpy as np
from pycocotools import mask as mask_util

SIZE = 200
CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
]
# image id: [(category id, [x, y, w, h])]
OBJECTS = {
    1: [(1, [10, 10, 40, 40]), (2, [100, 100, 40, 40]), (1, [10, 120, 30, 30]), (3, [150, 10, 40, 40]),
        (3, [60, 60, 30, 30])],
    2: [(2, [20, 20, 50, 50]), (3, [100, 20, 60, 40]), (1, [120, 120, 40, 40])],
    3: [],
}  # fmt: skip
CROWD = (2, 2, [150, 150, 40, 40])  # image, category, box
# (image, category, box, score, what it is)
DETECTIONS = [
    (1, 1, [11, 11, 40, 40], 0.90, "TP"),
    (1, 1, [12, 10, 40, 40], 0.80, "Dupe"),
    (1, 1, [101, 101, 40, 40], 0.95, "Cls"),  # a circle on the square: same supercategory
    (1, 3, [175, 10, 40, 40], 0.60, "Loc"),  # IoU 0.23 with its car
    (1, 3, [61, 61, 30, 30], 0.50, "TP"),
    (1, 2, [60, 160, 20, 20], 0.97, "Bkg"),
    (1, 3, [30, 10, 40, 40], 0.70, "Both"),  # a car at IoU 0.33 on the circle: another supercategory
    (2, 2, [21, 21, 50, 50], 0.85, "TP"),
    (2, 3, [100, 22, 60, 40], 0.88, "TP"),
    (2, 1, [126, 126, 40, 40], 0.75, "TP"),  # IoU 0.57: a true positive at 0.5, not at 0.75
]
CROWD_DETECTION = (2, 2, [152, 152, 30, 30], 0.65, "ignored")


def _rle(box: list[float]) -> dict:
    x, y, w, h = box
    mask = np.zeros((SIZE, SIZE), np.uint8, order="F")
    mask[y : y + h, x : x + w] = 1
    rle = mask_util.encode(mask)
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def ground_truth(*, crowd: bool = False) -> dict:
    """The COCO instances dict (polygons for the objects, an RLE for the crowd region)."""
    annotations = []
    for image_id, objects in OBJECTS.items():
        for category_id, (x, y, w, h) in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id, "bbox": [x, y, w, h],
                "area": float(w * h), "iscrowd": 0, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            })  # fmt: skip
    if crowd:
        image_id, category_id, box = CROWD
        annotations.append({"id": 100, "image_id": image_id, "category_id": category_id, "bbox": box,
                            "area": float(box[2] * box[3]), "iscrowd": 1, "segmentation": _rle(box)})  # fmt: skip
    images = [{"id": i, "width": SIZE, "height": SIZE, "file_name": f"{i}.png"} for i in OBJECTS]
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def detections(*, crowd: bool = False) -> list[dict]:
    """The COCO results, with a box and a rectangle mask each."""
    rows = DETECTIONS + [CROWD_DETECTION] * crowd
    return [{"image_id": i, "category_id": c, "bbox": [float(v) for v in box], "score": s, "segmentation": _rle(box)}
            for i, c, box, s, _ in rows]  # fmt: skip


def write(folder, *, crowd: bool = False) -> tuple[str, str]:
    """Write gt.json and results.json into ``folder``; return their paths."""
    gt_path, results_path = folder / "gt.json", folder / "results.json"
    gt_path.write_text(json.dumps(ground_truth(crowd=crowd)))
    results_path.write_text(json.dumps(detections(crowd=crowd)))
    return str(gt_path), str(results_path)
