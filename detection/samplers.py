"""Training samplers: aspect-ratio grouped batches over a seeded, DDP-aware shuffle."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence

import torch.distributed as dist
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, Sampler

__all__ = ["GroupedBatchSampler", "train_sampler"]


class GroupedBatchSampler(BatchSampler):
    """Batches indices from ``sampler`` so that a batch shares one group id.

    Grouping by aspect ratio keeps padding small. Each index the sampler yields lands in
    exactly one batch: once the sampler is exhausted the group leftovers are merged and
    cut into batches, so there are always ``ceil(len(sampler) / batch_size)`` batches
    (the same on every DDP rank) and only the last one or two may mix groups. The order
    is a function of the sampler's order, so a seeded sampler makes it deterministic.

    Args:
        sampler: yields dataset indices, e.g. a ``DistributedSampler`` for this rank.
        group_ids: group id of every dataset index.
        batch_size: size of every batch but the last ones.
    """

    def __init__(self, sampler: Sampler[int] | Iterable[int], group_ids: Sequence[int], batch_size: int) -> None:
        super().__init__(sampler, batch_size, drop_last=False)
        self.group_ids = list(group_ids)

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = defaultdict(list)
        for index in self.sampler:
            buffer = buffers[self.group_ids[index]]
            buffer.append(index)
            if len(buffer) == self.batch_size:
                yield buffer.copy()
                buffer.clear()
        leftovers = [index for buffer in buffers.values() for index in buffer]
        for start in range(0, len(leftovers), self.batch_size):
            yield leftovers[start : start + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Forwards the epoch to the sampler, so that its shuffle changes every epoch."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def train_sampler(dataset: Dataset) -> DistributedSampler:
    # A one-replica DistributedSampler outside DDP: unlike RandomSampler it shuffles
    # from seed + epoch, so an epoch's order is reproducible, also after resuming.
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    if dist.is_available() and dist.is_initialized():
        return DistributedSampler(dataset, shuffle=True, seed=seed)
    return DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
