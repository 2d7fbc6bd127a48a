"""ImageNet-style classification pretraining: image-folder data, a synthetic dataset and the Lightning task.

Imports Lightning, so `backbones` itself does not import this package.
"""

from .data import (
    ImageFileError,
    ImageFolder,
    ImageFolderDataModule,
    ImageFolderError,
    ShapesClassificationDataModule,
    read_rgb_image,
)
from .synthetic import SHAPES_CLASSIFICATION_CLASSES, generate_shapes_classification, shapes_classification_root
from .task import CLASS_LAYERS, ClassificationTask

__all__ = [
    "CLASS_LAYERS",
    "SHAPES_CLASSIFICATION_CLASSES",
    "ClassificationTask",
    "ImageFileError",
    "ImageFolder",
    "ImageFolderDataModule",
    "ImageFolderError",
    "ShapesClassificationDataModule",
    "generate_shapes_classification",
    "read_rgb_image",
    "shapes_classification_root",
]
