"""Optimizer inputs: parameter groups (no decay on norms and biases) and the learning rate scaled by the
global batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning.pytorch.utilities import rank_zero_info
from torch import nn

if TYPE_CHECKING:
    import lightning as L

__all__ = ["batch_scaled_lr", "global_batch_size", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float, *, norm_bias_decay: bool = True) -> list[dict]:
    """Trainable parameters in two groups; with `norm_bias_decay=False` norms and biases get no decay."""
    decay, no_decay = [], []
    for module in model.modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (no_decay if (is_norm or name == "bias") and not norm_bias_decay else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def global_batch_size(trainer: L.Trainer, batch_size: int) -> int:
    """Images per optimizer step over every process: batch_size * devices * num_nodes * accumulate_grad_batches."""
    return batch_size * trainer.world_size * trainer.accumulate_grad_batches


def batch_scaled_lr(lr: float, reference_batch_size: int | None, trainer: L.Trainer, *, name: str = "lr") -> float:
    """`lr` scaled linearly with the global batch (Goyal et al.): lr * global_batch / reference_batch_size.

    With `reference_batch_size=None`, `lr` as it is. The per-device batch is the data module's
    `batch_size`; the rate used is printed once (rank 0) with how it was reached.

    Example:
        lr 0.02 for a reference batch of 16 on 2 nodes x 8 GPUs x 2 images: 0.02 * 32 / 16 = 0.04.
    """
    if reference_batch_size is None:
        rank_zero_info(f"learning rate {lr:.4g} ({name}; not scaled with the batch size)")
        return lr
    if reference_batch_size < 1:
        raise ValueError(f"lr_reference_batch_size={reference_batch_size}; give a positive batch size or None")
    batch_size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    if batch_size is None:
        raise ValueError(
            f"scaling {name}={lr:g} by the global batch (reference batch {reference_batch_size}) needs the per-device "
            "batch_size of the trainer's data module, which has none; fit with a data module that has batch_size, "
            "or give an unscaled learning rate"
        )
    global_batch = global_batch_size(trainer, batch_size)
    scaled = lr * global_batch / reference_batch_size
    rank_zero_info(
        f"learning rate {scaled:.4g} = {name} {lr:g} x global batch {global_batch} / {reference_batch_size} "
        f"(global batch = {batch_size} per device x {trainer.num_devices} devices x {trainer.num_nodes} nodes "
        f"x {trainer.accumulate_grad_batches} accumulated)"
    )
    return scaled
