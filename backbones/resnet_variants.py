"""The registered ResNet family: a table of variants, no logic."""

from __future__ import annotations

import inspect
from functools import partial

from .blocks import BasicBlock, Bottleneck, PreActBottleneck
from .registry import register_backbone
from .resnet import ResNet

_BASIC, _BOTTLENECK, _PREACT = BasicBlock, Bottleneck, PreActBottleneck
_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

# name: (block, depth, architecture options)
VARIANTS = {
    "resnet18": (_BASIC, 18, {}),
    "resnet34": (_BASIC, 34, {}),
    "resnet50": (_BOTTLENECK, 50, {}),
    "resnet101": (_BOTTLENECK, 101, {}),
    "resnet152": (_BOTTLENECK, 152, {}),
    "resnet50c": (_BOTTLENECK, 50, {"deep_stem": True}),
    "resnet101c": (_BOTTLENECK, 101, {"deep_stem": True}),
    "resnet50d": (_BOTTLENECK, 50, {"deep_stem": True, "avg_down": True}),
    "resnet101d": (_BOTTLENECK, 101, {"deep_stem": True, "avg_down": True}),
    "resnet152d": (_BOTTLENECK, 152, {"deep_stem": True, "avg_down": True}),
    "resnext50_32x4d": (_BOTTLENECK, 50, {"groups": 32, "width_per_group": 4}),
    "resnext101_32x8d": (_BOTTLENECK, 101, {"groups": 32, "width_per_group": 8}),
    "resnext101_64x4d": (_BOTTLENECK, 101, {"groups": 64, "width_per_group": 4}),
    "wide_resnet50_2": (_BOTTLENECK, 50, {"width_per_group": 128}),
    "wide_resnet101_2": (_BOTTLENECK, 101, {"width_per_group": 128}),
    "seresnet50": (_BOTTLENECK, 50, {"se": True}),
    "seresnet101": (_BOTTLENECK, 101, {"se": True}),
    "seresnext50_32x4d": (_BOTTLENECK, 50, {"se": True, "groups": 32, "width_per_group": 4}),
    "resnetv2_50": (_PREACT, 50, {}),
    "resnetv2_101": (_PREACT, 101, {}),
}


def _build(block, depth: int, options: dict, **kwargs) -> ResNet:
    return ResNet(block=block, layers=_DEPTHS[depth], **{**options, **kwargs})


# A builder shows ResNet's keyword arguments (less block and layers), so callers can check option names.
_SIGNATURE = inspect.Signature(
    [p for name, p in inspect.signature(ResNet).parameters.items() if name not in ("block", "layers")]
)

for _name, (_block, _depth, _options) in VARIANTS.items():
    _builder = partial(_build, _block, _depth, _options)
    _builder.__signature__ = _SIGNATURE
    register_backbone(_name)(_builder)
