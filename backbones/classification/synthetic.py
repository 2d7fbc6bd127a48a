"""A deterministic synthetic image-classification dataset in ImageNet's folder layout.

Six classes, three of shape and three of texture, each image drawn by a generator seeded
with (seed, split, class, index), so the files are a pure function of the parameters::

    circle  square  triangle    one large filled polygon on a smooth, noisy background
    stripes checkerboard dots   a two-colour texture at a random scale and angle

Layout written under ``root`` (generated into a temporary folder, then renamed)::

    train/circle/000000.JPEG ...   val/circle/000000.JPEG ...
    COMPLETE                       (marker holding the parameters)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np

from backbones.data.cache import build_once, default_cache_dir

__all__ = ["SHAPES_CLASSIFICATION_CLASSES", "generate_shapes_classification", "shapes_classification_root"]

FORMAT_VERSION = 1  # bump when the drawings change, so caches are not reused
SPLITS = ("train", "val")
MIN_IMAGE_SIZE = 32
SHAPES_CLASSIFICATION_CLASSES = ("checkerboard", "circle", "dots", "square", "stripes", "triangle")  # sorted
_POLYGON_VERTICES = {"circle": 32, "square": 4, "triangle": 3}


def shapes_classification_root(
    *, train_per_class: int = 400, val_per_class: int = 50, image_size: int = 64, seed: int = 0
) -> Path:
    """The cache folder of a dataset; its name encodes every parameter.

    Example:
        >>> shapes_classification_root(train_per_class=8, val_per_class=2).name
        'shapes-cls-v1-train8-val2-size64-seed0'
    """
    name = f"shapes-cls-v{FORMAT_VERSION}-train{train_per_class}-val{val_per_class}-size{image_size}-seed{seed}"
    return default_cache_dir() / name


def generate_shapes_classification(
    root: str | os.PathLike | None = None,
    *,
    train_per_class: int = 400,
    val_per_class: int = 50,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Writes the dataset under ``root`` unless it is already complete there; returns ``root``.

    Safe for concurrent callers (DDP ranks): each writes a temporary folder and renames it,
    and the loser of the race finds the winner's complete dataset.

    Raises:
        ValueError: a parameter is out of range, or ``root`` holds a dataset of other parameters.
        FileExistsError: ``root`` exists, is not empty and is not such a dataset.
    """
    params = _checked_params(train_per_class, val_per_class, image_size, seed)
    root = Path(root) if root is not None else shapes_classification_root(**params)
    return build_once(root, _marker_content(params), lambda folder: _write_dataset(folder, params))


def _checked_params(train_per_class: int, val_per_class: int, image_size: int, seed: int) -> dict:
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(f"train_per_class={train_per_class}, val_per_class={val_per_class}; both must be >= 1")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size}; choose at least {MIN_IMAGE_SIZE}")
    return {
        "train_per_class": int(train_per_class),
        "val_per_class": int(val_per_class),
        "image_size": int(image_size),
        "seed": int(seed),
    }


def _marker_content(params: dict) -> dict:
    return {"format_version": FORMAT_VERSION, **params}


def _write_dataset(folder: Path, params: dict) -> None:
    size = params["image_size"]
    for split_index, split in enumerate(SPLITS):
        for class_index, name in enumerate(SHAPES_CLASSIFICATION_CLASSES):
            class_dir = folder / split / name
            class_dir.mkdir(parents=True)
            for i in range(params[f"{split}_per_class"]):
                # One generator per image: an image does not depend on how many come before it.
                rng = np.random.default_rng([params["seed"], split_index, class_index, i])
                image = render(name, rng, size)
                cv2.imwrite(str(class_dir / f"{i:06d}.JPEG"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])


def render(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draws one image of class ``name``: BGR uint8 (size, size, 3).

    Light on dark throughout (random hues), so that a small network learns the classes in a few
    hundred steps: the dataset is a smoke test of the training path, not a benchmark.
    """
    dark, light = rng.uniform(0, 100, size=3), rng.uniform(155, 255, size=3)
    if name in _POLYGON_VERTICES:
        image = _polygon(rng, size, _POLYGON_VERTICES[name], dark, light)
    elif name == "dots":
        image = _dots(rng, size, dark, light)
    elif name in ("stripes", "checkerboard"):
        image = _periodic(rng, size, dark, light, checker=name == "checkerboard")
    else:
        raise ValueError(f"class {name!r}; choose one of {', '.join(SHAPES_CLASSIFICATION_CLASSES)}")
    noise = rng.normal(0, 6, size=image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _smooth_background(rng: np.random.Generator, size: int, colour: np.ndarray) -> np.ndarray:
    coarse = rng.uniform(-25, 25, size=(4, 4, 3))
    return np.clip(colour + cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC), 0, 255)


def _polygon(rng, size: int, num_vertices: int, background: np.ndarray, colour: np.ndarray) -> np.ndarray:
    image = _smooth_background(rng, size, background)
    radius = rng.uniform(0.25, 0.42) * size
    cx, cy = size / 2 + rng.uniform(-0.08, 0.08, size=2) * size
    angles = rng.uniform(0, 2 * math.pi) + 2 * math.pi * np.arange(num_vertices) / num_vertices
    points = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    cv2.fillPoly(image, [np.round(points).astype(np.int32)], tuple(float(c) for c in colour), cv2.LINE_AA)
    return image


def _dots(rng, size: int, background: np.ndarray, colour: np.ndarray) -> np.ndarray:
    image = _smooth_background(rng, size, background)
    radius = max(1.0, rng.uniform(0.03, 0.06) * size)
    for _ in range(int(rng.integers(12, 30))):
        cx, cy = rng.uniform(0, size, size=2)
        cv2.circle(image, (int(cx), int(cy)), round(radius), tuple(float(c) for c in colour), -1, cv2.LINE_AA)
    return image


def _periodic(rng, size: int, colour_a: np.ndarray, colour_b: np.ndarray, *, checker: bool) -> np.ndarray:
    period = rng.uniform(0.2, 0.4) * size
    angle = rng.uniform(0, math.pi)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    u = (xs * math.cos(angle) + ys * math.sin(angle)) / period + rng.uniform(0, 1)
    on = np.floor(u * 2) % 2 == 1
    if checker:
        v = (-xs * math.sin(angle) + ys * math.cos(angle)) / period + rng.uniform(0, 1)
        on ^= np.floor(v * 2) % 2 == 1
    return np.where(on[..., None], colour_a, colour_b)
