"""COCO-format detection data: dataset, batching and Lightning data modules.

Images are decoded with OpenCV; targets follow torchvision's detection convention
(``boxes`` XYXY in pixels, ``labels`` in 1..K with 0 the background, ``masks`` (N, H, W)).
COCO category ids, which need not be contiguous, are mapped to labels in id order.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import (
    DataLoader,
    Dataset,
)
from torchvision import tv_tensors

from backbones.distributed import eval_sampler
from backbones.images import ImageFileError, read_rgb_image
from backbones.shapes import (
    ShapesPaths,
    generate_shapes,
    shapes_categories,
    shapes_root,
)
from detection.samplers import (
    GroupedBatchSampler,
    SeededSamples,
    global_seed,
    restore_training_state,
    train_sampler,
    training_state,
)
from detection.transforms import train_transforms, val_transforms

__all__ = [
    "AnnotationFileError",
    "CocoDetection",
    "CocoDetectionDataModule",
    "GroupedBatchSampler",
    "ImageFileError",
    "ShapesDataModule",
    "collate",
    "contiguous_labels",
    "load_coco",
]

logger = logging.getLogger(__name__)

REQUIRED_KEYS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}
MAX_NAMES_IN_ERROR = 5


class AnnotationFileError(ValueError):
    """A COCO annotation file is malformed or inconsistent."""


def load_coco(path: str | os.PathLike) -> COCO:
    """Loads and validates a COCO annotation file.

    Raises:
        FileNotFoundError: the file does not exist.
        AnnotationFileError: invalid JSON (with line and column), a missing top-level
            key or entry field, or an annotation referring to an unknown category or image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        with open(path) as f:
            dataset = json.load(f)
    except json.JSONDecodeError as error:
        raise AnnotationFileError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from error
    _check_structure(dataset, path)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    _check_references(coco, path)
    return coco


def _check_structure(dataset: Any, path: Path) -> None:
    if not isinstance(dataset, dict):
        raise AnnotationFileError(f"{path}: top level is {type(dataset).__name__}, expected a JSON object")
    for key, fields in REQUIRED_KEYS.items():
        if key not in dataset:
            raise AnnotationFileError(f"{path}: missing the top-level key '{key}'")
        for position, entry in enumerate(dataset[key]):
            missing = [field for field in fields if field not in entry]
            if missing:
                raise AnnotationFileError(f"{path}: '{key}' entry #{position} lacks {missing}: {entry}")


def _check_references(coco: COCO, path: Path) -> None:
    for annotation in coco.dataset["annotations"]:
        if annotation["category_id"] not in coco.cats:
            raise AnnotationFileError(
                f"{path}: annotation id {annotation['id']} has category_id {annotation['category_id']}, "
                f"which is not among the categories; allowed ids: {sorted(coco.cats)}"
            )
        if annotation["image_id"] not in coco.imgs:
            raise AnnotationFileError(
                f"{path}: annotation id {annotation['id']} refers to image_id "
                f"{annotation['image_id']}, which is not among the images"
            )


def contiguous_labels(categories: Iterable[dict]) -> dict[int, int]:
    """Maps contiguous labels 1..K to COCO category ids, in id order (0 is background).

    Example:
        >>> contiguous_labels([{"id": 7}, {"id": 1}, {"id": 3}])
        {1: 1, 2: 3, 3: 7}
    """
    return {label: category_id for label, category_id in enumerate(sorted(c["id"] for c in categories), 1)}


def _xyxy_in_image(bbox: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    x, y, w, h = bbox
    return (min(max(x, 0), width), min(max(y, 0), height), min(max(x + w, 0), width), min(max(y + h, 0), height))


def _has_area(box: tuple[float, float, float, float]) -> bool:
    return box[2] > box[0] and box[3] > box[1]


class CocoDetection(Dataset):
    """A COCO-format detection dataset.

    Crowd annotations are left out of the targets (COCO evaluation still reads them from
    the JSON); boxes are clipped to the image and those left without area are dropped.
    Images without annotations are kept with empty targets.

    Args:
        images: folder that ``file_name`` entries are relative to.
        annotations: COCO instances JSON file.
        transforms: called as ``image, target = transforms(image, target)``.
        with_masks: also return instance masks decoded from polygons or RLE.

    Example:
        >>> dataset = CocoDetection("val2017", "instances_val2017.json", with_masks=True)
        >>> image, target = dataset[0]
        >>> image.shape, target["boxes"].shape, target["masks"].shape
        (torch.Size([3, H, W]), torch.Size([N, 4]), torch.Size([N, H, W]))
    """

    def __init__(
        self,
        images: str | os.PathLike,
        annotations: str | os.PathLike,
        transforms: Callable | None = None,
        with_masks: bool = False,
    ) -> None:
        self.images = Path(images)
        self.annotations = Path(annotations)
        self.transforms = transforms
        self.with_masks = with_masks
        self.coco = load_coco(self.annotations)
        self.ids = sorted(self.coco.imgs)
        self._check_images_exist()
        self.label_to_category_id = contiguous_labels(self.coco.dataset["categories"])
        self.category_id_to_label = {c: label for label, c in self.label_to_category_id.items()}
        names = [self.coco.cats[c]["name"] for c in self.label_to_category_id.values()]
        self.category_names = ["__background__", *names]
        self._targets, dropped = self._select_annotations()
        self.num_dropped_boxes = len(dropped)
        if dropped:
            logger.warning(
                "%s: dropped %d box(es) with zero or negative width or height inside the image (annotation ids %s)",
                self.annotations,
                len(dropped),
                ", ".join(map(str, dropped[:MAX_NAMES_IN_ERROR]))
                + (", ..." if len(dropped) > MAX_NAMES_IN_ERROR else ""),
            )

    @property
    def num_classes(self) -> int:
        """Number of categories plus one for the background."""
        return len(self.category_names)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        height, width = info["height"], info["width"]
        pixels = read_rgb_image(self.images / info["file_name"], height, width)
        image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())  # (3, H, W)
        annotations = self._targets[image_id]
        boxes = [_xyxy_in_image(a["bbox"], width, height) for a in annotations]
        labels = [self.category_id_to_label[a["category_id"]] for a in annotations]
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": image_id,
            "orig_size": torch.tensor([height, width]),
        }
        if self.with_masks:
            target["masks"] = tv_tensors.Mask(self._masks(annotations, height, width))  # (N, H, W)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def aspect_ratio_group_ids(self) -> list[int]:
        """Group per index from the JSON sizes: 0 when width >= height, else 1."""
        return [0 if self.coco.imgs[i]["width"] >= self.coco.imgs[i]["height"] else 1 for i in self.ids]

    def _check_images_exist(self) -> None:
        if not self.images.is_dir():
            raise FileNotFoundError(f"image folder {self.images} (for {self.annotations}) does not exist")
        present = set(os.listdir(self.images))
        names = [self.coco.imgs[i]["file_name"] for i in self.ids]
        missing = [n for n in names if n not in present and not (self.images / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(names)} images listed in {self.annotations} are missing "
                f"from {self.images}, e.g. {', '.join(missing[:MAX_NAMES_IN_ERROR])}"
            )

    def _select_annotations(self) -> tuple[dict[int, list[dict]], list[int]]:
        """Per image, the annotations used as training targets; also the ids of the dropped boxes."""
        targets, dropped = {}, []
        for image_id in self.ids:
            info = self.coco.imgs[image_id]
            kept = []
            for annotation in self.coco.imgToAnns[image_id]:
                if annotation.get("iscrowd", 0):
                    continue
                if _has_area(_xyxy_in_image(annotation["bbox"], info["width"], info["height"])):
                    kept.append(annotation)
                else:
                    dropped.append(annotation["id"])
            targets[image_id] = kept
        return targets, dropped

    def _masks(self, annotations: list[dict], height: int, width: int) -> torch.Tensor:
        if not annotations:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        masks = [self.coco.annToMask(a) for a in annotations]
        for annotation, mask in zip(annotations, masks):
            if mask.shape != (height, width):  # an RLE carries its own size
                raise AnnotationFileError(
                    f"{self.annotations}: annotation id {annotation['id']} has a {mask.shape[0]}x{mask.shape[1]} (HxW) "
                    f"mask, but its image {annotation['image_id']} is {height}x{width}"
                )
        return torch.from_numpy(np.stack(masks))


def collate(batch: Sequence[tuple[Any, Any]]) -> tuple[list, list]:
    """Batches detection samples as ``(list of images, list of targets)``."""
    return [image for image, _ in batch], [target for _, target in batch]


class CocoDetectionDataModule(L.LightningDataModule):
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
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done), from a checkpoint

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

    def setup(self, stage: str | None = None) -> None:
        for split in self._splits_for(stage):
            self._dataset(split)

    def train_dataloader(self) -> DataLoader:
        # Shuffle, batches and augmentations follow from (seed, epoch, index): a resumed run sees the
        # same batches as an uninterrupted one (see detection.samplers).
        dataset, seed = self._dataset("train"), global_seed()
        batch_sampler = GroupedBatchSampler(
            train_sampler(dataset, seed), dataset.aspect_ratio_group_ids(), self.batch_size, seed=seed
        )
        if self._resume_at is not None:
            batch_sampler.resume_at(*self._resume_at)
            self._resume_at = None
        generator = torch.Generator().manual_seed(seed)  # worker seeds, without drawing from the global RNG
        return self._loader(SeededSamples(dataset), batch_sampler=batch_sampler, generator=generator)

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the epoch, the batches done in it and the RNG state, for a mid-epoch resume."""
        return training_state(self.trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_at = restore_training_state(state_dict)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self._dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._dataset("test"))

    def _eval_loader(self, dataset: CocoDetection) -> DataLoader:
        # Each image on exactly one rank, no padding copies (see backbones.distributed).
        return self._loader(dataset, batch_size=self.val_batch_size, sampler=eval_sampler(dataset))

    def _categories(self) -> list[dict]:
        if self._category_list is None:
            # The smallest file usually: categories must be the same in every split.
            candidates = (self.val_annotations, self.test_annotations, self.split_paths["train"][1])
            path = next((p for p in candidates if p), None)
            if path is None:
                raise ValueError("no annotation file given; set train_annotations, val_annotations or test_annotations")
            self._category_list = sorted(load_coco(path).dataset["categories"], key=lambda c: c["id"])
        return self._category_list

    def _splits_for(self, stage: str | None) -> list[str]:
        given = [split for split, paths in self.split_paths.items() if all(paths)]
        if stage == "fit":  # validation is optional when fitting
            return ["train", *(["val"] if "val" in given else [])]
        if stage in ("validate", "test"):
            return [{"validate": "val", "test": "test"}[stage]]
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
    """The built-in synthetic shapes dataset (:mod:`backbones.shapes`) as detection data.

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
