"""DeepLab for `torch.export` and ONNX: the normalization inside, the `out` logits as the one output.

DeepLabV3 and V3+ have no data-dependent branches: both exporters take them as they are, with a
dynamic batch and image size (`ASPPPooling` pools globally and upsamples to the feature size, which
follows the input). The auxiliary head, a training aid, is left out of the graph. `SegmentationExport`
is what the tools ask of a segmentation model (registered with the task in `segmentation/__init__.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from backbones.export import (
    ExportSource,
    NetworkWeights,
    NormalizedModel,
    TaskExport,
    backbone_weights,
    base_metadata,
)

from .models import CLASS_LAYERS, PRESETS, build_model

__all__ = ["OUTPUT_NAMES", "SegmentationExport", "exportable_segmenter", "segmentation_metadata"]

OUTPUT_NAMES = ("logits",)


def exportable_segmenter(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """`model` (a `DeepLabV3`/`DeepLabV3Plus`) as images in [0, 1] -> logits (N, num_classes, H, W).

    Example:
        >>> model = build_model("deeplabv3plus_r18", num_classes=4).eval()
        >>> module = exportable_segmenter(model, IMAGENET_MEAN, IMAGENET_STD)
        >>> module(torch.rand(2, 3, 65, 97)).shape
        torch.Size([2, 4, 65, 97])
    """
    return NormalizedModel(model, mean, std, output="out").eval()


def segmentation_metadata(
    *,
    architecture: str,
    num_classes: int,
    class_names: Sequence[str] | None,
    mean: Sequence[float],
    std: Sequence[float],
) -> dict[str, Any]:
    """What a runtime needs beside the model: the normalization applied inside, the classes, the output."""
    metadata = base_metadata(
        task="segmentation", architecture=architecture, num_classes=num_classes, class_names=class_names,
        mean=mean, std=std,
    )  # fmt: skip
    metadata["postprocess"] = "argmax over the class axis: the label of each pixel (softmax: probabilities)"
    return metadata


class SegmentationExport(TaskExport):
    """Images in [0, 1] -> logits (N, num_classes, H, W); the exported model is called as `SegmentationTask`:
    `model(images)["out"]`."""

    task = "segmentation"
    default_size = (512, 512)
    class_layers = CLASS_LAYERS

    def source(self, task: nn.Module) -> ExportSource:
        hp = task.hparams
        return ExportSource(
            self.task, hp.model, task.model, int(hp.num_classes), hp.class_names, None, tuple(hp.mean), tuple(hp.std)
        )

    def build(self, name: str, *, num_classes: int, weights: str) -> nn.Module:
        return build_model(name, num_classes=num_classes, weights=weights)

    def network(self, hparams: dict[str, Any], *, ema: bool = False) -> NetworkWeights:
        return backbone_weights(hparams, PRESETS, ("model.backbone.",))  # DeepLab holds it as is

    def exportable(self, source: ExportSource) -> tuple[nn.Module, tuple[str, ...], dict[str, Any]]:
        metadata = segmentation_metadata(
            architecture=source.architecture, num_classes=source.num_classes, class_names=source.class_names,
            mean=source.mean, std=source.std,
        )  # fmt: skip
        return exportable_segmenter(source.model, source.mean, source.std), OUTPUT_NAMES, metadata

    def outputs(self, run, images: Tensor) -> dict[str, Tensor]:
        return {"out": run(images)["logits"]}
