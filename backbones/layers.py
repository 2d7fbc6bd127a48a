"""Norm layers from a closed factory, and helpers to freeze parts of a network."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = ["NORMS", "NormLayer", "get_norm_layer", "freeze_module", "FrozenBatchNorm2d"]

NormLayer = Callable[[int], nn.Module]
NORMS = ("bn", "frozen_bn", "sync_bn", "gn")


def _group_norm(num_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    # Fewer channels than groups (a deep stem's 32) falls back to the largest divisor.
    groups = min(num_groups, num_channels)
    while num_channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, num_channels)


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


def freeze_module(module: nn.Module) -> None:
    """Stops gradients in `module` and keeps its batch norms in eval mode.

    The parameters get `requires_grad=False`; batch norms are put in eval mode now and marked so
    that `keep_frozen_norms_in_eval` puts them back after every `train()` call.
    """
    for param in module.parameters():
        param.requires_grad_(False)
    for sub in module.modules():
        if isinstance(sub, _BATCH_NORMS):
            sub._resbone_frozen = True
            sub.eval()


def keep_frozen_norms_in_eval(module: nn.Module) -> None:
    """Re-applies eval mode to the batch norms that `freeze_module` marked."""
    for sub in module.modules():
        if getattr(sub, "_resbone_frozen", False):
            sub.eval()


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """`nn.SyncBatchNorm.convert_sync_batchnorm` that leaves frozen batch norms as they are.

    torch's converter would turn a frozen (eval-mode, no-grad) BatchNorm2d into a SyncBatchNorm
    that then silently updates nothing useful; frozen ones are kept instead.
    """
    if isinstance(module, nn.BatchNorm2d) and not getattr(module, "_resbone_frozen", False):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module


def zero_init_(norm: nn.Module) -> None:
    """Sets a norm layer's scale to zero (the `zero_init_last` trick)."""
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor):
        with torch.no_grad():
            weight.zero_()

