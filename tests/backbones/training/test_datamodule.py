"""The data-module skeleton's shared parts: COCO splits and categories, generated datasets, the background name."""

from __future__ import annotations

import json

import pytest

import backbones.data.coco as coco_store
from backbones.classification import ShapesClassificationDataModule
from backbones.data.shapes import generate_shapes
from backbones.training import BACKGROUND
from backbones.training.datamodule import CocoDataModule, GeneratedDataMixin
from detection.coco import CocoDetection
from detection.data import CocoDetectionDataModule, ShapesDataModule
from segmentation.data import CocoSegmentationDataModule, ShapesSegmentationDataModule
from segmentation.datasets import CocoSegmentation

COCO_MODULES = {"detection": CocoDetectionDataModule, "segmentation": CocoSegmentationDataModule}
TINY_SHAPES = {"num_train": 2, "num_val": 2, "image_size": 32, "seed": 5}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "data", **TINY_SHAPES)


@pytest.fixture
def parses(tmp_path, monkeypatch):
    """The annotation files whose store is built (parsed) from here on, in a cache of this test's own."""
    monkeypatch.setenv("RESBONE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(coco_store, "_OPEN", {})
    parsed = []
    build = coco_store.build_arrays
    monkeypatch.setattr(coco_store, "build_arrays", lambda path: parsed.append(str(path)) or build(path))
    return parsed


@pytest.mark.parametrize("task", list(COCO_MODULES))
def test_coco_prepare_data_builds_every_annotation_store_once(task, shapes, parses):
    # Segmentation's COCO module had no prepare_data: each process built the stores itself in setup.
    datamodule = COCO_MODULES[task](
        train_images=str(shapes.train_images), train_annotations=str(shapes.train_annotations),
        val_images=str(shapes.val_images), val_annotations=str(shapes.val_annotations), num_workers=0,
    )  # fmt: skip
    assert isinstance(datamodule, CocoDataModule)
    datamodule.prepare_data()
    assert sorted(parses) == sorted([str(shapes.train_annotations), str(shapes.val_annotations)])
    assert any((coco_store.default_cache_dir() / "coco").iterdir())  # in the cache, for the other processes
    datamodule.setup("fit")  # the stores are reused, not built again
    assert len(parses) == 2 and datamodule.val_annotations == str(shapes.val_annotations)


@pytest.mark.parametrize("task", list(COCO_MODULES))
def test_coco_categories_come_from_the_first_annotation_file(task, shapes, tmp_path, parses):
    # The validation file first (usually the smallest), then the test file, then the training file.
    renamed = json.loads(shapes.val_annotations.read_text())
    renamed["categories"] = [{**c, "name": c["name"].upper()} for c in renamed["categories"]]
    (tmp_path / "val.json").write_text(json.dumps(renamed))
    make = COCO_MODULES[task]
    train_only = make(train_images=str(shapes.train_images), train_annotations=str(shapes.train_annotations))
    assert train_only.class_names == [BACKGROUND, "circle", "square", "triangle"]
    with_val = make(train_images=str(shapes.train_images), train_annotations=str(shapes.train_annotations),
                    val_images=str(shapes.val_images), val_annotations=str(tmp_path / "val.json"))  # fmt: skip
    assert with_val.class_names == [BACKGROUND, "CIRCLE", "SQUARE", "TRIANGLE"] and with_val.num_classes == 4
    assert parses == [str(shapes.train_annotations), str(tmp_path / "val.json")]  # the training file not read again
    with pytest.raises(ValueError, match="no annotation file given; set train_annotations, val_annotations or test_"):
        make(train_images=str(shapes.train_images)).class_names  # noqa: B018


def test_every_generated_data_module_generates_in_prepare_data_and_in_setup(tmp_path):
    modules = {
        "detection": lambda root: ShapesDataModule(root=str(root), **TINY_SHAPES, num_workers=0),
        "segmentation": lambda root: ShapesSegmentationDataModule(root=str(root), **TINY_SHAPES, num_workers=0),
        "classification": lambda root: ShapesClassificationDataModule(
            root=str(root), train_per_class=1, val_per_class=1, image_size=32, seed=5, num_workers=0
        ),
    }
    for name, make in modules.items():
        prepared, set_up = make(tmp_path / name / "prepared"), make(tmp_path / name / "set_up")
        assert isinstance(prepared, GeneratedDataMixin) and not prepared.root.exists()
        assert prepared.num_classes in (4, 6)  # known before the files exist
        prepared.prepare_data()  # Lightning: once per node
        assert (prepared.root / "COMPLETE").is_file()
        set_up.setup("fit")  # without a Trainer: setup generates
        assert (set_up.root / "COMPLETE").is_file() and len(set_up.dataset("train")) > 0
        assert sorted(p.name for p in prepared.root.rglob("*") if p.name != "COMPLETE") == sorted(
            p.name for p in set_up.root.rglob("*") if p.name != "COMPLETE"
        )


def test_one_background_name_everywhere(shapes):
    assert BACKGROUND == "__background__"  # torchvision's name, kept in checkpoints
    assert CocoDetection(shapes.val_images, shapes.val_annotations).class_names[0] == BACKGROUND
    assert CocoSegmentation(shapes.val_images, shapes.val_annotations).class_names[0] == BACKGROUND
    for module in (ShapesDataModule, ShapesSegmentationDataModule):
        assert module(root=str(shapes.root), **TINY_SHAPES).class_names[0] == BACKGROUND
