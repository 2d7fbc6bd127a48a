"""Evaluation reports shared by the tasks: a self-contained HTML page (`html`), matplotlib figures (`plots`)
and bootstrap helpers (`stats`).

Lightning-free; matplotlib draws with its Agg canvas (no display, no pyplot state).
"""

from .html import HTMLReport
from .plots import (
    bar_chart,
    confusion_figure,
    image_panels_figure,
    pr_curve_figure,
    pr_curve_grid,
    save_figure,
    side_by_side_figure,
    stacked_pr_figure,
)
from .stats import image_draws, percentile_interval

__all__ = [
    "HTMLReport",
    "bar_chart",
    "confusion_figure",
    "image_draws",
    "image_panels_figure",
    "percentile_interval",
    "pr_curve_figure",
    "pr_curve_grid",
    "save_figure",
    "side_by_side_figure",
    "stacked_pr_figure",
]
