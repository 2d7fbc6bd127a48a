"""CocoSegmentation's masks are those of torchvision's segmentation reference, pixel by pixel.

The reference (torchvision `references/segmentation/coco_utils.py`) keeps the annotations of the chosen
categories (`FilterAndRemapCocoCategories`), crowd regions included, and merges them
(`ConvertCocoPolysToMask`): each pixel takes the maximum class over the instances covering it, and 255
where more than one instance covers it, whatever their classes.
"""

import contextlib
import io
import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO

from segmentation.datasets import IGNORE_INDEX, CocoSegmentation
from tests.segmentation.layouts import _image

HEIGHT, WIDTH = 40, 48


def box(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def uncompressed_rle(mask):
    """COCO's crowd encoding: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]]))) if flat.size else []
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def region(rows, cols):
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[rows, cols] = 1
    return uncompressed_rle(mask)


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_overlaps")
    rng = np.random.default_rng(0)
    for name in ("1.jpg", "2.jpg"):
        _image(root / "images" / name, rng)
    annotations = [
        (1, box(0, 0, 20, 20), 0),  # a
        (1, box(10, 10, 30, 30), 0),  # overlaps a: the same class
        (2, box(25, 25, 40, 38), 0),  # overlaps the one before: another class
        (1, region(slice(30, 38), slice(0, 10)), 1),  # a crowd region alone
        (2, region(slice(0, 5), slice(15, 25)), 1),  # a crowd region over a
        (3, box(5, 5, 12, 12), 0),  # over a, of a category left out below
    ]
    coco = {
        "images": [{"id": 1, "file_name": "1.jpg", "height": HEIGHT, "width": WIDTH},
                   {"id": 2, "file_name": "2.jpg", "height": HEIGHT, "width": WIDTH}],
        "annotations": [{"id": i + 1, "image_id": 1, "category_id": c, "segmentation": s, "iscrowd": crowd,
                         "bbox": [0, 0, 1, 1], "area": 1} for i, (c, s, crowd) in enumerate(annotations)],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
    }  # fmt: skip
    (root / "instances.json").write_text(json.dumps(coco))
    return root / "images", root / "instances.json"


def torchvision_reference_mask(coco, image_id, category_ids):
    """torchvision's FilterAndRemapCocoCategories + ConvertCocoPolysToMask, in numpy."""
    info = coco.imgs[image_id]
    height, width = info["height"], info["width"]
    annotations = [a for a in coco.imgToAnns[image_id] if a["category_id"] in category_ids]
    if not annotations:
        return np.zeros((height, width), np.uint8)
    masks = []
    for annotation in annotations:
        rles = mask_utils.frPyObjects(annotation["segmentation"], height, width)
        mask = mask_utils.decode(rles)
        masks.append((mask[..., None] if mask.ndim < 3 else mask).any(axis=2))
    masks = np.stack(masks).astype(np.uint8)
    classes = np.array([category_ids.index(a["category_id"]) + 1 for a in annotations], np.uint8)
    target = (masks * classes[:, None, None]).max(axis=0)
    target[masks.sum(axis=0) > 1] = 255
    return target


@pytest.mark.parametrize("category_ids", [None, [2, 1]], ids=["all", "subset"])
def test_masks_equal_torchvision_reference(coco_files, category_ids):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(coco_files[1]))
    dataset = CocoSegmentation(*coco_files, category_ids=category_ids)
    chosen = category_ids or [1, 2, 3]
    for image_id in (1, 2):
        np.testing.assert_array_equal(
            dataset.semantic_mask(image_id), torchvision_reference_mask(coco, image_id, chosen)
        )
    mask = dataset.semantic_mask(1)
    a = chosen.index(1) + 1
    assert (mask[10:20, 10:20] == IGNORE_INDEX).all()  # two instances of one class overlap: ignored
    assert (mask[30:38, 0:10] == a).all()  # a crowd region is its class
    assert (mask[0:5, 15:20] == IGNORE_INDEX).all()  # a crowd region over an instance: an overlap
    assert (mask[5:10, 5:10] == (IGNORE_INDEX if category_ids is None else a)).all()  # a category left out
