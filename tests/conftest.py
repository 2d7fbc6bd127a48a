"""Session-wide test setup: private caches, and the tiny datasets and one-step checkpoints the tests share.

Each dataset and checkpoint here is made once per run (session scope) and must be treated as read-only by
the tests that take it: a test that changes files copies them to its own `tmp_path` first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# variable -> its folder in the session's temporary folder; XDG_CACHE_HOME for the libraries that follow it
# (onnxruntime writes ~/.cache/Microsoft/... when it loads, Hugging Face's hub would write its downloads)
CACHE_VARIABLES = {"RESBONE_CACHE": "resbone", "TORCH_HOME": "torch", "XDG_CACHE_HOME": "xdg"}


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory) -> Path:
    """Points every cache the code writes (COCO stores, generated datasets, downloaded weights, onnxruntime's)
    into the run's temporary folder, for this process and the processes the tests start, so that a test run
    leaves nothing in the user's `~/.cache` and never reads what an earlier run or the user left there."""
    root = tmp_path_factory.mktemp("cache")
    saved = {name: os.environ.get(name) for name in CACHE_VARIABLES}
    os.environ.update({name: str(root / folder) for name, folder in CACHE_VARIABLES.items()})
    yield root
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# ------------------------------------------------------------------------------------------------ tiny datasets


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """The detection-sized shapes dataset (`ShapesPaths`): 2 train and 3 val images of 64 px, seed 0, with masks.

    A `ShapesDataModule(root=str(shapes.root), **SHAPES)` reads it without generating anything."""
    from backbones.data.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes") / "data", **SHAPES)


@pytest.fixture(scope="session")
def small_shapes(tmp_path_factory):
    """The segmentation-sized shapes dataset: 2 train and 3 val images of 40 px, seed 0."""
    from backbones.data.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("small_shapes") / "data", **SMALL_SHAPES)


@pytest.fixture(scope="session")
def classification_shapes(tmp_path_factory) -> Path:
    """Image folders of the three shapes (`root/train/<class>/*.JPEG`, `root/val/...`): 1 image per class and
    split, 32 px."""
    from backbones.classification import generate_shapes_classification

    return generate_shapes_classification(tmp_path_factory.mktemp("classification") / "data", **CLASSIFICATION_SHAPES)


SHAPES = {"num_train": 2, "num_val": 3, "image_size": 64, "seed": 0}
SMALL_SHAPES = {"num_train": 2, "num_val": 3, "image_size": 40, "seed": 0}
CLASSIFICATION_SHAPES = {"train_per_class": 1, "val_per_class": 1, "image_size": 32, "seed": 0}

# ------------------------------------------------------------------------------------------ one-step checkpoints


@dataclass(frozen=True)
class TaskCheckpoint:
    """A task trained one step on a tiny dataset: the task object, its checkpoint file, the validation images."""

    task: Any
    path: Path
    images: Path


# A barely trained detector: small images, anchors to match, and its low-scored detections kept.
TINY_DETECTOR = {
    "min_size": 64,
    "max_size": 64,
    "anchor_sizes": [8, 16, 32, 64, 128],
    "box_detections_per_img": 10,
    "box_score_thresh": 0.0,
}


@pytest.fixture(scope="session")
def detection_checkpoint(shapes, tmp_path_factory) -> TaskCheckpoint:
    """A Mask R-CNN R18-FPN (`TINY_DETECTOR` options) after one step on `shapes`."""
    import lightning as L

    from detection.data import ShapesDataModule
    from detection.task import DetectionTask
    from tests.tools.loader import fit_one_step

    L.seed_everything(0, verbose=False)
    data = ShapesDataModule(root=str(shapes.root), **SHAPES, batch_size=2, num_workers=0, with_masks=True)
    task = DetectionTask(model="mask_rcnn_r18_fpn", model_options=TINY_DETECTOR, warmup=0)
    path = fit_one_step(task, data, tmp_path_factory.mktemp("detection_checkpoint"))
    return TaskCheckpoint(task, path, shapes.val_images)


@pytest.fixture(scope="session")
def segmentation_checkpoint(small_shapes, tmp_path_factory) -> TaskCheckpoint:
    """A DeepLabV3+ R18 (output stride 16, 32 decoder channels, its own mean and std) after one step on
    `small_shapes`."""
    import lightning as L

    from segmentation.data import ShapesSegmentationDataModule
    from segmentation.task import SegmentationTask
    from tests.tools.loader import fit_one_step

    L.seed_everything(0, verbose=False)
    data = ShapesSegmentationDataModule(root=str(small_shapes.root), **SMALL_SHAPES, batch_size=2, num_workers=0)
    task = SegmentationTask(
        model="deeplabv3plus_r18", output_stride=16, model_options={"decoder_channels": 32},
        mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
    )  # fmt: skip
    path = fit_one_step(task, data, tmp_path_factory.mktemp("segmentation_checkpoint"))
    return TaskCheckpoint(task, path, small_shapes.val_images)


@pytest.fixture(scope="session")
def classification_checkpoint(classification_shapes, tmp_path_factory) -> TaskCheckpoint:
    """A ResNet-18 classifier after one step on `classification_shapes`."""
    import lightning as L

    from backbones.classification import ClassificationTask, ShapesClassificationDataModule
    from tests.tools.loader import fit_one_step

    L.seed_everything(0, verbose=False)
    data = ShapesClassificationDataModule(
        root=str(classification_shapes), **CLASSIFICATION_SHAPES, batch_size=4, num_workers=0
    )
    task = ClassificationTask(model="resnet18", lr=0.01)
    path = fit_one_step(task, data, tmp_path_factory.mktemp("classification_checkpoint"))
    return TaskCheckpoint(task, path, classification_shapes / "val")
