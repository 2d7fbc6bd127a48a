"""ResBone detection: Faster and Mask R-CNN on the backbone registry, COCO data and mAP evaluation.

The models and the evaluator import neither Lightning nor OpenCV; the task and the data modules are
imported on first use.
"""

from backbones.lazy import lazy_exports
from backbones.tasks import TaskEntry, register_task

from .evaluation import COCOEvaluator
from .models import PRESETS, build_model

TASK = register_task(
    TaskEntry(
        name="detection",
        task="detection.task:DetectionTask",
        models=("detection.models:PRESETS", "detection.models:ARCHITECTURES"),
        export="detection.export:DetectionExport",
        benchmark="detection.speed:DetectionBenchmark",
        train_tool="tools/train_det.py",
        infer_tool="tools/infer_det.py",
    )
)

_MACHINERY = {
    "CocoDetection": ".coco",
    "CocoDetectionDataModule": ".data",
    "DetectionTask": ".task",
    "ShapesDataModule": ".data",
}
__getattr__, __dir__ = lazy_exports(__name__, _MACHINERY)

__all__ = ["TASK", "COCOEvaluator", "PRESETS", "build_model", *_MACHINERY]
