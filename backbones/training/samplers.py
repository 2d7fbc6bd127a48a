"""Training samplers of every task: batches over a seeded, DDP-aware shuffle, resumable mid-epoch.

A run killed mid-epoch and resumed from its last checkpoint trains on the same batches, with the
same augmentations, as a run that was never stopped:

- the shuffle is a function of (seed, epoch) (`train_sampler`), and a `GroupedBatchSampler` made with
  `resume=(epoch, batches_done)` skips, in its first pass over that epoch, the batches already trained
  on. It is a constructor argument so that it survives Lightning re-making the batch sampler around
  its own `DistributedSampler` under DDP;
- with a `seed`, `GroupedBatchSampler` yields `SampleKey(index, seed)` and `SeededSamples` runs each
  sample's random transforms from that seed, so an augmentation depends on (seed, epoch, index) only,
  not on the RNG history of the process, the number of workers or a restart;
- `training_state(trainer)` records the epoch, the batches done in it and the global RNG state (which
  the model's own sampling draws from) in the checkpoint; `restore_training_state` puts them back.

`ResumableTrainData` gives a LightningDataModule all of this: its `state_dict`/`load_state_dict` and
`train_loader_kwargs`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, Sampler

if TYPE_CHECKING:
    import lightning as L

__all__ = [
    "GroupedBatchSampler",
    "ResumableTrainData",
    "SampleKey",
    "SeededSamples",
    "global_seed",
    "restore_training_state",
    "train_sampler",
    "training_state",
]


class SampleKey(NamedTuple):
    """A dataset index and the seed of that sample's random transforms."""

    index: int
    seed: int


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch."""
    return int(np.random.SeedSequence((seed, epoch, index)).generate_state(1, np.uint64)[0] >> 1)


class GroupedBatchSampler(BatchSampler):
    """Batches indices from ``sampler`` so that a batch shares one group id.

    Grouping by aspect ratio keeps padding small. Each index the sampler yields lands in
    exactly one batch: once the sampler is exhausted the group leftovers are merged and
    cut into batches, so there are always ``ceil(len(sampler) / batch_size)`` batches
    (the same on every DDP rank) and only the last one or two may mix groups. The order
    is a function of the sampler's order, so a seeded sampler makes it deterministic.
    Without ``group_ids`` it is a plain batch sampler: consecutive runs of the sampler's order.

    Args:
        sampler: yields dataset indices, e.g. a ``DistributedSampler`` for this rank.
        group_ids: group id of every dataset index; None: one group.
        batch_size: size of every batch but the last ones.
        seed: if given, batches hold ``SampleKey(index, seed)`` with a seed drawn from
            (seed, epoch, index), for a dataset wrapped in ``SeededSamples``.
        drop_last: drop the last batch if it is smaller than ``batch_size`` (``floor`` batches).
        resume: ``(epoch, batches_done)``: the first pass over that epoch skips its first
            ``batches_done`` batches (see `resume_at`).
    """

    def __init__(
        self,
        sampler: Sampler[int] | Iterable[int],
        group_ids: Sequence[int] | None,
        batch_size: int,
        *,
        seed: int | None = None,
        drop_last: bool = False,
        resume: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last=drop_last)
        self.group_ids = None if group_ids is None else list(group_ids)
        self.seed = seed
        self._epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip) for the next pass
        if resume is not None:
            self.resume_at(*resume)

    @property
    def epoch(self) -> int:
        """The sampler's epoch (Lightning sets it on the sampler, not on the batch sampler), else ours."""
        return getattr(self.sampler, "epoch", self._epoch)

    def __iter__(self) -> Iterator[list[int] | list[SampleKey]]:
        epoch = self.epoch
        skip = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume = None
        for position, batch in enumerate(self._batches()):
            if position < skip:
                continue
            if self.seed is None:
                yield batch
            else:
                yield [SampleKey(index, sample_seed(self.seed, epoch, index)) for index in batch]

    def _batches(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = defaultdict(list)
        for index in self.sampler:
            buffer = buffers[0 if self.group_ids is None else self.group_ids[index]]
            buffer.append(index)
            if len(buffer) == self.batch_size:
                yield buffer.copy()
                buffer.clear()
        leftovers = [index for buffer in buffers.values() for index in buffer]
        for start in range(0, len(leftovers), self.batch_size):
            batch = leftovers[start : start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.sampler) // self.batch_size
        return math.ceil(len(self.sampler) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Forwards the epoch to the sampler, so that its shuffle changes every epoch."""
        self._epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Sets the epoch; the next pass over it skips its first `batches_done` batches (once)."""
        if not 0 <= batches_done <= len(self):
            raise ValueError(f"batches_done={batches_done}; an epoch here has {len(self)} batches")
        self.set_epoch(epoch)
        self._resume = (epoch, batches_done)


class SeededSamples(Dataset):
    """Runs ``dataset[key.index]`` with the CPU RNG seeded from ``key.seed`` (then restored).

    Plain indices pass through unseeded. The global RNG outside is left as it was, so the
    model's own random sampling does not depend on how many images were loaded.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | SampleKey) -> Any:
        if not isinstance(key, SampleKey):
            return self.dataset[key]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(key.seed)  # the CPU generator only; CUDA's is the model's
            return self.dataset[key.index]


def global_seed() -> int:
    """The seed of `seed_everything` (LightningCLI's `seed_everything`), 0 without one."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


def train_sampler(dataset: Dataset, seed: int | None = None) -> DistributedSampler:
    # A one-replica DistributedSampler outside DDP: unlike RandomSampler it shuffles
    # from seed + epoch, so an epoch's order is reproducible, also after resuming.
    seed = global_seed() if seed is None else seed
    if dist.is_available() and dist.is_initialized():
        return DistributedSampler(dataset, shuffle=True, seed=seed)
    return DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)


def training_state(trainer: L.Trainer) -> dict[str, Any]:
    """Where a fit stands, for a data module's `state_dict`: the epoch, the batches done in it and the RNG.

    Called while a checkpoint is written. After the last batch of an epoch it points at the
    start of the next one. Outside fitting it is empty.
    """
    if trainer is None or trainer.state.fn != "fit":
        return {}
    progress = trainer.fit_loop.epoch_loop.batch_progress
    epoch, done = trainer.current_epoch, progress.current.processed  # processed: batches whose step ran
    if progress.is_last_batch or done >= trainer.num_training_batches:
        epoch, done = epoch + 1, 0
    state: dict[str, Any] = {"epoch": epoch, "batches_done": done, "torch_rng_state": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng_states"] = torch.cuda.get_rng_state_all()
    return state


def restore_training_state(state: dict[str, Any]) -> tuple[int, int] | None:
    """Puts back the RNG state of `training_state` and returns its (epoch, batches_done), or None if empty.

    Lightning restores a data module's state after the model is built and before the training
    loader is made, so the RNG continues exactly where the checkpointed run was.
    """
    if not state:
        return None
    # Lightning looks for a state_dict on the DataLoader itself, finds none and would warn that this
    # mid-epoch resume is unreliable; the data module restores the position instead.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    torch.set_rng_state(state["torch_rng_state"])
    if "cuda_rng_states" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng_states"])
    return int(state["epoch"]), int(state["batches_done"])


class ResumableTrainData:
    """A LightningDataModule mixin: training batches that resume mid-epoch where the checkpoint stopped.

    Lightning saves the data module's `state_dict` in every checkpoint and, on resume, calls
    `load_state_dict` before it asks for the training loader. Build that loader over
    `SeededSamples(dataset)` with `train_loader_kwargs`:

        def train_dataloader(self):
            dataset = self.dataset("train")
            return DataLoader(SeededSamples(dataset), **self.train_loader_kwargs(dataset, 8), num_workers=2)
    """

    _resume_at: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the epoch, the batches done in it and the RNG state (`training_state`)."""
        return training_state(self.trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_at = restore_training_state(state_dict)

    def train_loader_kwargs(
        self, dataset: Dataset, batch_size: int, *, group_ids: Sequence[int] | None = None, drop_last: bool = False
    ) -> dict[str, Any]:
        """`batch_sampler` (seeded, DDP-aware shuffle, grouped by `group_ids`, resumed where the checkpoint
        stopped) and `generator` (worker seeds from the run's seed, not drawn from the global RNG)."""
        seed = global_seed()
        batch_sampler = GroupedBatchSampler(
            train_sampler(dataset, seed), group_ids, batch_size, seed=seed, drop_last=drop_last, resume=self._resume_at
        )
        self._resume_at = None  # once: a loader made again later starts its epoch from the beginning
        return {"batch_sampler": batch_sampler, "generator": torch.Generator().manual_seed(seed)}
