"""FPN: layouts, declared shapes, the stride check, norms and torchvision's `resnet_fpn_backbone` parity."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from backbones import create_backbone, load_state_dict
from backbones.fpn import FPN

INPUT_SIZE = 64


def _input() -> torch.Tensor:
    return torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(0))


def _check_declared_shapes(fpn: FPN, out) -> None:
    assert list(out) == [i.name for i in fpn.feature_info]
    assert fpn.output_shape() == {i.name: i for i in fpn.feature_info}
    for info in fpn.feature_info:
        size = -(-INPUT_SIZE // info.stride)  # the extra levels round up
        assert tuple(out[info.name].shape) == (1, info.channels, size, size), info


def test_fpn_maxpool_layout():
    fpn = FPN(create_backbone("resnet18")).eval()
    assert [(i.name, i.channels, i.stride) for i in fpn.feature_info] == [
        ("p2", 256, 4),
        ("p3", 256, 8),
        ("p4", 256, 16),
        ("p5", 256, 32),
        ("p6", 256, 64),
    ]
    with torch.no_grad():
        _check_declared_shapes(fpn, fpn(_input()))


@pytest.mark.parametrize("p6p7_from_c5", [False, True])
def test_fpn_p6p7_layout(p6p7_from_c5):
    fpn = FPN(
        create_backbone("resnet18", out_indices=(2, 3, 4)), out_channels=64, top_block="p6p7", p6p7_from_c5=p6p7_from_c5
    ).eval()
    assert [(i.name, i.stride) for i in fpn.feature_info] == [
        ("p3", 8),
        ("p4", 16),
        ("p5", 32),
        ("p6", 64),
        ("p7", 128),
    ]
    assert fpn.fpn.extra_blocks.p6.in_channels == (512 if p6p7_from_c5 else 64)
    with torch.no_grad():
        _check_declared_shapes(fpn, fpn(_input()))


def test_fpn_without_top_block_and_with_in_features():
    fpn = FPN(create_backbone("resnet18"), out_channels=32, top_block=None, in_features=("c3", "c4", "c5")).eval()
    assert [(i.name, i.stride) for i in fpn.feature_info] == [("p3", 8), ("p4", 16), ("p5", 32)]
    with torch.no_grad():
        _check_declared_shapes(fpn, fpn(_input()))


@pytest.mark.parametrize("output_stride", [16, 8])
def test_fpn_rejects_dilated_backbone(output_stride):
    backbone = create_backbone("resnet18", output_stride=output_stride)
    with pytest.raises(ValueError, match="strides double") as error:
        FPN(backbone)
    assert str([i.stride for i in backbone.feature_info]) in str(error.value)


def test_fpn_bad_arguments_are_named():
    backbone = create_backbone("resnet18")
    with pytest.raises(ValueError, match="'p5p6'"):
        FPN(backbone, top_block="p5p6")
    with pytest.raises(ValueError, match="c6"):
        FPN(backbone, in_features=("c5", "c6"))


def test_fpn_group_norm():
    fpn = FPN(create_backbone("resnet18", norm="gn"), out_channels=64, norm="gn").eval()
    norms = [m for m in fpn.fpn.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 8  # one after each lateral and each output conv of the four levels
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fpn.modules())
    with torch.no_grad():
        _check_declared_shapes(fpn, fpn(_input()))


def test_fpn_trains():
    fpn = FPN(create_backbone("resnet18"), out_channels=32).train()
    out = fpn(torch.randn(2, 3, INPUT_SIZE, INPUT_SIZE))
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None for p in fpn.parameters() if p.requires_grad)


def _calibrated_resnet50_state() -> dict[str, torch.Tensor]:
    """torchvision ResNet-50 weights whose BN statistics and affine are not the defaults."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    generator = torch.Generator().manual_seed(1)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in norms:
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.bias.normal_(0, 0.2, generator=generator)
            bn.momentum = 1.0  # running statistics := those of this batch, so activations stay O(1)
        model.train()(torch.randn(2, 3, INPUT_SIZE, INPUT_SIZE, generator=generator))
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def test_fpn_matches_torchvision_resnet_fpn_backbone():
    reference = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5).eval()
    reference.body.load_state_dict(_calibrated_resnet50_state())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frozen BN without weights warns; they are loaded just below
        ours = FPN(create_backbone("resnet50", norm="frozen_bn")).eval()
    reference_state = reference.state_dict()
    assert list(ours.state_dict()) == list(reference_state)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference_state.items()}

    load_state_dict(ours, reference_state)
    with torch.no_grad():
        expected, actual = reference(_input()), ours(_input())
    assert list(expected) == ["0", "1", "2", "3", "pool"]
    assert list(actual) == ["p2", "p3", "p4", "p5", "p6"]
    for (key, value), reference_key in zip(actual.items(), expected, strict=True):
        diff = (value - expected[reference_key]).abs().max().item()
        assert diff < 1e-4, f"{key}: max abs diff {diff:.3g}"
