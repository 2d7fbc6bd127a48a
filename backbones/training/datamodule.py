"""The data-module skeleton of the three tasks: splits, datasets built once, the four loaders.

A subclass gives its splits (`split_paths`, or `available_splits`), how a split's dataset is made (`build_dataset`),
`num_classes` and `class_names`, and where it differs: `collate_fn`, `drop_last_train`,
`train_group_ids`. Everything else is here, once:

- training batches from `ResumableTrainData` (seeded shuffle and augmentations, resumable mid-epoch);
- validation, test and predict batches over `eval_sampler` (every image exactly once at any world size);
- the predict split is the test split when there is one, else the validation split;
- memory is pinned when the trainer runs on CUDA.

Two parts that several data modules share sit next to it: `CocoDataModule` (an image folder and a COCO JSON
per split, the categories of the first JSON, the annotation stores built in `prepare_data`) and
`GeneratedDataMixin` (a dataset written on first use: `prepare_data` generates it, `setup` calls it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from torch.utils.data import DataLoader, Dataset

from backbones.data.coco import CocoAnnotations, load_coco_annotations
from backbones.weights_table import BACKGROUND

from .distributed import eval_sampler
from .samplers import ResumableTrainData, SeededSamples

__all__ = ["BACKGROUND", "CocoDataModule", "GeneratedDataMixin", "TaskDataModule"]


class TaskDataModule(ResumableTrainData, L.LightningDataModule):
    """The shared part of the detection, segmentation and classification data modules.

    Args:
        batch_size: training images per batch (per device).
        val_batch_size: images per validation, test and predict batch (None: `batch_size`).
        num_workers: data loading processes (per device).
    """

    #: turns a list of samples into a batch (None: PyTorch's default)
    collate_fn: ClassVar[Callable | None] = None
    #: full training batches only (a last batch of one image breaks batch norm), when there is one full batch
    drop_last_train: ClassVar[bool] = True

    def __init__(self, *, batch_size: int, val_batch_size: int | None = None, num_workers: int = 2) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size or 1)):
            if value < 1:
                raise ValueError(f"{name}={value}; give a positive number of images per batch")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers}; give 0 (load in the main process) or more")
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, Dataset] = {}

    # ------------------------------------------------------------ what a data module gives

    @property
    def num_classes(self) -> int:
        """Number of classes the model must cover (background included where there is one)."""
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        """A name per label, saved with the task's checkpoint; label 0 is `BACKGROUND` in detection and segmentation."""
        raise NotImplementedError

    #: the paths of each split ("train", "val", "test"), e.g. (images, annotations); None where not given
    split_paths: dict[str, tuple[str | None, ...]]
    #: what the paths of a split are, for errors: ("images", "annotations") names train_images, train_annotations
    split_path_names: ClassVar[tuple[str, ...]] = ("images", "annotations")

    def available_splits(self) -> list[str]:
        """The splits ("train", "val", "test") whose data is given: all of their `split_paths`."""
        return [split for split, paths in self.split_paths.items() if all(paths)]

    def build_dataset(self, split: str) -> Dataset:
        """The dataset of `split`, with its transforms; called once per split."""
        raise NotImplementedError

    def train_group_ids(self, dataset: Dataset) -> Sequence[int] | None:
        """A group id per training image; a batch holds one group (e.g. aspect ratios). None: one group."""
        return None

    # ------------------------------------------------------------ splits and datasets

    def predict_split(self) -> str:
        """`predict` runs on the test split when it is given, else on the validation split."""
        return "test" if "test" in self.available_splits() else "val"

    def setup(self, stage: str | None = None) -> None:
        available = self.available_splits()
        splits = {
            "fit": ["train", *(["val"] if "val" in available else [])],  # validation is optional
            "validate": ["val"],
            "test": ["test"],
            "predict": [self.predict_split()],
        }.get(stage or "", available)
        for split in splits:
            self.dataset(split)

    def dataset(self, split: str) -> Dataset:
        """The dataset of `split` ("train", "val" or "test"), built on first use."""
        if split not in self.datasets:
            available = self.available_splits()
            if split not in available:
                # not strict: a split (or a subclass) without `split_paths` names no paths
                paths = zip(self.split_path_names, getattr(self, "split_paths", {}).get(split, ()), strict=False)
                given = ", ".join(f"{split}_{name}={path!r}" for name, path in paths)
                raise ValueError(
                    f"no {split} data given to {type(self).__name__} ({given}); set them "
                    f"(splits given: {', '.join(available) or 'none'})"
                )
            self.datasets[split] = self.build_dataset(split)
        return self.datasets[split]

    # ------------------------------------------------------------ loaders

    def train_dataloader(self) -> DataLoader:
        # Shuffle, batches and augmentations follow from (seed, epoch, index): a run resumed mid-epoch sees the
        # same batches as an uninterrupted one (backbones.training.samplers).
        dataset = self.dataset("train")
        drop_last = self.drop_last_train and len(dataset) >= self.batch_size
        options = self.train_loader_kwargs(
            dataset, self.batch_size, group_ids=self.train_group_ids(dataset), drop_last=drop_last
        )
        return self._loader(SeededSamples(dataset), **options)

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.available_splits():  # fitting without validation
            return []
        return self._eval_loader(self.dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset("test"))

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset(self.predict_split()))

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        # Each image on exactly one rank, no padding copies: metrics summed over ranks count it once.
        return self._loader(dataset, batch_size=self.val_batch_size, sampler=eval_sampler(dataset))

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            collate_fn=type(self).collate_fn,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.on_cuda,
            **kwargs,
        )

    @property
    def on_cuda(self) -> bool:
        """Whether the trainer runs on a CUDA device (pinned host memory then speeds up the copies)."""
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"


class CocoDataModule(TaskDataModule):
    """A data module over COCO-format files: an image folder and an instances JSON per split.

    The categories (the same in every split) are read from the first annotation file given: the
    validation one (usually the smallest), else the test one, else the training one; each file's store
    (`backbones.data.coco`) is built once in `prepare_data`, which Lightning runs once per node.

    Args:
        train_images, train_annotations: training image folder and COCO JSON.
        val_images, val_annotations: validation image folder and COCO JSON.
        test_images, test_annotations: test image folder and COCO JSON.
        **kwargs: the settings of the data module (batch_size, num_workers, ...).
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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.split_paths = {
            "train": (train_images, train_annotations),
            "val": (val_images, val_annotations),
            "test": (test_images, test_annotations),
        }
        self._categories: list[dict] | None = None

    @property
    def val_annotations(self) -> str | None:
        """The validation COCO JSON, for the evaluator."""
        return self.split_paths["val"][1]

    @property
    def test_annotations(self) -> str | None:
        """The test COCO JSON, for the evaluator."""
        return self.split_paths["test"][1]

    def category_store(self) -> CocoAnnotations:
        """The store of the annotation file the categories are read from (see the class)."""
        candidates = (self.val_annotations, self.test_annotations, self.split_paths["train"][1])
        path = next((p for p in candidates if p), None)
        if path is None:
            raise ValueError("no annotation file given; set train_annotations, val_annotations or test_annotations")
        return load_coco_annotations(path)

    @property
    def categories(self) -> list[dict]:
        """The COCO categories (`id`, `name`, ...), sorted by id, read once."""
        if self._categories is None:
            self._categories = self.category_store().categories
        return self._categories

    def prepare_data(self) -> None:
        """Builds the annotation stores (`backbones.data.coco`) of the splits this run reads, once; Lightning runs
        this once per node. `validate` builds only the val store, not COCO train's (20 s and 3 GB)."""
        for split in _splits_of_run(self):
            annotation_file = self.split_paths.get(split, (None, None))[1]
            if annotation_file is not None:
                load_coco_annotations(annotation_file)


class GeneratedDataMixin:
    """For a data module over a generated dataset (the synthetic shapes): the files are written on first use.

    `prepare_data` (run by Lightning on one process per node) generates them unless they are cached, then
    does the parent's preparation; `setup` calls it too (cheap when cached), which covers use without a
    Trainer. The subclass sets `generator` and `default_root`, and calls `init_generated` in its
    constructor before the parent's (whose paths lie under `self.root`).
    """

    #: writes the dataset at `root` from the parameters unless it is there; safe from several processes
    generator: ClassVar[Callable[..., Any]]
    #: the cache folder of a parameter set, used when no root is given
    default_root: ClassVar[Callable[..., Path]]

    def init_generated(self, root: str | None, **params: Any) -> Path:
        """Keeps the generator's parameters; returns the dataset folder (`root`, else the cache folder)."""
        self.generator_params = params
        self.root = Path(root) if root is not None else type(self).default_root(**params)
        return self.root

    def prepare_data(self) -> None:
        """Generates the dataset unless it is cached; safe to call from several processes."""
        type(self).generator(self.root, **self.generator_params)
        super().prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # cheap when cached; covers use without a Trainer
        super().setup(stage)


# The splits a trainer's entry point reads (Lightning's TrainerFn values); predict reads `predict_split()`.
_RUN_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


def _splits_of_run(datamodule: L.LightningDataModule) -> tuple[str, ...]:
    """The splits of the run `datamodule` is prepared for; all of them when no trainer is running it."""
    trainer = getattr(datamodule, "trainer", None)
    function = getattr(getattr(getattr(trainer, "state", None), "fn", None), "value", None)
    if function == "predict":
        return (datamodule.predict_split(),)
    return _RUN_SPLITS.get(function, ("train", "val", "test"))
