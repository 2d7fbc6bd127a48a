"""Semantic segmentation data: COCO instances turned into class masks, image/mask folders, the synthetic shapes.

A sample is ``(image, mask)``: after the transforms a float32 (3, H, W) image in [0, 1] and a
uint8 (H, W) mask of class indices, ``IGNORE_INDEX`` (255) where no label counts. Images are
decoded with OpenCV; :func:`collate` pads a batch to its largest image (image 0, mask 255).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import cv2
import lightning as L
import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from backbones.distributed import eval_sampler
from backbones.shapes import ShapesPaths, generate_shapes, shapes_categories, shapes_root

from .transforms import IGNORE_INDEX, train_transforms, val_transforms

__all__ = [
    "IGNORE_INDEX",
    "VOC_CATEGORY_IDS",
    "CocoSegmentation",
    "CocoSegmentationDataModule",
    "FolderSegmentation",
    "FolderSegmentationDataModule",
    "LabelFileError",
    "SegmentationDataModule",
    "ShapesSegmentationDataModule",
    "collate",
    "read_label_mask",
    "read_rgb_image",
]

logger = logging.getLogger(__name__)

# COCO category ids of the 20 Pascal VOC classes in VOC order (torchvision's references): aeroplane,
# bicycle, bird, boat, bottle, bus, car, cat, chair, cow, diningtable, dog, horse, motorbike,
# person, pottedplant, sheep, sofa, train, tvmonitor.
VOC_CATEGORY_IDS = (5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MAX_NAMES_IN_ERROR = 5


class LabelFileError(ValueError):
    """An image or label file is unreadable, of the wrong size or holds labels outside the classes."""


def read_rgb_image(path: str | os.PathLike) -> np.ndarray:
    """Decodes an image with OpenCV into RGB (H, W, 3) uint8; a corrupt or truncated file is a `LabelFileError`."""
    data = np.fromfile(path, dtype=np.uint8)
    if _is_truncated_jpeg(data.tobytes()):
        raise LabelFileError(f"{path}: truncated JPEG (no end-of-image marker after the last scan)")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise LabelFileError(f"{path}: cannot be decoded as an image (unreadable or corrupt)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _is_truncated_jpeg(data: bytes) -> bool:
    # OpenCV fills a truncated JPEG with grey without an error. Entropy-coded data escapes 0xFF, so
    # a complete JPEG has its end-of-image marker (FFD9) after its last start-of-scan (FFDA).
    return data.startswith(b"\xff\xd8") and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")


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


def check_labels(mask: np.ndarray, num_classes: int, path: str | os.PathLike) -> None:
    """Raises if ``mask`` holds a value that is neither a class (0..num_classes-1) nor ``IGNORE_INDEX``."""
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise LabelFileError(
            f"{path}: label values {bad.tolist()} are outside the classes 0..{num_classes - 1} and are not "
            f"the ignore index {IGNORE_INDEX}"
        )


def _sample(image: np.ndarray, mask: np.ndarray) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    return (
        tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous()),  # (3, H, W) uint8
        tv_tensors.Mask(torch.from_numpy(mask)),  # (H, W) uint8
    )


class FolderSegmentation(Dataset):
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
        self.transforms = transforms
        for folder, what in ((self.images, "image"), (self.masks, "mask")):
            if not folder.is_dir():
                raise FileNotFoundError(f"{what} folder {folder} does not exist")
        image_files = sorted(p for p in self.images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not image_files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.images}")
        self.pairs = [(p, self._mask_path(p, image_suffix, mask_suffix)) for p in image_files]
        missing = [(image, mask) for image, mask in self.pairs if not mask.is_file()]
        if missing:
            examples = "; ".join(f"{image} -> {mask}" for image, mask in missing[:MAX_NAMES_IN_ERROR])
            raise FileNotFoundError(f"{len(missing)} of {len(self.pairs)} images have no mask, e.g. {examples}")

    def _mask_path(self, image: Path, image_suffix: str, mask_suffix: str) -> Path:
        stem = image.stem.removesuffix(image_suffix) if image_suffix else image.stem
        return self.masks / image.parent.relative_to(self.images) / f"{stem}{mask_suffix}.png"

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image_path, mask_path = self.pairs[index]
        image, mask = read_rgb_image(image_path), read_label_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise LabelFileError(
                f"{mask_path}: size {mask.shape[0]}x{mask.shape[1]} (HxW) differs from its image {image_path}, "
                f"{image.shape[0]}x{image.shape[1]}"
            )
        check_labels(mask, self.num_classes, mask_path)
        image, mask = _sample(image, mask)
        return self.transforms(image, mask) if self.transforms is not None else (image, mask)


def load_coco(path: str | os.PathLike) -> COCO:
    """Loads a COCO instances file, naming the file in every error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        dataset = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise LabelFileError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from error
    missing = [key for key in ("images", "annotations", "categories") if key not in dataset]
    if missing:
        raise LabelFileError(f"{path}: missing the top-level key(s) {missing}")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    for annotation in dataset["annotations"]:  # an unknown id would silently become background
        if annotation.get("category_id") not in coco.cats or annotation.get("image_id") not in coco.imgs:
            raise LabelFileError(
                f"{path}: annotation id {annotation.get('id')} refers to category_id {annotation.get('category_id')} "
                f"and image_id {annotation.get('image_id')}; the file's category ids are {sorted(coco.cats)}"
            )
    return coco


class CocoSegmentation(Dataset):
    """Semantic masks made from COCO instance annotations.

    Class k (1..K) is the k-th of ``category_ids`` (all categories in id order when None); 0 is
    the background, which includes the objects of categories left out. Where instances of
    *different* classes overlap the pixel is ignored (255), as in torchvision's references: its
    true class is unknown. Crowd regions of the chosen categories are ignored too.

    Args:
        images: folder that ``file_name`` entries are relative to.
        annotations: COCO instances JSON.
        category_ids: the categories to segment, in class order, e.g. ``VOC_CATEGORY_IDS``.
        transforms: called as ``image, mask = transforms(image, mask)``.
        skip_empty: leave out images without any (non-crowd) instance of the chosen categories.
    """

    def __init__(
        self,
        images: str | os.PathLike,
        annotations: str | os.PathLike,
        *,
        category_ids: Sequence[int] | None = None,
        transforms: Callable | None = None,
        skip_empty: bool = False,
    ):
        self.images, self.annotations = Path(images), Path(annotations)
        self.transforms = transforms
        self.coco = load_coco(self.annotations)
        self.category_ids = _check_category_ids(category_ids, self.coco, self.annotations)
        self.label_of = {category_id: k for k, category_id in enumerate(self.category_ids, 1)}
        self.class_names = ["__background__", *(self.coco.cats[c]["name"] for c in self.category_ids)]
        self.ids = sorted(self.coco.imgs)
        if skip_empty:
            self.ids = [i for i in self.ids if any(self._instances(i, crowd=False))]
        if not self.images.is_dir():
            raise FileNotFoundError(f"image folder {self.images} (for {self.annotations}) does not exist")

    @property
    def num_classes(self) -> int:
        return len(self.category_ids) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def _instances(self, image_id: int, *, crowd: bool):
        for annotation in self.coco.imgToAnns[image_id]:
            if annotation["category_id"] in self.label_of and bool(annotation.get("iscrowd", 0)) == crowd:
                yield annotation

    def _instance_mask(self, annotation: dict, shape: tuple[int, int]) -> np.ndarray:
        instance = self.coco.annToMask(annotation).astype(bool)
        if instance.shape != shape:  # an RLE carries its own size
            raise LabelFileError(
                f"{self.annotations}: annotation id {annotation['id']} has a {instance.shape[0]}x{instance.shape[1]} "
                f"(HxW) mask, but its image {annotation['image_id']} is {shape[0]}x{shape[1]}"
            )
        return instance

    def semantic_mask(self, image_id: int) -> np.ndarray:
        """The (H, W) uint8 class mask of an image, at the size its JSON entry gives."""
        info = self.coco.imgs[image_id]
        mask = np.zeros((info["height"], info["width"]), np.uint8)
        coverage = np.zeros(mask.shape, np.uint8)  # 1: one class so far, 2: classes clash
        for annotation in self._instances(image_id, crowd=False):
            instance = self._instance_mask(annotation, mask.shape)
            label = self.label_of[annotation["category_id"]]
            clash = instance & (coverage > 0) & (mask != label)
            coverage[instance & (coverage == 0)] = 1
            coverage[clash] = 2
            mask[instance & (coverage == 1)] = label
        mask[coverage == 2] = IGNORE_INDEX
        for annotation in self._instances(image_id, crowd=True):
            mask[self._instance_mask(annotation, mask.shape)] = IGNORE_INDEX
        return mask

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image_id = self.ids[index]
        path = self.images / self.coco.imgs[image_id]["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image {path} (id {image_id} in {self.annotations}) does not exist")
        image, mask = read_rgb_image(path), self.semantic_mask(image_id)
        if mask.shape != image.shape[:2]:
            raise LabelFileError(
                f"{path}: decoded size {image.shape[0]}x{image.shape[1]} (HxW) differs from the "
                f"{mask.shape[0]}x{mask.shape[1]} given in {self.annotations}"
            )
        image, mask = _sample(image, mask)
        return self.transforms(image, mask) if self.transforms is not None else (image, mask)


def _check_category_ids(category_ids: Sequence[int] | None, coco: COCO, path: Path) -> list[int]:
    if category_ids is None:
        return sorted(coco.cats)
    unknown = [c for c in category_ids if c not in coco.cats]
    if unknown or len(set(category_ids)) != len(category_ids) or not category_ids:
        raise ValueError(
            f"category_ids={list(category_ids)}: unknown {unknown} or repeated or empty; {path} has {sorted(coco.cats)}"
        )
    return [int(c) for c in category_ids]


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


class SegmentationDataModule(L.LightningDataModule):
    """What every segmentation data module shares: the transforms and the loaders.

    Subclasses give ``num_classes``, ``class_names`` and ``_build_dataset(split, transforms)``.

    Args:
        batch_size: training images per batch (per device).
        num_workers: data loading processes.
        crop_size: side of the training crops.
        scale_range: random scale factors in training.
        base_size: shorter side the scale factors apply to (None: each image's own size).
        val_size: shorter side validation/test images are resized to (None: as they are).
        val_batch_size: images per validation and test batch (padded to the largest).
    """

    splits: tuple[str, ...] = ("train", "val", "test")

    def __init__(
        self,
        *,
        batch_size: int = 8,
        num_workers: int = 2,
        crop_size: int = 513,
        scale_range: tuple[float, float] = (0.5, 2.0),
        base_size: int | None = None,
        val_size: int | None = None,
        val_batch_size: int = 1,
    ):
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.crop_size = crop_size
        self.scale_range = tuple(scale_range)
        self.base_size = base_size
        self.val_size = val_size
        self.val_batch_size = val_batch_size
        self.datasets: dict[str, Dataset] = {}

    @property
    def num_classes(self) -> int:
        """Number of classes, background included."""
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    def available_splits(self) -> list[str]:
        raise NotImplementedError

    def _build_dataset(self, split: str, transforms: Callable) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        available = self.available_splits()
        splits = {
            "fit": ["train", *(["val"] if "val" in available else [])],  # validation is optional
            "validate": ["val"],
            "test": ["test"],
            "predict": [self._predict_split()],
        }.get(stage or "", available)
        for split in splits:
            self.dataset(split)

    def dataset(self, split: str) -> Dataset:
        if split not in self.datasets:
            if split not in self.available_splits():
                raise ValueError(f"no {split} data given; set its paths (available: {self.available_splits()})")
            if split == "train":
                transforms = train_transforms(self.crop_size, scale_range=self.scale_range, base_size=self.base_size)
            else:
                transforms = val_transforms(self.val_size)
            self.datasets[split] = self._build_dataset(split, transforms)
        return self.datasets[split]

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        # Full batches only: a batch of one breaks BN after ASPP's image pooling (1x1 features).
        return self._loader(dataset, self.batch_size, shuffle=True, drop_last=len(dataset) >= self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset("test"))

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset(self._predict_split()))

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        # Each image on exactly one rank, no padding copies: the confusion matrix is summed over ranks.
        return self._loader(dataset, self.val_batch_size, sampler=eval_sampler(dataset))

    def _predict_split(self) -> str:
        return "test" if "test" in self.available_splits() else "val"

    def _loader(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )


class CocoSegmentationDataModule(SegmentationDataModule):
    """COCO images with semantic masks made from their instance annotations (see `CocoSegmentation`).

    Args:
        train_images, train_annotations, val_images, ..., test_annotations: folders and JSONs.
        category_ids: the categories to segment in class order (None: all, in id order), e.g.
            the 20 of ``VOC_CATEGORY_IDS`` as torchvision's COCO-trained DeepLabV3.
        skip_empty_train: leave training images without any chosen instance out.
        **kwargs: loader and transform settings of `SegmentationDataModule`.
    """

    def __init__(
        self,
        *,
        train_images: str | None = None,
        train_annotations: str | None = None,
        val_images: str | None = None,
        val_annotations: str | None = None,
        test_images: str | None = None,
        test_annotations: str | None = None,
        category_ids: list[int] | None = None,
        skip_empty_train: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.split_paths = {
            "train": (train_images, train_annotations),
            "val": (val_images, val_annotations),
            "test": (test_images, test_annotations),
        }
        self.category_ids = list(category_ids) if category_ids is not None else None
        self.skip_empty_train = skip_empty_train
        self._class_names: list[str] | None = None

    def available_splits(self) -> list[str]:
        return [split for split, paths in self.split_paths.items() if all(paths)]

    @property
    def class_names(self) -> list[str]:
        """``"__background__"`` then the chosen categories' names, read from an annotation file."""
        if self._class_names is None:
            given = [self.split_paths[s][1] for s in ("val", "test", "train") if self.split_paths[s][1]]
            if not given:
                raise ValueError("no annotation file given; set train_, val_ or test_annotations with its images")
            coco = load_coco(given[0])  # the smallest file usually; every split must have the same classes
            ids = _check_category_ids(self.category_ids, coco, Path(given[0]))
            self._class_names = ["__background__", *(coco.cats[c]["name"] for c in ids)]
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _build_dataset(self, split: str, transforms: Callable) -> Dataset:
        images, annotations = self.split_paths[split]
        dataset = CocoSegmentation(
            images, annotations, category_ids=self.category_ids, transforms=transforms,
            skip_empty=self.skip_empty_train and split == "train",
        )  # fmt: skip
        if dataset.class_names != self.class_names:
            raise LabelFileError(f"{annotations}: classes {dataset.class_names} differ from {self.class_names}")
        return dataset


class FolderSegmentationDataModule(SegmentationDataModule):
    """Images and label PNGs in folders (see `FolderSegmentation`).

    Args:
        num_classes: classes, background (or the first class) included; 255 is void.
        train_images, train_masks, val_images, val_masks, test_images, test_masks: folders.
        class_names: a name per class (default "class0", "class1", ...).
        image_suffix, mask_suffix: see `FolderSegmentation`.
        **kwargs: loader and transform settings of `SegmentationDataModule`.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        train_images: str | None = None,
        train_masks: str | None = None,
        val_images: str | None = None,
        val_masks: str | None = None,
        test_images: str | None = None,
        test_masks: str | None = None,
        class_names: list[str] | None = None,
        image_suffix: str = "",
        mask_suffix: str = "",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        if not 1 <= num_classes <= IGNORE_INDEX:
            raise ValueError(f"num_classes={num_classes}; choose 1 to {IGNORE_INDEX} ({IGNORE_INDEX} is void)")
        self._num_classes = num_classes
        self._class_names = list(class_names) if class_names else [f"class{i}" for i in range(num_classes)]
        self.split_paths = {
            "train": (train_images, train_masks),
            "val": (val_images, val_masks),
            "test": (test_images, test_masks),
        }
        self.image_suffix, self.mask_suffix = image_suffix, mask_suffix

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def class_names(self) -> list[str]:
        return self._class_names

    def available_splits(self) -> list[str]:
        return [split for split, paths in self.split_paths.items() if all(paths)]

    def _build_dataset(self, split: str, transforms: Callable) -> Dataset:
        images, masks = self.split_paths[split]
        return FolderSegmentation(
            images, masks, num_classes=self.num_classes, transforms=transforms,
            image_suffix=self.image_suffix, mask_suffix=self.mask_suffix,
        )  # fmt: skip


class ShapesSegmentationDataModule(FolderSegmentationDataModule):
    """The built-in synthetic shapes (:mod:`backbones.shapes`): background, circle, square, triangle.

    Generated on first use (``prepare_data``, or ``setup``) into a cache folder named after the
    parameters; the test split is the validation split.

    Args:
        root: dataset folder; None uses ``backbones.shapes.shapes_root`` of the parameters.
        num_train, num_val, image_size, seed: generator parameters.
        crop_size: training crop side (default: ``image_size``).
        **kwargs: loader and transform settings of `SegmentationDataModule`.
    """

    def __init__(
        self,
        *,
        root: str | None = None,
        num_train: int = 2000,
        num_val: int = 100,
        image_size: int = 128,
        seed: int = 0,
        crop_size: int | None = None,
        **kwargs: Any,
    ):
        self.shapes_params = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}
        self.root = Path(root) if root is not None else shapes_root(**self.shapes_params)
        paths = ShapesPaths.at(self.root)
        names = ["background", *(c["name"] for c in shapes_categories())]
        super().__init__(
            num_classes=len(names), class_names=names,
            train_images=str(paths.train_images), train_masks=str(paths.train_masks),
            val_images=str(paths.val_images), val_masks=str(paths.val_masks),
            test_images=str(paths.val_images), test_masks=str(paths.val_masks),
            crop_size=crop_size or image_size, **kwargs,
        )  # fmt: skip

    def prepare_data(self) -> None:
        """Generates the dataset unless it is cached; safe to call from several processes."""
        generate_shapes(self.root, **self.shapes_params)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # cheap when cached; covers use without a Trainer
        super().setup(stage)
