"""Inference fast path: fold batch norms into the convs before them, fuse ReLUs and residual adds
into the convs, and channels-last memory.

A batch norm that uses its running statistics is an affine map per channel, so after a conv it can be
folded into that conv's weight and bias (`torch.nn.utils.fusion.fuse_conv_bn_weights`) and replaced
by `nn.Identity`. Pairs are found from the structure, never guessed from names alone:

- in a plain `nn.Sequential` (also torchvision's `Conv2dNormActivation`, `ASPPConv`, `ASPPPooling`, the
  FPN's and the v2 detection heads' blocks, our DeepLab heads), a norm right after a conv, or after a
  sequential that ends with a conv (a deep stem, a separable conv);
- in the residual blocks and stems whose `forward` is known (ours and torchvision's `BasicBlock`,
  `Bottleneck`, `ResNet`): `convK -> bnK`; in the pre-activation bottleneck `conv1 -> bn2` and
  `conv2 -> bn3` (its `bn1` normalizes the block input and stays).

Then `fuse_activations` turns each folded residual block into a `FusedResidualBlock` (conv+ReLU,
conv+ReLU, conv+add+ReLU) and every other conv into a `FusedConv2d`, which on the CPU runs one oneDNN
call per conv with the ReLU fused in and its weight reordered once (see `backbones.cpu_conv`).

Example:
    >>> model = detection.build_model("faster_rcnn_r18_fpn", num_classes=4).eval()
    >>> model = fuse_for_inference(model)  # same outputs, no BatchNorm left in the backbone
"""

from __future__ import annotations

import logging
from itertools import pairwise

import torch
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models import resnet as tv_resnet
from torchvision.models.segmentation.deeplabv3 import ASPPPooling
from torchvision.ops import FrozenBatchNorm2d

from .blocks import BasicBlock, Bottleneck, PreActBottleneck
from .cpu_conv import FusedConv2d
from .resnet import ResNet

__all__ = ["FusedResidualBlock", "fold_batch_norms", "fuse_activations", "fuse_for_inference", "prepare_for_inference"]

log = logging.getLogger(__name__)

# Modules whose forward applies `conv -> bn` for these attribute pairs (exact types: a subclass may
# override forward). Our ResNet's pre-activation variant has `bn1 = Identity`, so its pair is a no-op.
_NAMED_PAIRS: dict[type, tuple[tuple[str, str], ...]] = {
    BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    PreActBottleneck: (("conv1", "bn2"), ("conv2", "bn3")),  # bn1 reads the block input, not a conv
    ResNet: (("conv1", "bn1"),),
    tv_resnet.BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    tv_resnet.Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    tv_resnet.ResNet: (("conv1", "bn1"),),
}
# Sequential subclasses whose own forward still runs the children in order.
_IN_ORDER_SEQUENTIALS = (ASPPPooling,)
_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
# Exact types, whose forward is known: a subclass may do more than its affine map (timm's norm + act
# layers apply a dropout and an activation after it, which stay when the norm is folded).
_FOLDABLE_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d, BatchNormAct2d, FrozenBatchNormAct2d)


def _runs_in_order(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and (
        type(module).forward is nn.Sequential.forward or type(module) in _IN_ORDER_SEQUENTIALS
    )


def _last_conv(module: nn.Module) -> nn.Conv2d | None:
    """The conv whose output `module` returns unchanged: itself, or the last child of an in-order sequential."""
    if type(module) is nn.Conv2d:
        return module
    if _runs_in_order(module) and len(module) > 0 and type(module) not in _IN_ORDER_SEQUENTIALS:
        return _last_conv(module[-1])
    return None


def _is_norm(module: nn.Module) -> bool:
    return type(module) in _FOLDABLE_NORMS


def _after_folding(norm: nn.Module) -> nn.Module:
    """What is left of `norm` once its affine map is in the conv: nothing, or timm's dropout and activation."""
    if isinstance(norm, (BatchNormAct2d, FrozenBatchNormAct2d)):
        return norm.act if isinstance(norm.drop, nn.Identity) else nn.Sequential(norm.drop, norm.act)
    return nn.Identity()


def _candidate_pairs(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Conv2d, nn.Module]]:
    """(parent name, parent, norm attribute, conv, norm) for every norm that directly follows a conv."""
    pairs = []
    for parent_name, parent in model.named_modules():
        if _runs_in_order(parent):
            for (_, before), (name, norm) in pairwise(parent.named_children()):
                conv = _last_conv(before)
                if conv is not None and _is_norm(norm):
                    pairs.append((parent_name, parent, name, conv, norm))
        for conv_name, norm_name in _NAMED_PAIRS.get(type(parent), ()):
            conv, norm = _last_conv(getattr(parent, conv_name)), getattr(parent, norm_name)
            if conv is not None and _is_norm(norm):
                pairs.append((parent_name, parent, norm_name, conv, norm))
    return pairs


def _running_stats(norm: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """(mean, var, eps, weight, bias) that the norm applies in eval mode, or None if it uses batch statistics."""
    if norm.running_mean is None or norm.running_var is None:
        return None
    return norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias


@torch.no_grad()
def _fold(conv: nn.Conv2d, norm: nn.Module) -> None:
    mean, var, eps, weight, bias = _running_stats(norm)
    dtype = conv.weight.dtype

    def as64(t):
        return None if t is None else t.double()

    # In float64, then back: the fused weights carry no more rounding than one multiply in `dtype`.
    fused_w, fused_b = fuse_conv_bn_weights(
        conv.weight.double(), as64(conv.bias), mean.double(), var.double(), eps, as64(weight), as64(bias)
    )
    conv.weight = nn.Parameter(fused_w.to(dtype), requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(fused_b.to(dtype), requires_grad=conv.weight.requires_grad)


def fold_batch_norms(model: nn.Module) -> list[str]:
    """Folds, in place, every batch norm that follows a conv and uses running statistics.

    Args:
        model: any module; BatchNorm2d/SyncBatchNorm must be in eval mode, FrozenBatchNorm2d always is.

    Returns:
        The names of the norms folded (each is now an `nn.Identity`, or for timm's `BatchNormAct2d`
        its activation).

    Raises:
        ValueError: a batch norm that would be folded is in training mode (it normalizes with the
            statistics of each batch, which no fixed weight can reproduce).
    """
    pairs = _candidate_pairs(model)
    training = [_name(p, n) for p, _, n, _, norm in pairs if isinstance(norm, _BATCH_NORMS) and norm.training]
    if training:
        shown = ", ".join(training[:5]) + (f" and {len(training) - 5} more" if len(training) > 5 else "")
        raise ValueError(
            f"fuse_for_inference: {len(training)} batch norm(s) are in training mode ({shown}); "
            "call model.eval() first (a training-mode norm uses batch statistics and cannot be folded)"
        )
    folded = []
    for parent_name, parent, name, conv, norm in pairs:
        if _running_stats(norm) is None or norm.running_mean.numel() != conv.out_channels:
            continue  # track_running_stats=False: batch statistics even in eval mode
        _fold(conv, norm)
        setattr(parent, name, _after_folding(norm))
        folded.append(_name(parent_name, name))
    return folded


def _name(parent_name: str, name: str) -> str:
    return f"{parent_name}.{name}" if parent_name else name


class FusedResidualBlock(nn.Module):
    """A folded residual block as a chain of `FusedConv2d`: ReLU after each conv, and the last conv
    adds the shortcut before its ReLU. Its parameter names are the block's (`conv1`..., `downsample`).
    """

    def __init__(self, convs: dict[str, nn.Conv2d], downsample: nn.Module | None):
        super().__init__()
        for name, conv in convs.items():
            self.add_module(name, FusedConv2d.from_conv(conv, activation="relu"))
        self.downsample = downsample
        self.conv_names = tuple(convs)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        *inner, last = self.conv_names
        for name in inner:
            x = getattr(self, name)(x)
        return getattr(self, last)(x, residual=shortcut)


_BLOCK_CONVS = {
    BasicBlock: ("conv1", "conv2"),
    Bottleneck: ("conv1", "conv2", "conv3"),
    tv_resnet.BasicBlock: ("conv1", "conv2"),
    tv_resnet.Bottleneck: ("conv1", "conv2", "conv3"),
}


def _fusable_conv(module: nn.Module) -> bool:
    return type(module) is nn.Conv2d and not isinstance(module.padding, str) and module.padding_mode == "zeros"


def _fused_block(block: nn.Module) -> FusedResidualBlock | None:
    """The block as a `FusedResidualBlock` when its norms are folded and nothing else sits between the convs."""
    names = _BLOCK_CONVS.get(type(block))
    if names is None or block.training or getattr(block, "se", None) is not None:
        return None
    norms = [getattr(block, n.replace("conv", "bn")) for n in names]
    if not all(_fusable_conv(getattr(block, n)) for n in names) or not all(type(n) is nn.Identity for n in norms):
        return None  # drop_path is an identity in eval mode
    return FusedResidualBlock({n: getattr(block, n) for n in names}, block.downsample)


def _is_fusable_stem(model: nn.Module) -> bool:
    """A ResNet (not pre-activation) whose `relu` only follows the stem's conv1 -> bn1, and bn1 is folded."""
    return (
        type(model) in (ResNet, tv_resnet.ResNet)
        and not getattr(model, "preact", False)
        and _fusable_conv(model.conv1)
        and type(model.bn1) is nn.Identity
        and type(model.relu) is nn.ReLU
    )


def _fuse_relus_in_order(sequential: nn.Sequential) -> list[str]:
    """Each conv followed by identities (folded norms) and a ReLU applies the ReLU itself."""
    children = list(sequential.named_children())
    fused = []
    for i, (name, child) in enumerate(children):
        j = i + 1
        while j < len(children) and type(children[j][1]) is nn.Identity:
            j += 1
        if _fusable_conv(child) and j < len(children) and type(children[j][1]) is nn.ReLU:
            setattr(sequential, name, FusedConv2d.from_conv(child, activation="relu"))
            setattr(sequential, children[j][0], nn.Identity())
            fused.append(name)
    return fused


def fuse_activations(model: nn.Module) -> list[str]:
    """Fuses, in place, each ReLU and residual add into the conv before it, and makes every other plain
    conv a `FusedConv2d` (its weight reordered once for the CPU). Call after `fold_batch_norms`.

    - a residual block (ours or torchvision's, not pre-activation, no squeeze-excitation) whose norms are
      folded becomes a `FusedResidualBlock`;
    - the ResNet stem `conv1 -> bn1 (folded) -> relu` and, in an in-order sequential, a conv followed by
      folded norms and a ReLU: the conv applies the ReLU and the ReLU becomes an `nn.Identity`.

    Returns:
        The names of the blocks and convs that now apply a fused ReLU.
    """
    fused = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            block = _fused_block(child)
            if block is not None:
                setattr(parent, name, block)
                fused.append(_name(parent_name, name))
    for parent_name, parent in list(model.named_modules()):
        if _is_fusable_stem(parent):
            parent.conv1, parent.relu = FusedConv2d.from_conv(parent.conv1, activation="relu"), nn.Identity()
            fused.append(_name(parent_name, "conv1"))
        if _runs_in_order(parent):
            fused += [_name(parent_name, name) for name in _fuse_relus_in_order(parent)]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _fusable_conv(child):
                setattr(parent, name, FusedConv2d.from_conv(child))
    return fused


def fuse_for_inference(model: nn.Module, *, channels_last: bool = True) -> nn.Module:
    """Makes `model` faster for inference with the same outputs (to float rounding); changes it in place.

    Folds each eval-mode or frozen batch norm into the conv before it, puts the model in eval mode,
    fuses each ReLU and residual add that follows a conv into it (`fuse_activations`: on the CPU, one
    oneDNN call per conv with its weight reordered once) and, with `channels_last`, stores its 4-D
    weights channels-last (NHWC), which convs then propagate. The fused model's state dict has other
    keys (conv biases, no norms): fuse after loading weights, and deep-copy first to keep the original.

    Args:
        model: a backbone, classifier, detector or segmentation model, with its norms in eval mode.
        channels_last: also convert to `torch.channels_last` memory format.

    Returns:
        `model` itself, in eval mode.

    Raises:
        ValueError: a batch norm after a conv is in training mode; call `model.eval()` first.

    Example:
        >>> net = create_backbone("resnet50").eval()
        >>> fused = fuse_for_inference(copy.deepcopy(net))
        >>> torch.allclose(net(x)["c5"], fused(x)["c5"], rtol=1e-4, atol=1e-5)
        True
    """
    folded = fold_batch_norms(model)
    model.eval()
    relus = fuse_activations(model)
    log.info("fuse_for_inference: folded %d batch norms and fused %d ReLUs into convs", len(folded), len(relus))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def prepare_for_inference(
    model: nn.Module, *, fuse: bool = True, channels_last: bool = True, compile_backbone: bool = False
) -> nn.Module:
    """The inference set-up of the tools: eval mode, then optionally folding, channels-last and compiling.

    Unlike `fuse_for_inference`, this puts the model in eval mode first, so every batch norm with
    running statistics is folded; `fuse` folds them and fuses the activations, as
    `fuse_for_inference`. `compile_backbone` wraps `model.backbone` (the body and FPN of a
    detector, the body of a DeepLab model) in `torch.compile`; the heads' data-dependent control flow
    stays eager.

    Returns:
        `model` itself, changed in place.
    """
    model.eval()
    if fuse:
        fold_batch_norms(model)
        fuse_activations(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile_backbone:
        if not isinstance(getattr(model, "backbone", None), nn.Module):
            raise ValueError(f"compile_backbone=True needs a model with a `backbone`; {type(model).__name__} has none")
        model.backbone = torch.compile(model.backbone)
    return model
