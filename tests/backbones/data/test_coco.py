"""The COCO annotation store: the same targets as the pycocotools-based readers it replaced, the cache, the checks."""

import contextlib
import io
import json
import logging
import os
import pickle
import time

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from pycocotools.coco import COCO

import backbones.data.coco as coco_store
from backbones.data.coco import AnnotationFileError, load_coco_annotations
from detection.coco import CocoDetection
from segmentation.datasets import IGNORE_INDEX, CocoSegmentation

CATEGORIES = [{"id": 7, "name": "triangle"}, {"id": 1, "name": "circle"}, {"id": 3, "name": "square"}]


def _polygon(rng, height, width):
    points = rng.integers(3, 12)
    centre, radius = rng.uniform([0, 0], [width, height]), rng.uniform(2, 10)
    angles = np.sort(rng.uniform(0, 2 * np.pi, points))
    xy = np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], 1)
    return np.round(xy, 2).ravel().tolist()  # two decimals as in COCO: many are not exact in binary


def _rle(rng, height, width, compressed):
    mask = (rng.random((height, width)) < 0.1).astype(np.uint8)
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask))
        return {"size": rle["size"], "counts": rle["counts"].decode()}
    flat = mask.flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": [height, width], "counts": counts if flat[0] == 0 else [0, *counts]}


def write_coco(folder, seed=0, num_images=8):
    """Images of several sizes and a JSON with polygons, both RLE kinds, crowd, clipped and empty boxes."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    images, annotations = [], []
    for image_id in rng.permutation(np.arange(1, num_images + 1) * 10).tolist():  # unsorted ids
        height, width = int(rng.integers(20, 40)), int(rng.integers(20, 40))
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": height, "width": width})
        cv2.imwrite(str(folder / "images" / f"{image_id}.png"), np.zeros((height, width, 3), np.uint8))
        for _ in range(int(rng.integers(0, 6))):
            x, y = rng.uniform(-5, width), rng.uniform(-5, height)
            box = [round(x, 2), round(y, 2), round(rng.uniform(0, 15), 2), round(rng.uniform(0, 15), 2)]
            if rng.random() < 0.15:
                box[2] = 0  # no area: dropped
            kind = rng.random()
            if kind < 0.7:
                segmentation = [_polygon(rng, height, width) for _ in range(int(rng.integers(1, 3)))]
            else:
                segmentation = _rle(rng, height, width, compressed=kind < 0.85)
            crowd = int(rng.random() < 0.15)
            annotations.append({"image_id": image_id, "category_id": int(rng.choice([1, 3, 7])), "bbox": box,
                                "segmentation": segmentation, "iscrowd": crowd, "area": 1.0})  # fmt: skip
    rng.shuffle(annotations)  # annotations of an image are spread over the file
    for annotation_id, annotation in enumerate(annotations, 100):
        annotation["id"] = annotation_id
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return folder / "images", path


def reference_coco(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def reference_detection_targets(path):
    """The starting reader's targets, computed with pycocotools: per image boxes, labels, masks."""
    coco = reference_coco(path)
    label_of = {category_id: label for label, category_id in enumerate(sorted(coco.cats), 1)}
    targets = []
    for image_id in sorted(coco.imgs):
        height, width = coco.imgs[image_id]["height"], coco.imgs[image_id]["width"]
        boxes, kept = [], []
        for annotation in coco.imgToAnns[image_id]:
            if annotation.get("iscrowd", 0):
                continue
            x, y, w, h = annotation["bbox"]
            box = (min(max(x, 0), width), min(max(y, 0), height), min(max(x + w, 0), width), min(max(y + h, 0), height))
            if box[2] > box[0] and box[3] > box[1]:
                boxes.append(box)
                kept.append(annotation)
        masks = [coco.annToMask(a) for a in kept]
        targets.append({
            "image_id": image_id,
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([label_of[a["category_id"]] for a in kept], dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8),
        })  # fmt: skip
    return targets


def reference_semantic_mask(coco, image_id, label_of):
    """torchvision's segmentation reference (`references/segmentation/coco_utils.py`), with pycocotools: every
    chosen instance, crowd regions included, paints its class; a pixel of two or more instances is 255."""
    info = coco.imgs[image_id]
    chosen = [a for a in coco.imgToAnns[image_id] if a["category_id"] in label_of]
    if not chosen:
        return np.zeros((info["height"], info["width"]), np.uint8)
    masks = np.stack([coco.annToMask(a).astype(np.int64) for a in chosen])
    labels = np.array([label_of[a["category_id"]] for a in chosen])
    mask = (masks * labels[:, None, None]).max(axis=0).astype(np.uint8)
    mask[masks.sum(axis=0) > 1] = IGNORE_INDEX
    return mask


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESBONE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(coco_store, "_OPEN", {})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detection_targets_equal_the_pycocotools_reader(tmp_path, seed):
    images, path = write_coco(tmp_path, seed)
    expected = reference_detection_targets(path)
    dataset = CocoDetection(images, path, with_masks=True)
    assert len(dataset) == len(expected)
    for index, reference in enumerate(expected):
        _, target = dataset[index]
        assert target["image_id"] == reference["image_id"] and type(target["image_id"]) is int
        for key in ("boxes", "labels", "masks"):
            assert target[key].dtype == reference[key].dtype
            assert torch.equal(target[key].as_subclass(torch.Tensor), reference[key]), (index, key)


@pytest.mark.parametrize("category_ids", [None, [3, 7]])
def test_semantic_masks_equal_the_pycocotools_reader(tmp_path, category_ids):
    images, path = write_coco(tmp_path, seed=3)
    coco = reference_coco(path)
    dataset = CocoSegmentation(images, path, category_ids=category_ids, skip_empty=True)
    label_of = {c: k for k, c in enumerate(category_ids or sorted(coco.cats), 1)}
    non_empty = [i for i in sorted(coco.imgs)
                 if any(a["category_id"] in label_of and not a["iscrowd"] for a in coco.imgToAnns[i])]  # fmt: skip
    assert dataset.ids == non_empty
    for index, image_id in enumerate(non_empty):
        np.testing.assert_array_equal(dataset[index][1].numpy(), reference_semantic_mask(coco, image_id, label_of))


def test_second_load_maps_the_cache_without_parsing(tmp_path, monkeypatch):
    _images, path = write_coco(tmp_path)
    first = load_coco_annotations(path)
    assert isinstance(first.bboxes, np.memmap) and isinstance(first.polygon_coords, np.memmap)
    monkeypatch.setattr(coco_store, "_OPEN", {})  # as a new process
    monkeypatch.setattr(coco_store, "build_arrays", lambda path: pytest.fail("parsed the JSON again"))
    monkeypatch.setattr(coco_store, "_sha256", lambda path: pytest.fail("hashed the unchanged file again"))
    second = load_coco_annotations(path)
    assert second is not first and second.categories == first.categories
    for name, array in first._arrays.items():
        np.testing.assert_array_equal(getattr(second, name), array)
    assert len(list((tmp_path / "cache" / "coco").glob("*/COMPLETE"))) == 1


def test_changed_file_gets_a_new_store(tmp_path):
    _images, path = write_coco(tmp_path)
    before = load_coco_annotations(path)
    content = json.loads(path.read_text())
    content["categories"].append({"id": 9, "name": "star"})
    path.write_text(json.dumps(content))
    after = load_coco_annotations(path)
    assert len(after.categories) == len(before.categories) + 1
    assert len(list((tmp_path / "cache" / "coco").glob("*/COMPLETE"))) == 2


@pytest.mark.parametrize("new_process", [False, True])
def test_a_rewrite_that_keeps_size_and_mtime_gets_a_new_store(tmp_path, monkeypatch, new_process):
    """`cp -p`, `rsync -a` and `tar` restore the mtime: a same-size rewrite must not be served the old store."""
    _images, path = write_coco(tmp_path)
    before = path.stat()
    assert _names(load_coco_annotations(path))[7] == "triangle"
    renamed = [{**CATEGORIES[0], "name": CATEGORIES[0]["name"][::-1].upper()}, *CATEGORIES[1:]]
    text = path.read_text().replace(json.dumps(CATEGORIES), json.dumps(renamed))
    assert len(text) == before.st_size and text != path.read_text()
    time.sleep(0.02)  # past the file system's timestamp granularity, as any real rewrite is
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    if new_process:
        monkeypatch.setattr(coco_store, "_OPEN", {})  # only the remembered hash on disk is left
    assert _names(load_coco_annotations(path))[7] == "ELGNAIRT"


def _names(store) -> dict[int, str]:
    return {category["id"]: category["name"] for category in store.categories}


def test_pickled_store_maps_the_files_again(tmp_path):
    images, path = write_coco(tmp_path)
    dataset = CocoDetection(images, path, with_masks=True)
    data = pickle.dumps(dataset)
    assert len(data) < 4000  # the arrays are not in the pickle
    copy = pickle.loads(data)
    assert isinstance(copy.store.bboxes, np.memmap)
    for key in ("boxes", "labels", "masks"):
        assert torch.equal(copy[1][1][key], dataset[1][1][key])


def test_unwritable_cache_keeps_the_store_in_memory(tmp_path, monkeypatch, caplog):
    _images, path = write_coco(tmp_path)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("RESBONE_CACHE", str(blocker))
    with caplog.at_level(logging.WARNING, logger="backbones.data.coco"):
        store = load_coco_annotations(path)
    assert "cannot cache its annotation store" in caplog.text
    assert not isinstance(store.bboxes, np.memmap) and store.num_images == 8
    assert pickle.loads(pickle.dumps(store)).num_annotations == store.num_annotations


def _edit(path, edit):
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def test_bbox_of_three_numbers_is_named(tmp_path):
    images, path = write_coco(tmp_path)
    _edit(path, lambda c: c["annotations"][2].update(bbox=[1, 2, 3]))
    with pytest.raises(AnnotationFileError, match=r"instances\.json: annotation id 102 has bbox \[1, 2, 3\]; expected"):
        CocoDetection(images, path)


def test_malformed_segmentation_is_named(tmp_path):
    _images, path = write_coco(tmp_path)
    _edit(path, lambda c: c["annotations"][0].update(segmentation=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))  # no outer list
    with pytest.raises(AnnotationFileError, match=r"annotation id 100 has a segmentation that is neither"):
        load_coco_annotations(path)


def test_missing_segmentation_is_named_when_masks_are_needed(tmp_path):
    images, path = write_coco(tmp_path)
    target = reference_detection_targets(path)
    _edit(path, lambda c: [a.pop("segmentation") for a in c["annotations"]])
    assert torch.equal(CocoDetection(images, path)[0][1]["boxes"], target[0]["boxes"])  # boxes need none
    with pytest.raises(AnnotationFileError, match=r"annotation id\(s\) 1\d\d, .* have no 'segmentation'"):
        CocoDetection(images, path, with_masks=True)


def test_degenerate_polygons_are_left_out_with_one_warning(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "1.png"), np.zeros((32, 32, 3), np.uint8))
    square = [2, 2, 12, 2, 12, 12, 2, 12]
    annotations = [
        {"id": 1, "segmentation": [square, [20, 20, 25, 25]]},  # a 2-point polygon beside a good one
        {"id": 2, "segmentation": [[20, 20, 25, 20, 25, 25, 20]]},  # 7 numbers: its only polygon
        {"id": 3, "segmentation": [[4, 20, 10, 20, 10, 28, 4, 28]]},
    ]
    for annotation in annotations:
        annotation.update(image_id=1, category_id=1, bbox=[2, 2, 10, 10], iscrowd=0)
    path = tmp_path / "instances.json"
    coco = {"images": [{"id": 1, "file_name": "1.png", "height": 32, "width": 32}], "annotations": annotations,
            "categories": [{"id": 1, "name": "thing"}]}  # fmt: skip
    path.write_text(json.dumps(coco))
    with caplog.at_level(logging.WARNING):
        dataset = CocoDetection(images, path, with_masks=True)
        _, target = dataset[0]
        assert len(CocoDetection(images, path)[0][1]["boxes"]) == 3  # without masks every box is kept
    messages = [r.getMessage() for r in caplog.records if "polygon(s)" in r.getMessage()]
    assert len(messages) == 1 and "left 2 polygon(s)" in messages[0] and "annotation ids 1, 2" in messages[0]
    assert any("dropped 1 annotation(s) left without a valid polygon" in r.getMessage() for r in caplog.records)
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([square], 32, 32)))
    assert target["masks"].shape == (2, 32, 32) and len(target["boxes"]) == 2
    assert torch.equal(target["masks"][0], torch.from_numpy(expected))
    semantic = CocoSegmentation(images, path).semantic_mask(1)  # an instance without a polygon adds nothing
    assert semantic.sum() == expected.sum() + target["masks"][1].sum()


def test_loader_workers_give_the_same_targets(tmp_path):
    """Two loader workers read the store (mapped, or pickled across processes) and give the same targets."""
    images, path = write_coco(tmp_path)
    dataset = CocoDetection(images, path, with_masks=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    for index, (_, target) in enumerate(loader):
        assert torch.equal(target["masks"], dataset[index][1]["masks"])


def test_parse_runs_with_the_garbage_collector_paused(tmp_path, monkeypatch):
    """Millions of containers and no cycles: the collector would rescan the growing heap (a third of the time)."""
    import gc

    import backbones.data.coco_json as coco_json

    images, path = write_coco(tmp_path)
    seen = []
    read = coco_json._read_json
    monkeypatch.setattr(coco_json, "_read_json", lambda path: seen.append(gc.isenabled()) or read(path))
    assert gc.isenabled()
    coco_json.build_arrays(path)
    assert seen == [False] and gc.isenabled()
    with pytest.raises(AnnotationFileError, match=r"10\.png: not a JSON text file"):
        coco_json.build_arrays(images / "10.png")  # the collector is back on after an error too
    assert gc.isenabled()
