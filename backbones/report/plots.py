"""Report figures with matplotlib: bars, PR curves, confusion matrices, stacked PR areas, image pairs.

Each function returns a ``matplotlib.figure.Figure`` built without pyplot (so no display and no global figure
list: nothing to close), which :func:`save_figure` writes as a PNG and a logger can take as it is
(TensorBoard's ``add_figure``). Fonts are matplotlib's bundled ones; nothing is read from the network.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

__all__ = [
    "bar_chart",
    "confusion_figure",
    "image_panels_figure",
    "pr_curve_figure",
    "pr_curve_grid",
    "save_figure",
    "side_by_side_figure",
    "stacked_pr_figure",
]

# The analyzer's colours (the COCO detection-eval page's): C75 and C50 white, then blue, red, green, purple, orange.
STACK_COLOURS = ("#ffffff", "#ffffff", "#4f82bd", "#bf4f4c", "#5ce561", "#8063a3", "#ff9900")


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # the Agg canvas: PNG output with no display
    return figure


def save_figure(figure: Figure, path: str | os.PathLike) -> str:
    """Write ``figure`` as a PNG at ``path``; return the path."""
    figure.savefig(path, format="png")
    return str(path)


def bar_chart(
    labels: Sequence[str], series: Mapping[str, Sequence[float]], *, title: str, xlabel: str = "", limit: float = 1.0
) -> Figure:
    """Horizontal grouped bars, one group per label (top to bottom in the given order); nan bars are left out."""
    height = 1.2 + 0.22 * len(labels) * max(1, len(series))
    figure = _figure(7, min(height, 40))
    axes = figure.add_subplot()
    positions = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        values = np.asarray(values, dtype=float)
        axes.barh(positions + i * width, np.nan_to_num(values, nan=0.0), height=width, label=name)
    axes.set_yticks(positions + width * (len(series) - 1) / 2, labels)
    axes.invert_yaxis()
    axes.set_xlim(0, limit)
    axes.set_xlabel(xlabel)
    axes.set_title(title)
    axes.grid(axis="x", alpha=0.3)
    if len(series) > 1:
        axes.legend(loc="lower right", fontsize="small")
    return figure


def _draw_curves(axes, recall, curves: Mapping[str, Sequence[float]], points: Mapping[str, tuple] | None) -> None:
    for index, (label, precision) in enumerate(curves.items()):
        colour = f"C{index % 10}"
        axes.plot(recall, precision, color=colour, label=label)
        point = (points or {}).get(label)
        if point is not None and None not in point:
            axes.plot(point[0], point[1], "o", color=colour, markersize=5)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)


def pr_curve_figure(
    recall: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    *,
    title: str,
    points: Mapping[str, tuple[float | None, float | None]] | None = None,
    point_label: str = "",
) -> Figure:
    """Precision against recall, one line per entry of ``curves``; ``points`` marks (recall, precision) on a line."""
    figure = _figure(6, 4.5)
    axes = figure.add_subplot()
    _draw_curves(axes, recall, curves, points)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title(title + (f"\n(dots: {point_label})" if points and point_label else ""))
    axes.legend(loc="lower left", fontsize="small")
    return figure


def pr_curve_grid(
    recall: Sequence[float],
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    title: str,
    points: Mapping[str, Mapping[str, tuple]] | None = None,
) -> Figure:
    """One small PR plot per panel (e.g. per category), the same curves in each."""
    columns = min(4, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    figure = _figure(3.2 * columns, 2.8 * rows + 0.4)
    figure.suptitle(title)
    for index, (name, curves) in enumerate(panels.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        _draw_curves(axes, recall, curves, (points or {}).get(name))
        axes.set_title(name, fontsize="small")
        axes.tick_params(labelsize="x-small")
        if index == 0:
            axes.legend(loc="lower left", fontsize="x-small")
    return figure


MAX_FIGURE_INCHES = 20.0
MAX_TICK_LABELS = 80  # a label per class up to this many classes, then every n-th


def confusion_figure(
    matrix: np.ndarray, row_labels: Sequence[str], column_labels: Sequence[str], *, title: str, normalized: bool
) -> Figure:
    """A heat map of ``matrix`` (rows: truth, columns: prediction), with the numbers written while they fit."""
    count = max(len(row_labels), len(column_labels))
    # 0.45 inch a class up to 20 inches (ADE20K's 150 classes would need 70); beyond that smaller ticks, fewer labels
    size = min(max(4.0, 0.45 * count + 2), MAX_FIGURE_INCHES)
    every = max(1, math.ceil(count / MAX_TICK_LABELS))
    font = "x-small" if count <= 40 else "xx-small"
    figure = _figure(size + 1, size)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", vmin=0, vmax=1 if normalized else max(1, matrix.max()))
    figure.colorbar(image, ax=axes, shrink=0.8)
    columns = range(0, len(column_labels), every)
    axes.set_xticks(columns, [column_labels[i] for i in columns], rotation=45, ha="right", fontsize=font)
    rows = range(0, len(row_labels), every)
    axes.set_yticks(rows, [row_labels[i] for i in rows], fontsize=font)
    axes.set_xlabel("prediction")
    axes.set_ylabel("ground truth")
    axes.set_title(title)
    if len(row_labels) * len(column_labels) <= 625:
        threshold = 0.5 * (1 if normalized else max(1, matrix.max()))
        for (row, column), value in np.ndenumerate(matrix):
            text = f"{value:.2f}" if normalized else str(int(value))
            colour = "white" if value > threshold else "black"
            axes.text(column, row, text, ha="center", va="center", fontsize="x-small", color=colour)
    return figure


def stacked_pr_figure(recall: Sequence[float], curves: Mapping[str, Sequence[float]], *, title: str) -> Figure:
    """The analyzer's plot: the area between successive curves filled, the legend giving each curve's area."""
    figure = _figure(6, 4.5)
    axes = figure.add_subplot()
    below = np.zeros(len(recall))
    for index, (name, precision) in enumerate(curves.items()):
        precision = np.asarray(precision, dtype=float)
        colour = STACK_COLOURS[index % len(STACK_COLOURS)]
        axes.plot(recall, precision, color="black", linewidth=0.5)
        axes.fill_between(recall, below, precision, color=colour, label=f"[{precision.mean():.3f}] {name}")
        below = precision
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title(title)
    axes.legend(loc="lower left", fontsize="small")
    return figure


def side_by_side_figure(
    image: np.ndarray,
    left: Sequence[tuple[Sequence[float], str, str]],
    right: Sequence[tuple[Sequence[float], str, str]],
    *,
    titles: tuple[str, str],
    suptitle: str = "",
) -> Figure:
    """The image twice, with boxes ``(x, y, w, h), label, colour`` drawn on each side."""
    height, width = image.shape[:2]
    scale = 5.0 / max(height, width)
    figure = _figure(2 * width * scale + 0.4, height * scale + 0.8)
    if suptitle:
        figure.suptitle(suptitle, fontsize="small")
    for index, (boxes, name) in enumerate(((left, titles[0]), (right, titles[1]))):
        axes = figure.add_subplot(1, 2, index + 1)
        axes.imshow(image)
        for (x, y, w, h), label, colour in boxes:
            axes.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=1.5))
            if label:
                axes.text(
                    x,
                    y,
                    label,
                    fontsize="x-small",
                    color="white",
                    va="bottom",
                    bbox={"facecolor": colour, "alpha": 0.7, "pad": 1, "linewidth": 0},
                )
        axes.set_title(name, fontsize="small")
        axes.axis("off")
    return figure


def image_panels_figure(panels: Sequence[tuple[np.ndarray, str]], *, suptitle: str = "") -> Figure:
    """Pictures of one size in a row, each ``(image (H, W, 3) uint8, title)``, e.g. image | truth | prediction."""
    height, width = panels[0][0].shape[:2]
    scale = 4.0 / max(height, width)
    figure = _figure(len(panels) * width * scale + 0.4, height * scale + 0.8)
    if suptitle:
        figure.suptitle(suptitle, fontsize="small")
    for index, (picture, title) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        axes.imshow(picture, interpolation="nearest")  # nearest: label colours are not blended at their edges
        axes.set_title(title, fontsize="small")
        axes.axis("off")
    return figure
