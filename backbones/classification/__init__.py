"""ImageNet-style classification pretraining: image-folder data, a synthetic dataset and the Lightning task.

The task and the data import Lightning and OpenCV: they load on first use, so registering the task
(`backbones.tasks`) and its export (`.export`) import neither.
"""

from backbones.lazy import lazy_exports
from backbones.tasks import TaskEntry, register_task
from backbones.weights_table import CLASS_LAYERS  # the classifier heads' layer names, for the door and the tools

TASK = register_task(
    TaskEntry(
        name="classification",
        task="backbones.classification.task:ClassificationTask",
        models=("backbones.registry:list_backbones",),
        export="backbones.classification.export:ClassificationExport",
        benchmark="backbones.classification.speed:ClassificationBenchmark",
        train_tool="tools/train_cls.py",
        prefixes=("timm/",),
    )
)

_MACHINERY = {
    "ClassificationTask": ".task",
    "ImageFileError": ".data",
    "ImageFolder": ".data",
    "ImageFolderDataModule": ".data",
    "ImageFolderError": ".data",
    "SHAPES_CLASSIFICATION_CLASSES": ".synthetic",
    "ShapesClassificationDataModule": ".data",
    "generate_shapes_classification": ".synthetic",
    "read_rgb_image": ".data",
    "shapes_classification_root": ".synthetic",
}
__getattr__, __dir__ = lazy_exports(__name__, _MACHINERY)

__all__ = ["CLASS_LAYERS", "TASK", *_MACHINERY]
