"""DeepLab for `torch.export` and ONNX: the normalization inside, the `out` logits as the one output.

DeepLabV3 and V3+ have no data-dependent branches: both exporters take them as they are, with a
dynamic batch and image size (`ASPPPooling` pools globally and upsamples to the feature size, which
follows the input). The auxiliary head, a training aid, is left out of the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from backbones.export import NormalizedModel, base_metadata

__all__ = ["OUTPUT_NAMES", "exportable_segmenter", "segmentation_metadata"]

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
