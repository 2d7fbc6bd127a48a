"""Faster and Mask R-CNN on any registered backbone, built from torchvision's detection parts.

Presets name the usual combinations; the general form chooses the architecture, backbone, neck and
head independently:

    build_model("mask_rcnn_r50_fpn", num_classes=81)
    build_model("faster_rcnn", num_classes=4, backbone="resnet18", neck="fpn", head="v2", norm="gn")
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from backbones import create_backbone, get_norm_layer, load_weights
from backbones.features import FeatureInfo
from backbones.fpn import FPN
from backbones.registry import backbone_options, check_name, check_options
from backbones.weights import builder_num_classes, class_layer_prefixes

from .weights_table import DETECTION_WEIGHTS

__all__ = [
    "ARCHITECTURES", "CLASS_LAYERS", "HEADS", "NECKS", "PRESETS", "TORCHVISION_OPTIONS", "build_model",
    "check_build_args",
]  # fmt: skip

ARCHITECTURES = ("faster_rcnn", "mask_rcnn")
NECKS = ("fpn", "dc5")
HEADS = ("v1", "v2")

PRESETS: dict[str, dict[str, Any]] = {
    "faster_rcnn_r50_fpn": dict(architecture="faster_rcnn", backbone="resnet50", neck="fpn", head="v1"),
    # torchvision's v2 recipe keeps plain BN in the backbone (its checkpoints carry BN statistics to match)
    "faster_rcnn_r50_fpn_v2": dict(architecture="faster_rcnn", backbone="resnet50", neck="fpn", head="v2", norm="bn"),
    "mask_rcnn_r50_fpn": dict(architecture="mask_rcnn", backbone="resnet50", neck="fpn", head="v1"),
    "mask_rcnn_r50_fpn_v2": dict(architecture="mask_rcnn", backbone="resnet50", neck="fpn", head="v2", norm="bn"),
    # detectron2's DC5 (Base-RCNN-DilatedC5.yaml): every res5 block dilated by 2 (stride 16), RPN and RoI heads
    # on that one map; box head 2 fc of 1024 on 7x7 RoIAlign of the 2048-channel C5; mask head 4 convs of 256
    # on 14x14 RoIAlign; RPN keeps 12000/2000 proposals before/after NMS in training, 6000/1000 in test.
    "faster_rcnn_r50_dc5": dict(architecture="faster_rcnn", backbone="resnet50", neck="dc5", head="v1"),
    "mask_rcnn_r50_dc5": dict(architecture="mask_rcnn", backbone="resnet50", neck="dc5", head="v1"),
    "faster_rcnn_r101_fpn": dict(architecture="faster_rcnn", backbone="resnet101", neck="fpn", head="v1"),
    "mask_rcnn_r101_fpn": dict(architecture="mask_rcnn", backbone="resnet101", neck="fpn", head="v1"),
    "faster_rcnn_r18_fpn": dict(architecture="faster_rcnn", backbone="resnet18", neck="fpn", head="v1"),
    "mask_rcnn_r18_fpn": dict(architecture="mask_rcnn", backbone="resnet18", neck="fpn", head="v1"),
}

# torchvision settings each neck implies, under the user's: the FPN keeps torchvision's defaults (the
# pre-NMS count is per level); DC5 has one map, so detectron2's DC5 counts hold for the whole image.
NECK_DEFAULTS: dict[str, dict[str, int]] = {
    "fpn": {},
    "dc5": dict(
        rpn_pre_nms_top_n_train=12000,
        rpn_post_nms_top_n_train=2000,
        rpn_pre_nms_top_n_test=6000,
        rpn_post_nms_top_n_test=1000,
    ),
}

# torchvision's FasterRCNN/MaskRCNN (and transform) arguments that build_model passes on; it builds the parts
# (anchor generator, RoI pools, heads, predictors) itself. Anything else is an error: torchvision would swallow it.
TORCHVISION_OPTIONS = frozenset(
    (set(inspect.signature(MaskRCNN).parameters) | set(inspect.signature(GeneralizedRCNNTransform).parameters))
    - {"backbone", "num_classes", "kwargs", "rpn_anchor_generator", "rpn_head", "box_roi_pool", "box_head",
       "box_predictor", "mask_roi_pool", "mask_head", "mask_predictor"}
)  # fmt: skip
# backbone options the detector sets itself (`norm` and `frozen_stages` are build_model's own)
_SET_BY_BUILDER = frozenset({"features_only", "num_classes", "out_indices", "output_stride", "norm", "frozen_stages"})

#: the class-specific layers (module names): left as initialised when a checkpoint has another number of
#: classes (`fresh_heads`); the first one's weight has a row per class
CLASS_LAYERS = ("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred",
                "roi_heads.mask_predictor.mask_fcn_logits")  # fmt: skip
HEAD_PREFIXES = class_layer_prefixes(CLASS_LAYERS)


class Float32BoxCoder(BoxCoder):
    """torchvision's box coder, decoding in float32 whatever the autocast dtype.

    Under bf16/fp16 autocast the regression comes out in half precision and torchvision decodes in
    its dtype: proposals and boxes at 256-512 px would snap to a 2 px grid (bf16 keeps 8 bits).
    """

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        with torch.autocast(rel_codes.device.type, enabled=False):
            return super().decode(rel_codes.float(), [b.float() for b in boxes])


class Float32Transform(GeneralizedRCNNTransform):
    """torchvision's transform, whose eval `postprocess` (box rescaling, mask pasting) runs in float32."""

    def postprocess(
        self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:  # fmt: skip
        if self.training or not result:
            return result
        result = [{k: v.float() if v.is_floating_point() else v for k, v in r.items()} for r in result]
        with torch.autocast(result[0]["boxes"].device.type, enabled=False):
            return super().postprocess(result, image_shapes, original_image_sizes)


def _decode_in_float32(model: FasterRCNN, *, resize_in_training: bool) -> None:
    """Mixed precision runs the network in bf16/fp16, never the box arithmetic (fp32 results are unchanged)."""
    for part in (model.rpn, model.roi_heads):
        part.box_coder = Float32BoxCoder(part.box_coder.weights, part.box_coder.bbox_xform_clip)
    t = model.transform
    model.transform = Float32Transform(
        t.min_size, t.max_size, t.image_mean, t.image_std, size_divisible=t.size_divisible, fixed_size=t.fixed_size,
        _skip_resize=not resize_in_training,
    )  # fmt: skip


def _choice(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what}={value!r}; choose one of {', '.join(map(repr, allowed))}")
    return value


def _neck(
    neck: str,
    backbone: str,
    *,
    backbone_weights: str | None,
    norm: str,
    frozen_stages: int,
    fpn_norm: str | None,
    fpn_channels: int,
    backbone_kwargs: dict,
) -> tuple[nn.Module, list[str]]:
    """The backbone with its neck, and the feature names the RoI heads pool from."""
    if neck == "fpn":
        body = create_backbone(
            backbone, weights=backbone_weights, norm=norm, frozen_stages=frozen_stages, **backbone_kwargs
        )
        module = FPN(body, out_channels=fpn_channels, top_block="maxpool", norm=fpn_norm)
        roi_features = [info.name for info in module.feature_info[:-1]]  # p2..p5; p6 feeds the RPN only
    else:  # dc5: C5 with dilation instead of the last stride, no FPN (detectron2's DC5)
        if not backbone.startswith("timm/"):  # timm models keep their own dilation pattern
            backbone_kwargs = {"dilate_first_block": True, **backbone_kwargs}  # detectron2 dilates all of res5
        module = create_backbone(
            backbone,
            weights=backbone_weights,
            out_indices=(4,),
            output_stride=16,
            norm=norm,
            frozen_stages=frozen_stages,
            **backbone_kwargs,
        )
        roi_features = [module.feature_info[-1].name]
    module.out_channels = module.feature_info[-1].channels  # torchvision's heads read this attribute
    return module, roi_features


#: anchor side per unit of feature stride: 32 px on the stride-4 map up to 512 px on stride 64 (FPN paper)
ANCHOR_SIZE_PER_STRIDE = 8
#: the anchor sides of a single map (DC5): the FPN's five, all on that map (detectron2's DC5)
SINGLE_MAP_ANCHOR_SIZES = (32, 64, 128, 256, 512)


def _anchors(
    feature_info: Sequence[FeatureInfo], sizes: Sequence[int] | None, ratios: Sequence[float]
) -> AnchorGenerator:
    """One anchor size per pyramid level (default: 8x the level's stride, read from `feature_info`), or every
    size on a single map."""
    num_levels = len(feature_info)
    if num_levels == 1:  # every size on the single C5 map
        return AnchorGenerator((tuple(sizes or SINGLE_MAP_ANCHOR_SIZES),), (tuple(ratios),))
    sizes = tuple(sizes or (ANCHOR_SIZE_PER_STRIDE * info.stride for info in feature_info))
    if len(sizes) != num_levels:
        raise ValueError(f"anchor_sizes={sizes}: give one size per pyramid level ({num_levels})")
    return AnchorGenerator(tuple((s,) for s in sizes), (tuple(ratios),) * num_levels)


def build_model(
    name: str,
    *,
    num_classes: int | None = None,
    weights: str | None = None,
    backbone_weights: str | None = None,
    backbone: str | None = None,
    neck: str | None = None,
    head: str | None = None,
    norm: str | None = None,
    frozen_stages: int | None = None,
    fpn_norm: str | None = None,
    fpn_channels: int = 256,
    head_channels: int | None = None,
    head_norm: str = "bn",
    box_head_dim: int = 1024,
    mask_head_convs: int = 4,
    roi_sampling_ratio: int = 2,
    anchor_sizes: Sequence[int] | None = None,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    resize_in_training: bool = True,
    backbone_kwargs: dict | None = None,
    fresh_heads: bool = False,
    **overrides: Any,
) -> FasterRCNN | MaskRCNN:
    """Builds a Faster or Mask R-CNN; torchvision's calling convention and checkpoint layout.

    Args:
        name: a preset (`PRESETS`) or an architecture, "faster_rcnn" or "mask_rcnn".
        num_classes: including the background class, as in torchvision; None: the `weights` tag's (91 for
            the `*.tv_coco` tags), as torchvision's `weights=`. A value other than the tag's needs `fresh_heads`.
        weights: a whole-detector checkpoint: a tag (`detection.weights_table.DETECTION_WEIGHTS`,
            e.g. `faster_rcnn_r50_fpn.tv_coco`), a file (torchvision's or our Lightning checkpoint) or a URL.
        backbone_weights: ImageNet weights for the backbone (a tag such as `resnet50.tv_in1k`, a file or URL).
        backbone, neck, head: override the preset: any registered backbone (or `timm/<model>`),
            "fpn" or "dc5", "v1" (two fc) or "v2" (4 convs + 1 fc with norm, RPN with 2 convs).
        norm, frozen_stages: backbone norm policy. Default: with pretrained weights "frozen_bn" and 1
            (the stem and first stage frozen, detectron2's and torchvision's practice); from scratch
            "bn" and -1.
        fpn_norm: norm inside the FPN (default: none for v1, "bn" for v2 as torchvision).
        fpn_channels: channels of the FPN outputs (detectron2's FPN.OUT_CHANNELS); 256 as
            torchvision. Smaller is much cheaper for small data.
        head_channels: width of the mask head's convs and upsampling and of the v2 box head's convs
            (detectron2's CONV_DIM); default `fpn_channels`. With dc5 the heads read the 2048-channel
            C5 and reduce it to this width in their first conv, as detectron2.
        box_head_dim: width of the box head's fully connected layers (1024, detectron2's FC_DIM).
        mask_head_convs: 3x3 convs of the mask head before its upsampling (4, detectron2's NUM_CONV).
        roi_sampling_ratio: bilinear samples per RoIAlign bin side (torchvision's 2; 0 = adaptive).
        anchor_sizes: one anchor side per pyramid level, default 8x the level's stride from the neck's
            `feature_info` (32 to 512 on p2 to p6); with dc5 every size on the one map (default 32 to 512).
        aspect_ratios: anchor height/width ratios, at every level.
        resize_in_training: False when the data pipeline has already resized training images.
        fresh_heads: with `weights` of another number of classes, load everything but the
            class-specific layers (`CLASS_LAYERS`), which keep their fresh initialisation
            (fine-tuning, e.g. from COCO to a new dataset); without it such weights are an error.
        backbone_kwargs: more options of the backbone (`backbones.registry.backbone_options(name)`).
        **overrides: passed to torchvision's FasterRCNN/MaskRCNN: one of `TORCHVISION_OPTIONS`
            (min_size, max_size, rpn_pre_nms_top_n_train, box_batch_size_per_image,
            box_detections_per_img, ...); any other name is an error naming the closest.
    """
    num_classes = builder_num_classes(
        num_classes, weights, DETECTION_WEIGHTS, fresh_heads=fresh_heads, where="detection.weights_table"
    )  # the tag's unless given
    settings = check_build_args(name, dict(overrides, backbone=backbone, backbone_kwargs=backbone_kwargs))
    settings.update({k: v for k, v in dict(backbone=backbone, neck=neck, head=head).items() if v is not None})
    neck_name = _choice(settings["neck"], NECKS, "neck")
    head_name = _choice(settings["head"], HEADS, "head")
    pretrained = weights is not None or backbone_weights is not None
    norm = norm or settings.get("norm") or ("frozen_bn" if pretrained else "bn")
    frozen_stages = (1 if pretrained else -1) if frozen_stages is None else frozen_stages
    if fpn_norm is None and head_name == "v2":
        fpn_norm = "bn"
    with warnings.catch_warnings():
        if weights is not None:  # the whole-detector weights fill the backbone a moment later
            warnings.filterwarnings("ignore", message=".*freeze randomly initialised weights.*")
        body, roi_features = _neck(
            neck_name,
            settings["backbone"],
            backbone_weights=backbone_weights,
            norm=norm,
            frozen_stages=frozen_stages,
            fpn_norm=fpn_norm,
            fpn_channels=fpn_channels,
            backbone_kwargs=backbone_kwargs or {},
        )
    anchor_generator = _anchors(body.feature_info, anchor_sizes, aspect_ratios)
    channels = body.out_channels
    head_channels = fpn_channels if head_channels is None else head_channels
    parts: dict[str, Any] = dict(
        rpn_anchor_generator=anchor_generator,
        box_roi_pool=MultiScaleRoIAlign(roi_features, output_size=7, sampling_ratio=roi_sampling_ratio),
    )
    head_norm_layer = get_norm_layer(head_norm)
    if head_name == "v2":
        parts["rpn_head"] = RPNHead(channels, anchor_generator.num_anchors_per_location()[0], conv_depth=2)
        parts["box_head"] = FastRCNNConvFCHead(
            (channels, 7, 7), [head_channels] * 4, [box_head_dim], norm_layer=head_norm_layer
        )
    else:
        parts["rpn_head"] = RPNHead(channels, anchor_generator.num_anchors_per_location()[0])
        parts["box_head"] = TwoMLPHead(channels * 7 * 7, box_head_dim)
    parts["box_predictor"] = FastRCNNPredictor(box_head_dim, num_classes)
    if settings["architecture"] == "mask_rcnn":
        parts["mask_roi_pool"] = MultiScaleRoIAlign(roi_features, output_size=14, sampling_ratio=roi_sampling_ratio)
        mask_norm = head_norm_layer if head_name == "v2" else None
        parts["mask_head"] = MaskRCNNHeads(channels, [head_channels] * mask_head_convs, 1, norm_layer=mask_norm)
        parts["mask_predictor"] = MaskRCNNPredictor(head_channels, head_channels, num_classes)
    detector = MaskRCNN if settings["architecture"] == "mask_rcnn" else FasterRCNN
    model = detector(body, **parts, **{**NECK_DEFAULTS[neck_name], **overrides})
    _decode_in_float32(model, resize_in_training=resize_in_training)
    if weights is not None:
        load_detector_weights(model, weights, fresh_heads=fresh_heads)
    return model


BUILD_OPTIONS = frozenset(inspect.signature(build_model).parameters) - {"name", "overrides"}

_WHERE = "detection.build_model's arguments and detection.models.TORCHVISION_OPTIONS"


def check_build_args(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Checks a model name and `build_model` options without building anything; returns the preset.

    Raises:
        UnknownNameError: `name` is neither a preset nor an architecture, an option is neither an
            argument of `build_model` nor of torchvision's detector (`TORCHVISION_OPTIONS`), or a
            `backbone_kwargs` key is not an option of the backbone; each names the closest.
    """
    options = dict(options or {})
    check_name(name, [*ARCHITECTURES, *PRESETS], what="detection model", where="the presets: detection.PRESETS")
    settings = dict(PRESETS.get(name, {})) or dict(architecture=name, backbone="resnet50", neck="fpn", head="v1")
    check_options(options, BUILD_OPTIONS | TORCHVISION_OPTIONS, where=_WHERE)
    backbone = options.get("backbone") or settings["backbone"]
    allowed = backbone_options(backbone)
    if allowed is not None:
        where = f"backbones.registry.backbone_options({backbone!r})"
        check_options(options.get("backbone_kwargs") or {}, allowed - _SET_BY_BUILDER, where=where)
    return settings


def load_detector_weights(model: nn.Module, weights: str, *, fresh_heads: bool = False) -> None:
    """Loads a whole-detector checkpoint; with `fresh_heads` the class-specific layers may differ in shape.

    Raises:
        WeightsError: a key is missing, unexpected or of another shape (each named, with both shapes);
            when only the class-specific layers differ, the message suggests `fresh_heads=True`.
    """
    load_weights(model, weights, table=DETECTION_WEIGHTS, head_prefixes=HEAD_PREFIXES, fresh_heads=fresh_heads)
