"""COCO-format detection data modules: COCO files and the synthetic shapes.

The annotation reader, the dataset and the collate function they use are in ``detection.coco``
(and re-exported here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from backbones.training.distributed import eval_sampler
from backbones.data.images import ImageFileError, read_rgb_image
from backbones.training.samplers import GroupedBatchSampler, ResumableTrainData, SeededSamples
from backbones.data.shapes import ShapesPaths, generate_shapes, shapes_categories, shapes_root
from detection.coco import (
    MAX_NAMES_IN_ERROR,
    REQUIRED_KEYS,
    AnnotationFileError,
    CocoDetection,
    collate,
    contiguous_labels,
    load_coco_annotations,
)
from detection.transforms import train_transforms, val_transforms

__all__ = [
    "MAX_NAMES_IN_ERROR",
    "REQUIRED_KEYS",
    "AnnotationFileError",
    "CocoDetection",
    "CocoDetectionDataModule",
    "GroupedBatchSampler",
    "ImageFileError",
    "ShapesDataModule",
    "collate",
    "contiguous_labels",
    "load_coco_annotations",
    "read_rgb_image",
]


class CocoDetectionDataModule(ResumableTrainData, L.LightningDataModule):
    """COCO-format detection data for training, validation and testing.

    Training batches are grouped by aspect ratio and augmented with
    :func:`~detection.transforms.train_transforms`; validation and test images keep
    their original size. ``num_classes`` and the label mapping are read from the
    annotation files' categories and are available right after construction.

    Args:
        train_images, train_annotations: training image folder and COCO JSON.
        val_images, val_annotations: validation image folder and COCO JSON.
        test_images, test_annotations: test image folder and COCO JSON.
        batch_size: training images per batch (per device).
        num_workers: data loading processes.
        train_sizes: candidate shorter-side lengths for multi-scale training.
        max_size: the longest the longer side may become in training.
        with_masks: also load instance masks (for Mask R-CNN).
        val_batch_size: images per validation and test batch.
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
        batch_size: int = 2,
        num_workers: int = 2,
        train_sizes: tuple[int, ...] = (640, 672, 704, 736, 768, 800),
        max_size: int = 1333,
        with_masks: bool = False,
        val_batch_size: int = 1,
    ) -> None:
        super().__init__()
        self.split_paths = {
            "train": (train_images, train_annotations),
            "val": (val_images, val_annotations),
            "test": (test_images, test_annotations),
        }
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_sizes = tuple(train_sizes)
        self.max_size = max_size
        self.with_masks = with_masks
        self.val_batch_size = val_batch_size
        self.datasets: dict[str, CocoDetection] = {}
        self._category_list: list[dict] | None = None

    @property
    def num_classes(self) -> int:
        """Number of categories plus one for the background."""
        return len(self._categories()) + 1

    @property
    def label_to_category_id(self) -> dict[int, int]:
        """Contiguous label (1..K) to COCO category id."""
        return contiguous_labels(self._categories())

    @property
    def category_names(self) -> list[str]:
        """Category name per label; index 0 is ``"__background__"``."""
        return ["__background__", *(c["name"] for c in self._categories())]

    @property
    def val_annotations(self) -> str | None:
        """The validation COCO JSON, for the evaluator."""
        return self.split_paths["val"][1]

    @property
    def test_annotations(self) -> str | None:
        """The test COCO JSON, for the evaluator."""
        return self.split_paths["test"][1]

    def prepare_data(self) -> None:
        """Builds each annotation file's store (`backbones.data.coco`) once; Lightning runs this once per node."""
        for _, annotations in self.split_paths.values():
            if annotations is not None:
                load_coco_annotations(annotations)

    def setup(self, stage: str | None = None) -> None:
        for split in self._splits_for(stage):
            self._dataset(split)

    def train_dataloader(self) -> DataLoader:
        # Shuffle, batches and augmentations follow from (seed, epoch, index): a resumed run sees the
        # same batches as an uninterrupted one (see backbones.training.samplers).
        dataset = self._dataset("train")
        options = self.train_loader_kwargs(dataset, self.batch_size, group_ids=dataset.aspect_ratio_group_ids())
        return self._loader(SeededSamples(dataset), **options)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self._dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._dataset("test"))

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self._dataset(self._predict_split()))

    def _predict_split(self) -> str:
        """`predict` runs on the test split when it is given, else on the validation split."""
        return "test" if all(self.split_paths["test"]) else "val"

    def _eval_loader(self, dataset: CocoDetection) -> DataLoader:
        # Each image on exactly one rank, no padding copies (see backbones.training.distributed).
        return self._loader(dataset, batch_size=self.val_batch_size, sampler=eval_sampler(dataset))

    def _categories(self) -> list[dict]:
        if self._category_list is None:
            # The smallest file usually: categories must be the same in every split.
            candidates = (self.val_annotations, self.test_annotations, self.split_paths["train"][1])
            path = next((p for p in candidates if p), None)
            if path is None:
                raise ValueError("no annotation file given; set train_annotations, val_annotations or test_annotations")
            self._category_list = load_coco_annotations(path).categories  # sorted by id
        return self._category_list

    def _splits_for(self, stage: str | None) -> list[str]:
        given = [split for split, paths in self.split_paths.items() if all(paths)]
        if stage == "fit":  # validation is optional when fitting
            return ["train", *(["val"] if "val" in given else [])]
        if stage in ("validate", "test", "predict"):
            return [{"validate": "val", "test": "test", "predict": self._predict_split()}[stage]]
        return given if stage is None else []

    def _build_dataset(self, split: str) -> CocoDetection:
        images, annotations = self.split_paths[split]
        if images is None or annotations is None:
            raise ValueError(
                f"{split}_images={images!r}, {split}_annotations={annotations!r}; both are needed for the {split} split"
            )
        if split == "train":
            transforms = train_transforms(self.train_sizes, self.max_size)
        else:
            transforms = val_transforms()
        dataset = CocoDetection(images, annotations, transforms=transforms, with_masks=self.with_masks)
        if dataset.label_to_category_id != self.label_to_category_id:
            raise AnnotationFileError(
                f"{annotations}: categories {dataset.label_to_category_id} (label: id) differ from "
                f"{self.label_to_category_id} of the other splits"
            )
        return dataset

    def _dataset(self, split: str) -> CocoDetection:
        if split not in self.datasets:
            self.datasets[split] = self._build_dataset(split)
        return self.datasets[split]

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )


class ShapesDataModule(CocoDetectionDataModule):
    """The built-in synthetic shapes dataset (:mod:`backbones.data.shapes`) as detection data.

    The images are generated on first use (``prepare_data``, which Lightning runs on
    one process per node, or ``setup``) and cached; the test split is the validation
    split. ``num_classes`` is 4 (three shapes and the background) without any file.

    Args:
        root: dataset folder; ``None`` uses a cache folder named after the parameters.
        num_train, num_val, image_size, seed: generator parameters.
        batch_size, num_workers, with_masks, val_batch_size: as in the parent class.
        train_sizes: shorter-side lengths for training; defaults to ``(image_size,)``.
        max_size: longest side in training; defaults to the largest of ``train_sizes``.
    """

    def __init__(
        self,
        *,
        root: str | None = None,
        num_train: int = 2000,
        num_val: int = 100,
        image_size: int = 128,
        seed: int = 0,
        batch_size: int = 2,
        num_workers: int = 2,
        train_sizes: tuple[int, ...] | None = None,
        max_size: int | None = None,
        with_masks: bool = False,
        val_batch_size: int = 1,
    ) -> None:
        self.shapes_params = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}
        self.root = Path(root) if root is not None else shapes_root(**self.shapes_params)
        paths = ShapesPaths.at(self.root)
        train_sizes = tuple(train_sizes) if train_sizes else (image_size,)
        super().__init__(
            train_images=str(paths.train_images),
            train_annotations=str(paths.train_annotations),
            val_images=str(paths.val_images),
            val_annotations=str(paths.val_annotations),
            test_images=str(paths.val_images),
            test_annotations=str(paths.val_annotations),
            batch_size=batch_size,
            num_workers=num_workers,
            train_sizes=train_sizes,
            max_size=max_size if max_size is not None else max(train_sizes),
            with_masks=with_masks,
            val_batch_size=val_batch_size,
        )

    def prepare_data(self) -> None:
        """Generates the dataset unless it is cached; safe to call from several processes."""
        generate_shapes(self.root, **self.shapes_params)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # cheap when cached; covers use without a Trainer
        super().setup(stage)

    def _categories(self) -> list[dict]:
        return shapes_categories()
