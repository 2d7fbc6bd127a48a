"""Tiny copies of Cityscapes, Pascal VOC 2012 (+ SBD) and ADE20K in their own layouts, for the tests.

Files have the real names and folders; images are 64x128 (HxW). Every builder returns what it wrote
(the raw label arrays by file), so tests can check the readers pixel by pixel.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from segmentation.label_tables import voc_palette

HEIGHT, WIDTH = 64, 128


def _image(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def _png(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), labels)


def _blocks(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An (HEIGHT, WIDTH) map of 8x8 blocks, each one of `values` (every value used while blocks last)."""
    count = (HEIGHT // 8) * (WIDTH // 8)
    cells = np.concatenate([values, rng.choice(values, count - len(values))])[:count]
    rng.shuffle(cells)
    return np.kron(cells.reshape(HEIGHT // 8, WIDTH // 8), np.ones((8, 8), np.int64)).astype(np.uint8)


CITYSCAPES_FRAMES = {
    "train": ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"],
    "val": ["frankfurt_000000_000294", "lindau_000000_000019"],
}
#: the frame whose folder also holds a *_gtFine_labelTrainIds.png (as createTrainIdLabelImgs writes it)
CITYSCAPES_WITH_TRAIN_IDS = "bochum_000000_000313"


def make_cityscapes(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """`root/leftImg8bit/{split}/{city}/*_leftImg8bit.png` and `root/gtFine/...` label ids 0..33 (all of them in
    every label image); one frame also has a labelTrainIds file (all road, to tell it from its labelIds)."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, frames in CITYSCAPES_FRAMES.items():
        for frame in frames:
            city = frame.split("_")[0]
            _image(root / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png", rng)
            label_ids = _blocks(np.arange(34), rng)
            path = root / "gtFine" / split / city / f"{frame}_gtFine_labelIds.png"
            _png(path, label_ids)
            written[str(path)] = label_ids
            if frame == CITYSCAPES_WITH_TRAIN_IDS:
                train_ids = np.zeros_like(label_ids)
                train_ids[:, :8] = 255
                path = path.with_name(f"{frame}_gtFine_labelTrainIds.png")
                _png(path, train_ids)
                written[str(path)] = train_ids
    return written


VOC_SPLITS = {
    "train": ["2007_000032", "2007_000039"],
    "val": ["2007_000033", "2007_000042"],
    "aug": ["2008_000002", "2008_000003", "2008_000007"],  # SBD images VOC does not label
}
VOC_UNLISTED = "2009_000001"  # in JPEGImages only, as most of VOC's 17,125 images


def make_voc(devkit: Path, seed: int = 1) -> dict[str, np.ndarray]:
    """`devkit/VOC2012/{JPEGImages, SegmentationClass (palette PNGs with 255 borders), SegmentationClassAug,
    ImageSets/Segmentation/{train, val, trainval, aug, train_aug}.txt}`. SegmentationClassAug covers VOC's
    train images too (as DeepLab's copy does), with other labels than SegmentationClass."""
    rng = np.random.default_rng(seed)
    root = devkit / "VOC2012"
    written = {}
    colours = voc_palette(256).reshape(-1).tolist()
    for split, ids in VOC_SPLITS.items():
        for image_id in ids:
            _image(root / "JPEGImages" / f"{image_id}.jpg", rng)
            aug = _blocks(np.arange(21), rng)
            _png(root / "SegmentationClassAug" / f"{image_id}.png", aug)
            written[str(root / "SegmentationClassAug" / f"{image_id}.png")] = aug
            if split == "aug":
                continue
            labels = _blocks(np.arange(21), rng)
            labels[::8, :] = 255  # object borders
            labels[:, ::8] = 255
            picture = Image.fromarray(labels, mode="P")
            picture.putpalette(colours)
            path = root / "SegmentationClass" / f"{image_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            picture.save(path)
            written[str(path)] = labels
    _image(root / "JPEGImages" / f"{VOC_UNLISTED}.jpg", rng)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    content = {**VOC_SPLITS, "trainval": VOC_SPLITS["train"] + VOC_SPLITS["val"]}
    content["train_aug"] = VOC_SPLITS["train"] + VOC_SPLITS["aug"]
    for name, ids in content.items():
        (lists / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return written


ADE_IMAGES = {"training": ["ADE_train_00000001", "ADE_train_00000002"], "validation": ["ADE_val_00000001"]}


def make_ade20k(root: Path, seed: int = 2) -> dict[str, np.ndarray]:
    """`root/ADEChallengeData2016/{images,annotations}/{training,validation}`, labels 0..150 (0 and 150 in each)."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, stems in ADE_IMAGES.items():
        for stem in stems:
            _image(root / "ADEChallengeData2016" / "images" / split / f"{stem}.jpg", rng)
            labels = _blocks(np.array([0, 1, 2, 75, 149, 150]), rng)
            path = root / "ADEChallengeData2016" / "annotations" / split / f"{stem}.png"
            _png(path, labels)
            written[str(path)] = labels
    return written
