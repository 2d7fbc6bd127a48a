"""Inference fast path: fold batch norms into the convs before them, and channels-last memory.

A batch norm that uses its running statistics is an affine map per channel, so after a conv it can be
folded into that conv's weight and bias (`torch.nn.utils.fusion.fuse_conv_bn_weights`) and replaced
by `nn.Identity`. Pairs are found from the structure, never guessed from names alone:

- in a plain `nn.Sequential` (also torchvision's `Conv2dNormActivation`, `ASPPConv`, `ASPPPooling`, the
  FPN's and the v2 detection heads' blocks, our DeepLab heads), a norm right after a conv, or after a
  sequential that ends with a conv (a deep stem, a separable conv);
- in the residual blocks and stems whose `forward` is known (ours and torchvision's `BasicBlock`,
  `Bottleneck`, `ResNet`): `convK -> bnK`; in the pre-activation bottleneck `conv1 -> bn2` and
  `conv2 -> bn3` (its `bn1` normalizes the block input and stays).

Example:
    >>> model = detection.build_model("faster_rcnn_r18_fpn", num_classes=4).eval()
    >>> model = fuse_for_inference(model)  # same outputs, no BatchNorm left in the backbone
"""

from __future__ import annotations

import logging
from itertools import pairwise

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models import resnet as tv_resnet
from torchvision.models.segmentation.deeplabv3 import ASPPPooling
from torchvision.ops import FrozenBatchNorm2d

from .blocks import BasicBlock, Bottleneck, PreActBottleneck
from .resnet import ResNet

__all__ = ["fold_batch_norms", "fuse_for_inference", "prepare_for_inference"]

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
    return isinstance(module, (FrozenBatchNorm2d, *_BATCH_NORMS))


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
        The names of the norms folded (each is now an `nn.Identity`).

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
        setattr(parent, name, nn.Identity())
        folded.append(_name(parent_name, name))
    return folded


def _name(parent_name: str, name: str) -> str:
    return f"{parent_name}.{name}" if parent_name else name


def fuse_for_inference(model: nn.Module, *, channels_last: bool = True) -> nn.Module:
    """Makes `model` faster for inference with the same outputs (to float rounding); changes it in place.

    Folds each eval-mode or frozen batch norm into the conv before it, puts the model in eval mode and,
    with `channels_last`, stores its 4-D weights channels-last (NHWC), which convs then propagate.
    The folded model's state dict has other keys (conv biases, no norms): fuse after loading weights,
    and deep-copy first to keep the original.

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
    log.info("fuse_for_inference: folded %d batch norms into convs", len(folded))
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def prepare_for_inference(
    model: nn.Module, *, fuse: bool = True, channels_last: bool = True, compile_backbone: bool = False
) -> nn.Module:
    """The inference set-up of the tools: eval mode, then optionally folding, channels-last and compiling.

    Unlike `fuse_for_inference`, this puts the model in eval mode first, so every batch norm with
    running statistics is folded. `compile_backbone` wraps `model.backbone` (the body and FPN of a
    detector, the body of a DeepLab model) in `torch.compile`; the heads' data-dependent control flow
    stays eager.

    Returns:
        `model` itself, changed in place.
    """
    model.eval()
    if fuse:
        fold_batch_norms(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile_backbone:
        if not isinstance(getattr(model, "backbone", None), nn.Module):
            raise ValueError(f"compile_backbone=True needs a model with a `backbone`; {type(model).__name__} has none")
        model.backbone = torch.compile(model.backbone)
    return model
