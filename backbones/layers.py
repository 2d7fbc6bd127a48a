"""Norm layers from a closed factory, and helpers to freeze parts of a network."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from timm.layers import BatchNormAct2d, GroupNormAct, freeze_batch_norm_2d
from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = ["NORMS", "FrozenBatchNorm2d", "NormLayer", "freeze_module", "get_norm_layer", "replace_batch_norms"]

NormLayer = Callable[[int], nn.Module]
NORMS = ("bn", "frozen_bn", "sync_bn", "gn")


def _num_groups(num_channels: int, num_groups: int = 32) -> int:
    # Fewer channels than groups (a deep stem's 32), or channels that 32 does not divide (EfficientNet's 24),
    # fall back to the largest divisor.
    groups = min(num_groups, num_channels)
    while num_channels % groups:
        groups -= 1
    return groups


def _group_norm(num_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_num_groups(num_channels), num_channels)


def get_norm_layer(norm: str | NormLayer) -> NormLayer:
    """Returns a constructor `norm_layer(num_channels) -> nn.Module`.

    Args:
        norm: one of "bn", "frozen_bn", "sync_bn", "gn" (32 groups), or a callable taking the
            number of channels.

    Example:
        >>> get_norm_layer("gn")(64)
        GroupNorm(32, 64, eps=1e-05, affine=True)
    """
    if callable(norm):
        return norm
    factories = {
        "bn": nn.BatchNorm2d,
        "frozen_bn": FrozenBatchNorm2d,
        "sync_bn": nn.SyncBatchNorm,
        "gn": _group_norm,
    }
    if norm not in factories:
        raise ValueError(f"norm={norm!r}; choose one of {', '.join(map(repr, NORMS))} or pass a callable")
    return factories[norm]


_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def freeze_module(module: nn.Module, *, recurse: bool = True) -> None:
    """Stops gradients in `module` and keeps its batch norms in eval mode.

    The parameters get `requires_grad=False`; batch norms are put in eval mode now and marked so
    that `keep_frozen_norms_in_eval` puts them back after every `train()` call. With `recurse=False`
    only `module`'s own parameters (not its children's) are frozen.
    """
    for param in module.parameters(recurse=recurse):
        param.requires_grad_(False)
    for sub in module.modules() if recurse else [module]:
        if isinstance(sub, _BATCH_NORMS):
            sub._resbone_frozen = True
            sub.eval()


def keep_frozen_norms_in_eval(module: nn.Module) -> None:
    """Re-applies eval mode to the batch norms that `freeze_module` marked."""
    for sub in module.modules():
        if getattr(sub, "_resbone_frozen", False):
            sub.eval()


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """`nn.SyncBatchNorm.convert_sync_batchnorm` that leaves frozen batch norms as they are and keeps
    timm's fused norm + activation layers whole.

    torch's converter would turn a frozen (eval-mode, no-grad) BatchNorm2d into a SyncBatchNorm
    that then silently updates nothing useful; frozen ones are kept instead. It would also turn
    timm's `BatchNormAct2d` into a plain SyncBatchNorm, dropping its activation; timm's converter
    makes it a `SyncBatchNormAct` (and a plain batch norm a SyncBatchNorm, as torch's does).
    """
    if isinstance(module, nn.BatchNorm2d) and not getattr(module, "_resbone_frozen", False):
        return timm_convert_sync_batchnorm(module)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module


def replace_batch_norms(module: nn.Module, norm: str | NormLayer) -> nn.Module:
    """Applies a norm policy to a network built with batch norms (a timm model), in place where it can.

    "bn" keeps them; "frozen_bn" and "sync_bn" use timm's converters (`freeze_batch_norm_2d`,
    `convert_sync_batchnorm`); "gn" and a callable replace each batch norm by a new norm of as many
    channels. timm's fused `BatchNormAct2d` keeps its activation (and drop) in every case. Norms
    that are not batch norms (ConvNeXt's LayerNorms) are left as they are.

    Returns:
        `module`, or its replacement when `module` is itself a batch norm.
    """
    make = get_norm_layer(norm)  # checks the name
    if norm == "bn":
        return module
    if norm == "frozen_bn":
        return freeze_batch_norm_2d(module)
    if norm == "sync_bn":
        return timm_convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _replaced(module, make, group_norm=norm == "gn").train(module.training)
    for name, child in module.named_children():
        module.add_module(name, replace_batch_norms(child, norm))
    return module


def _replaced(bn: nn.Module, make: NormLayer, *, group_norm: bool) -> nn.Module:
    if not isinstance(bn, BatchNormAct2d):
        return make(bn.num_features)
    if group_norm:  # timm's own fused layer: same parameter names as the batch norm's
        new = GroupNormAct(bn.num_features, _num_groups(bn.num_features), eps=bn.eps, apply_act=False)
        new.drop, new.act = bn.drop, bn.act
        return new
    return nn.Sequential(OrderedDict(norm=make(bn.num_features), drop=bn.drop, act=bn.act))


def zero_init_(norm: nn.Module) -> None:
    """Sets a norm layer's scale to zero (the `zero_init_last` trick)."""
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor):
        with torch.no_grad():
            weight.zero_()
