"""Semantic segmentation data modules: COCO instances, image/mask folders, the synthetic shapes.

The datasets, readers and the collate function they use are in ``segmentation.datasets`` (and
re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from backbones.data.shapes import ShapesPaths, generate_shapes, shapes_categories, shapes_root
from backbones.training.datamodule import BACKGROUND, CocoDataModule, GeneratedDataMixin, TaskDataModule

from .datasets import (
    IGNORE_INDEX,
    IMAGE_EXTENSIONS,
    VOC_CATEGORY_IDS,
    AnnotationFileError,
    CocoSegmentation,
    FolderSegmentation,
    LabelFileError,
    category_class_names,
    check_category_ids,
    collate,
    read_label_mask,
    read_rgb_image,
)
from .transforms import train_transforms, val_transforms

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
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


class SegmentationDataModule(TaskDataModule):
    """What every segmentation data module shares: the transforms and the collate function.

    Subclasses give ``split_paths``, ``num_classes``, ``class_names`` and ``_build_dataset(split, transforms)``.

    Args:
        batch_size: training images per batch (per device).
        num_workers: data loading processes.
        crop_size: side of the training crops.
        scale_range: random scale factors in training.
        base_size: shorter side the scale factors apply to (None: each image's own size).
        val_size: shorter side validation/test images are resized to (None: as they are).
        val_batch_size: images per validation and test batch (padded to the largest).
    """

    collate_fn = staticmethod(collate)
    drop_last_train = True  # a batch of one breaks BN after ASPP's image pooling (1x1 features)

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
        super().__init__(batch_size=batch_size, val_batch_size=val_batch_size, num_workers=num_workers)
        self.crop_size = crop_size
        self.scale_range = tuple(scale_range)
        self.base_size = base_size
        self.val_size = val_size

    def _build_dataset(self, split: str, transforms: Callable) -> Dataset:
        raise NotImplementedError

    def build_dataset(self, split: str) -> Dataset:
        if split == "train":
            transforms = train_transforms(self.crop_size, scale_range=self.scale_range, base_size=self.base_size)
        else:
            transforms = val_transforms(self.val_size)
        return self._build_dataset(split, transforms)


class CocoSegmentationDataModule(CocoDataModule, SegmentationDataModule):
    """COCO images with semantic masks made from their instance annotations (see `CocoSegmentation`).

    The annotation files' stores are built in ``prepare_data`` (once per node), as for detection.

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
        super().__init__(
            train_images=train_images, train_annotations=train_annotations, val_images=val_images,
            val_annotations=val_annotations, test_images=test_images, test_annotations=test_annotations, **kwargs,
        )  # fmt: skip
        self.category_ids = list(category_ids) if category_ids is not None else None
        self.skip_empty_train = skip_empty_train
        self._class_names: list[str] | None = None

    @property
    def class_names(self) -> list[str]:
        """``BACKGROUND`` ("__background__") then the chosen categories' names, read from an annotation file."""
        if self._class_names is None:
            store = self.category_store()  # all splits have the same classes
            self._class_names = category_class_names(store, check_category_ids(self.category_ids, store))
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
            raise AnnotationFileError(f"{annotations}: classes {dataset.class_names} differ from {self.class_names}")
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

    split_path_names = ("images", "masks")

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

    def _build_dataset(self, split: str, transforms: Callable) -> Dataset:
        images, masks = self.split_paths[split]
        return FolderSegmentation(
            images, masks, num_classes=self.num_classes, transforms=transforms,
            image_suffix=self.image_suffix, mask_suffix=self.mask_suffix,
        )  # fmt: skip


class ShapesSegmentationDataModule(GeneratedDataMixin, FolderSegmentationDataModule):
    """The built-in synthetic shapes (:mod:`backbones.data.shapes`): background, circle, square, triangle.

    Generated on first use (``prepare_data``, or ``setup``) into a cache folder named after the
    parameters; the test split is the validation split.

    Args:
        root: dataset folder; None uses ``backbones.data.shapes.shapes_root`` of the parameters.
        num_train, num_val, image_size, seed: generator parameters.
        crop_size: training crop side (default: ``image_size``).
        **kwargs: loader and transform settings of `SegmentationDataModule`.
    """

    generator = staticmethod(generate_shapes)
    default_root = staticmethod(shapes_root)

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
        root = self.init_generated(root, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
        paths = ShapesPaths.at(root)
        names = [BACKGROUND, *(c["name"] for c in shapes_categories())]
        super().__init__(
            num_classes=len(names), class_names=names,
            train_images=str(paths.train_images), train_masks=str(paths.train_masks),
            val_images=str(paths.val_images), val_masks=str(paths.val_masks),
            test_images=str(paths.val_images), test_masks=str(paths.val_masks),
            crop_size=crop_size or image_size, **kwargs,
        )  # fmt: skip
