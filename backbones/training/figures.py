"""Figures in the training logs, for the loggers that take images.

Lightning has no figure metric (Lightning #2714, #4348): a logger whose ``experiment`` has ``add_figure``
(TensorBoard's ``SummaryWriter``, tensorboardX's) takes a matplotlib figure; the others (CSV) are skipped, and
when none takes figures they are not even drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["figure_experiments", "log_figures"]


def figure_experiments(trainer: Any) -> list[Any]:
    """The ``experiment`` of each of ``trainer``'s loggers that takes figures (has ``add_figure``)."""
    return [logger.experiment for logger in trainer.loggers if hasattr(logger.experiment, "add_figure")]


def log_figures(trainer: Any, figures: Mapping[str, Any] | Callable[[], Mapping[str, Any]], step: int) -> int:
    """Adds each figure (a matplotlib ``Figure``, by tag) to every logger of ``trainer`` that takes figures.

    Args:
        trainer: a Lightning trainer (its ``loggers``).
        figures: ``{tag: figure}``, or a function that makes them: called only when a logger takes figures.
        step: the global step the figures are logged at.

    Returns:
        How many loggers got the figures.
    """
    experiments = figure_experiments(trainer)
    if not experiments:
        return 0
    figures = figures() if callable(figures) else figures
    for tag, figure in figures.items():
        for experiment in experiments:
            experiment.add_figure(tag, figure, global_step=step)
    return len(experiments)
