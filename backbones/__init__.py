"""ResBone backbones: the ResNet family, its registry, FPN and weights."""

from . import resnet_variants  # noqa: F401  (registers the family)
from .features import FeatureInfo
from .fusion import fuse_for_inference
from .layers import NORMS, convert_sync_batchnorm, get_norm_layer
from .lazy import lazy_exports
from .registry import create_backbone, create_model, list_backbones, register_backbone
from .resnet import ResNet
from .weights import WEIGHTS, WeightsError, load_state_dict, load_weights

# The pretraining task and its data import Lightning and OpenCV: loaded on first use.
_MACHINERY = {
    "ClassificationTask": ".classification",
    "ImageFolderDataModule": ".classification",
    "ShapesClassificationDataModule": ".classification",
}
__getattr__, __dir__ = lazy_exports(__name__, _MACHINERY)

__all__ = [
    "NORMS",
    "WEIGHTS",
    "ClassificationTask",
    "FeatureInfo",
    "ImageFolderDataModule",
    "ResNet",
    "ShapesClassificationDataModule",
    "WeightsError",
    "convert_sync_batchnorm",
    "create_backbone",
    "create_model",
    "fuse_for_inference",
    "get_norm_layer",
    "list_backbones",
    "load_state_dict",
    "load_weights",
    "register_backbone",
]
