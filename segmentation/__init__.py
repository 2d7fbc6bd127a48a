"""ResBone segmentation: DeepLabV3 and V3+ on the backbone registry, semantic data and mIoU evaluation.

The models and the evaluator import neither Lightning nor OpenCV; the task and the data modules are
imported on first use.
"""

from backbones.lazy import lazy_exports

from .evaluation import SegmentationEvaluator
from .models import PRESETS, DeepLabV3, DeepLabV3Plus, build_model

_MACHINERY = {
    "CocoSegmentationDataModule": ".data",
    "FolderSegmentationDataModule": ".data",
    "SegmentationDataModule": ".data",
    "SegmentationTask": ".task",
    "ShapesSegmentationDataModule": ".data",
    "VOC_CATEGORY_IDS": ".data",
}
__getattr__, __dir__ = lazy_exports(__name__, _MACHINERY)

__all__ = ["PRESETS", "DeepLabV3", "DeepLabV3Plus", "SegmentationEvaluator", "build_model", *_MACHINERY]
