"""Learning-rate schedules: linear warmup, then step, cosine, poly or constant, as a factor per optimizer step."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["SCHEDULES", "LRSchedule"]

SCHEDULES = ("step", "cosine", "poly", "constant")


class LRSchedule:
    """A learning-rate factor per optimizer step: linear warmup, then step, cosine or poly decay.

    Picklable (a plain object, not a lambda) so LambdaLR state survives a checkpoint.

    Args:
        total_steps: steps of the whole run (cosine and poly decay over them).
        schedule: "step" (multiply by `gamma` at each milestone), "cosine", "poly" or "constant".
        milestones: step indices of the decays for "step".
        warmup_steps: steps of linear warmup from `warmup_factor` to 1.
        final_factor: the factor cosine and poly decay to, e.g. 0.01 for a rate of 0.01 ending at 1e-4
            (MMSegmentation's ``eta_min``: ``final + (1 - final) * (1 - t)^power``).
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
        final_factor: float = 0.0,
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
        if not 0 <= final_factor <= 1:
            raise ValueError(f"final_factor={final_factor}; the rate decays to a fraction in 0..1 of itself")
        self.final_factor = final_factor

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
            decay = 0.5 * (1 + math.cos(math.pi * progress))
        elif self.schedule == "poly":
            decay = (1 - progress) ** self.power
        else:
            return 1.0
        return self.final_factor + (1 - self.final_factor) * decay
