"""Evaluation reports shared by the tasks: a self-contained HTML page (`html`) and matplotlib figures (`plots`).

Lightning-free; matplotlib draws with its Agg canvas (no display, no pyplot state).
"""

from .html import HTMLReport
from .plots import (
    bar_chart,
    confusion_figure,
    pr_curve_figure,
    pr_curve_grid,
    save_figure,
    side_by_side_figure,
    stacked_pr_figure,
)

__all__ = [
    "HTMLReport",
    "bar_chart",
    "confusion_figure",
    "pr_curve_figure",
    "pr_curve_grid",
    "save_figure",
    "side_by_side_figure",
    "stacked_pr_figure",
]
