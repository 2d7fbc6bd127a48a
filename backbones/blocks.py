"""Residual blocks: parameter names follow torchvision and timm so their checkpoints load strictly."""

from __future__ import annotations

from timm.layers import DropPath, SEModule
from torch import Tensor, nn

from .layers import NormLayer, zero_init_


def conv3x3(in_channels: int, out_channels: int, *, stride: int = 1, dilation: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups, bias=False
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1
    preact = False

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        stride_in_1x1: bool = False,
        se: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError(f"BasicBlock takes groups=1 and width_per_group=64, got {groups} and {width_per_group}")
        out_channels = planes * self.expansion
        self.conv1 = conv3x3(in_channels, planes, stride=stride, dilation=first_dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = norm_layer(planes)
        self.se = SEModule(out_channels) if se else None
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def zero_init_last(self) -> None:
        zero_init_(self.bn2)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        out = self.drop_path(out)
        out += shortcut  # in place, as torchvision: no extra activation-sized tensor per block
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand; optional squeeze-excitation after the last norm.

    `stride_in_1x1` puts the stride on the first 1x1 conv (the paper's and the MSRA/detectron2 weights'
    placement) instead of the 3x3 conv (torchvision's and timm's).
    """

    expansion = 4
    preact = False

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        stride_in_1x1: bool = False,
        se: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
        drop_path: float = 0.0,
    ):
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        out_channels = planes * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=stride_1x1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride=stride_3x3, dilation=first_dilation, groups=groups)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.se = SEModule(out_channels) if se else None
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def zero_init_last(self) -> None:
        zero_init_(self.bn3)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        out = self.drop_path(out)
        out += shortcut  # in place, as torchvision: no extra activation-sized tensor per block
        return self.relu(out)


class PreActBottleneck(nn.Module):
    """ResNet-v2 bottleneck: norm, ReLU, conv three times; the identity path stays clean.

    The shortcut projection (when present) reads the pre-activated input, as in the paper and timm.
    """

    expansion = 4
    preact = True

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        stride_in_1x1: bool = False,
        se: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if se or stride_in_1x1:
            raise ValueError("PreActBottleneck supports neither se=True nor stride_in_1x1=True")
        width = int(planes * (width_per_group / 64.0)) * groups
        self.bn1 = norm_layer(in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn2 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride=stride, dilation=first_dilation, groups=groups)
        self.bn3 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)  # no norm after the last conv: zero the conv, as timm does

    def forward(self, x: Tensor) -> Tensor:
        x_preact = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        out = self.conv1(x_preact)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return self.drop_path(out) + shortcut
