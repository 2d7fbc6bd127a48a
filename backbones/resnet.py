"""The ResNet family in one network class: torchvision's and timm's parameter names, any output stride."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from timm.layers import AvgPool2dSame
from torch import Tensor, nn

from .blocks import BasicBlock, Bottleneck, PreActBottleneck
from .features import Backbone, FeatureInfo, check_out_indices, check_output_stride, feature_name, feature_stride
from .layers import NormLayer, freeze_module, get_norm_layer

__all__ = ["ResNet", "make_stages"]

Block = type[BasicBlock] | type[Bottleneck] | type[PreActBottleneck]


def _downsample(
    in_channels: int, out_channels: int, *, stride: int, dilation: int, avg_down: bool, norm_layer: NormLayer | None
) -> nn.Sequential:
    """The projection shortcut: a strided 1x1 conv, or (avg_down, the 'd' variants) 2x2 avg-pool then 1x1 conv."""
    conv = nn.Conv2d(in_channels, out_channels, 1, stride=1 if avg_down else stride, bias=False)
    norm = [norm_layer(out_channels)] if norm_layer is not None else []  # pre-activation nets project un-normed
    if not avg_down:
        return nn.Sequential(conv, *norm)
    if stride == 1 and dilation == 1:
        pool = nn.Identity()
    elif stride == 1:  # a dilated stage keeps timm's stride-1 "same" pool so its weights still fit
        pool = AvgPool2dSame(2, 1, ceil_mode=True, count_include_pad=False)
    else:
        pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
    return nn.Sequential(pool, conv, *norm)


def make_stages(
    block: Block,
    layers: Sequence[int],
    *,
    in_channels: int,
    output_stride: int = 32,
    multi_grid: Sequence[int] | None = None,
    dilate_first_block: bool = False,
    avg_down: bool = False,
    norm_layer: NormLayer,
    drop_path_rate: float = 0.0,
    **block_kwargs,
) -> tuple[list[nn.Sequential], list[FeatureInfo]]:
    """Builds the four stages and reports the channels and stride of each as it goes.

    Strides past `output_stride` turn into dilation; the first block of a dilated stage keeps the
    previous dilation, the others take the new one (torchvision's `replace_stride_with_dilation`
    and timm's `output_stride`). `multi_grid` multiplies the dilations of the last stage's blocks.
    `dilate_first_block` gives the first block the new dilation too (detectron2's RES5_DILATION, DC5).
    """
    stages, infos = [], []
    total_blocks, block_index = sum(layers), 0
    net_stride, dilation = feature_stride(0), 1
    for stage_index, num_blocks in enumerate(layers):
        planes = 64 * 2**stage_index
        prev_dilation = dilation
        # the stem's max-pool reduces by 2 before the first stage; a later stage halves, or dilates past output_stride
        new_stride = feature_stride(stage_index + 1, output_stride)
        stride = 1 if stage_index == 0 else new_stride // net_stride
        if stage_index > 0 and stride == 1:
            dilation *= 2
        net_stride = new_stride
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = _downsample(
                in_channels,
                out_channels,
                stride=stride,
                dilation=dilation,
                avg_down=avg_down,
                norm_layer=None if block.preact else norm_layer,
            )
        is_last = stage_index == len(layers) - 1
        grid = _check_multi_grid(multi_grid, num_blocks) if (is_last and multi_grid) else None
        blocks = []
        for i in range(num_blocks):
            block_dilation = dilation * grid[i] if grid else dilation
            first_dilation = block_dilation if (grid or i > 0 or dilate_first_block) else prev_dilation
            blocks.append(
                block(
                    in_channels,
                    planes,
                    stride=stride if i == 0 else 1,
                    dilation=block_dilation,
                    first_dilation=first_dilation,
                    downsample=downsample if i == 0 else None,
                    norm_layer=norm_layer,
                    drop_path=drop_path_rate * block_index / max(total_blocks - 1, 1),
                    **block_kwargs,
                )
            )
            in_channels, block_index = out_channels, block_index + 1
        stages.append(nn.Sequential(*blocks))
        infos.append(FeatureInfo(feature_name(stage_index + 1), out_channels, net_stride))
    return stages, infos


def _check_multi_grid(multi_grid: Sequence[int], num_blocks: int) -> tuple[int, ...]:
    if len(multi_grid) != num_blocks or any(int(g) < 1 for g in multi_grid):
        raise ValueError(
            f"multi_grid={tuple(multi_grid)}; give one positive rate per block of the last stage ({num_blocks} blocks)"
        )
    return tuple(int(g) for g in multi_grid)


def _stem_conv(in_chans: int, stem_width: int, deep_stem: bool, norm_layer: NormLayer) -> nn.Module:
    if not deep_stem:
        return nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
    return nn.Sequential(  # timm's 'c'/'d' deep stem: three 3x3 convs (names conv1.0 ... conv1.6)
        nn.Conv2d(in_chans, stem_width, 3, stride=2, padding=1, bias=False),
        norm_layer(stem_width),
        nn.ReLU(inplace=True),
        nn.Conv2d(stem_width, stem_width, 3, stride=1, padding=1, bias=False),
        norm_layer(stem_width),
        nn.ReLU(inplace=True),
        nn.Conv2d(stem_width, 64, 3, stride=1, padding=1, bias=False),
    )


class ResNet(Backbone):
    """ResNet, ResNeXt, Wide ResNet, SE-ResNet(X), ResNet-C/D and the pre-activation ResNet-v2.

    With `features_only=True` it is a backbone: `forward` returns an ordered dict of the outputs
    chosen by `out_indices` (0 = `stem` at stride 2, 1..4 = `c2`..`c5`), and the layers after the
    last one asked for are not built. Otherwise it is the classifier (stem, stages, pool, fc).

    Example:
        >>> net = ResNet(block=Bottleneck, layers=(3, 4, 6, 3), features_only=True, output_stride=16)
        >>> {f.name: (f.channels, f.stride) for f in net.feature_info}
        {'c2': (256, 4), 'c3': (512, 8), 'c4': (1024, 16), 'c5': (2048, 16)}
    """

    def __init__(
        self,
        *,
        block: Block,
        layers: Sequence[int],
        num_classes: int = 1000,
        features_only: bool = False,
        out_indices: Sequence[int] = (1, 2, 3, 4),
        in_chans: int = 3,
        groups: int = 1,
        width_per_group: int = 64,
        deep_stem: bool = False,
        stem_width: int = 32,
        avg_down: bool = False,
        stride_in_1x1: bool = False,
        se: bool = False,
        output_stride: int = 32,
        multi_grid: Sequence[int] | None = None,
        dilate_first_block: bool = False,
        norm: str | NormLayer = "bn",
        frozen_stages: int = -1,
        zero_init_last: bool = False,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        check_output_stride(output_stride)
        if not -1 <= frozen_stages <= len(layers):
            raise ValueError(f"frozen_stages={frozen_stages}; choose -1 (none), 0 (stem) up to {len(layers)}")
        norm_layer = get_norm_layer(norm)
        self.features_only = features_only
        self.preact = block.preact
        self.frozen_stages = frozen_stages

        self.conv1 = _stem_conv(in_chans, stem_width, deep_stem, norm_layer)
        self.bn1 = nn.Identity() if block.preact else norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages, stage_infos = make_stages(
            block,
            layers,
            in_channels=64,
            output_stride=output_stride,
            multi_grid=multi_grid,
            dilate_first_block=dilate_first_block,
            avg_down=avg_down,
            norm_layer=norm_layer,
            drop_path_rate=drop_path_rate,
            groups=groups,
            width_per_group=width_per_group,
            stride_in_1x1=stride_in_1x1,
            se=se,
        )
        for i, stage in enumerate(stages):
            self.add_module(f"layer{i + 1}", stage)
        self.num_features = stage_infos[-1].channels
        # pre-activation nets end with the norm the last block leaves out
        self.norm = norm_layer(self.num_features) if block.preact else nn.Identity()

        all_infos = [FeatureInfo(feature_name(0), 64, feature_stride(0)), *stage_infos]
        if features_only:
            self.out_indices = check_out_indices(tuple(out_indices), len(all_infos))
            self.feature_info = [all_infos[i] for i in self.out_indices]
            self._prune_after(max(self.out_indices))
        else:
            self.out_indices = ()
            self.feature_info = all_infos
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self._init_weights(zero_init_last)
        self._freeze_stages()

    def _prune_after(self, last_index: int) -> None:
        for i in range(last_index + 1, 5):
            delattr(self, f"layer{i}")
        if last_index < 4:
            self.norm = nn.Identity()
        if last_index == 0:
            self.maxpool = nn.Identity()

    def _init_weights(self, zero_init_last: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_last:
            for module in self.modules():
                if hasattr(module, "zero_init_last"):
                    module.zero_init_last()

    def stages(self) -> list[nn.Module]:
        """The stem (index 0) and the stages that exist (1..4)."""
        stem = nn.ModuleList([self.conv1, self.bn1])
        return [stem, *(getattr(self, f"layer{i}") for i in range(1, 5) if hasattr(self, f"layer{i}"))]

    def _freeze_stages(self) -> None:
        for stage in self.stages()[: self.frozen_stages + 1]:
            freeze_module(stage)

    def forward_feature_maps(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """Returns the outputs chosen by `out_indices` (all five for a classifier), by name."""
        wanted = self.out_indices or (0, 1, 2, 3, 4)
        out: OrderedDict[str, Tensor] = OrderedDict()
        x = self.relu(self.bn1(self.conv1(x))) if not self.preact else self.conv1(x)  # (N, 64, H/2, W/2)
        if 0 in wanted:
            out["stem"] = x
        if max(wanted) == 0:
            return out
        x = self.maxpool(x)
        for i in range(1, max(wanted) + 1):
            x = getattr(self, f"layer{i}")(x)
            if i == 4 and self.preact:
                x = self.relu(self.norm(x))
            if i in wanted:
                out[feature_name(i)] = x
        return out

    def forward_features(self, x: Tensor) -> Tensor:
        """The classifier's last feature map before pooling, (N, num_features, H/32, W/32), as timm's."""
        if self.features_only:
            raise RuntimeError("forward_features is the classifier's; a features_only ResNet returns forward(x)")
        x = self.relu(self.bn1(self.conv1(x))) if not self.preact else self.conv1(x)
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.relu(self.norm(x)) if self.preact else x

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor] | Tensor:
        if self.features_only:
            return self.forward_feature_maps(x)
        return self.forward_head(self.forward_features(x))

    def convert_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Maps timm's ResNet-v2 names (`stem.conv`, `stages.i.blocks.j.norm1`, `head.fc`) onto ours."""
        if not self.preact or "stem.conv.weight" not in state_dict:
            return state_dict
        return convert_timm_resnetv2(state_dict)


def convert_timm_resnetv2(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm `resnetv2_*` checkpoint keys -> ours (conv1, layerN.M.bnK, downsample.0, norm, fc)."""
    converted = {}
    for key, value in state_dict.items():
        new = key.replace("stem.conv.", "conv1.").replace("head.fc.", "fc.")
        if new.startswith("stages."):
            _, stage, _, rest = new.split(".", 3)
            new = f"layer{int(stage) + 1}.{rest}"
            for k in (1, 2, 3):
                new = new.replace(f".norm{k}.", f".bn{k}.")
            new = new.replace(".downsample.conv.", ".downsample.0.")
        if new == "fc.weight" and value.ndim == 4:  # timm's head is a 1x1 conv
            value = value.flatten(1)
        converted[new] = value
    return converted
