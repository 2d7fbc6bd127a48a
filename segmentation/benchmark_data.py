"""Data modules of the segmentation benchmarks as they ship: Cityscapes, Pascal VOC 2012 (+ SBD), ADE20K.

Each reads a dataset's own folder layout through its reader (`segmentation.benchmark_datasets`) and has
its classes; the transforms are `SegmentationDataModule`'s (random scale, pad and crop, flip in training;
the whole image, optionally resized, in evaluation), with the defaults of the published DeepLab recipes
(MMSegmentation's): Cityscapes 512x1024 crops of the image scaled by 0.5-2.0, VOC and ADE20K 512x512
crops of the image scaled to a shorter side of 512 times 0.5-2.0, evaluated at a shorter side of 512.
Select one in YAML by ``class_path: segmentation.benchmark_data.CityscapesDataModule``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

from torch.utils.data import Dataset

from .benchmark_datasets import ADE20KSegmentation, CityscapesSegmentation, VOCSegmentation
from .data import SegmentationDataModule

__all__ = ["ADE20KDataModule", "BenchmarkDataModule", "CityscapesDataModule", "VOCDataModule"]


class BenchmarkDataModule(SegmentationDataModule):
    """A dataset in its own layout under `root`, a split name (or names) per stage, its fixed classes.

    Subclasses set `dataset_class` (called as ``dataset_class(root, split, transforms=...)``, with a
    `classes` attribute) and give their defaults.

    Args:
        root: the dataset's folder.
        train_split, val_split, test_split: the dataset's split names; None: the stage has no data.
        **kwargs: loader and transform settings of `SegmentationDataModule`.
    """

    dataset_class: ClassVar[type]
    split_path_names = ("root", "split")

    def __init__(
        self,
        *,
        root: str,
        train_split: str | list[str] | None,
        val_split: str | list[str] | None,
        test_split: str | list[str] | None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.root = root
        self.split_paths = {"train": (root, train_split), "val": (root, val_split), "test": (root, test_split)}

    @property
    def num_classes(self) -> int:
        return len(self.dataset_class.classes)

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset_class.classes)

    def dataset_options(self) -> dict[str, Any]:
        """More keyword arguments of `dataset_class`."""
        return {}

    def _build_dataset(self, split: str, transforms: Callable) -> Dataset:
        root, name = self.split_paths[split]
        return self.dataset_class(root, name, transforms=transforms, **self.dataset_options())


class CityscapesDataModule(BenchmarkDataModule):
    """Cityscapes (``leftImg8bit/``, ``gtFine/``), 19 train-id classes (see `CityscapesSegmentation`).

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/``.
        train_split, val_split, test_split: "train", "val", "test" or None.
        label_files: "auto" (``*_labelTrainIds.png`` where present, else ``*_labelIds.png`` mapped),
            "labelIds" or "labelTrainIds".
        crop_size: training crop, (height, width) or a side.
        **kwargs: loader and transform settings of `SegmentationDataModule`.
    """

    dataset_class = CityscapesSegmentation

    def __init__(
        self,
        *,
        root: str,
        train_split: str | None = "train",
        val_split: str | None = "val",
        test_split: str | None = None,
        label_files: Literal["auto", "labelIds", "labelTrainIds"] = "auto",
        crop_size: int | tuple[int, int] = (512, 1024),
        **kwargs: Any,
    ):
        super().__init__(
            root=root, train_split=train_split, val_split=val_split, test_split=test_split, crop_size=crop_size,
            **kwargs,
        )  # fmt: skip
        self.label_files = label_files

    def dataset_options(self) -> dict[str, Any]:
        return {"label_files": self.label_files}


class VOCDataModule(BenchmarkDataModule):
    """Pascal VOC 2012 by split list, with SBD's ``SegmentationClassAug`` (see `VOCSegmentation`).

    Args:
        root: ``VOCdevkit/VOC2012``.
        train_split, val_split, test_split: list names of ``ImageSets/Segmentation`` (or lists of
            them); "train_aug" (VOC train + SBD, 10,582 images) trains and "val" evaluates by default.
        crop_size, base_size, val_size: see `SegmentationDataModule`.
        **kwargs: loader and transform settings of `SegmentationDataModule`.
    """

    dataset_class = VOCSegmentation

    def __init__(
        self,
        *,
        root: str,
        train_split: str | list[str] | None = "train_aug",
        val_split: str | list[str] | None = "val",
        test_split: str | list[str] | None = None,
        crop_size: int | tuple[int, int] = 512,
        base_size: int | None = 512,
        val_size: int | None = 512,
        **kwargs: Any,
    ):
        super().__init__(
            root=root, train_split=train_split, val_split=val_split, test_split=test_split, crop_size=crop_size,
            base_size=base_size, val_size=val_size, **kwargs,
        )  # fmt: skip


class ADE20KDataModule(BenchmarkDataModule):
    """ADE20K SceneParsing (``ADEChallengeData2016``), 150 classes (see `ADE20KSegmentation`).

    Args:
        root: ``ADEChallengeData2016``.
        train_split, val_split, test_split: "training", "validation" or None.
        crop_size, base_size, val_size: see `SegmentationDataModule`.
        **kwargs: loader and transform settings of `SegmentationDataModule`.
    """

    dataset_class = ADE20KSegmentation

    def __init__(
        self,
        *,
        root: str,
        train_split: str | None = "training",
        val_split: str | None = "validation",
        test_split: str | None = None,
        crop_size: int | tuple[int, int] = 512,
        base_size: int | None = 512,
        val_size: int | None = 512,
        **kwargs: Any,
    ):
        super().__init__(
            root=root, train_split=train_split, val_split=val_split, test_split=test_split, crop_size=crop_size,
            base_size=base_size, val_size=val_size, **kwargs,
        )  # fmt: skip
