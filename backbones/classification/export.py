"""Classifiers for `torch.export` and ONNX: the normalization inside, the logits as the one output.

A classifier has no data-dependent branches: both exporters take it as it is, with a dynamic batch
and image size. Its checkpoint's network is the whole classifier (`model.*`, or the EMA weights
`ema.module.*`), which `tools/export_backbone.py` writes under torchvision's and timm's names.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from backbones.export import ExportSource, NetworkWeights, NormalizedModel, TaskExport, base_metadata
from backbones.registry import create_model
from backbones.weights_table import CLASS_LAYERS

__all__ = ["OUTPUT_NAMES", "ClassificationExport"]

OUTPUT_NAMES = ("logits",)


class ClassificationExport(TaskExport):
    """Images in [0, 1] -> logits (N, num_classes), normalized inside with the task's mean and std."""

    task = "classification"
    default_size = (224, 224)
    class_layers = CLASS_LAYERS
    has_ema = True

    def source(self, task: nn.Module) -> ExportSource:
        hp = task.hparams  # the task normalizes its [0, 1] input: the export does it inside
        return ExportSource(
            self.task, hp.model, task.eval_model, int(hp.num_classes), hp.class_names, None, tuple(hp.mean),
            tuple(hp.std),
        )  # fmt: skip

    def build(self, name: str, *, num_classes: int, weights: str) -> nn.Module:
        return create_model(name, num_classes=num_classes, weights=weights)

    def network(self, hparams: dict[str, Any], *, ema: bool = False) -> NetworkWeights:
        options = dict(hparams.get("model_options") or {})
        model, num_classes = hparams["model"], int(hparams["num_classes"])
        return NetworkWeights(
            ("ema.module.",) if ema else ("model.",), lambda: create_model(model, num_classes=num_classes, **options),
            repr(model), f"create_model({model!r}, weights={{weights}}) or create_backbone(...)",
        )  # fmt: skip

    def exportable(self, source: ExportSource) -> tuple[nn.Module, tuple[str, ...], dict[str, Any]]:
        metadata = base_metadata(
            task=self.task, architecture=source.architecture, num_classes=source.num_classes,
            class_names=source.class_names, mean=source.mean, std=source.std,
        )  # fmt: skip
        metadata["postprocess"] = "softmax over the logits gives the class probabilities"
        return NormalizedModel(source.model, source.mean, source.std).eval(), OUTPUT_NAMES, metadata
