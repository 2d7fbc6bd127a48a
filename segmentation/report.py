"""The segmentation report: ``report.html`` and ``metrics.json`` that explain an mIoU.

:func:`segmentation_metrics` computes every number from the summed confusion matrix (the evaluator's, so the
summary is its own) and the per-image ``class_statistics`` (true positives, ground-truth and predicted pixels
per class of each image): mIoU, pixel accuracy (MMSegmentation's aAcc), mean accuracy (mAcc), IoU and accuracy
per class, each image's mIoU, and bootstrap intervals. A bootstrap draw resamples the images with replacement;
its statistics are the per-image ones summed with the draw's multiplicities, so all draws are one matrix product
of the (draws, images) multiplicities with the (images, 3 * K) statistics. The metrics are functions of these
three numbers per class alone, so the draws equal evaluations of the resampled image lists, and the point
estimate is the evaluator's own.

:func:`write_segmentation_report` writes them with the figures: the row-normalised confusion matrix, IoU and
accuracy bars, and the images with the lowest mIoU (over the classes present in their ground truth or
prediction) drawn as image | ground truth | prediction. Used by ``tools/eval_seg.py --report`` and by
``SegmentationTask(report_dir=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbones.data.files import json_safe, write_json
from backbones.report import (
    HTMLReport,
    bar_chart,
    confusion_figure,
    image_draws,
    image_panels_figure,
    percentile_interval,
    save_figure,
)

from .evaluation import metrics_from_confusion, metrics_from_statistics
from .label_tables import class_palette

__all__ = ["class_colours", "confusion_matrix_figure", "segmentation_metrics", "write_segmentation_report"]

SUMMARY = ("mIoU", "pixel_acc", "mean_acc")
SUMMARY_NOTE = (
    "pixel_acc: the share of labelled pixels predicted right (MMSegmentation's aAcc); mean_acc: the mean over "
    "classes of the share of each class's pixels predicted right (mAcc); mIoU: the mean over classes of "
    "TP / (TP + FP + FN). A class with no pixel in the ground truth nor the predictions has no IoU and is left out "
    "of the means; pixels of the ignore index are not counted."
)
BACKGROUND_NAMES = ("__background__", "background")
#: an image panel is given (image or None, ground truth (H, W), prediction (H, W)) by the caller
ImageLoader = Callable[[int], tuple[np.ndarray | None, np.ndarray, np.ndarray]]


def segmentation_metrics(
    confusion: np.ndarray | torch.Tensor,
    statistics: np.ndarray,
    class_names: Sequence[str],
    *,
    image_names: Sequence[str] | None = None,
    num_bootstrap: int = 0,
    seed: int = 0,
    confidence: float = 0.95,
    num_worst: int = 8,
) -> dict[str, Any]:
    """Every number of the report.

    Args:
        confusion: (K, K) pixel counts summed over the images (rows ground truth, columns predictions).
        statistics: (N, 3, K) ``class_statistics`` per image; they sum to those of ``confusion``.
        class_names: K names.
        image_names: a name per image (default: its index).
        num_bootstrap: resamplings of the images for the intervals (0: none).
        seed: the seed of the resamplings (the same seed gives the same intervals).
        confidence: the intervals' level.
        num_worst: how many of the lowest-mIoU images to list.

    Returns:
        A dict for ``metrics.json``: ``summary``, ``per_class``, ``confusion``, ``per_image``, ``worst_images``
        and, with ``num_bootstrap``, ``bootstrap``.
    """
    confusion = torch.as_tensor(np.asarray(confusion), dtype=torch.int64)
    statistics = np.asarray(statistics, dtype=np.int64)
    num_images, num_classes = len(statistics), confusion.shape[0]
    if statistics.shape[1:] != (3, num_classes) or len(class_names) != num_classes:
        raise ValueError(
            f"per-image statistics {statistics.shape}, confusion {tuple(confusion.shape)} and "
            f"{len(class_names)} class names do not agree; expected (N, 3, {num_classes}) and {num_classes} names"
        )
    names = [str(i) for i in range(num_images)] if image_names is None else [str(n) for n in image_names]
    if len(names) != num_images:
        raise ValueError(f"{len(names)} image names for {num_images} images")
    total = metrics_from_confusion(confusion)
    pixels_gt, pixels_predicted = confusion.sum(1), confusion.sum(0)
    share = pixels_gt.double() / max(int(pixels_gt.sum()), 1)
    per_image = metrics_from_statistics(torch.from_numpy(statistics))
    image_miou = per_image["mIoU"].numpy()
    ranked = [int(i) for i in np.argsort(image_miou, kind="stable") if not np.isnan(image_miou[i])]
    worst = [
        {
            "index": i,
            "name": names[i],
            "mIoU": float(image_miou[i]),
            "pixel_acc": float(per_image["pixel_acc"][i]),
            "classes": [class_names[k] for k in np.flatnonzero(statistics[i, 1] + statistics[i, 2])],
        }
        for i in ranked[:num_worst]
    ]
    metrics: dict[str, Any] = {
        "num_images": num_images,
        "num_pixels": int(pixels_gt.sum()),
        "summary": {key: float(total[key]) for key in SUMMARY},
        "per_class": {
            name: {
                "IoU": float(total["iou"][k]),
                "acc": float(total["acc"][k]),
                "gt_pixels": int(pixels_gt[k]),
                "predicted_pixels": int(pixels_predicted[k]),
                "gt_share": float(share[k]),
            }
            for k, name in enumerate(class_names)
        },
        "confusion": {
            "classes": list(class_names),
            "counts": confusion.tolist(),
            "row_normalized": _row_normalized(confusion.numpy()).tolist(),
        },
        "per_image": {
            "names": names,
            "mIoU": image_miou.tolist(),
            "pixel_acc": per_image["pixel_acc"].tolist(),
        },
        "worst_images": worst,
    }
    if num_bootstrap:
        metrics["bootstrap"] = bootstrap_intervals(
            statistics, class_names, num_draws=num_bootstrap, seed=seed, confidence=confidence
        )
    return metrics


def bootstrap_intervals(
    statistics: np.ndarray, class_names: Sequence[str], *, num_draws: int, seed: int, confidence: float = 0.95
) -> dict[str, Any]:
    """Percentile intervals of the summary metrics and of each class's IoU and accuracy over image resamplings.

    Returns:
        ``draws``, ``seed``, ``confidence``, ``summary`` (metric: [low, high]) and ``per_class``
        (name: {"IoU": [low, high], "acc": [low, high]}); nan (null in JSON) where no draw defines a value.
    """
    num_images, _, num_classes = statistics.shape
    multiplicities = image_draws(num_images, num_draws, seed).astype(np.float64)  # (D, N)
    # float64 products and sums of integer counts are exact below 2 ** 53
    resampled = multiplicities @ statistics.reshape(num_images, 3 * num_classes).astype(np.float64)
    draws = metrics_from_statistics(torch.from_numpy(resampled.reshape(num_draws, 3, num_classes)))
    summary = {key: percentile_interval(draws[key].numpy(), confidence).tolist() for key in SUMMARY}
    iou, acc = (percentile_interval(draws[key].numpy(), confidence) for key in ("iou", "acc"))
    return {
        "draws": num_draws,
        "seed": seed,
        "confidence": confidence,
        "summary": summary,
        "per_class": {
            name: {"IoU": iou[:, k].tolist(), "acc": acc[:, k].tolist()} for k, name in enumerate(class_names)
        },
    }


def class_colours(class_names: Sequence[str]) -> np.ndarray:
    """(K, 3) uint8 RGB colours of the overlays: the dataset's own palette (`label_tables.class_palette`: Cityscapes',
    ADE20K's, else VOC's colour map), as `tools/infer_seg.py` draws; black, left uncoloured over an image, for a
    background class."""
    colours = class_palette(class_names).copy()
    colours[[name in BACKGROUND_NAMES for name in class_names]] = 0
    return colours


def confusion_matrix_figure(confusion: np.ndarray | torch.Tensor, class_names: Sequence[str], *, title: str):
    """The row-normalised confusion matrix (rows: ground truth, columns: prediction) as a figure; a row of a
    class absent from the ground truth is left empty."""
    matrix = np.nan_to_num(_row_normalized(np.asarray(confusion)))
    return confusion_figure(matrix, class_names, class_names, title=title, normalized=True)


def write_segmentation_report(
    out_dir: str | os.PathLike,
    metrics: dict[str, Any],
    *,
    load_image: ImageLoader | None = None,
    palette: np.ndarray | None = None,
    ignore_index: int = 255,
    sources: dict | None = None,
) -> Path:
    """Write ``out_dir/report.html``, its PNG figures and ``out_dir/metrics.json`` (``metrics`` and ``sources``).

    Args:
        out_dir: the report folder (created).
        metrics: :func:`segmentation_metrics`' result.
        load_image: gives image ``index``'s (RGB image (H, W, 3) uint8 or None, ground truth, prediction),
            to draw the worst images; None: they are listed, not drawn.
        palette: (K, 3) uint8 class colours (default :func:`class_colours`).
        ignore_index: the ground-truth label drawn uncoloured.
        sources: where the inputs came from, written into the report.

    Returns:
        The page's path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    class_names = metrics["confusion"]["classes"]
    palette = class_colours(class_names) if palette is None else np.asarray(palette, np.uint8)
    page = HTMLReport("Segmentation report")
    if sources:
        page.paragraph(", ".join(f"{key}: {value}" for key, value in sources.items()), note=True)

    def figure(name: str, fig, alt: str) -> None:
        save_figure(fig, out / f"{name}.png")
        page.image(f"{name}.png", alt)

    bootstrap = metrics.get("bootstrap")
    page.heading("Summary")
    page.paragraph(f"{metrics['num_images']} images, {metrics['num_pixels']} labelled pixels.")
    header = ["metric", "value"]
    if bootstrap:
        header += [f"{bootstrap['confidence']:.0%} interval: low", "high"]
        page.paragraph(
            f"Intervals: percentiles of {bootstrap['draws']} resamplings of the images with replacement "
            f"(seed {bootstrap['seed']})."
        )
    summary = metrics["summary"]
    rows = [[key, value, *(bootstrap["summary"][key] if bootstrap else [])] for key, value in summary.items()]
    page.table(header, rows, digits=4)
    page.paragraph(SUMMARY_NOTE, note=True)

    page.heading("Confusion matrix")
    page.paragraph("Rows: ground truth, columns: prediction; each row divided by its class's pixels.")
    title = "pixel confusions, row-normalised"
    figure("confusion_matrix", confusion_matrix_figure(metrics["confusion"]["counts"], class_names, title=title), title)

    page.heading("Per class")
    per_class = metrics["per_class"]
    header = ["class", "IoU", "acc", "gt share", "gt pixels", "predicted pixels"]
    if bootstrap:
        header[2:2] = ["IoU low", "IoU high"]
    rows = []
    for name, row in per_class.items():
        interval = bootstrap["per_class"][name]["IoU"] if bootstrap else []
        counts = [row["gt_share"], row["gt_pixels"], row["predicted_pixels"]]
        rows.append([name, row["IoU"], *interval, row["acc"], *counts])
    page.table(header, rows, digits=4)
    series = {key: [row[key] for row in per_class.values()] for key in ("IoU", "acc")}
    figure("per_class", bar_chart(list(per_class), series, title="IoU and accuracy per class"), "per-class bars")

    page.heading("Worst images")
    page.paragraph(
        "The images with the lowest mIoU over the classes present in their ground truth or prediction."
        + ("" if load_image else " Not drawn: no images were given.")
    )
    worst = metrics["worst_images"]
    page.table(
        ["image", "mIoU", "pixel_acc", "classes"],
        [[row["name"], row["mIoU"], row["pixel_acc"], ", ".join(row["classes"])] for row in worst],
        digits=4,
    )
    if load_image is not None:
        # not strict: a palette may be shorter than the classes (the classes beyond it are drawn uncoloured)
        colours = zip(class_names, palette, strict=False)
        page.legend([(name, colour if colour.any() else None) for name, colour in colours])
        for rank, row in enumerate(worst, 1):
            image, truth, prediction = load_image(row["index"])
            panels = _overlay_panels(image, truth, prediction, palette, ignore_index)
            title = f"{row['name']}: mIoU {row['mIoU']:.3f}"
            figure(f"worst_{rank}", image_panels_figure(panels, suptitle=title), title)
    write_json(out / "metrics.json", json_safe({"sources": dict(sources or {}), **metrics}), indent=1)
    return page.write(out / "report.html")


def _overlay_panels(image, truth, prediction, palette, ignore_index: int, alpha: float = 0.5) -> list:
    """Image | ground truth | prediction; labels coloured over the image (or alone without one); pixels of the
    ignore index and, over an image, of black classes are left uncoloured."""
    truth, prediction = np.asarray(truth), np.asarray(prediction)
    if truth.shape != prediction.shape:
        raise ValueError(f"ground truth {truth.shape} and prediction {prediction.shape} differ in size")
    base = np.full((*truth.shape, 3), 255, np.uint8) if image is None else np.asarray(image, np.uint8)
    if base.shape[:2] != truth.shape:
        raise ValueError(f"image {base.shape[:2]} and labels {truth.shape} differ in size")

    def coloured(labels: np.ndarray) -> np.ndarray:
        known = (labels != ignore_index) & (labels < len(palette))
        if image is not None:  # black (background) classes leave the image as it is
            known &= palette[np.minimum(labels, len(palette) - 1)].any(axis=-1)
        colours = palette[np.where(known, labels, 0)].astype(np.float32)
        weight = 1.0 if image is None else alpha
        mixed = (1 - weight) * base.astype(np.float32) + weight * colours
        return np.where(known[..., None], mixed, base).round().astype(np.uint8)

    panels = [] if image is None else [(base, "image")]
    return [*panels, (coloured(truth), "ground truth"), (coloured(prediction), "prediction")]


def _row_normalized(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum; nan rows for classes without ground-truth pixels."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / totals, np.nan)
