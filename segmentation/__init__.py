"""ResBone segmentation: DeepLabV3 and V3+ on the backbone registry, semantic data and mIoU evaluation.

The models and the evaluator import neither Lightning nor OpenCV; the task and the data modules are
imported on first use.
"""

from backbones.lazy import lazy_exports
from backbones.tasks import TaskEntry, register_task

from .evaluation import SegmentationEvaluator
from .models import PRESETS, DeepLabV3, DeepLabV3Plus, build_model

TASK = register_task(
    TaskEntry(
        name="segmentation",
        task="segmentation.task:SegmentationTask",
        models=("segmentation.models:PRESETS", "segmentation.models:ARCHITECTURES"),
        export="segmentation.export:SegmentationExport",
        benchmark="segmentation.speed:SegmentationBenchmark",
        train_tool="tools/train_seg.py",
        infer_tool="tools/infer_seg.py",
    )
)

_MACHINERY = {
    "CocoSegmentationDataModule": ".data",
    "FolderSegmentationDataModule": ".data",
    "SegmentationDataModule": ".data",
    "SegmentationTask": ".task",
    "ShapesSegmentationDataModule": ".data",
    "VOC_CATEGORY_IDS": ".data",
}
__getattr__, __dir__ = lazy_exports(__name__, _MACHINERY)

__all__ = ["TASK", "PRESETS", "DeepLabV3", "DeepLabV3Plus", "SegmentationEvaluator", "build_model", *_MACHINERY]
