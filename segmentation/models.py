"""DeepLabV3 and DeepLabV3+ on any registered backbone, with torchvision's calling convention and layout.

Presets name the usual combinations; the general form chooses the architecture and backbone:

    build_model("deeplabv3_r50", num_classes=21, aux_loss=True)
    build_model("deeplabv3plus", num_classes=19, backbone="timm/convnext_tiny", output_stride=16)

The output is torchvision's: a dict with `out` (logits at the input size) and, with `aux_loss`,
`aux` (the FCN head on c4). Inputs are normalized images; the models do not normalize.
"""

from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from backbones import create_backbone, load_weights
from backbones.registry import backbone_options, check_name, check_options
from backbones.weights import builder_num_classes, class_layer_prefixes

from .heads import DeepLabV3Head, DeepLabV3PlusHead, FCNHead, atrous_rates_for
from .weights_table import SEGMENTATION_WEIGHTS

__all__ = [
    "ARCHITECTURES", "CLASS_LAYERS", "PRESETS", "SEGMENTATION_WEIGHTS", "DeepLabV3", "DeepLabV3Plus", "build_model",
    "check_build_args",
]  # fmt: skip

ARCHITECTURES = ("deeplabv3", "deeplabv3plus")

PRESETS: dict[str, dict[str, str]] = {
    f"{architecture}_r{depth}": dict(architecture=architecture, backbone=f"resnet{depth}")
    for architecture in ARCHITECTURES
    for depth in (18, 50, 101)
}

#: the class-specific layers (module names) of DeepLabV3, V3+ and the aux head: left as initialised by
#: `fresh_heads` when a checkpoint has other classes; each one's weight has a row per class
CLASS_LAYERS = ("classifier.4", "classifier.predictor", "aux_classifier.4")
HEAD_PREFIXES = class_layer_prefixes(CLASS_LAYERS)


def _upsample(logits: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class DeepLabV3(nn.Module):
    """A backbone, a head on its deepest features and an optional auxiliary head on c4.

    Args:
        backbone: returns a dict of features (`backbones.create_backbone`).
        classifier: maps the `in_feature` features to logits.
        aux_classifier: maps the `aux_feature` features to logits (training only, usually).
    """

    def __init__(
        self,
        backbone: nn.Module,
        classifier: nn.Module,
        aux_classifier: nn.Module | None = None,
        *,
        in_feature: str = "c5",
        aux_feature: str = "c4",
    ):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier
        self.in_feature = in_feature
        self.aux_feature = aux_feature

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Returns `out` (N, num_classes, H, W) and, with an aux head, `aux` of the same shape."""
        size = x.shape[-2:]
        features = self.backbone(x)
        # logits leave the network in float32 under bf16/fp16 autocast too: upsampled (and later
        # arg-maxed) in half precision, close classes would tie and the border would blur
        result = OrderedDict(out=_upsample(self.classify(features).float(), size))
        if self.aux_classifier is not None:
            result["aux"] = _upsample(self.aux_classifier(features[self.aux_feature]).float(), size)
        return result

    def classify(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(features[self.in_feature])  # (N, num_classes, H/os, W/os)


class DeepLabV3Plus(DeepLabV3):
    """DeepLabV3 whose head also reads the stride-4 `low_level_feature` (the V3+ decoder)."""

    def __init__(self, *args: Any, low_level_feature: str = "c2", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.low_level_feature = low_level_feature

    def classify(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(features[self.in_feature], features[self.low_level_feature])  # (N, K, H/4, W/4)


# backbone options the model sets itself (`norm`, `frozen_stages`, `output_stride` are build_model's own)
_SET_BY_BUILDER = frozenset({"features_only", "num_classes", "out_indices", "output_stride", "norm", "frozen_stages"})


def check_build_args(name: str, options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Checks a model name and `build_model` options without building anything; returns the settings.

    Raises:
        UnknownNameError: `name` is neither a preset nor an architecture, or an option is neither an
            argument of `build_model` nor an option of the backbone; each names the closest.
    """
    options = dict(options or {})
    check_name(name, [*ARCHITECTURES, *PRESETS], what="segmentation model", where="the presets: segmentation.PRESETS")
    settings = dict(PRESETS.get(name, {})) or dict(architecture=name, backbone="resnet50")
    if options.get("backbone") is not None:
        settings["backbone"] = options["backbone"]
    backbone = settings["backbone"]
    allowed = backbone_options(backbone)  # None: a timm model or a builder taking any option
    if allowed is not None:
        where = f"segmentation.build_model's arguments and backbones.registry.backbone_options({backbone!r})"
        check_options(options, BUILD_OPTIONS | (allowed - _SET_BY_BUILDER), where=where)
    return settings


def build_model(
    name: str,
    *,
    num_classes: int | None = None,
    weights: str | None = None,
    backbone_weights: str | None = None,
    output_stride: int = 8,
    aux_loss: bool = False,
    backbone: str | None = None,
    norm: str = "bn",
    frozen_stages: int = -1,
    multi_grid: Sequence[int] | None = None,
    atrous_rates: Sequence[int] | None = None,
    aspp_channels: int = 256,
    decoder_channels: int = 256,
    separable: bool = False,
    fresh_heads: bool = False,
    **overrides: Any,
) -> DeepLabV3:
    """Builds a DeepLabV3 or DeepLabV3+.

    Args:
        name: a preset (`PRESETS`: `deeplabv3_r50`, `deeplabv3plus_r101`, ...) or an architecture,
            "deeplabv3" or "deeplabv3plus" (ResNet-50 unless `backbone` says otherwise).
        num_classes: output classes, background included; None: the `weights` tag's (21 for the
            `*.tv_coco_voc` tags). A value other than the tag's needs `fresh_heads`.
        weights: a whole-model checkpoint: a tag of `SEGMENTATION_WEIGHTS` (e.g.
            `deeplabv3_r50.tv_coco_voc`), a file (torchvision's, or our Lightning checkpoint) or a URL.
        backbone_weights: ImageNet weights for the backbone (`resnet50.tv_in1k`, a file or a URL).
        output_stride: 8, 16 or 32; the later backbone strides become dilation.
        aux_loss: add the FCN head on c4, whose output is `aux`.
        backbone: any registered backbone or `timm/<model>`, overriding the preset's.
        norm, frozen_stages: the backbone's norm and frozen stages (segmentation trains BN: "bn", -1).
        multi_grid: dilation multipliers of the last stage's blocks, e.g. (1, 2, 4).
        atrous_rates: ASPP rates; default by the deepest features' stride (`feature_info[-1].stride`):
            (12, 24, 36) at 8, (6, 12, 18) at 16, (3, 6, 9) at 32.
        aspp_channels: channels of ASPP and of the V3 head (256 in the paper and torchvision).
        decoder_channels: channels of the V3+ decoder's two 3x3 convs (256 in the paper).
        separable: depthwise-separable convs in ASPP and the V3+ decoder.
        fresh_heads: with `weights` of another number of classes, leave the class-specific
            layers as initialised (fine-tuning) instead of failing.
        **overrides: more options of the backbone (`drop_path_rate`, `zero_init_last`, ...; the list:
            `backbones.registry.backbone_options(name)`); another name is an error naming the closest.

    Example:
        >>> model = build_model("deeplabv3plus_r18", num_classes=4, output_stride=16).eval()
        >>> model(torch.randn(1, 3, 65, 65))["out"].shape
        torch.Size([1, 4, 65, 65])
    """
    num_classes = builder_num_classes(
        num_classes, weights, SEGMENTATION_WEIGHTS, fresh_heads=fresh_heads, where="segmentation.weights_table"
    )  # the tag's unless given
    settings = check_build_args(name, dict(overrides, backbone=backbone))
    plus = settings["architecture"] == "deeplabv3plus"
    out_indices = (1,) if plus else ()
    out_indices += (3, 4) if aux_loss else (4,)
    if multi_grid is not None:
        overrides["multi_grid"] = tuple(multi_grid)
    with warnings.catch_warnings():
        if weights is not None:  # the whole-model weights fill the backbone a moment later
            warnings.filterwarnings("ignore", message=".*freeze randomly initialised weights.*")
        body = create_backbone(
            settings["backbone"], weights=backbone_weights, out_indices=out_indices, output_stride=output_stride,
            norm=norm, frozen_stages=frozen_stages, **overrides,
        )  # fmt: skip
    shapes = body.output_shape()
    deep = body.feature_info[-1]
    rates = atrous_rates_for(deep.stride, atrous_rates)  # the backbone's own stride, dilation included
    aux_classifier = FCNHead(shapes["c4"].channels, num_classes) if aux_loss else None
    if plus:
        head = DeepLabV3PlusHead(
            deep.channels, shapes["c2"].channels, num_classes, atrous_rates=rates, aspp_channels=aspp_channels,
            decoder_channels=decoder_channels, separable=separable,
        )  # fmt: skip
        model = DeepLabV3Plus(body, head, aux_classifier, in_feature=deep.name)
    else:
        head = DeepLabV3Head(
            deep.channels, num_classes, atrous_rates=rates, channels=aspp_channels, separable=separable
        )
        model = DeepLabV3(body, head, aux_classifier, in_feature=deep.name)
    if weights is not None:
        load_segmentation_weights(model, weights, fresh_heads=fresh_heads)
    return model


BUILD_OPTIONS = frozenset(inspect.signature(build_model).parameters) - {"name", "overrides"}


def load_segmentation_weights(model: nn.Module, weights: str, *, fresh_heads: bool = False) -> None:
    """Loads a whole-model checkpoint strictly; an aux head the model lacks is dropped.

    With `fresh_heads` the class-specific layers may differ in shape (they stay as initialised).
    """
    load_weights(model, weights, table=SEGMENTATION_WEIGHTS, head_prefixes=HEAD_PREFIXES, fresh_heads=fresh_heads)
