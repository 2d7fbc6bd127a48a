"""Training helpers shared by the detection, segmentation and classification tasks."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from .distributed import prepare_sync_batchnorm

if TYPE_CHECKING:
    import lightning as L

__all__ = [
    "SCHEDULES",
    "LRSchedule",
    "batch_scaled_lr",
    "check_finite_losses",
    "global_batch_size",
    "param_groups",
    "prepare_task_model",
]

SCHEDULES = ("step", "cosine", "poly", "constant")


class LRSchedule:
    """A learning-rate factor per optimizer step: linear warmup, then step, cosine or poly decay.

    Picklable (a plain object, not a lambda) so LambdaLR state survives a checkpoint.

    Args:
        total_steps: steps of the whole run (cosine and poly decay over them).
        schedule: "step" (multiply by `gamma` at each milestone), "cosine", "poly" or "constant".
        milestones: step indices of the decays for "step".
        warmup_steps: steps of linear warmup from `warmup_factor` to 1.
    """

    def __init__(
        self,
        *,
        total_steps: int,
        schedule: str = "step",
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        warmup_steps: int = 0,
        warmup_factor: float = 0.001,
        power: float = 0.9,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}; choose one of {', '.join(SCHEDULES)}")
        self.total_steps = max(int(total_steps), 1)
        self.schedule = schedule
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = gamma
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = warmup_factor
        self.power = power

    def __call__(self, step: int) -> float:
        factor = self._decay(step)
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor

    def _decay(self, step: int) -> float:
        progress = min(step / self.total_steps, 1.0)
        if self.schedule == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        if self.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if self.schedule == "poly":
            return (1 - progress) ** self.power
        return 1.0


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


def check_finite_losses(losses: Mapping[str, Tensor], step: int) -> None:
    """Stops training at the first NaN or infinite loss, naming the step and every loss term."""
    total = sum(losses.values())
    if torch.isfinite(total).all():
        return
    terms = ", ".join(f"{name}={value.item():.4g}" for name, value in losses.items())
    raise FloatingPointError(
        f"loss became non-finite at step {step}: {terms}. The last checkpoint saved before it is intact; "
        "lower the learning rate, add gradient clipping (--trainer.gradient_clip_val) or check the data"
    )


def steps_per_epoch(total_steps: int, max_epochs: int | None) -> int:
    return max(total_steps // max(max_epochs or 1, 1), 1)


def as_list(values: Iterable[int] | None) -> list[int]:
    return [int(v) for v in values] if values else []


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


def prepare_task_model(task: L.LightningModule, *, channels_last: bool = False) -> None:
    """What every task does in `configure_model`, before Lightning wraps it for DDP.

    Installs the frozen-aware SyncBatchNorm conversion (`backbones.distributed.prepare_sync_batchnorm`)
    and, with `channels_last`, turns every 4-D weight of the task into channels-last memory. The
    inputs need no conversion: a convolution whose weight is channels-last runs channels-last (cuDNN
    and oneDNN convert its input), and its output, channels-last, carries the format on.
    """
    if task._trainer is not None:  # Lightning's load_from_checkpoint calls configure_model without a trainer
        prepare_sync_batchnorm(task.trainer, task)
    if channels_last:
        task.to(memory_format=torch.channels_last)
