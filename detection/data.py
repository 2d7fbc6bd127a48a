"""COCO-format detection data modules: COCO files and the synthetic shapes.

The annotation reader, the dataset and the collate function they use are in ``detection.coco``
(and re-exported here).
"""

from __future__ import annotations

from backbones.data.images import ImageFileError, read_rgb_image
from backbones.data.shapes import ShapesPaths, generate_shapes, shapes_categories, shapes_root
from backbones.training.datamodule import BACKGROUND, CocoDataModule, GeneratedDataMixin
from backbones.training.samplers import GroupedBatchSampler
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


class CocoDetectionDataModule(CocoDataModule):
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
        with_masks: also load instance masks; Mask R-CNN needs them, Faster R-CNN does not use them
            (the task checks that it matches the model).
        val_batch_size: images per validation and test batch.
    """

    collate_fn = staticmethod(collate)
    drop_last_train = False  # detection has no batch norm that trains on one image

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
        super().__init__(
            train_images=train_images, train_annotations=train_annotations, val_images=val_images,
            val_annotations=val_annotations, test_images=test_images, test_annotations=test_annotations,
            batch_size=batch_size, val_batch_size=val_batch_size, num_workers=num_workers,
        )  # fmt: skip
        self.train_sizes = tuple(train_sizes)
        self.max_size = max_size
        self.with_masks = with_masks

    @property
    def num_classes(self) -> int:
        """Number of categories plus one for the background."""
        return len(self.categories) + 1

    @property
    def label_to_category_id(self) -> dict[int, int]:
        """Contiguous label (1..K) to COCO category id."""
        return contiguous_labels(self.categories)

    @property
    def class_names(self) -> list[str]:
        """Category name per label; label 0 is ``BACKGROUND`` ("__background__")."""
        return [BACKGROUND, *(c["name"] for c in self.categories)]

    def train_group_ids(self, dataset: CocoDetection) -> list[int]:
        return dataset.aspect_ratio_group_ids()

    def build_dataset(self, split: str) -> CocoDetection:
        images, annotations = self.split_paths[split]
        if images is None or annotations is None:
            raise ValueError(
                f"{split}_images={images!r}, {split}_annotations={annotations!r}; both are needed for the {split} split"
            )
        transforms = train_transforms(self.train_sizes, self.max_size) if split == "train" else val_transforms()
        dataset = CocoDetection(images, annotations, transforms=transforms, with_masks=self.with_masks)
        if dataset.label_to_category_id != self.label_to_category_id:
            raise AnnotationFileError(
                f"{annotations}: categories {dataset.label_to_category_id} (label: id) differ from "
                f"{self.label_to_category_id} of the other splits"
            )
        return dataset


class ShapesDataModule(GeneratedDataMixin, CocoDetectionDataModule):
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
        batch_size: int = 2,
        num_workers: int = 2,
        train_sizes: tuple[int, ...] | None = None,
        max_size: int | None = None,
        with_masks: bool = False,
        val_batch_size: int = 1,
    ) -> None:
        root = self.init_generated(root, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
        paths = ShapesPaths.at(root)
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
        self._categories = shapes_categories()  # known before the files exist
