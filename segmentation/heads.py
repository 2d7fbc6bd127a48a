"""DeepLab heads: ASPP with configurable rates, the DeepLabV3 head, the DeepLabV3+ decoder, the FCN aux head.

ASPP, its branches and the FCN head are torchvision's own classes, so the DeepLabV3 head keeps
torchvision's parameter names (`classifier.0.convs.0.0.weight`, ...) and its checkpoints load strictly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.models.segmentation.fcn import FCNHead

__all__ = [
    "ASPP",
    "DEFAULT_ATROUS_RATES",
    "DeepLabV3Head",
    "DeepLabV3PlusHead",
    "FCNHead",
    "SeparableConv2d",
    "atrous_rates_for",
    "make_aspp",
]

# The paper's rates scale with the feature resolution: (6, 12, 18) at stride 16, doubled at 8.
DEFAULT_ATROUS_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


def atrous_rates_for(stride: int, atrous_rates: Sequence[int] | None = None) -> tuple[int, ...]:
    """The given rates, or the default ones of features at `stride` (the backbone's `feature_info[-1].stride`).

    Example:
        >>> atrous_rates_for(16)
        (6, 12, 18)
    """
    if atrous_rates is not None:
        rates = tuple(int(r) for r in atrous_rates)
        if not rates or min(rates) < 1:
            raise ValueError(f"atrous_rates={tuple(atrous_rates)}; give one or more rates >= 1")
        return rates
    if stride not in DEFAULT_ATROUS_RATES:
        raise ValueError(
            f"the deepest features have stride {stride}; default atrous rates exist for strides "
            f"{', '.join(map(str, DEFAULT_ATROUS_RATES))}: give atrous_rates"
        )
    return DEFAULT_ATROUS_RATES[stride]


class SeparableConv2d(nn.Sequential):
    """A depthwise (dilated) 3x3 conv, then a pointwise 1x1 conv; no norm in between (as in DeepLabV3+)."""

    def __init__(self, in_channels: int, out_channels: int, *, dilation: int = 1):
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, 3, padding=dilation, dilation=dilation, groups=in_channels, bias=False
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)


def _conv3x3(in_channels: int, out_channels: int, *, dilation: int = 1, separable: bool = False) -> nn.Module:
    if separable:
        return SeparableConv2d(in_channels, out_channels, dilation=dilation)
    return nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)


def make_aspp(
    in_channels: int, atrous_rates: Sequence[int], *, out_channels: int = 256, separable: bool = False
) -> ASPP:
    """torchvision's ASPP: a 1x1 branch, one 3x3 branch per rate, image pooling, then a 1x1 projection.

    With `separable`, the atrous branches use depthwise-separable convs (their keys then differ
    from torchvision's: `convs.1.0.depthwise.weight`, `convs.1.0.pointwise.weight`).

    Example:
        >>> make_aspp(2048, (12, 24, 36))(torch.randn(2, 2048, 9, 9)).shape
        torch.Size([2, 256, 9, 9])
    """
    rates = tuple(atrous_rates)
    aspp = ASPP(in_channels, rates, out_channels)
    if separable:
        for branch, rate in zip(aspp.convs[1:-1], rates, strict=True):  # branch = (conv, bn, relu)
            branch[0] = SeparableConv2d(in_channels, out_channels, dilation=rate)
    return aspp


class DeepLabV3Head(nn.Sequential):
    """ASPP, a 3x3 conv with BN and ReLU, then the 1x1 classifier: torchvision's `DeepLabHead` layout.

    Input (N, in_channels, h, w); output logits (N, num_classes, h, w).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        atrous_rates: Sequence[int] = (12, 24, 36),
        channels: int = 256,
        separable: bool = False,
    ):
        super().__init__(
            make_aspp(in_channels, atrous_rates, out_channels=channels, separable=separable),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, num_classes, 1),
        )


class DeepLabV3PlusHead(nn.Module):
    """The DeepLabV3+ decoder: ASPP on the deep features, upsampled and joined with the projected
    low-level features, two 3x3 convs, then the 1x1 classifier.

    Args:
        in_channels: channels of the deep features (c5).
        low_level_channels: channels of the low-level features (c2, stride 4).
        num_classes: output classes.
        atrous_rates: ASPP rates.
        aspp_channels: ASPP output channels (256 in the paper).
        low_level_project: channels the low-level features are projected to (48 in the paper).
        decoder_channels: channels of the two 3x3 convs (256 in the paper).
        separable: depthwise-separable convs in ASPP and the decoder.

    Example:
        >>> head = DeepLabV3PlusHead(2048, 256, 21, atrous_rates=(6, 12, 18))
        >>> head(torch.randn(1, 2048, 32, 32), torch.randn(1, 256, 128, 128)).shape
        torch.Size([1, 21, 128, 128])
    """

    def __init__(
        self,
        in_channels: int,
        low_level_channels: int,
        num_classes: int,
        *,
        atrous_rates: Sequence[int] = (6, 12, 18),
        aspp_channels: int = 256,
        low_level_project: int = 48,
        decoder_channels: int = 256,
        separable: bool = False,
    ):
        super().__init__()
        self.aspp = make_aspp(in_channels, atrous_rates, out_channels=aspp_channels, separable=separable)
        self.project = nn.Sequential(
            nn.Conv2d(low_level_channels, low_level_project, 1, bias=False),
            nn.BatchNorm2d(low_level_project),
            nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            _conv3x3(aspp_channels + low_level_project, decoder_channels, separable=separable),
            nn.BatchNorm2d(decoder_channels),
            nn.ReLU(),
            _conv3x3(decoder_channels, decoder_channels, separable=separable),
            nn.BatchNorm2d(decoder_channels),
            nn.ReLU(),
        )
        self.predictor = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward(self, features: Tensor, low_level: Tensor) -> Tensor:
        x = self.aspp(features)  # (N, aspp_channels, H/os, W/os)
        low = self.project(low_level)  # (N, 48, H/4, W/4)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        x = self.decoder(torch.cat([x, low], dim=1))  # (N, decoder_channels, H/4, W/4)
        return self.predictor(x)  # (N, num_classes, H/4, W/4)
