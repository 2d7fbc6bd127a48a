"""Checks run during training: a non-finite loss stops the run with the step and every loss term."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["check_finite_losses"]


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
