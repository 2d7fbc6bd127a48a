"""FusedConv2d and fuse_activations: the oneDNN path equals conv (+ residual) (+ ReLU) and falls back elsewhere."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from backbones import create_backbone, create_model
from backbones.cpu_conv import FusedConv2d, cpu_kernels_available
from backbones.fusion import FusedResidualBlock, fold_batch_norms, fuse_activations

needs_onednn = pytest.mark.skipif(not cpu_kernels_available(), reason="this torch has no oneDNN conv ops")

CONVS = {
    "3x3": dict(kernel_size=3, padding=1),
    "3x3-s2-d2-g4-bias": dict(kernel_size=3, stride=2, padding=2, dilation=2, groups=4, bias=True),
    "1x1-s2": dict(kernel_size=1, stride=2, bias=False),
    "7x7-s2": dict(kernel_size=7, stride=2, padding=3, bias=False),
}


def reference(conv, x, residual, activation):
    out = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    out = out if residual is None else out + residual
    return F.relu(out) if activation == "relu" else out


@needs_onednn
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("config", CONVS.values(), ids=CONVS.keys())
def test_onednn_path_matches_conv(config, with_residual, activation):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, **config).eval()
    fused = FusedConv2d.from_conv(conv, activation=activation)
    # channels-last, then plain NCHW and other sizes: the weight reordered for the first input serves them all
    for shape, channels_last in [((2, 16, 20, 24), True), ((2, 16, 20, 24), False), ((3, 16, 17, 9), True)]:
        x = torch.randn(shape)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        residual = torch.randn_like(conv(x)) if with_residual else None
        with torch.inference_mode():
            out = fused(x, residual)
        assert out.is_contiguous(memory_format=torch.channels_last)  # oneDNN's output, not F.conv2d's
        torch.testing.assert_close(out, reference(conv, x, residual, activation), rtol=1e-5, atol=1e-5)
    assert fused._packed is not None


@needs_onednn
def test_new_weights_are_reordered_again():
    conv = FusedConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1), activation="relu").eval()
    x = torch.randn(1, 8, 12, 12)
    with torch.inference_mode():
        conv(x)
    state = {k: torch.randn_like(v) for k, v in conv.state_dict().items()}
    conv.load_state_dict(state)  # copies in place: the same tensors, a new version
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), reference(conv, x, None, "relu"), rtol=1e-5, atol=1e-5)


def test_gradients_and_other_dtypes_take_the_plain_path():
    torch.manual_seed(0)
    plain = nn.Conv2d(4, 6, 3, padding=1)
    fused = FusedConv2d.from_conv(copy.deepcopy(plain), activation="relu")
    x, residual = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)
    fused(x, residual).square().sum().backward()
    F.relu(plain(x) + residual).square().sum().backward()
    torch.testing.assert_close(fused.weight.grad, plain.weight.grad)
    assert fused._packed is None  # training never reorders
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides, as for a conv
        assert fused(x).dtype == plain(x).dtype == torch.bfloat16
        assert fused(x, residual.bfloat16()).dtype == torch.bfloat16
    fused64 = copy.deepcopy(fused).double()
    with torch.inference_mode():
        out = fused64(x.double(), residual.double())
    torch.testing.assert_close(out, reference(fused64, x.double(), residual.double(), "relu"))


def test_copies_and_state_dict_are_those_of_a_conv():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    fused = FusedConv2d.from_conv(conv, activation="relu").eval()
    assert fused.weight is conv.weight and fused.bias is conv.bias  # shared, not copied
    with torch.inference_mode():
        fused(torch.randn(1, 4, 8, 8))
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True).keys() == conv.state_dict().keys()
    clone = copy.deepcopy(fused)
    assert clone._packed is None and clone.activation == "relu" and "activation=relu" in repr(clone)


@pytest.mark.parametrize(
    "conv, activation, message",
    [(nn.Conv2d(4, 4, 3, padding="same"), None, "numeric zero padding"),
     (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), None, "numeric zero padding"),
     (nn.Conv2d(4, 4, 3), "gelu", "activation must be one of")],
)  # fmt: skip
def test_unsupported_convs_are_refused(conv, activation, message):
    with pytest.raises(ValueError, match=message):
        FusedConv2d.from_conv(conv, activation=activation)


@pytest.mark.parametrize("name, blocks", [("resnet50", 16), ("resnet18", 8)])
def test_residual_blocks_and_stem_are_fused(name, blocks):
    model = create_model(name).eval()
    fold_batch_norms(model)
    keys = model.state_dict().keys()
    fused = fuse_activations(model)
    assert sum(isinstance(m, FusedResidualBlock) for m in model.modules()) == blocks
    assert "conv1" in fused and not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert all(type(m) is not nn.Conv2d for m in model.modules())  # every conv reordered once
    assert model.state_dict().keys() == keys  # the same names: a fused checkpoint still loads


def test_blocks_that_cannot_be_fused_are_left_alone():
    se = create_backbone("seresnet50").eval()  # squeeze-excitation between the last conv and the add
    fold_batch_norms(se)
    fuse_activations(se)
    assert not any(isinstance(m, FusedResidualBlock) for m in se.modules())
    unfolded = create_model("resnet18").eval()  # norms not folded: nothing to fuse into
    fuse_activations(unfolded)
    assert not any(isinstance(m, FusedResidualBlock) for m in unfolded.modules())
    assert sum(isinstance(m, nn.ReLU) for m in unfolded.modules()) == 9


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch is built without oneDNN")
def test_private_onednn_ops_work_as_we_call_them():
    # Pins what FusedConv2d relies on: a torch whose oneDNN ops are gone, take other arguments or compute
    # something else fails here (and FusedConv2d falls back to F.conv2d) instead of in a user's run.
    from backbones.cpu_conv import _check_cpu_kernels

    assert hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    assert hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")
    assert _check_cpu_kernels()
    assert cpu_kernels_available()


def test_broken_onednn_ops_fall_back_to_the_public_path(monkeypatch):
    import backbones.cpu_conv as cpu_conv

    def changed_signature(*args, **kwargs):
        raise RuntimeError("mkldnn::_convolution_pointwise() expected at most 9 argument(s)")

    monkeypatch.setattr(cpu_conv, "_fused_conv", changed_signature)
    cpu_kernels_available.cache_clear()
    try:
        with pytest.warns(UserWarning, match="using F.conv2d, add and relu instead"):
            assert not cpu_kernels_available()
        conv = nn.Conv2d(8, 8, 3, padding=1).eval()
        fused = FusedConv2d.from_conv(conv, activation="relu")
        x, residual = torch.randn(1, 8, 10, 10), torch.randn(1, 8, 10, 10)
        with torch.inference_mode():
            torch.testing.assert_close(fused(x, residual), reference(conv, x, residual, "relu"))
    finally:
        cpu_kernels_available.cache_clear()
