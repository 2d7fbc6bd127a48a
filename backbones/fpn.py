"""Feature Pyramid Network over any backbone that reports its output shapes."""

from __future__ import annotations

from collections import OrderedDict
from itertools import pairwise

from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from .features import Backbone, FeatureInfo
from .layers import NormLayer, get_norm_layer

__all__ = ["FPN"]

_TOP_BLOCKS = ("maxpool", "p6p7")


class FPN(Backbone):
    """A backbone (`body`) followed by torchvision's FPN (`fpn`); itself a backbone with `p*` outputs.

    The module layout is torchvision's `BackboneWithFPN`, so its detection checkpoints load as they are.

    Args:
        backbone: returns an ordered dict of features and lists them in `feature_info`.
        out_channels: channels of every pyramid level.
        top_block: "maxpool" adds P6 as a stride-2 max-pool of P5 (the Faster R-CNN layout);
            "p6p7" adds P6 and P7 convs (the RetinaNet layout); None adds nothing.
        in_features: which backbone outputs to use (default: all of them).
        p6p7_from_c5: with "p6p7", start P6 from C5 (RetinaNet's paper) instead of P5.
        norm: an optional norm after each FPN conv ("gn", "bn", ... or a callable).

    Example:
        >>> fpn = FPN(create_backbone("resnet18"))  # c2..c5 -> p2..p6
        >>> [(f.name, f.channels, f.stride) for f in fpn.feature_info]
        [('p2', 256, 4), ('p3', 256, 8), ('p4', 256, 16), ('p5', 256, 32), ('p6', 256, 64)]
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        out_channels: int = 256,
        top_block: str | None = "maxpool",
        in_features: tuple[str, ...] | None = None,
        p6p7_from_c5: bool = False,
        norm: str | NormLayer | None = None,
    ):
        super().__init__()
        if top_block not in (*_TOP_BLOCKS, None):
            raise ValueError(f"top_block={top_block!r}; choose 'maxpool', 'p6p7' or None")
        shapes = backbone.output_shape()
        in_features = tuple(in_features or shapes)
        unknown = [f for f in in_features if f not in shapes]
        if unknown:
            raise ValueError(f"in_features {unknown} are not outputs of the backbone; it has {list(shapes)}")
        inputs = [shapes[name] for name in in_features]
        strides = [info.stride for info in inputs]
        if any(b != 2 * a for a, b in pairwise(strides)):
            raise ValueError(f"FPN needs features whose strides double level by level; got {strides}")
        self.in_features = in_features
        extra, num_extra = None, 0
        if top_block == "maxpool":
            extra, num_extra = LastLevelMaxPool(), 1
        elif top_block == "p6p7":
            p6_in = inputs[-1].channels if p6p7_from_c5 else out_channels
            extra, num_extra = LastLevelP6P7(p6_in, out_channels), 2
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(
            [info.channels for info in inputs],
            out_channels,
            extra_blocks=extra,
            norm_layer=get_norm_layer(norm) if norm is not None else None,
        )
        levels = [_level(info.stride) for info in inputs]
        levels += [levels[-1] + k for k in range(1, num_extra + 1)]
        self.feature_info = [FeatureInfo(f"p{level}", out_channels, 2**level) for level in levels]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        features = self.body(x)
        pyramid = self.fpn(OrderedDict((name, features[name]) for name in self.in_features))
        return OrderedDict((info.name, level) for info, level in zip(self.feature_info, pyramid.values(), strict=True))


def _level(stride: int) -> int:
    return stride.bit_length() - 1
