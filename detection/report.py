"""The detection report: ``report.html`` and ``metrics.json`` that explain a COCO mAP.

:func:`analyze_detections` computes every number from one pycocotools ``COCOeval`` per IoU type (so the summary
is pycocotools' own): the 12-number summary, per-category AP, PR curves at IoU 0.5, 0.75 and 0.5:0.95 (COCOeval's
precision array, so a curve's area is its AP) with the precision and recall at a chosen score, a one-to-one
confusion matrix, TIDE's error breakdown, the COCO analyzer's curves and the images that lose most.
:func:`write_detection_report` writes them with the figures and the page (``detection.report_page``). Used by
``tools/eval_det.py --report`` and by ``DetectionTask(report_dir=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from backbones.data.files import json_safe, write_json
from backbones.report import HTMLReport

from .analysis import (
    cached_image_matches,
    category_matches,
    confusion_matrix,
    image_errors,
    image_matches,
    threshold_index,
)
from .error_analysis import coco_analyzer, tide_errors
from .evaluation import STAT_NAMES, category_names, check_iou_types, load_ground_truth, run_cocoeval
from .report_page import CURVES, confusion_matrix_figure, pr_overall_figure, write_section

__all__ = [
    "analyze_detections",
    "check_report_options",
    "evaluation_figures",
    "metrics_figures",
    "write_detection_report",
]

AREAS = {"AP": 0, "APs": 1, "APm": 2, "APl": 3}  # COCOeval's area ranges: all, small, medium, large


def analyze_detections(
    coco_eval: Any, *, score_threshold: float = 0.5, confusion_iou: float = 0.5, num_worst: int = 8
) -> dict:
    """Every number of the report for one evaluated pycocotools COCOeval (after evaluate and accumulate)."""
    params, stats = coco_eval.params, coco_eval.stats
    names = category_names(coco_eval.cocoGt.loadCats(params.catIds))
    precision = coco_eval.eval["precision"][:, :, :, :, -1]  # (T, R, K, A), the most detections
    has_gt = precision[0, 0, :, 0] > -1
    per_category = {}
    for k, name in enumerate(names):
        row = {key: _mean_valid(precision[:, :, k, area]) for key, area in AREAS.items()}
        row["AP50"] = _mean_valid(precision[threshold_index(coco_eval, 0.5), :, k, 0])
        row["AP75"] = _mean_valid(precision[threshold_index(coco_eval, 0.75), :, k, 0])
        per_category[name] = {key: row[key] for key in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    order = sorted(per_category, key=lambda n: -np.nan_to_num(per_category[n]["AP"], nan=-1.0))
    matches = category_matches(coco_eval)
    images = cached_image_matches(coco_eval)
    t50 = threshold_index(coco_eval, 0.5)
    supercategories = {c["id"]: c.get("supercategory") for c in coco_eval.cocoGt.loadCats(params.catIds)}
    analyzer = coco_analyzer(coco_eval, images, supercategories)
    file_names = {i["id"]: i.get("file_name") for i in coco_eval.cocoGt.loadImgs(params.imgIds)}
    worst = [{**row, "file_name": file_names[row["image_id"]]} for row in image_errors(images, t50) if row["error"]]
    return {
        "summary": {name: (float(s) if s >= 0 else None) for name, s in zip(STAT_NAMES, stats[:12], strict=True)},
        "num_images": len(params.imgIds),
        "num_detections": int(sum(len(m.scores) for m in matches.values())),
        "per_category": {name: per_category[name] for name in order},
        "pr_curves": _pr_curves(coco_eval, names, has_gt, matches, score_threshold),
        "confusion": _confusion(coco_eval, names, images, confusion_iou, score_threshold),
        "tide": tide_errors(coco_eval, images),
        "analyzer": {
            "overall": {kind: _area(curve) for kind, curve in analyzer["overall"].items()},
            "per_category": {
                name: None
                if (curves := analyzer["per_category"][c]) is None
                else {kind: _area(curve) for kind, curve in curves.items()}
                for name, c in zip(names, params.catIds, strict=True)
            },
        },
        "worst_images": worst[:num_worst],
    }


def evaluation_figures(
    coco_gt: Any,
    results: list[dict],
    iou_type: str,
    *,
    image_ids: Sequence[int] | None = None,
    score_threshold: float = 0.5,
    confusion_iou: float = 0.5,
) -> dict[str, Any]:
    """The PR curves of all categories and the row-normalised confusion matrix as figures, for a logger.

    Returns:
        ``{"pr_curve": Figure, "confusion_matrix": Figure}`` (matplotlib figures without pyplot).
    """
    coco_gt = load_ground_truth(coco_gt, "pycocotools")
    coco_eval, _ = run_cocoeval(coco_gt, results, iou_type, "pycocotools", image_ids)
    names = category_names(coco_gt.loadCats(coco_eval.params.catIds))
    has_gt = coco_eval.eval["precision"][0, 0, :, 0, -1] > -1
    curves = _pr_curves(coco_eval, names, has_gt, category_matches(coco_eval), score_threshold)
    confusion = _confusion(coco_eval, names, image_matches(coco_eval), confusion_iou, score_threshold)
    return metrics_figures(iou_type, {"pr_curves": curves, "confusion": confusion})


def metrics_figures(iou_type: str, metrics: dict) -> dict[str, Any]:
    """The figures of :func:`evaluation_figures` from one IoU type's numbers (:func:`analyze_detections`' or a
    report's ``metrics[iou_type]``), without evaluating again."""
    return {
        "pr_curve": pr_overall_figure(iou_type, metrics["pr_curves"]),
        "confusion_matrix": confusion_matrix_figure(iou_type, metrics["confusion"], normalized=True),
    }


def _confusion(coco_eval, names: list[str], images, iou: float, score: float) -> dict:
    counts, ignored = confusion_matrix(images, coco_eval.params.catIds, threshold_index(coco_eval, iou), iou, score)
    return {
        "iou": iou,
        "score": score,
        "rows": [*names, "background"],
        "columns": [*names, "missed"],
        "counts": counts.tolist(),
        "row_normalized": _row_normalized(counts),
        "ignored_detections": ignored,
    }


def _pr_curves(coco_eval, names, has_gt, matches, score: float) -> dict:
    params = coco_eval.params
    curves = {"recall": [float(r) for r in params.recThrs], "score": score}
    for label, ious in CURVES.items():
        t = [threshold_index(coco_eval, iou) for iou in ious]
        precision = coco_eval.eval["precision"][t, :, :, 0, -1]  # (T', R, K)
        per_category = {}
        for k, (name, category) in enumerate(zip(names, params.catIds, strict=True)):
            if not has_gt[k]:
                per_category[name] = None
                continue
            curve = precision[:, :, k].mean(axis=0)
            entry = {
                "AP": float(curve.mean()),
                "precision": curve.tolist(),
                "at_score": _at_score(matches[category], t, score),
            }
            if len(t) == 1:
                entry["scores"] = coco_eval.eval["scores"][t[0], :, k, 0, -1].tolist()  # the score at each recall
            per_category[name] = entry
        scored = [entry for entry in per_category.values() if entry is not None]
        overall = np.mean([entry["precision"] for entry in scored], axis=0) if scored else np.zeros(len(params.recThrs))
        at_score = {key: _mean_defined([e["at_score"][key] for e in scored]) for key in ("precision", "recall")}
        curves[label] = {
            "overall": {"AP": float(overall.mean()), "precision": overall.tolist(), "at_score": at_score},
            "per_category": per_category,
        }
    return curves


def _at_score(matches, thresholds: list[int], score: float) -> dict:
    """Precision and recall of the detections scoring at least ``score``, averaged over ``thresholds``."""
    keep = matches.scores >= score
    counted = ~matches.ignored[thresholds][:, keep]
    true_positives = (matches.matched[thresholds][:, keep] & counted).sum(axis=1)
    detections = counted.sum(axis=1)
    num_gt = int(matches.num_gt.sum())
    precision = float(np.mean(true_positives / detections)) if detections.all() else None
    return {"precision": precision, "recall": float(np.mean(true_positives / num_gt)), "detections": int(detections[0])}


def write_detection_report(
    coco_gt: Any,
    results: list[dict],
    out_dir: str | os.PathLike,
    *,
    iou_types: Sequence[str] = ("bbox",),
    images_dir: str | os.PathLike | None = None,
    score_threshold: float = 0.5,
    confusion_iou: float = 0.5,
    num_worst: int = 8,
    image_ids: Sequence[int] | None = None,
    sources: dict | None = None,
) -> dict:
    """Analyze ``results`` and write ``out_dir/report.html``, its PNG figures and ``out_dir/metrics.json``.

    Args:
        coco_gt: Ground truth: an instances JSON path or a COCO object.
        results: COCO results (validated), with ``segmentation`` for ``"segm"``.
        out_dir: The report folder (created).
        iou_types: ``"bbox"`` and/or ``"segm"``.
        images_dir: The images' folder, to draw the worst images; None: they are listed, not drawn.
        score_threshold: The score of the confusion matrix and of the operating points on the PR curves.
        confusion_iou: The IoU of the confusion matrix (a threshold of COCOeval: 0.5, 0.55, ..., 0.95).
        num_worst: How many of the images that lose most to show.
        image_ids: Score these images only (None: all).
        sources: Where the inputs came from, written into the report (e.g. the file names).

    Returns:
        The metrics written to ``metrics.json``.
    """
    iou_types = check_iou_types(iou_types)
    check_report_options(images_dir=images_dir, confusion_iou=confusion_iou, score_threshold=score_threshold)
    if not results:
        raise ValueError("no detections to report on: the results are empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    coco_gt = load_ground_truth(coco_gt, "pycocotools")
    settings = {"score_threshold": score_threshold, "confusion_iou": confusion_iou, "images_dir": _str(images_dir)}
    metrics: dict[str, Any] = {"sources": dict(sources or {}), "settings": settings}
    page = HTMLReport("Detection report")
    page.paragraph(", ".join(f"{key}: {value}" for key, value in {**metrics["sources"], **settings}.items()), note=True)
    for iou_type in iou_types:
        coco_eval, _ = run_cocoeval(coco_gt, results, iou_type, "pycocotools", image_ids)
        metrics[iou_type] = analyze_detections(
            coco_eval, score_threshold=score_threshold, confusion_iou=confusion_iou, num_worst=num_worst
        )
        write_section(page, out, iou_type, metrics[iou_type], coco_eval, images_dir)
    write_json(out / "metrics.json", json_safe(metrics), indent=1)
    page.write(out / "report.html")
    return metrics


def check_report_options(*, images_dir=None, confusion_iou: float = 0.5, score_threshold: float = 0.5) -> None:
    """Fail before a long evaluation: a missing images folder, an IoU COCOeval does not match at, a bad score."""
    if images_dir is not None and not os.path.isdir(images_dir):
        raise FileNotFoundError(f"{images_dir}: the images folder does not exist")
    thresholds = np.linspace(0.5, 0.95, 10)
    if not np.isclose(thresholds, confusion_iou).any():
        raise ValueError(
            f"confusion IoU {confusion_iou}: choose one of COCOeval's thresholds {thresholds.round(2).tolist()}"
        )
    if not 0 <= score_threshold <= 1:
        raise ValueError(f"score threshold {score_threshold}: choose a value in [0, 1]")


def _area(curve: np.ndarray) -> dict:
    return {"AP": float(np.mean(curve)), "precision": np.asarray(curve, dtype=float).tolist()}


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else float("nan")


def _mean_defined(values: list) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _row_normalized(counts: np.ndarray) -> list:
    totals = counts.sum(axis=1, keepdims=True)
    return [
        [None if total == 0 else float(v / total) for v in row] for row, total in zip(counts, totals[:, 0], strict=True)
    ]


def _str(value) -> str | None:
    return None if value is None else str(value)
