"""A deterministic synthetic "shapes" dataset in COCO format.

Detection, segmentation and classification all train on it out of the box, so it
lives in ``backbones`` (which imports neither of the others). Each image shows a few
filled circles, squares and triangles of random colour, size and position on a
smooth, noisy random background. Objects never overlap, so every polygon and mask
is exactly the visible area. Shapes stand upright (squares axis-aligned, triangles
apex up), as in Matterport's Mask R-CNN shapes demo: a from-scratch detector on two
CPU cores then learns the three classes within minutes, while randomly rotated small
squares and circles take a from-scratch network many more steps to tell apart.

Layout written under ``root``::

    train/000001.jpg ...                 val/000001.jpg ...
    train_masks/000001.png ...           val_masks/000001.png ...
    annotations/instances_train.json     annotations/instances_val.json
    COMPLETE                             (marker holding the parameters)

Category ids are deliberately non-contiguous (1, 3, 7) so that code mapping COCO
category ids to contiguous labels is exercised. Semantic masks hold 0 for the
background and ``k`` for the k-th category in id order (circle=1, square=2,
triangle=3).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .cache import MARKER, build_once, default_cache_dir, publish  # noqa: F401  (re-exported)

__all__ = [
    "SHAPE_CLASSES",
    "ShapeClass",
    "ShapesPaths",
    "default_cache_dir",
    "generate_shapes",
    "shapes_categories",
    "shapes_root",
]

FORMAT_VERSION = 2  # bump when the generator's output changes, so caches are not reused
SPLITS = ("train", "val")
MIN_IMAGE_SIZE = 32
MAX_PLACEMENT_TRIES = 50


@dataclass(frozen=True)
class ShapeClass:
    """One class of the shapes dataset.

    Attributes:
        category_id: COCO category id (non-contiguous on purpose).
        name: category name.
        num_vertices: vertices of the regular polygon drawn (a circle is a 32-gon).
        angle: direction of the first vertex from the centre, in radians (image y points down).
    """

    category_id: int
    name: str
    num_vertices: int
    angle: float


SHAPE_CLASSES = (
    ShapeClass(category_id=1, name="circle", num_vertices=32, angle=0.0),
    ShapeClass(category_id=3, name="square", num_vertices=4, angle=math.pi / 4),  # axis-aligned
    ShapeClass(category_id=7, name="triangle", num_vertices=3, angle=-math.pi / 2),  # apex up
)


@dataclass(frozen=True)
class ShapesPaths:
    """Where the files of a generated shapes dataset live."""

    root: Path
    train_images: Path
    train_annotations: Path
    train_masks: Path
    val_images: Path
    val_annotations: Path
    val_masks: Path

    @classmethod
    def at(cls, root: str | os.PathLike) -> ShapesPaths:
        """Returns the paths of a shapes dataset rooted at ``root`` (nothing is checked)."""
        root = Path(root)
        return cls(
            root=root,
            train_images=root / "train",
            train_annotations=root / "annotations" / "instances_train.json",
            train_masks=root / "train_masks",
            val_images=root / "val",
            val_annotations=root / "annotations" / "instances_val.json",
            val_masks=root / "val_masks",
        )


def shapes_categories() -> list[dict]:
    """Returns the COCO ``categories`` list of the shapes dataset, sorted by id."""
    return [{"id": c.category_id, "name": c.name, "supercategory": "shape"} for c in SHAPE_CLASSES]


def shapes_root(
    *,
    num_train: int = 2000,
    num_val: int = 100,
    image_size: int = 128,
    num_objects: tuple[int, int] = (1, 3),
    seed: int = 0,
) -> Path:
    """Returns the cache folder of a shapes dataset; its name encodes every parameter.

    Example:
        >>> shapes_root(num_train=8, num_val=2, image_size=64).name
        'shapes-v2-train8-val2-size64-objects1to3-seed0'
    """
    low, high = num_objects
    name = f"shapes-v{FORMAT_VERSION}-train{num_train}-val{num_val}-size{image_size}-objects{low}to{high}-seed{seed}"
    return default_cache_dir() / name


def generate_shapes(
    root: str | os.PathLike | None = None,
    *,
    num_train: int = 2000,
    num_val: int = 100,
    image_size: int = 128,
    num_objects: tuple[int, int] = (1, 3),
    seed: int = 0,
) -> ShapesPaths:
    """Writes the shapes dataset under ``root``, or reuses it if it is already complete.

    The output is a pure function of the parameters. Files are written to a temporary
    folder beside ``root`` which is then renamed to ``root``, so an interrupted run
    never leaves half a dataset and concurrent callers (e.g. DDP ranks) are safe.

    Args:
        root: target folder; ``None`` uses :func:`shapes_root` of the parameters.
        num_train: number of training images.
        num_val: number of validation images.
        image_size: side of the square images, in pixels (at least 32).
        num_objects: inclusive range of objects per image, e.g. ``(1, 3)``.
        seed: seed of the generator.

    Returns:
        The paths of the dataset.

    Raises:
        ValueError: a parameter is out of range, or ``root`` holds a shapes dataset
            made with other parameters.
        FileExistsError: ``root`` exists and is not a shapes dataset.
    """
    params = _checked_params(num_train, num_val, image_size, num_objects, seed)
    root = Path(root) if root is not None else shapes_root(**params)
    build_once(root, _marker_content(params), lambda folder: _write_dataset(folder, params))
    return ShapesPaths.at(root)


def _checked_params(num_train, num_val, image_size, num_objects, seed) -> dict:
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train={num_train}, num_val={num_val}; both must be >= 0")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size}; choose at least {MIN_IMAGE_SIZE}")
    low, high = num_objects
    if not 0 <= low <= high:
        raise ValueError(f"num_objects={num_objects}; need 0 <= low <= high")
    return {
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
        "num_objects": (int(low), int(high)),
        "seed": int(seed),
    }


def _marker_content(params: dict) -> dict:
    return {"format_version": FORMAT_VERSION, **params, "num_objects": list(params["num_objects"])}


def _write_dataset(folder: Path, params: dict) -> None:
    paths = ShapesPaths.at(folder)
    paths.train_annotations.parent.mkdir(parents=True)
    for split_index, split in enumerate(SPLITS):
        num_images = params[f"num_{split}"]
        coco = _write_split(
            images_dir=getattr(paths, f"{split}_images"),
            masks_dir=getattr(paths, f"{split}_masks"),
            num_images=num_images,
            seeds=(params["seed"], split_index),
            image_size=params["image_size"],
            num_objects=params["num_objects"],
        )
        coco["info"]["description"] = f"resbone synthetic shapes, {split} split"
        with open(getattr(paths, f"{split}_annotations"), "w") as f:
            json.dump(coco, f)


def _write_split(images_dir, masks_dir, num_images, seeds, image_size, num_objects) -> dict:
    images_dir.mkdir()
    masks_dir.mkdir()
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        # One generator per image: images do not depend on how many come before.
        rng = np.random.default_rng([*seeds, image_id])
        image, semantic, objects = _render_image(rng, image_size, num_objects)
        stem = f"{image_id:06d}"
        cv2.imwrite(str(images_dir / f"{stem}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(str(masks_dir / f"{stem}.png"), semantic)
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": image_size, "height": image_size})
        for shape_class, vertices in objects:
            annotations.append(_annotation(len(annotations) + 1, image_id, shape_class, vertices))
    return {
        "info": {"version": str(FORMAT_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": shapes_categories(),
    }


def _render_image(rng: np.random.Generator, size: int, num_objects: tuple[int, int]):
    """Draws one image.

    Returns:
        The BGR image (size, size, 3) uint8, its semantic mask (size, size) uint8 and a
        list of ``(ShapeClass, vertices)`` with integer pixel vertices (V, 2).
    """
    background = rng.uniform(0, 255, size=3)
    image = _smooth_background(rng, size, background)
    semantic = np.zeros((size, size), np.uint8)
    objects = []
    for circle in _place_circles(rng, size, int(rng.integers(num_objects[0], num_objects[1] + 1))):
        class_index = int(rng.integers(len(SHAPE_CLASSES)))
        shape_class = SHAPE_CLASSES[class_index]
        vertices = _regular_polygon(circle, shape_class.num_vertices, shape_class.angle)
        cv2.fillPoly(image, [vertices], _contrasting_colour(rng, background))
        cv2.fillPoly(semantic, [vertices], class_index + 1)
        objects.append((shape_class, vertices))
    noise = rng.normal(0, 8, size=image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return image, semantic, objects


def _smooth_background(rng: np.random.Generator, size: int, colour: np.ndarray) -> np.ndarray:
    """A colour plus low-frequency texture, as float64 (size, size, 3)."""
    coarse = rng.uniform(-40, 40, size=(4, 4, 3))
    texture = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(colour + texture, 0, 255)


def _place_circles(rng: np.random.Generator, size: int, count: int) -> list[tuple[float, float, float]]:
    """Rejection-samples up to ``count`` disjoint circles (cx, cy, r) inside the image."""
    circles: list[tuple[float, float, float]] = []
    for _ in range(count):
        for _ in range(MAX_PLACEMENT_TRIES):
            radius = rng.uniform(0.08, 0.22) * size
            cx, cy = rng.uniform(radius + 1, size - 2 - radius, size=2)
            if all(math.hypot(cx - x, cy - y) > radius + r + 2 for x, y, r in circles):
                circles.append((cx, cy, radius))
                break
    return circles


def _regular_polygon(circle: tuple[float, float, float], num_vertices: int, angle: float) -> np.ndarray:
    cx, cy, radius = circle
    angles = angle + 2 * math.pi * np.arange(num_vertices) / num_vertices
    points = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    return np.round(points).astype(np.int32)  # (V, 2)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[float, ...]:
    colour = rng.uniform(0, 255, size=3)
    for _ in range(10):
        if np.linalg.norm(colour - background) > 100:
            break
        colour = rng.uniform(0, 255, size=3)
    return tuple(float(c) for c in colour)


def _annotation(annotation_id: int, image_id: int, shape_class: ShapeClass, vertices: np.ndarray) -> dict:
    # cv2 fills pixel i, which covers [i, i + 1) in COCO's continuous coordinates.
    polygon = vertices.astype(np.float64) + 0.5
    x0, y0 = polygon.min(axis=0)
    x1, y1 = polygon.max(axis=0)
    xs, ys = polygon[:, 0], polygon[:, 1]
    area = 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))  # shoelace
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": shape_class.category_id,
        "segmentation": [[round(float(v), 2) for v in polygon.reshape(-1)]],
        "area": round(float(area), 2),
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        "iscrowd": 0,
    }
