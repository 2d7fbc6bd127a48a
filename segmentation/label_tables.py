"""The label tables of the segmentation benchmarks, as data: class names, colours, label ids.

- Cityscapes: the 34 + 1 entries of cityscapesScripts' ``cityscapesscripts/helpers/labels.py``
  (mcordts/cityscapesScripts): label id (the value in ``*_gtFine_labelIds.png``), name, train id
  (0..18, 255 ignored, -1 for the license plate, which is never in a label image), category and colour.
- Pascal VOC 2012: background and the 20 classes, coloured by VOC's bit-interleaved colour map (the
  palette of its ``SegmentationClass`` PNGs).
- ADE20K SceneParsing (ADEChallengeData2016): the 150 classes and colours of MMSegmentation's
  ``ADE20KDataset`` (label k of an annotation PNG is class k - 1; 0, "other", is ignored). MMSegmentation
  spells "bed" with a trailing space; here it has none.

`class_palette` gives the colours of a list of class names: a table's own colours when the names are
that table's, VOC's colour map otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "ADE20K_CLASSES",
    "ADE20K_PALETTE",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABELS",
    "CITYSCAPES_PALETTE",
    "VOC_CLASSES",
    "VOC_PALETTE",
    "CityscapesLabel",
    "class_palette",
    "voc_palette",
]


class CityscapesLabel(NamedTuple):
    """One row of cityscapesScripts' label table (its `Label`, fields in its order)."""

    name: str
    id: int  # the value in *_gtFine_labelIds.png; -1: never drawn into a label image
    train_id: int  # 0..18, or 255 (ignored in training and evaluation), -1 (license plate)
    category: str
    category_id: int
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]  # RGB


# fmt: off
CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = tuple(CityscapesLabel(*row) for row in (
    # name                    id  train  category         cat  instances ignore  colour
    ("unlabeled",              0,  255, "void",           0,  False,    True,  (0, 0, 0)),
    ("ego vehicle",            1,  255, "void",           0,  False,    True,  (0, 0, 0)),
    ("rectification border",   2,  255, "void",           0,  False,    True,  (0, 0, 0)),
    ("out of roi",             3,  255, "void",           0,  False,    True,  (0, 0, 0)),
    ("static",                 4,  255, "void",           0,  False,    True,  (0, 0, 0)),
    ("dynamic",                5,  255, "void",           0,  False,    True,  (111, 74, 0)),
    ("ground",                 6,  255, "void",           0,  False,    True,  (81, 0, 81)),
    ("road",                   7,    0, "flat",           1,  False,    False, (128, 64, 128)),
    ("sidewalk",               8,    1, "flat",           1,  False,    False, (244, 35, 232)),
    ("parking",                9,  255, "flat",           1,  False,    True,  (250, 170, 160)),
    ("rail track",            10,  255, "flat",           1,  False,    True,  (230, 150, 140)),
    ("building",              11,    2, "construction",   2,  False,    False, (70, 70, 70)),
    ("wall",                  12,    3, "construction",   2,  False,    False, (102, 102, 156)),
    ("fence",                 13,    4, "construction",   2,  False,    False, (190, 153, 153)),
    ("guard rail",            14,  255, "construction",   2,  False,    True,  (180, 165, 180)),
    ("bridge",                15,  255, "construction",   2,  False,    True,  (150, 100, 100)),
    ("tunnel",                16,  255, "construction",   2,  False,    True,  (150, 120, 90)),
    ("pole",                  17,    5, "object",         3,  False,    False, (153, 153, 153)),
    ("polegroup",             18,  255, "object",         3,  False,    True,  (153, 153, 153)),
    ("traffic light",         19,    6, "object",         3,  False,    False, (250, 170, 30)),
    ("traffic sign",          20,    7, "object",         3,  False,    False, (220, 220, 0)),
    ("vegetation",            21,    8, "nature",         4,  False,    False, (107, 142, 35)),
    ("terrain",               22,    9, "nature",         4,  False,    False, (152, 251, 152)),
    ("sky",                   23,   10, "sky",            5,  False,    False, (70, 130, 180)),
    ("person",                24,   11, "human",          6,  True,     False, (220, 20, 60)),
    ("rider",                 25,   12, "human",          6,  True,     False, (255, 0, 0)),
    ("car",                   26,   13, "vehicle",        7,  True,     False, (0, 0, 142)),
    ("truck",                 27,   14, "vehicle",        7,  True,     False, (0, 0, 70)),
    ("bus",                   28,   15, "vehicle",        7,  True,     False, (0, 60, 100)),
    ("caravan",               29,  255, "vehicle",        7,  True,     True,  (0, 0, 90)),
    ("trailer",               30,  255, "vehicle",        7,  True,     True,  (0, 0, 110)),
    ("train",                 31,   16, "vehicle",        7,  True,     False, (0, 80, 100)),
    ("motorcycle",            32,   17, "vehicle",        7,  True,     False, (0, 0, 230)),
    ("bicycle",               33,   18, "vehicle",        7,  True,     False, (119, 11, 32)),
    ("license plate",         -1,   -1, "vehicle",        7,  False,    True,  (0, 0, 142)),
))
# fmt: on

_TRAINED = sorted((label for label in CITYSCAPES_LABELS if 0 <= label.train_id < 255), key=lambda x: x.train_id)
#: the 19 classes of Cityscapes' train ids, in train id order (road, sidewalk, ..., bicycle)
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(label.name for label in _TRAINED)
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = tuple(label.color for label in _TRAINED)

VOC_CLASSES: tuple[str, ...] = (
    "__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def voc_palette(num_classes: int) -> np.ndarray:
    """Pascal VOC's colour map: (num_classes, 3) uint8 RGB, distinct colours from the bits of the index.

    Example:
        >>> voc_palette(3).tolist()
        [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    """
    colours = np.zeros((num_classes, 3), np.uint8)
    for index in range(num_classes):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[index] = (r, g, b)
    return colours


VOC_PALETTE: tuple[tuple[int, int, int], ...] = tuple(map(tuple, voc_palette(len(VOC_CLASSES)).tolist()))

# fmt: off
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board",
    "shower", "radiator", "glass", "clock", "flag",
)
ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255), (255, 71, 0),
    (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255),
    (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255),
    (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0),
    (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184), (0, 31, 255),
    (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255),
    (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0),
    (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),
    (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163), (255, 204, 0), (255, 0, 143),
    (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212),
    (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204),
    (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184),
    (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)
# fmt: on

_PALETTES = {
    CITYSCAPES_CLASSES: CITYSCAPES_PALETTE,
    ADE20K_CLASSES: ADE20K_PALETTE,
    VOC_CLASSES: VOC_PALETTE,
}


def class_palette(class_names: Sequence[str]) -> np.ndarray:
    """(len(class_names), 3) uint8 RGB colours: a benchmark's own when the names are its classes, else VOC's map.

    Example:
        >>> class_palette(CITYSCAPES_CLASSES)[0].tolist()  # road
        [128, 64, 128]
    """
    known = _PALETTES.get(tuple(class_names))
    return np.array(known, np.uint8) if known is not None else voc_palette(len(class_names))
