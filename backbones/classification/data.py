"""Image-classification data in ImageNet's folder layout, decoded with OpenCV, as Lightning data modules.

Layout: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``; classes are the training
folder's sub-folders in sorted order (torchvision's `ImageFolder` convention), so label ``k`` is the
k-th class name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from backbones.data.files import IMAGE_SUFFIXES as IMAGE_EXTENSIONS
from backbones.data.images import ImageFileError, read_rgb_image
from backbones.training.datamodule import GeneratedDataMixin, TaskDataModule

from .synthetic import SHAPES_CLASSIFICATION_CLASSES, generate_shapes_classification, shapes_classification_root

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFileError",
    "ImageFolder",
    "ImageFolderDataModule",
    "ImageFolderError",
    "ShapesClassificationDataModule",
    "read_rgb_image",
    "train_transforms",
    "val_transforms",
]

MAX_NAMES_IN_ERROR = 5


class ImageFolderError(ValueError):
    """A dataset folder is missing, has no class folders, an empty class folder or an unknown class."""


def list_classes(folder: str | os.PathLike) -> list[str]:
    """The sorted names of the class folders inside ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageFolderError(f"image folder {folder} does not exist")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ImageFolderError(f"{folder} has no class folders; expected {folder}/<class>/<image>")
    return classes


class ImageFolder(Dataset):
    """Images in ``folder/<class>/``, labelled by the position of ``<class>`` in ``class_names``.

    The folder is scanned once, here; images are decoded when read.

    Args:
        folder: holds one sub-folder per class.
        class_names: the label order; every class folder must be among them (a class may be absent).
        transforms: called on the (3, H, W) uint8 image tensor.

    Raises:
        ImageFolderError: ``folder`` is missing or has no class folders, a class folder has no
            images, or a class folder is not among ``class_names``.
    """

    def __init__(self, folder: str | os.PathLike, class_names: Sequence[str], transforms: Callable | None = None):
        self.folder = Path(folder)
        self.class_names = list(class_names)
        self.transforms = transforms
        label_of = {name: label for label, name in enumerate(self.class_names)}
        present = list_classes(self.folder)
        unknown = [c for c in present if c not in label_of]
        if unknown:
            raise ImageFolderError(
                f"{self.folder}: class folder(s) {', '.join(unknown[:MAX_NAMES_IN_ERROR])} are not among the "
                f"{len(self.class_names)} training classes (e.g. {', '.join(self.class_names[:MAX_NAMES_IN_ERROR])})"
            )
        # Paths in one bytes buffer and labels in an array, not a list of tuples: with 1.28 M images a
        # list of Python objects costs ~200 MB per process and loader workers copy it as they read it.
        chunks, lengths, labels = [], [], []
        for name in present:  # one class folder at a time: the peak is one folder's list of names
            files = [os.fsencode(path) for path in _image_files(self.folder / name)]
            if not files:
                raise ImageFolderError(
                    f"class folder {self.folder / name} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)})"
                )
            chunks.append(b"".join(files))
            lengths.append(np.fromiter(map(len, files), np.int64, len(files)))
            labels.append(np.full(len(files), label_of[name], np.int32))
        self._path_offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
        self._path_bytes = np.frombuffer(b"".join(chunks), np.uint8)
        self.targets = np.concatenate(labels)  # (N,) int32 label per image

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(path, label)`` per image, built on each call (the dataset keeps arrays)."""
        return [(self.path(i), int(label)) for i, label in enumerate(self.targets)]

    def path(self, index: int) -> str:
        """The file of image ``index``."""
        start, stop = self._path_offsets[index], self._path_offsets[index + 1]
        return os.fsdecode(self._path_bytes[start:stop].tobytes())

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.path(index), int(self.targets[index])
        image = torch.from_numpy(read_rgb_image(path)).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
        if self.transforms is not None:
            image = self.transforms(image)
        return image, label


def _image_files(folder: Path) -> list[str]:
    return sorted(
        entry.path for entry in os.scandir(folder) if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
    )


def train_transforms(
    crop_size: int,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
) -> v2.Compose:
    """RandomResizedCrop and horizontal flip; uint8 (3, H, W) in, float (3, crop, crop) in [0, 1] out.

    The task normalizes (`TrainingTask.normalize`), as for detection and segmentation.
    """
    return v2.Compose(
        [
            v2.RandomResizedCrop(crop_size, scale=tuple(scale), ratio=tuple(ratio), antialias=True),
            v2.RandomHorizontalFlip(hflip),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def val_transforms(crop_size: int, resize_size: int) -> v2.Compose:
    """Shorter side to ``resize_size``, then the central ``crop_size`` square; float in [0, 1] out."""
    return v2.Compose(
        [
            v2.Resize(resize_size, antialias=True),
            v2.CenterCrop(crop_size),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


class ImageFolderDataModule(TaskDataModule):
    """ImageNet-style folders for training, validation, testing and prediction.

    ``num_classes`` and ``class_names`` come from the training folder's class folders (or the
    validation folder's when there is no training folder) and are known without a `setup`.

    Args:
        root: holds ``train/`` and ``val/``; or give the folders themselves:
        train_dir, val_dir: training and validation folders (``<dir>/<class>/<image>``).
        test_dir: test folder (default: the validation folder).
        batch_size: training images per batch per device (the task scales its learning rate by
            the global batch: batch_size * devices * accumulate_grad_batches).
        val_batch_size: images per validation/test/predict batch (default: ``batch_size``).
        num_workers: data loading processes per device.
        crop_size: side of the training crops and of the validation centre crops.
        resize_size: shorter side of validation images before the centre crop (256 for 224).
        scale, ratio: RandomResizedCrop's area fraction and aspect-ratio ranges.
        hflip: probability of a horizontal flip in training.

    Images come as floats in [0, 1]; the task normalizes them (its `mean` and `std`).
    """

    split_path_names = ("dir",)

    def __init__(
        self,
        *,
        root: str | None = None,
        train_dir: str | None = None,
        val_dir: str | None = None,
        test_dir: str | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 8,
        crop_size: int = 224,
        resize_size: int = 256,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
    ):
        super().__init__(batch_size=batch_size, val_batch_size=val_batch_size, num_workers=num_workers)
        if root is not None and (train_dir is not None or val_dir is not None):
            raise ValueError(f"root={root!r} and train_dir={train_dir!r}/val_dir={val_dir!r}; give root or the folders")
        if root is not None:
            train_dir, val_dir = str(Path(root) / "train"), str(Path(root) / "val")
        if train_dir is None and val_dir is None and test_dir is None:
            raise ValueError("no data given; set root, or train_dir and val_dir")
        if crop_size > resize_size:
            raise ValueError(f"crop_size={crop_size} > resize_size={resize_size}; the centre crop must fit")
        self.dirs = {"train": train_dir, "val": val_dir, "test": test_dir or val_dir}
        self.split_paths = {split: (folder,) for split, folder in self.dirs.items()}
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self._class_names: list[str] | None = None

    @property
    def class_names(self) -> list[str]:
        """Class folder names in label order."""
        if self._class_names is None:
            self._class_names = list_classes(next(d for d in self.dirs.values() if d is not None))
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def build_dataset(self, split: str) -> ImageFolder:
        if split == "train":
            transforms = train_transforms(self.crop_size, scale=self.scale, ratio=self.ratio, hflip=self.hflip)
        else:
            transforms = val_transforms(self.crop_size, self.resize_size)
        return ImageFolder(self.dirs[split], self.class_names, transforms)


class ShapesClassificationDataModule(GeneratedDataMixin, ImageFolderDataModule):
    """The synthetic six-class dataset of `backbones.classification.synthetic`, read as image folders.

    Generated on first use (``prepare_data``, run once per node, or ``setup``) into a cache folder
    named after the parameters (under ``$RESBONE_CACHE``, default ``~/.cache/resbone``).

    Args:
        root: dataset folder; None uses the cache folder.
        train_per_class, val_per_class, image_size, seed: generator parameters.
        crop_size, resize_size: default to ``image_size`` (the whole image, no resize in validation).
        **kwargs: the other `ImageFolderDataModule` settings (batch_size, num_workers, scale, ...).
    """

    generator = staticmethod(generate_shapes_classification)
    default_root = staticmethod(shapes_classification_root)

    def __init__(
        self,
        *,
        root: str | None = None,
        train_per_class: int = 400,
        val_per_class: int = 50,
        image_size: int = 64,
        seed: int = 0,
        crop_size: int | None = None,
        resize_size: int | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 1,
        scale: tuple[float, float] = (0.25, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
    ):
        root = self.init_generated(
            root, train_per_class=train_per_class, val_per_class=val_per_class, image_size=image_size, seed=seed
        )
        super().__init__(
            root=str(root),
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            crop_size=crop_size or image_size,
            resize_size=resize_size or image_size,
            scale=scale,
            ratio=ratio,
            hflip=hflip,
        )
        self._class_names = list(SHAPES_CLASSIFICATION_CLASSES)  # known before the files exist
