"""Parity with the anchors: torchvision's and timm's checkpoints load strictly and give the same outputs.

Each anchor classifier is built with seeded random weights, its batch norms get a random affine and
running statistics measured on random data (so no norm is the identity), and its state dict is saved
with `torch.save`. Our backbone and classifier load that file through `weights=` and must reproduce the
anchor's stage outputs and logits in eval mode; our own state dict must load back into the anchor
strictly. The 18/34/50-layer members and the 50-layer variants run by default at output strides 32,
16 and 8; the 101/152-layer ones carry the `slow` marker.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import timm
import torch
import torchvision
from torch import nn

from backbones import create_backbone, create_model

TOL = 1e-4
INPUT_SIZE = 64

TORCHVISION_NAMES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
TIMM_NAMES = (*TORCHVISION_NAMES, "resnet50c", "resnet101c", "resnet50d", "resnet101d", "resnet152d")
TIMM_NAMES += ("seresnet50", "seresnet101", "seresnext50_32x4d")
BASIC_BLOCK_NAMES = ("resnet18", "resnet34")
# one member of every family, run by default at every output stride
DEFAULT_NAMES = frozenset(
    {
        "resnet18",
        "resnet34",
        "resnet50",
        "resnext50_32x4d",
        "wide_resnet50_2",
        "resnet50c",
        "resnet50d",
        "seresnet50",
        "seresnext50_32x4d",
        "resnetv2_50",
    }
)
STAGES = ("layer1", "layer2", "layer3", "layer4")
FEATURES = ("c2", "c3", "c4", "c5")
OUTPUT_STRIDES = (32, 16, 8)
# torchvision's replace_stride_with_dilation for each output stride
TORCHVISION_DILATION = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}


def _cases(names, strides=OUTPUT_STRIDES, skip=lambda name, stride: False, slow=frozenset()):
    return [
        pytest.param(
            name,
            stride,
            id=f"{name}-os{stride}",
            marks=() if name in DEFAULT_NAMES and name not in slow else pytest.mark.slow,
        )
        for name in names
        for stride in strides
        if not skip(name, stride)
    ]


def _randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random BN affine and BN statistics measured on random data (so no norm is the identity); eval mode.

    The convs keep their seeded random initialisation.
    """
    generator = torch.Generator().manual_seed(seed)
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in batch_norms:
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.bias.normal_(0, 0.2, generator=generator)
            bn.momentum = 1.0  # running statistics := those of the batch below
        model.train()
        model(torch.randn(2, 3, INPUT_SIZE, INPUT_SIZE, generator=generator))
        for bn in batch_norms:
            bn.momentum = 0.1
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.8, 1.25, generator=generator))
    return model.eval()


def _stage_outputs(model: nn.Module, stages: dict[str, nn.Module], x: torch.Tensor):
    """Runs `model(x)` and returns (its output, the outputs of `stages` captured by forward hooks)."""
    captured: OrderedDict[str, torch.Tensor] = OrderedDict()
    handles = [
        module.register_forward_hook(lambda _m, _i, out, key=key: captured.__setitem__(key, out.clone()))
        for key, module in stages.items()
    ]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, captured


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert diff < TOL, f"{what}: max abs diff {diff:.3g} >= {TOL}"


def _input() -> torch.Tensor:
    return torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(1))


def _check_parity(name: str, anchor: nn.Module, output_stride: int, path) -> None:
    x = _input()
    expected_logits, expected = _stage_outputs(
        anchor, {f: getattr(anchor, s) for f, s in zip(FEATURES, STAGES, strict=True)}, x
    )
    backbone = create_backbone(name, weights=str(path), output_stride=output_stride).eval()
    assert [info.name for info in backbone.feature_info] == list(FEATURES)
    with torch.no_grad():
        features = backbone(x)
    assert list(features) == list(FEATURES)
    for key in FEATURES:
        _assert_close(features[key], expected[key], f"{name} os={output_stride} {key}")
    if output_stride != 32:
        return
    # the classifier; then its state dict, saved, loads back into the anchor strictly
    model = create_model(name, weights=str(path)).eval()
    with torch.no_grad():
        _assert_close(model(x), expected_logits, f"{name} logits")
    ours = path.with_name("ours.pth")
    torch.save(model.state_dict(), ours)
    anchor.load_state_dict(torch.load(ours, weights_only=True), strict=True)


@pytest.mark.parametrize(
    ("name", "output_stride"),
    _cases(TORCHVISION_NAMES, skip=lambda name, stride: name in BASIC_BLOCK_NAMES and stride != 32),
)
def test_parity_torchvision(name, output_stride, tmp_path):
    torch.manual_seed(0)
    dilation = TORCHVISION_DILATION[output_stride]
    anchor = getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=dilation)
    _randomize_(anchor, seed=1)
    path = tmp_path / f"{name}.pth"
    torch.save(anchor.state_dict(), path)
    _check_parity(name, anchor, output_stride, path)


# timm's wide_resnet50_2 is torchvision's, checked above at every stride; its 69 M parameters cost the most
@pytest.mark.parametrize(("name", "output_stride"), _cases(TIMM_NAMES, slow={"wide_resnet50_2"}))
def test_parity_timm(name, output_stride, tmp_path):
    torch.manual_seed(0)
    anchor = timm.create_model(name, pretrained=False, output_stride=output_stride)
    _randomize_(anchor, seed=1)
    path = tmp_path / f"{name}.pth"
    torch.save(anchor.state_dict(), path)
    _check_parity(name, anchor, output_stride, path)


@pytest.mark.parametrize(("name", "output_stride"), _cases(("resnetv2_50", "resnetv2_101")))
def test_parity_timm_resnetv2(name, output_stride, tmp_path):
    torch.manual_seed(0)
    anchor = timm.create_model(name, pretrained=False, output_stride=output_stride)
    _randomize_(anchor, seed=1)
    path = tmp_path / f"{name}.pth"
    torch.save(anchor.state_dict(), path)
    assert "stem.conv.weight" in torch.load(path, weights_only=True)  # timm's names: the conversion is exercised

    x = _input()
    stages = {f: anchor.stages[i] for i, f in enumerate(FEATURES[:3])}
    expected_logits, expected = _stage_outputs(anchor, stages, x)
    with torch.no_grad():
        expected["c5"] = anchor.forward_features(x)  # the last stage, then the final norm and ReLU
    backbone = create_backbone(name, weights=str(path), output_stride=output_stride).eval()
    with torch.no_grad():
        features = backbone(x)
    assert list(features) == list(FEATURES)
    for key in FEATURES:
        _assert_close(features[key], expected[key], f"{name} os={output_stride} {key}")
    if output_stride == 32:
        model = create_model(name, weights=str(path)).eval()
        with torch.no_grad():
            _assert_close(model(x), expected_logits, f"{name} logits")


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d", "resnet50d", "seresnet50"])
def test_stride_in_1x1_moves_the_stride_to_conv1(name):
    default = create_backbone(name)
    paper = create_backbone(name, stride_in_1x1=True)
    for stage in ("layer2", "layer3", "layer4"):
        first, first_default = getattr(paper, stage)[0], getattr(default, stage)[0]
        assert first.conv1.stride == (2, 2) and first.conv2.stride == (1, 1), stage
        assert first_default.conv1.stride == (1, 1) and first_default.conv2.stride == (2, 2), stage
        for block in list(getattr(paper, stage))[1:]:
            assert block.conv1.stride == (1, 1) and block.conv2.stride == (1, 1), stage
    assert paper.layer1[0].conv1.stride == (1, 1)
    # same parameters (the checkpoints are interchangeable), same output shapes
    assert {k: v.shape for k, v in paper.state_dict().items()} == {k: v.shape for k, v in default.state_dict().items()}
    x = torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE)
    with torch.no_grad():
        shapes = {k: v.shape for k, v in paper(x).items()}
        assert shapes == {k: v.shape for k, v in default(x).items()}
    assert [(i.name, i.channels, i.stride) for i in paper.feature_info] == [
        (i.name, i.channels, i.stride) for i in default.feature_info
    ]


def test_stride_in_1x1_dilated_keeps_stride_one():
    paper = create_backbone("resnet50", stride_in_1x1=True, output_stride=8)
    for stage in ("layer3", "layer4"):
        assert all(b.conv1.stride == (1, 1) and b.conv2.stride == (1, 1) for b in getattr(paper, stage))
    with torch.no_grad():
        out = paper(torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE))
    assert out["c5"].shape[-2:] == (INPUT_SIZE // 8, INPUT_SIZE // 8)
