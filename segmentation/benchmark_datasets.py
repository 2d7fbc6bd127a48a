"""Readers of the segmentation benchmarks as they ship: Cityscapes, Pascal VOC 2012 (+ SBD) and ADE20K.

Each finds its (image, label) pairs in the dataset's own folder layout and reads the labels through
the dataset's label table (`segmentation.label_tables`), so samples come out as every reader's do
(`segmentation.datasets`): a (3, H, W) image and an (H, W) uint8 mask of classes, 255 where no label
counts. What is read is checked and named: a split folder or list that is not there, an image with no
label, a label with no image, a list entry with no file, a value outside the table.

- `CityscapesSegmentation`: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
  ``gtFine/{split}/{city}/*_gtFine_labelIds.png``, label ids mapped to the 19 train ids by
  cityscapesScripts' table; a ``*_gtFine_labelTrainIds.png`` beside it is used as it is.
- `VOCSegmentation`: the ids of ``ImageSets/Segmentation/{split}.txt``, ``JPEGImages/{id}.jpg``,
  labels from ``SegmentationClass/{id}.png`` (palette PNGs read as indices; 255 borders ignored) or,
  for the SBD images that VOC does not label, ``SegmentationClassAug/{id}.png``.
- `ADE20KSegmentation`: ``images/{training,validation}/*.jpg`` with ``annotations/.../*.png``, 150
  classes; label 0 ("other") is ignored and k becomes k - 1 (``reduce_zero_label``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from .datasets import MAX_NAMES_IN_ERROR, LabelMap, PairedSegmentation, check_pairs
from .label_tables import ADE20K_CLASSES, CITYSCAPES_CLASSES, CITYSCAPES_LABELS, VOC_CLASSES
from .transforms import IGNORE_INDEX

__all__ = [
    "ADE20K_LABELS",
    "CITYSCAPES_LABEL_IDS",
    "CITYSCAPES_TRAIN_IDS",
    "ADE20KSegmentation",
    "CityscapesSegmentation",
    "VOCSegmentation",
    "train_ids_to_label_ids",
]

#: Cityscapes ``*_gtFine_labelIds.png`` values (0..33) -> train ids (0..18, 255 for the ignored ones)
CITYSCAPES_LABEL_IDS = LabelMap(
    {label.id: label.train_id for label in CITYSCAPES_LABELS if label.id >= 0},
    "the label ids 0..33 of cityscapesScripts' table",
)
#: Cityscapes ``*_gtFine_labelTrainIds.png`` values: already train ids
CITYSCAPES_TRAIN_IDS = LabelMap.classes(len(CITYSCAPES_CLASSES))
#: ADE20K annotation values (0..150) -> classes 0..149, 0 ("other") ignored: ``reduce_zero_label``
ADE20K_LABELS = LabelMap(
    {0: IGNORE_INDEX, **{k: k - 1 for k in range(1, len(ADE20K_CLASSES) + 1)}},
    f"ADE20K's 0 (other) and classes 1..{len(ADE20K_CLASSES)}",
)
_LABEL_ID_OF_TRAIN_ID = np.array(
    [label.id for label in sorted(CITYSCAPES_LABELS, key=lambda x: x.train_id) if 0 <= label.train_id < 255], np.uint8
)


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Cityscapes train ids (0..18) -> label ids (7..33), the values the official evaluation reads.

    Example:
        >>> train_ids_to_label_ids(np.array([0, 10, 18])).tolist()  # road, sky, bicycle
        [7, 23, 33]
    """
    train_ids = np.asarray(train_ids)
    if train_ids.size and (train_ids.min() < 0 or train_ids.max() >= len(_LABEL_ID_OF_TRAIN_ID)):
        bad = np.unique(train_ids[(train_ids < 0) | (train_ids >= len(_LABEL_ID_OF_TRAIN_ID))])
        raise ValueError(f"train ids {bad.tolist()}; Cityscapes has 0..{len(_LABEL_ID_OF_TRAIN_ID) - 1}")
    return _LABEL_ID_OF_TRAIN_ID[train_ids]


def _split_folder(root: Path, folder: str, split: str, what: str) -> Path:
    path = root / folder / split
    if not path.is_dir():
        parent = root / folder
        found = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        raise FileNotFoundError(
            f"{what}: no folder {path} for split {split!r}"
            + (f"; {parent} has {', '.join(found)}" if found else f" ({parent} does not exist)")
        )
    return path


def _listed(files: Sequence[Path], where: Path, pattern: str) -> list[Path]:
    if not files:
        raise FileNotFoundError(f"no {pattern} files in {where}")
    return list(files)


def _check_no_orphans(labels: Iterable[Path], paired: Iterable[Path], what: str) -> None:
    """Every label file of the split belongs to an image (nothing is left out silently)."""
    orphans = sorted(set(labels) - set(paired))
    if orphans:
        names = ", ".join(map(str, orphans[:MAX_NAMES_IN_ERROR]))
        raise FileNotFoundError(f"{len(orphans)} {what} have no image, e.g. {names}")


class CityscapesSegmentation(PairedSegmentation):
    """Cityscapes' fine annotations as they ship, in its 19 train-id classes.

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: "train", "val" or "test" (a folder of ``leftImg8bit/``).
        transforms: called as ``image, mask = transforms(image, mask)``.
        label_files: "auto" reads ``*_gtFine_labelTrainIds.png`` where it exists and
            ``*_gtFine_labelIds.png`` (mapped by cityscapesScripts' table) elsewhere; "labelIds" or
            "labelTrainIds" read only that kind.

    Raises:
        FileNotFoundError: the split's folder is missing or empty, an image has no label file or a
            label file has no image (named).
    """

    classes = CITYSCAPES_CLASSES
    image_suffix = "_leftImg8bit.png"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        transforms: Callable | None = None,
        label_files: Literal["auto", "labelIds", "labelTrainIds"] = "auto",
    ):
        if label_files not in ("auto", "labelIds", "labelTrainIds"):
            raise ValueError(f"label_files={label_files!r}; choose 'auto', 'labelIds' or 'labelTrainIds'")
        self.root, self.split = Path(root), split
        images_dir = _split_folder(self.root, "leftImg8bit", split, "Cityscapes")
        labels_dir = _split_folder(self.root, "gtFine", split, "Cityscapes")
        images = _listed(sorted(images_dir.glob(f"*/*{self.image_suffix}")), images_dir, f"*/*{self.image_suffix}")
        pairs, maps = [], []
        for image in images:
            stem = labels_dir / image.parent.name / image.name.removesuffix(self.image_suffix)
            train_ids, label_ids = Path(f"{stem}_gtFine_labelTrainIds.png"), Path(f"{stem}_gtFine_labelIds.png")
            use_train_ids = label_files == "labelTrainIds" or (label_files == "auto" and train_ids.is_file())
            pairs.append((image, train_ids if use_train_ids else label_ids))
            maps.append(CITYSCAPES_TRAIN_IDS if use_train_ids else CITYSCAPES_LABEL_IDS)
        check_pairs(pairs, "Cityscapes images have no label file")
        _check_no_orphans(
            (
                p.with_name(p.name.replace("_labelTrainIds", "_labelIds"))
                for p in labels_dir.glob("*/*_gtFine_label*Ids.png")
            ),
            (p.with_name(p.name.replace("_labelTrainIds", "_labelIds")) for _, p in pairs),
            "Cityscapes label files",
        )
        super().__init__(pairs, maps, transforms=transforms)


class VOCSegmentation(PairedSegmentation):
    """Pascal VOC 2012 segmentation, with the SBD augmented set, by split list.

    The entries of ``ImageSets/Segmentation/{split}.txt`` (one image id a line, or DeepLab's
    ``/JPEGImages/{id}.jpg /SegmentationClassAug/{id}.png`` pairs): VOC's own
    ``SegmentationClass/{id}.png`` where it exists (palette PNGs: the indices are read, 255 marks
    borders and void), else SBD's ``SegmentationClassAug/{id}.png``. With SBD converted as DeepLab or
    MMSegmentation do, "train_aug" (VOC train + SBD less VOC val, 10,582 images; MMSegmentation names
    the list ``trainaug.txt``, read when ``train_aug.txt`` is not there) or ``["train", "aug"]`` is
    the usual training set and "val" the evaluation set.

    Args:
        root: ``VOCdevkit/VOC2012`` (or ``VOCdevkit``, holding it).
        split: a list's name, or several names whose lists are read one after the other.
        transforms: called as ``image, mask = transforms(image, mask)``.

    Raises:
        FileNotFoundError: a list is missing (the lists there are named) or an entry has no image or
            no label file.
        ValueError: an image is listed twice.
    """

    classes = VOC_CLASSES
    aliases: ClassVar[dict[str, tuple[str, ...]]] = {"train_aug": ("train_aug", "trainaug")}

    def __init__(
        self, root: str | os.PathLike, split: str | Sequence[str] = "train", *, transforms: Callable | None = None
    ):
        root = Path(root)
        self.root = root / "VOC2012" if not (root / "JPEGImages").is_dir() and (root / "VOC2012").is_dir() else root
        self.split = [split] if isinstance(split, str) else list(split)
        if not self.split:
            raise ValueError("split=[]; name one or more lists of ImageSets/Segmentation, e.g. 'train_aug'")
        pairs: list[tuple[Path, Path]] = []
        listed_in: dict[Path, Path] = {}
        for name in self.split:
            list_file = self._list_file(name)
            for image, label in self._read_list(list_file):
                if image in listed_in:
                    raise ValueError(f"{image.stem} is listed twice: in {listed_in[image]} and {list_file}")
                listed_in[image] = list_file
                pairs.append((image, label))
        if not pairs:
            raise FileNotFoundError(f"the lists {self.split} in {self.root / 'ImageSets/Segmentation'} are empty")
        missing = [image for image, _ in pairs if not image.is_file()]
        if missing:
            names = ", ".join(map(str, missing[:MAX_NAMES_IN_ERROR]))
            raise FileNotFoundError(
                f"{len(missing)} of {len(pairs)} images listed in {self.split} are missing, e.g. {names}"
            )
        check_pairs(pairs, f"images listed in {self.split} have no label file")
        super().__init__(pairs, LabelMap.classes(len(VOC_CLASSES)), transforms=transforms)

    def _list_file(self, name: str) -> Path:
        folder = self.root / "ImageSets" / "Segmentation"
        for candidate in self.aliases.get(name, (name,)):
            if (folder / f"{candidate}.txt").is_file():
                return folder / f"{candidate}.txt"
        found = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
        raise FileNotFoundError(
            f"Pascal VOC: no list {folder / (name + '.txt')} for split {name!r}"
            + (f"; the lists there: {', '.join(found)}" if found else f" ({folder} has no lists)")
        )

    def _read_list(self, list_file: Path) -> list[tuple[Path, Path]]:
        entries = []
        for number, line in enumerate(list_file.read_text().splitlines(), 1):
            fields = line.split()
            if len(fields) == 1:
                image = self.root / "JPEGImages" / f"{fields[0]}.jpg"
                label = self.root / "SegmentationClass" / f"{fields[0]}.png"
                if not label.is_file():
                    label = self.root / "SegmentationClassAug" / f"{fields[0]}.png"
            elif len(fields) == 2:  # DeepLab's lists: paths relative to the VOC2012 folder
                image, label = (self.root / field.lstrip("/") for field in fields)
            elif fields:
                raise ValueError(f"{list_file}:{number}: {line!r}; give an image id, or an image and a label path")
            else:
                continue
            entries.append((image, label))
        return entries


class ADE20KSegmentation(PairedSegmentation):
    """ADE20K SceneParsing (ADEChallengeData2016): 150 classes, ``reduce_zero_label``.

    Args:
        root: ``ADEChallengeData2016``, holding ``images/`` and ``annotations/``.
        split: "training" or "validation" ("train" and "val" are accepted for them).
        transforms: called as ``image, mask = transforms(image, mask)``.

    Raises:
        FileNotFoundError: a folder is missing or empty, an image has no annotation or an annotation
            has no image (named).
    """

    classes = ADE20K_CLASSES
    aliases: ClassVar[dict[str, str]] = {"train": "training", "val": "validation"}

    def __init__(self, root: str | os.PathLike, split: str = "training", *, transforms: Callable | None = None):
        self.root, self.split = Path(root), self.aliases.get(split, split)
        images_dir = _split_folder(self.root, "images", self.split, "ADE20K")
        labels_dir = _split_folder(self.root, "annotations", self.split, "ADE20K")
        images = _listed(sorted(images_dir.glob("*.jpg")), images_dir, "*.jpg")
        pairs = [(image, labels_dir / f"{image.stem}.png") for image in images]
        check_pairs(pairs, "ADE20K images have no annotation")
        _check_no_orphans(labels_dir.glob("*.png"), (label for _, label in pairs), "ADE20K annotations")
        super().__init__(pairs, ADE20K_LABELS, transforms=transforms)
