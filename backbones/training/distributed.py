"""Multi-process training and evaluation: an exact evaluation sampler and a SyncBatchNorm that keeps frozen norms.

Evaluation must see every image exactly once at any world size. torch's `DistributedSampler`
(which Lightning injects into every loader under DDP) pads the last round by repeating images,
so a metric summed over ranks (a confusion matrix, a top-1 count) would count them twice.
`EvalDistributedSampler` gives rank r the indices r, r + W, r + 2W, ... without padding; the data
modules use it (through `eval_sampler`) for their validation, test and predict loaders. Being a
`DistributedSampler`, Lightning keeps it instead of injecting its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct
from torch import nn
from torch.utils.data import DistributedSampler

from backbones.layers import FrozenBatchNorm2d, convert_sync_batchnorm

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch import Trainer

__all__ = [
    "EvalDistributedSampler",
    "FrozenAwareSyncBatchNorm",
    "count_batch_norms",
    "eval_sampler",
    "prepare_sync_batchnorm",
    "prepare_task_model",
]


class EvalDistributedSampler(DistributedSampler):
    """Rank r of W gets dataset indices r, r + W, r + 2W, ...: every index exactly once over all ranks.

    Ranks may get one index more than others (no padding, no shuffling). Every rank needs at
    least one index, or DDP's first forward (which broadcasts buffers) would wait for it forever.

    Args:
        dataset: a sized dataset.
        num_replicas, rank: default to the initialized process group's world size and rank.

    Raises:
        ValueError: the dataset is not empty but has fewer items than there are processes.

    Example:
        >>> list(EvalDistributedSampler(range(7), num_replicas=2, rank=1))
        [1, 3, 5]
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        size = len(dataset)
        if 0 < size < self.num_replicas:
            raise ValueError(
                f"the evaluation set has {size} items for {self.num_replicas} processes; every process needs "
                f"at least one: evaluate with at most {size} devices in all"
            )
        self.total_size = size
        self.num_samples = len(range(self.rank, size, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def eval_sampler(dataset: Sized) -> EvalDistributedSampler:
    """The sampler of a validation, test or predict loader: this rank's share under DDP, else every index in order."""
    if dist.is_available() and dist.is_initialized():
        return EvalDistributedSampler(dataset)
    return EvalDistributedSampler(dataset, num_replicas=1, rank=0)


class FrozenAwareSyncBatchNorm(TorchSyncBatchNorm):
    """Lightning's `sync_batchnorm=True` plugin, converting only the batch norms that train.

    Lightning's own converter (torch's) also turns frozen batch norms (`frozen_stages`, kept in eval
    mode by `keep_frozen_norms_in_eval`) into SyncBatchNorm layers that lose their frozen mark and
    would then update their statistics, and timm's fused `BatchNormAct2d` into plain SyncBatchNorm
    layers without their activation; `backbones.layers.convert_sync_batchnorm` keeps both. `revert`
    turns timm's `SyncBatchNormAct` back into `BatchNormAct2d`, activation included.

    The public way in is Lightning's plugin list, `Trainer(plugins=[FrozenAwareSyncBatchNorm()])`
    (allowed with `sync_batchnorm=True`: it is a `TorchSyncBatchNorm`). For a plain
    `sync_batchnorm=True`, Lightning has no public setter, so `prepare_sync_batchnorm` swaps it in.
    """

    def apply(self, model: nn.Module) -> nn.Module:
        return convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        frozen = {name for name, module in model.named_modules() if getattr(module, "_resbone_frozen", False)}
        model = super().revert(_revert_norm_acts(model))
        for name, module in model.named_modules():
            if name in frozen:  # a frozen norm="sync_bn" layer that Lightning's revert replaced
                module._resbone_frozen = True
                module.eval()
        return model


def _revert_norm_acts(module: nn.Module) -> nn.Module:
    """timm's `SyncBatchNormAct` -> `BatchNormAct2d` with the same parameters, statistics and activation."""
    if isinstance(module, SyncBatchNormAct):
        reverted = BatchNormAct2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            apply_act=False,
        )  # fmt: skip
        reverted.act, reverted.drop = module.act, module.drop
        if module.affine:
            reverted.weight, reverted.bias = module.weight, module.bias
        reverted.running_mean, reverted.running_var = module.running_mean, module.running_var
        reverted.num_batches_tracked = module.num_batches_tracked
        return reverted.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, _revert_norm_acts(child))
    return module


def prepare_sync_batchnorm(trainer: Trainer, model: nn.Module) -> None:
    """Puts our SyncBatchNorm policy in place before Lightning wraps `model` for DDP.

    Call it from a task's `configure_model` (after `setup`, before the strategy converts the layers):
    `Trainer(sync_batchnorm=True)` then converts through `FrozenAwareSyncBatchNorm`. A request that
    synchronizes nothing (one process, or no batch norm left that trains) is warned about.
    """
    strategy = trainer.strategy
    if type(getattr(strategy, "_layer_sync", None)) is TorchSyncBatchNorm:  # Lightning's default plugin
        strategy._layer_sync = FrozenAwareSyncBatchNorm()
    # Single-device strategies hold no plugin; the connector keeps the Trainer's flag for them.
    connector = getattr(trainer, "_accelerator_connector", None)
    if getattr(strategy, "_layer_sync", None) is not None or getattr(connector, "_layer_sync", None) is not None:
        requested = "Trainer(sync_batchnorm=True)"
    elif any(isinstance(module, nn.SyncBatchNorm) for module in model.modules()):
        requested = "norm='sync_bn'"
    else:
        return
    trainable, frozen = count_batch_norms(model)
    if trainer.world_size == 1:
        rank_zero_warn(f"{requested} with one process: the batch norms have nothing to synchronize with")
    elif trainable == 0:
        found = (
            f"none of the model's {frozen} batch norms trains (norm='frozen_bn', or in frozen_stages and kept in "
            "eval mode)"
            if frozen
            else "the model has no batch norm"
        )
        rank_zero_warn(f"{requested}, but {found}: nothing is synchronized")
    if trainable and frozen:
        rank_zero_info(f"SyncBatchNorm: {trainable} batch norms train synchronized, {frozen} frozen ones keep theirs")


def count_batch_norms(model: nn.Module) -> tuple[int, int]:
    """(batch norms that use batch statistics in training, frozen ones) of `model`."""
    trainable = frozen = 0
    for module in model.modules():
        if isinstance(module, (FrozenBatchNorm2d, FrozenBatchNormAct2d)) or getattr(module, "_resbone_frozen", False):
            frozen += 1
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            trainable += 1
    return trainable, frozen


def prepare_task_model(task: L.LightningModule, *, channels_last: bool = False) -> None:
    """What every task does in `configure_model`, before Lightning wraps it for DDP.

    Installs the frozen-aware SyncBatchNorm conversion (`backbones.training.distributed.prepare_sync_batchnorm`)
    and, with `channels_last`, turns every 4-D weight of the task into channels-last memory. The
    inputs need no conversion: a convolution whose weight is channels-last runs channels-last (cuDNN
    and oneDNN convert its input), and its output, channels-last, carries the format on.
    """
    if task._trainer is not None:  # Lightning's load_from_checkpoint calls configure_model without a trainer
        prepare_sync_batchnorm(task.trainer, task)
    if channels_last:
        task.to(memory_format=torch.channels_last)
