"""Every registered backbone: declared shapes, gradients, freezing, norms, options and their errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from timm.layers import DropPath
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from backbones import convert_sync_batchnorm, create_backbone, list_backbones
from backbones.blocks import BasicBlock, Bottleneck, PreActBottleneck

INPUT_SIZE = 64
ALL_NAMES = list_backbones()
# 101/152 layers and the wide nets: their cost on the CPU puts them behind the slow marker
HEAVY = frozenset(n for n in ALL_NAMES if any(d in n for d in ("101", "152", "wide")))


def _names():
    return [pytest.param(n, marks=pytest.mark.slow if n in HEAVY else ()) for n in ALL_NAMES]


def _input(batch: int = 1, channels: int = 3, size: int = INPUT_SIZE) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))


def _build(name: str, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frozen random weights warn; that is tested on its own below
        return create_backbone(name, **kwargs)


def _bn_snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [
        b.clone() for m in module.modules() if isinstance(m, nn.BatchNorm2d) for b in (m.running_mean, m.running_var)
    ]


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck, PreActBottleneck))]


# --- shapes -----------------------------------------------------------------------------------------------------


def _shape_cases():
    # The 101/152-layer nets check their shapes on the meta device by default (the arithmetic is the
    # 50-layer nets' one, repeated); on the CPU they are slow.
    cases = []
    for name in ALL_NAMES:
        if name in HEAVY:
            cases.append(pytest.param(name, "meta", id=f"{name}-meta"))
            cases.append(pytest.param(name, "cpu", id=f"{name}-cpu", marks=pytest.mark.slow))
        else:
            cases.append(pytest.param(name, "cpu", id=f"{name}-cpu"))
    return cases


@pytest.mark.parametrize("output_stride", [32, 16, 8])
@pytest.mark.parametrize(("name", "device"), _shape_cases())
def test_resnet_declared_shapes_match_outputs(name, device, output_stride):
    with torch.device(device):
        model = _build(name, out_indices=(0, 1, 2, 3, 4), output_stride=output_stride).eval()
    x = _input().to(device)
    expected_strides = [min(2**level, output_stride) for level in range(1, 6)]
    assert [i.name for i in model.feature_info] == ["stem", "c2", "c3", "c4", "c5"]
    assert [i.stride for i in model.feature_info] == expected_strides
    assert model.output_shape() == {i.name: i for i in model.feature_info}
    with torch.no_grad():
        out = model(x)
    assert list(out) == [i.name for i in model.feature_info]
    for info in model.feature_info:
        size = INPUT_SIZE // info.stride
        assert tuple(out[info.name].shape) == (1, info.channels, size, size), info


def test_resnet_default_out_indices_are_the_four_stages():
    model = create_backbone("resnet18")
    assert [(i.name, i.channels, i.stride) for i in model.feature_info] == [
        ("c2", 64, 4),
        ("c3", 128, 8),
        ("c4", 256, 16),
        ("c5", 512, 32),
    ]


# --- gradients --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _names())
def test_resnet_every_trainable_parameter_gets_a_gradient(name):
    model = create_backbone(name).train()
    out = model(_input())
    sum(v.sum() for v in out.values()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)


# --- freezing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frozen_stages", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("name", ["resnet18", "resnet50d", "resnetv2_50"])
def test_resnet_frozen_stages(name, frozen_stages):
    model = _build(name, frozen_stages=frozen_stages)
    stages = model.stages()  # the stem, then layer1..layer4
    for index, stage in enumerate(stages):
        frozen = index <= frozen_stages
        assert all(p.requires_grad is not frozen for p in stage.parameters()), (index, frozen)

    model.train()
    before = [_bn_snapshot(stage) for stage in stages]
    out = model(_input(batch=2))
    for index, stage in enumerate(stages):
        after = _bn_snapshot(stage)
        unchanged = all(torch.equal(a, b) for a, b in zip(before[index], after, strict=True))
        if index <= frozen_stages:
            assert unchanged, f"running statistics of frozen stage {index} moved"
        elif after:
            assert not unchanged, f"running statistics of trainable stage {index} did not move"

    if frozen_stages < 4:
        sum(v.sum() for v in out.values()).backward()
        for index, stage in enumerate(stages):
            for param in stage.parameters():
                assert (param.grad is None) == (index <= frozen_stages), index


def test_resnet_frozen_norms_stay_in_eval_after_train():
    model = _build("resnet18", frozen_stages=1).train()
    assert not model.bn1.training and not model.layer1[0].bn1.training
    assert model.layer2[0].bn1.training
    model.eval().train()
    assert not model.layer1[1].bn2.training and model.layer3[0].bn1.training


@pytest.mark.parametrize(
    "kwargs", [{"frozen_stages": 0}, {"frozen_stages": 2}, {"norm": "frozen_bn"}], ids=["fs0", "fs2", "frozen_bn"]
)
def test_resnet_freezing_random_weights_warns(kwargs):
    with pytest.warns(UserWarning, match="freeze randomly initialised"):
        create_backbone("resnet18", **kwargs)


def test_resnet_defaults_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_backbone("resnet18")
        create_backbone("resnet18", norm="gn")


# --- norms ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("norm", "layer_type"),
    [("bn", nn.BatchNorm2d), ("frozen_bn", FrozenBatchNorm2d), ("gn", nn.GroupNorm), ("sync_bn", nn.SyncBatchNorm)],
)
@pytest.mark.parametrize("name", ["resnet18", "resnet50d"])
def test_resnet_norm_factory(name, norm, layer_type):
    model = _build(name, norm=norm).eval()
    types = {type(m) for m in model.modules()}
    assert layer_type in types
    others = {nn.BatchNorm2d, FrozenBatchNorm2d, nn.GroupNorm, nn.SyncBatchNorm} - {layer_type}
    assert not types & others, types & others
    with torch.no_grad():
        out = model(_input())
    assert out["c5"].shape == (1, model.feature_info[-1].channels, 2, 2)


def test_convert_sync_batchnorm_keeps_frozen_norms():
    model = convert_sync_batchnorm(_build("resnet18", frozen_stages=1))
    assert type(model.bn1) is nn.BatchNorm2d and type(model.layer1[0].bn1) is nn.BatchNorm2d
    assert type(model.layer2[0].bn1) is nn.SyncBatchNorm and type(model.layer4[1].bn2) is nn.SyncBatchNorm
    assert not model.layer1[0].bn1.weight.requires_grad and model.layer2[0].bn1.weight.requires_grad
    with torch.no_grad():
        model.eval()(_input())


def test_resnet_group_norm_uses_32_groups():
    model = create_backbone("resnet50", norm="gn")
    assert model.bn1.num_groups == 32 and model.layer4[0].bn3.num_groups == 32


def test_resnet_norm_callable():
    model = create_backbone("resnet18", norm=lambda c: nn.GroupNorm(8, c))
    assert model.bn1.num_groups == 8


# --- bad arguments ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"norm": "batchnorm"}, "batchnorm"),
        ({"output_stride": 12}, "output_stride=12"),
        ({"output_stride": 64}, "output_stride=64"),
        ({"out_indices": (1, 5)}, "(1, 5)"),
        ({"out_indices": (3, 2)}, "(3, 2)"),
        ({"out_indices": (-1,)}, "(-1,)"),
        ({"out_indices": ()}, "out_indices=()"),
        ({"frozen_stages": 5}, "frozen_stages=5"),
        ({"frozen_stages": -2}, "frozen_stages=-2"),
        ({"multi_grid": (1, 2)}, "(1, 2)"),
        ({"multi_grid": (1, 2, 4, 8)}, "(1, 2, 4, 8)"),
        ({"multi_grid": (0, 1, 2)}, "(0, 1, 2)"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_resnet_bad_arguments_name_the_value(kwargs, named):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError) as error:
            create_backbone("resnet50", **kwargs)
    assert named in str(error.value)


# --- variant options --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("output_stride", "dilations"), [(32, (1, 2, 4)), (16, (2, 4, 8)), (8, (4, 8, 16))])
def test_resnet_multi_grid(output_stride, dilations):
    model = create_backbone("resnet50", output_stride=output_stride, multi_grid=(1, 2, 4)).eval()
    assert tuple(block.conv2.dilation[0] for block in model.layer4) == dilations
    assert tuple(block.conv2.padding[0] for block in model.layer4) == dilations
    with torch.no_grad():
        out = model(_input())
    assert out["c5"].shape[-1] == INPUT_SIZE // output_stride


def test_resnet_multi_grid_basic_block():
    model = create_backbone("resnet18", output_stride=16, multi_grid=(1, 2))
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in model.layer4] == [(2, 2), (4, 4)]


def test_resnet_dilation_without_multi_grid():
    model = create_backbone("resnet50", output_stride=8)
    # the first block of a dilated stage keeps the previous dilation (torchvision and timm)
    assert [b.conv2.dilation[0] for b in model.layer3] == [1] + [2] * 5
    assert [b.conv2.dilation[0] for b in model.layer4] == [2, 4, 4]
    assert all(b.conv2.stride == (1, 1) for b in (*model.layer3, *model.layer4))


@pytest.mark.parametrize(
    ("name", "last"), [("resnet18", "bn2"), ("resnet50", "bn3"), ("seresnext50_32x4d", "bn3"), ("resnetv2_50", "conv3")]
)
def test_resnet_zero_init_last(name, last):
    zeroed = create_backbone(name, zero_init_last=True)
    plain = create_backbone(name)
    for block in _blocks(zeroed):
        assert torch.count_nonzero(getattr(block, last).weight) == 0
    for block in _blocks(plain):
        assert torch.count_nonzero(getattr(block, last).weight) > 0
    # only the last norm (or conv) of each block is touched
    other = "conv2" if last == "conv3" else "bn1"
    assert all(torch.count_nonzero(getattr(b, other).weight) > 0 for b in _blocks(zeroed))


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnetv2_50"])
def test_resnet_drop_path_rates_increase_linearly(name):
    rate = 0.2
    model = create_backbone(name, drop_path_rate=rate)
    blocks = _blocks(model)
    expected = [rate * i / (len(blocks) - 1) for i in range(len(blocks))]
    actual = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in blocks]
    assert actual == pytest.approx(expected)
    assert sum(isinstance(m, DropPath) for m in model.modules()) == len(blocks) - 1
    model.train()
    out = model(_input(batch=2))
    sum(v.sum() for v in out.values()).backward()
    assert create_backbone(name).layer4[-1].drop_path.__class__ is nn.Identity


@pytest.mark.parametrize("in_chans", [1, 4])
@pytest.mark.parametrize("name", ["resnet18", "resnet50d"])
def test_resnet_in_chans(name, in_chans):
    model = create_backbone(name, in_chans=in_chans).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == in_chans
    with torch.no_grad():
        out = model(_input(channels=in_chans))
    assert out["c5"].shape[-1] == INPUT_SIZE // 32


# --- features_only pruning --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnetv2_50"])
def test_resnet_out_indices_prune_unused_stages(name):
    model = create_backbone(name, out_indices=(1, 2)).eval()
    assert hasattr(model, "layer2") and not hasattr(model, "layer3") and not hasattr(model, "layer4")
    assert not any(k.startswith(("layer3.", "layer4.", "fc.", "norm.")) for k in model.state_dict())
    with torch.no_grad():
        out = model(_input())
    assert list(out) == ["c2", "c3"]
    assert [i.name for i in model.feature_info] == ["c2", "c3"]


def test_resnet_stem_only():
    model = create_backbone("resnet18", out_indices=(0,)).eval()
    assert not hasattr(model, "layer1")
    with torch.no_grad():
        out = model(_input())
    assert list(out) == ["stem"] and out["stem"].shape == (1, 64, INPUT_SIZE // 2, INPUT_SIZE // 2)


def test_resnet_backbone_has_no_classifier():
    model = create_backbone("resnet50")
    assert not hasattr(model, "fc") and not hasattr(model, "avgpool")
