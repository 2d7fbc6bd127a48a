"""Semantic segmentation datasets: COCO instances turned into class masks, and image/mask folders.

A sample is ``(image, mask)``: after the transforms a float32 (3, H, W) image in [0, 1] and a
uint8 (H, W) mask of class indices, ``IGNORE_INDEX`` (255) where no label counts. Images are
decoded with OpenCV; :func:`collate` pads a batch to its largest image (image 0, mask 255).
The Lightning data modules that serve them are in ``segmentation.data``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from backbones.data.coco import AnnotationFileError, CocoAnnotations, check_images_exist, load_coco_annotations
from backbones.data.files import IMAGE_SUFFIXES as IMAGE_EXTENSIONS
from backbones.data.images import ImageFileError, read_rgb_image
from backbones.weights_table import BACKGROUND

from .transforms import IGNORE_INDEX
from .weights_table import VOC_CATEGORY_IDS

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "VOC_CATEGORY_IDS",
    "AnnotationFileError",
    "CocoSegmentation",
    "FolderSegmentation",
    "LabelFileError",
    "LabelMap",
    "PairedSegmentation",
    "category_class_names",
    "check_category_ids",
    "collate",
    "load_coco_annotations",
    "read_label_mask",
    "read_rgb_image",
]

# COCO category ids of the 20 Pascal VOC classes in VOC order (torchvision's references): aeroplane,
# bicycle, bird, boat, bottle, bus, car, cat, chair, cow, diningtable, dog, horse, motorbike,
# person, pottedplant, sheep, sofa, train, tvmonitor.
MAX_NAMES_IN_ERROR = 5


class LabelFileError(ImageFileError):
    """A label file is unreadable, of the wrong size or holds labels outside the classes."""


def read_label_mask(path: str | os.PathLike) -> np.ndarray:
    """Decodes a label PNG into (H, W) uint8 class indices.

    Single-channel 8- or 16-bit files are read with OpenCV. Palette PNGs (Pascal VOC's
    SegmentationClass) hold indices that OpenCV would turn into colours, so they are read with PIL.
    """
    mask = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise LabelFileError(f"{path}: cannot be decoded as a label image (unreadable or corrupt)")
    if mask.ndim == 3:
        mask = _palette_indices(path)
    if mask.max(initial=0) > np.iinfo(np.uint8).max:
        raise LabelFileError(f"{path}: label values up to {mask.max()}; labels must fit in 0..255")
    return mask.astype(np.uint8)


def _palette_indices(path: str | os.PathLike) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as picture:
        if picture.mode != "P":
            raise LabelFileError(
                f"{path}: a {picture.mode} colour image; label masks must hold one class index per pixel "
                "(a single-channel or palette PNG)"
            )
        return np.asarray(picture)


class LabelMap:
    """What the values of a label file mean: a lookup table value -> class; any other value is an error.

    Args:
        table: label value (0..255) -> class index (0..num_classes-1) or ``IGNORE_INDEX``.
        allowed: the values allowed, in words, for errors ("the label ids 0..33 of cityscapesScripts' table").

    Example:
        >>> reduce_zero_label = LabelMap({0: 255, **{k: k - 1 for k in range(1, 151)}}, "0..150")
        >>> reduce_zero_label(np.array([[0, 1, 150]], np.uint8), "a.png").tolist()
        [[255, 0, 149]]
    """

    def __init__(self, table: Mapping[int, int], allowed: str):
        self.lookup = np.full(256, -1, np.int16)  # -1: not a value of this label space
        for value, label in table.items():
            if not (0 <= value <= 255 and (0 <= label < IGNORE_INDEX or label == IGNORE_INDEX)):
                raise ValueError(f"label map entry {value} -> {label}; values are 0..255, classes 0..254 or 255")
            self.lookup[value] = label
        self.allowed = allowed

    @classmethod
    def classes(cls, num_classes: int) -> LabelMap:
        """Values that are already classes: 0..num_classes-1 and ``IGNORE_INDEX``."""
        table = {k: k for k in range(num_classes)} | {IGNORE_INDEX: IGNORE_INDEX}
        return cls(table, f"the classes 0..{num_classes - 1} and are not the ignore index {IGNORE_INDEX}")

    def __call__(self, mask: np.ndarray, path: str | os.PathLike) -> np.ndarray:
        """The (H, W) uint8 classes of a label image read from `path`; raises naming `path` and the bad values."""
        classes = self.lookup[mask]
        if (classes < 0).any():
            bad = np.unique(mask[classes < 0])
            raise LabelFileError(f"{path}: label values {bad.tolist()} are outside {self.allowed}")
        return classes.astype(np.uint8)


def _sample(image: np.ndarray, mask: np.ndarray) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    return (
        tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous()),  # (3, H, W) uint8
        tv_tensors.Mask(torch.from_numpy(mask)),  # (H, W) uint8
    )


class PairedSegmentation(Dataset):
    """Image files paired with label PNGs; each label is read through its `LabelMap` and checked.

    The base of the folder reader and of the benchmark readers (`segmentation.benchmark_datasets`),
    which find the pairs in their layouts.

    Args:
        pairs: (image, label) paths.
        label_maps: how each pair's label values become classes: one map for all, or one per pair.
        transforms: called as ``image, mask = transforms(image, mask)``.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        label_maps: LabelMap | Sequence[LabelMap],
        *,
        transforms: Callable | None = None,
    ):
        self.pairs = [(Path(image), Path(mask)) for image, mask in pairs]
        self.label_maps = [label_maps] * len(self.pairs) if isinstance(label_maps, LabelMap) else list(label_maps)
        if len(self.label_maps) != len(self.pairs):
            raise ValueError(f"{len(self.label_maps)} label maps for {len(self.pairs)} image/label pairs")
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.pairs)

    def read_mask(self, index: int) -> np.ndarray:
        """The (H, W) uint8 classes of pair `index` (``IGNORE_INDEX`` where no label counts)."""
        path = self.pairs[index][1]
        return self.label_maps[index](read_label_mask(path), path)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image_path, mask_path = self.pairs[index]
        image, mask = read_rgb_image(image_path), self.read_mask(index)
        if mask.shape != image.shape[:2]:
            raise LabelFileError(
                f"{mask_path}: size {mask.shape[0]}x{mask.shape[1]} (HxW) differs from its image {image_path}, "
                f"{image.shape[0]}x{image.shape[1]}"
            )
        image, mask = _sample(image, mask)
        return self.transforms(image, mask) if self.transforms is not None else (image, mask)


def check_pairs(pairs: Sequence[tuple[Path, Path]], what: str = "images have no mask") -> None:
    """Raises `FileNotFoundError` naming the pairs whose label file is missing (up to five of them)."""
    missing = [(image, mask) for image, mask in pairs if not mask.is_file()]
    if missing:
        examples = "; ".join(f"{image} -> {mask}" for image, mask in missing[:MAX_NAMES_IN_ERROR])
        raise FileNotFoundError(f"{len(missing)} of {len(pairs)} {what}, e.g. {examples}")


class FolderSegmentation(PairedSegmentation):
    """Images and label PNGs in two folders (VOC / Cityscapes layout), matched by file name.

    The mask of ``images/<dir>/<stem><image_suffix>.<ext>`` is
    ``masks/<dir>/<stem><mask_suffix>.png``; sub-folders are searched (Cityscapes' cities).

    Args:
        images: image folder.
        masks: label folder (class indices, ``IGNORE_INDEX`` for void).
        num_classes: labels must lie in 0..num_classes-1 or be the ignore index.
        transforms: called as ``image, mask = transforms(image, mask)``.
        image_suffix, mask_suffix: name parts that differ, e.g. ``"_leftImg8bit"`` and
            ``"_gtFine_labelTrainIds"`` for Cityscapes.

    Raises:
        FileNotFoundError: a folder is missing, holds no image, or an image has no mask (named).
    """

    def __init__(
        self,
        images: str | os.PathLike,
        masks: str | os.PathLike,
        *,
        num_classes: int,
        transforms: Callable | None = None,
        image_suffix: str = "",
        mask_suffix: str = "",
    ):
        self.images, self.masks = Path(images), Path(masks)
        self.num_classes = num_classes
        for folder, what in ((self.images, "image"), (self.masks, "mask")):
            if not folder.is_dir():
                raise FileNotFoundError(f"{what} folder {folder} does not exist")
        image_files = sorted(p for p in self.images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not image_files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.images}")
        pairs = [(p, self._mask_path(p, image_suffix, mask_suffix)) for p in image_files]
        check_pairs(pairs)
        super().__init__(pairs, LabelMap.classes(num_classes), transforms=transforms)

    def _mask_path(self, image: Path, image_suffix: str, mask_suffix: str) -> Path:
        stem = image.stem.removesuffix(image_suffix) if image_suffix else image.stem
        return self.masks / image.parent.relative_to(self.images) / f"{stem}{mask_suffix}.png"


class CocoSegmentation(Dataset):
    """Semantic masks made from COCO instance annotations, as torchvision's segmentation reference makes them.

    Class k (1..K) is the k-th of ``category_ids`` (all categories in id order when None); 0 is
    the background, which includes the objects of categories left out. Every instance of a chosen
    category, crowd regions included, paints its class; a pixel covered by two or more of them is
    ignored (255), whatever their classes. This is the definition of torchvision's
    ``references/segmentation/coco_utils.py`` (``ConvertCocoPolysToMask``: the classes' maximum, 255
    where the instance masks sum to more than 1), under which torchvision's COCO-trained DeepLabV3
    weights were trained and measured, so validating them here reproduces that protocol. The
    annotations are read through the shared, memory-mapped store of `backbones.data.coco` (built once
    per file), which also makes the checks and errors those of the detection reader.

    Args:
        images: folder that ``file_name`` entries are relative to.
        annotations: COCO instances JSON.
        category_ids: the categories to segment, in class order, e.g. ``VOC_CATEGORY_IDS``.
        transforms: called as ``image, mask = transforms(image, mask)``.
        skip_empty: leave out images without any instance (crowd included) of the chosen categories.
        store: the file's already opened store (default: `load_coco_annotations(annotations)`).
    """

    def __init__(
        self,
        images: str | os.PathLike,
        annotations: str | os.PathLike,
        *,
        category_ids: Sequence[int] | None = None,
        transforms: Callable | None = None,
        skip_empty: bool = False,
        store: CocoAnnotations | None = None,
    ):
        self.images, self.annotations = Path(images), Path(annotations)
        self.transforms = transforms
        self.store = store if store is not None else load_coco_annotations(self.annotations)
        self.category_ids = check_category_ids(category_ids, self.store)
        self.class_names = category_class_names(self.store, self.category_ids)
        # Per annotation its class (0: a category left out), so reading a sample touches no Python objects.
        chosen = np.array(self.category_ids, np.int64)
        order = np.argsort(chosen)
        position = np.minimum(np.searchsorted(chosen[order], self.store.category_ids), len(chosen) - 1)
        found = chosen[order][position] == self.store.category_ids
        self._labels = np.where(found, order[position] + 1, 0).astype(np.int32)
        self.store.check_segmentations(self._labels > 0)
        self.indices = np.arange(self.store.num_images)
        if skip_empty:
            self.indices = np.unique(self.store.annotation_image_index()[self._labels > 0])
        check_images_exist(self.store, self.images)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids) + 1

    @property
    def ids(self) -> list[int]:
        """Image ids in index order (ascending)."""
        return self.store.image_ids[self.indices].tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def semantic_mask(self, image_id: int) -> np.ndarray:
        """The (H, W) uint8 class mask of an image, at the size its JSON entry gives."""
        index = int(np.searchsorted(self.store.image_ids, image_id))
        if index == self.store.num_images or self.store.image_ids[index] != image_id:
            raise KeyError(f"image id {image_id} is not in {self.annotations}")
        return self._semantic_mask(index)

    def _semantic_mask(self, index: int) -> np.ndarray:
        store = self.store
        height, width = int(store.heights[index]), int(store.widths[index])
        start, stop = store.annotation_range(index)
        chosen = np.flatnonzero(self._labels[start:stop] > 0) + start
        mask = np.zeros((height, width), np.uint8)
        overlap = np.zeros(mask.shape, bool)
        covered = np.zeros(mask.shape, bool)
        for annotation in chosen.tolist():
            instance = store.mask(annotation, height, width).astype(bool)
            overlap |= instance & covered
            covered |= instance
            mask[instance] = self._labels[annotation]
        mask[overlap] = IGNORE_INDEX  # two or more instances: which one is seen is unknown
        return mask

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        index = int(self.indices[index])
        height, width = int(self.store.heights[index]), int(self.store.widths[index])
        image = read_rgb_image(self.images / self.store.file_name(index), height, width)
        image, mask = _sample(image, self._semantic_mask(index))
        return self.transforms(image, mask) if self.transforms is not None else (image, mask)


def check_category_ids(category_ids: Sequence[int] | None, store: CocoAnnotations) -> list[int]:
    """The chosen category ids (all, in id order, when None); raises naming unknown or repeated ones."""
    known = [c["id"] for c in store.categories]
    if category_ids is None:
        return known
    unknown = [c for c in category_ids if c not in known]
    if unknown or len(set(category_ids)) != len(category_ids) or not category_ids:
        raise ValueError(
            f"category_ids={list(category_ids)}: unknown {unknown} or repeated or empty; {store.path} has {known}"
        )
    return [int(c) for c in category_ids]


def category_class_names(store: CocoAnnotations, category_ids: Sequence[int]) -> list[str]:
    """``"__background__"`` then the names of ``category_ids``, in that order."""
    name_of = {c["id"]: c["name"] for c in store.categories}
    return [BACKGROUND, *(name_of[c] for c in category_ids)]


def collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks samples into images (N, 3, H, W) and int64 masks (N, H, W), padding to the largest.

    Padding is 0 in the image and ``IGNORE_INDEX`` in the mask, so it never counts.
    """
    height = max(image.shape[-2] for image, _ in batch)
    width = max(image.shape[-1] for image, _ in batch)
    images = batch[0][0].new_zeros((len(batch), batch[0][0].shape[0], height, width))
    masks = torch.full((len(batch), height, width), IGNORE_INDEX, dtype=torch.int64)
    for i, (image, mask) in enumerate(batch):
        images[i, :, : image.shape[-2], : image.shape[-1]] = image
        masks[i, : mask.shape[-2], : mask.shape[-1]] = mask
    return images, masks
