"""ResBone detection: Faster and Mask R-CNN on the backbone registry, COCO data and mAP evaluation."""

from .evaluation import COCOEvaluator
from .models import PRESETS, build_model

__all__ = ["COCOEvaluator", "PRESETS", "build_model"]
