import json
import math

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from backbones.data import shapes
from backbones.data.shapes import ShapesPaths, default_cache_dir, generate_shapes, shapes_root

TINY = {"num_train": 8, "num_val": 2, "image_size": 64}


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "tiny", **TINY)


def load(path):
    with open(path) as f:
        return json.load(f)


def test_generate_shapes_layout(tiny_shapes):
    for split, num_images in (("train", 8), ("val", 2)):
        coco = load(getattr(tiny_shapes, f"{split}_annotations"))
        images_dir = getattr(tiny_shapes, f"{split}_images")
        masks_dir = getattr(tiny_shapes, f"{split}_masks")
        assert len(coco["images"]) == num_images
        for info in coco["images"]:
            image = cv2.imread(str(images_dir / info["file_name"]))
            mask = cv2.imread(str(masks_dir / info["file_name"].replace(".jpg", ".png")), cv2.IMREAD_UNCHANGED)
            assert image.shape == (64, 64, 3)
            assert mask.shape == (64, 64) and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 1, 2, 3}


def test_shapes_categories_are_non_contiguous(tiny_shapes):
    coco = load(tiny_shapes.train_annotations)
    assert [c["id"] for c in coco["categories"]] == [1, 3, 7]
    assert [c["name"] for c in coco["categories"]] == ["circle", "square", "triangle"]
    assert {a["category_id"] for a in coco["annotations"]} <= {1, 3, 7}


def test_shapes_annotations_are_consistent(tiny_shapes):
    coco = load(tiny_shapes.train_annotations)
    assert coco["annotations"], "expected at least one object"
    for annotation in coco["annotations"]:
        x, y, w, h = annotation["bbox"]
        polygon = np.array(annotation["segmentation"][0]).reshape(-1, 2)
        assert w > 0 and h > 0 and annotation["area"] > 0 and annotation["iscrowd"] == 0
        assert x >= 0 and x + w <= 64 and y >= 0 and y + h <= 64
        np.testing.assert_allclose(polygon.min(0), [x, y])
        np.testing.assert_allclose(polygon.max(0), [x + w, y + h])


def test_shapes_semantic_masks_match_polygons(tiny_shapes):
    coco = COCO(str(tiny_shapes.train_annotations))
    label_of = {category_id: k for k, category_id in enumerate(sorted(coco.cats), 1)}
    for image_id, info in coco.imgs.items():
        semantic = cv2.imread(str(tiny_shapes.train_masks / info["file_name"].replace(".jpg", ".png")), 0)
        for annotation in coco.imgToAnns[image_id]:
            instance = coco.annToMask(annotation).astype(bool)
            drawn = semantic == label_of[annotation["category_id"]]
            overlap = (instance & drawn).sum() / instance.sum()
            assert overlap > 0.85, f"annotation {annotation['id']}: only {overlap:.2f} of its mask is drawn"


def test_generate_shapes_is_deterministic(tmp_path):
    first = generate_shapes(tmp_path / "a", **TINY, seed=3)
    second = generate_shapes(tmp_path / "b", **TINY, seed=3)
    other = generate_shapes(tmp_path / "c", **TINY, seed=4)
    assert first.train_annotations.read_bytes() == second.train_annotations.read_bytes()
    assert first.val_annotations.read_bytes() == second.val_annotations.read_bytes()
    assert (first.train_images / "000001.jpg").read_bytes() == (second.train_images / "000001.jpg").read_bytes()
    assert first.train_annotations.read_bytes() != other.train_annotations.read_bytes()


def test_generate_shapes_reuses_complete_root(tiny_shapes):
    before = tiny_shapes.train_annotations.stat().st_mtime_ns
    again = generate_shapes(tiny_shapes.root, **TINY)
    assert again == tiny_shapes
    assert tiny_shapes.train_annotations.stat().st_mtime_ns == before
    assert [p.name for p in tiny_shapes.root.parent.iterdir()] == ["tiny"]  # no staging folders left


def test_generate_shapes_rejects_root_of_other_params(tiny_shapes):
    with pytest.raises(ValueError, match="seed"):
        generate_shapes(tiny_shapes.root, **TINY, seed=1)


def test_generate_shapes_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        generate_shapes(tmp_path / "mine", **TINY)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_generate_shapes_fills_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    paths = generate_shapes(tmp_path / "empty", **TINY)
    assert paths.train_annotations.is_file()


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes, "_write_split", fail)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(tmp_path / "shapes", **TINY)
    assert list(tmp_path.iterdir()) == []


def test_losing_the_generation_race_is_fine(tiny_shapes, tmp_path):
    # Another process finished first: our rename fails, the complete dataset is kept.
    staging = tmp_path / "staging"
    staging.mkdir()
    params = shapes._checked_params(8, 2, 64, (1, 3), 0)
    shapes.publish(staging, tiny_shapes.root, shapes._marker_content(params))
    assert (tiny_shapes.root / shapes.MARKER).is_file()


def test_shapes_root_encodes_parameters(monkeypatch, tmp_path):
    monkeypatch.setenv("RESBONE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    root = shapes_root(num_train=8, num_val=2, image_size=64, seed=5)
    assert root.parent == tmp_path
    assert root != shapes_root(num_train=8, num_val=2, image_size=96, seed=5)
    assert root != shapes_root(num_train=8, num_val=2, image_size=64, seed=6)
    monkeypatch.delenv("RESBONE_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "resbone")


def test_generate_shapes_default_root_is_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RESBONE_CACHE", str(tmp_path))
    paths = generate_shapes(num_train=2, num_val=1, image_size=32)
    assert paths == ShapesPaths.at(shapes_root(num_train=2, num_val=1, image_size=32))
    assert paths.val_annotations.is_file()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"image_size": 16}, "image_size=16"), ({"num_objects": (3, 1)}, "num_objects"), ({"num_train": -1}, "num_train")],
)
def test_generate_shapes_rejects_bad_parameters(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_shapes(tmp_path / "shapes", **{**TINY, **kwargs})


def test_objects_do_not_overlap(tiny_shapes):
    coco = load(tiny_shapes.train_annotations)
    total = sum(a["area"] for a in coco["annotations"])
    drawn = sum((cv2.imread(str(p), 0) > 0).sum() for p in tiny_shapes.train_masks.iterdir())
    assert math.isclose(total, drawn, rel_tol=0.15)
