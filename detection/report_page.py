"""The HTML page of the detection report (``detection.report``): one section per IoU type, read from the metrics.

Every number on the page comes from the metrics dict that is also written to ``metrics.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backbones.data.images import read_rgb_image
from backbones.report import (
    HTMLReport,
    bar_chart,
    confusion_figure,
    pr_curve_figure,
    pr_curve_grid,
    save_figure,
    side_by_side_figure,
    stacked_pr_figure,
)

from .analysis import cached_image_matches, threshold_index
from .error_analysis import ANALYZER_TYPES, TIDE_ERRORS, TIDE_SPECIAL_ERRORS
from .evaluation import category_names

__all__ = ["CURVES", "confusion_matrix_figure", "pr_overall_figure", "write_section"]

CURVES = {"IoU=0.50": (0.5,), "IoU=0.75": (0.75,), "IoU=0.50:0.95": tuple(np.linspace(0.5, 0.95, 10))}
CONFUSION_DEFINITION = (
    "Per image, each detection scoring at least {score} and each ground truth is counted once. First COCOeval's "
    "own matches at IoU {iou} (greedy by score within a category) fill the diagonal; then each remaining "
    "detection, highest score first, takes the unmatched ground truth of any class it overlaps most with IoU >= "
    "{iou} (a class confusion); a detection left over is a false positive on the background (last row), a ground "
    "truth left over is missed (last column). Crowd regions are no objects: detections COCOeval ignores on them "
    "({ignored} here) are left out. Rows sum to the ground truths per class, columns to the detections per class."
)


def pr_overall_figure(iou_type: str, curves: dict):
    """All categories' PR curves at each IoU of :data:`CURVES`, with the operating points (metrics' ``pr_curves``)."""
    overall = {f"{label} (AP {curves[label]['overall']['AP']:.3f})": curves[label]["overall"] for label in CURVES}
    return pr_curve_figure(
        curves["recall"],
        {key: entry["precision"] for key, entry in overall.items()},
        title=f"{iou_type}, all categories",
        points={key: _point(entry) for key, entry in overall.items()},
        point_label=f"score >= {curves['score']}",
    )


def confusion_matrix_figure(iou_type: str, confusion: dict, *, normalized: bool):
    """The confusion matrix of the metrics' ``confusion``, raw or row-normalised."""
    matrix = np.asarray(confusion["counts"])
    if normalized:
        matrix = np.nan_to_num(np.asarray(confusion["row_normalized"], dtype=float))
    title = f"{iou_type} confusions (IoU {confusion['iou']}, score >= {confusion['score']})"
    title += "\nrow-normalised" if normalized else "\ncounts"  # two lines: one is wider than a small figure
    return confusion_figure(matrix, confusion["rows"], confusion["columns"], title=title, normalized=normalized)


def write_section(page: HTMLReport, out: Path, iou_type: str, metrics: dict, coco_eval, images_dir) -> None:
    def figure(name: str, fig, alt: str) -> None:
        save_figure(fig, out / f"{iou_type}_{name}.png")
        page.image(f"{iou_type}_{name}.png", alt)

    summary, per_category, curves = metrics["summary"], metrics["per_category"], metrics["pr_curves"]
    page.heading(f"{iou_type}: summary")
    page.paragraph(f"{metrics['num_images']} images, {metrics['num_detections']} detections scored (pycocotools).")
    page.table(["metric", *summary], [["value", *summary.values()]])
    page.heading(f"{iou_type}: AP per category")
    columns = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    page.table(["category", *columns], [[name, *(row[c] for c in columns)] for name, row in per_category.items()])
    series = {c: [row[c] for row in per_category.values()] for c in ("AP", "AP50", "AP75")}
    figure("per_category", bar_chart(list(per_category), series, title=f"{iou_type} AP per category"), "AP bars")

    page.heading(f"{iou_type}: precision-recall curves")
    score = curves["score"]
    page.paragraph(
        f"COCOeval's interpolated precision at its 101 recall points (area 'all', 100 detections): the mean of a curve "
        f"is its AP. The 0.50:0.95 curve is the mean over the 10 IoU thresholds; 'all categories' is the mean over "
        f"the categories with ground truth. Dots: precision and recall of the detections scoring >= {score}."
    )
    labels = list(CURVES)
    figure("pr_overall", pr_overall_figure(iou_type, curves), "PR curves of all categories")
    rows = [
        [
            label,
            curves[label]["overall"]["AP"],
            curves[label]["overall"]["at_score"]["precision"],
            curves[label]["overall"]["at_score"]["recall"],
        ]
        for label in labels
    ]
    page.table(["curve", "AP (area)", f"precision at score >= {score}", f"recall at score >= {score}"], rows)
    panels, points = {}, {}
    for name in per_category:
        entries = {label: curves[label]["per_category"][name] for label in labels}
        if all(entry is not None for entry in entries.values()):
            panels[name] = {label: entry["precision"] for label, entry in entries.items()}
            points[name] = {label: _point(entry) for label, entry in entries.items()}
    if panels:
        figure(
            "pr_per_category",
            pr_curve_grid(curves["recall"], panels, title=f"{iou_type} PR per category", points=points),
            "PR curves per category",
        )

    confusion = metrics["confusion"]
    page.heading(f"{iou_type}: confusion matrix")
    page.paragraph(
        CONFUSION_DEFINITION.format(
            score=confusion["score"], iou=confusion["iou"], ignored=confusion["ignored_detections"]
        )
    )
    counts = np.asarray(confusion["counts"])
    page.table(
        ["ground truth \\ prediction", *confusion["columns"]],
        [[row, *values] for row, values in zip(confusion["rows"], counts.tolist(), strict=True)],
    )
    for name, normalized in (("confusion", False), ("confusion_normalized", True)):
        figure(name, confusion_matrix_figure(iou_type, confusion, normalized=normalized), f"{name} matrix")

    tide = metrics["tide"]
    page.heading(f"{iou_type}: TIDE error breakdown (IoU 0.5)")
    page.paragraph(
        "dAP: the AP50 gained by fixing one error type alone (Bolya et al., ECCV 2020; tidecv's definitions, on "
        "COCOeval's matches: see detection.error_analysis). Counts: the detections (or for Miss the objects) of "
        f"each type. AP50 here: {tide['AP']:.4f}."
    )
    page.table(
        ["", *TIDE_ERRORS, *TIDE_SPECIAL_ERRORS],
        [["dAP", *tide["dAP"].values(), *tide["special"].values()], ["count", *tide["counts"].values(), "", ""]],
    )
    figure(
        "tide",
        bar_chart(
            [*TIDE_ERRORS, *TIDE_SPECIAL_ERRORS],
            {"dAP": [*tide["dAP"].values(), *tide["special"].values()]},
            title=f"{iou_type} TIDE dAP",
            limit=max(0.05, *tide["dAP"].values(), *tide["special"].values()),
        ),
        "TIDE",
    )

    analyzer = metrics["analyzer"]
    page.heading(f"{iou_type}: COCO analyzer")
    page.paragraph(
        "Stacked PR curves (area 'all'): C75, C50 (IoU 0.75, 0.5), Loc (IoU 0.1), Sim (supercategory confusions "
        "ignored), Oth (all class confusions ignored), BG (all background false positives removed), FN (every "
        "object found). The number beside each is its area."
    )
    page.table(
        ["category", *ANALYZER_TYPES],
        [["all categories", *(analyzer["overall"][k]["AP"] for k in ANALYZER_TYPES)]]
        + [[name, *(v[k]["AP"] for k in ANALYZER_TYPES)] for name, v in analyzer["per_category"].items() if v],
    )
    if analyzer["overall"]:
        stack = {k: analyzer["overall"][k]["precision"] for k in ANALYZER_TYPES}
        figure(
            "analyzer",
            stacked_pr_figure(curves["recall"], stack, title=f"{iou_type} analyzer, all categories"),
            "analyzer",
        )
    _worst_images(page, out, iou_type, metrics, coco_eval, images_dir)


def _worst_images(page: HTMLReport, out: Path, iou_type: str, metrics: dict, coco_eval, images_dir) -> None:
    page.heading(f"{iou_type}: images that lose most")
    page.paragraph(
        "Per image at IoU 0.5 (COCOeval's matches): the sum of the false positives' scores plus the number of "
        "missed objects. Left: ground truth (grey: crowd); right: detections scoring >= "
        f"{metrics['confusion']['score']} (green: true positive, red: false positive, grey: ignored)."
    )
    worst = metrics["worst_images"]
    page.table(
        ["image id", "file", "error", "false positives (any score)", "missed (by every detection)"],
        [[w["image_id"], w["file_name"], w["error"], w["false_positives"], w["missed"]] for w in worst],
    )
    if images_dir is None:
        page.paragraph("Not drawn: no images folder was given (--images DIR, or the data module's images).", note=True)
        return
    names = dict(
        zip(coco_eval.params.catIds, category_names(coco_eval.cocoGt.loadCats(coco_eval.params.catIds)), strict=True)
    )
    by_id = {image.image_id: image for image in cached_image_matches(coco_eval)}
    t50 = threshold_index(coco_eval, 0.5)
    for rank, row in enumerate(worst, 1):
        info = coco_eval.cocoGt.imgs[row["image_id"]]
        pixels = read_rgb_image(Path(images_dir) / info["file_name"], info.get("height"), info.get("width"))
        gts = [
            (g["bbox"], names.get(g["category_id"], "?"), "grey" if g.get("iscrowd") else "tab:blue")
            for g in coco_eval.cocoGt.imgToAnns[row["image_id"]]
            if g["category_id"] in names
        ]
        image, dets = by_id[row["image_id"]], []
        for d in np.flatnonzero(image.det_score >= metrics["confusion"]["score"]):
            colour = "grey" if image.det_ignored[t50, d] else "tab:green" if image.det_gt[t50, d] >= 0 else "tab:red"
            box = coco_eval.cocoDt.anns[int(image.det_ids[d])]["bbox"]
            dets.append((box, f"{names[int(image.det_category[d])]} {image.det_score[d]:.2f}", colour))
        fig = side_by_side_figure(
            pixels,
            gts,
            dets,
            titles=("ground truth", "detections"),
            suptitle=f"{info['file_name']}: error {row['error']:.2f}",
        )
        save_figure(fig, out / f"{iou_type}_worst_{rank}.png")
        page.image(f"{iou_type}_worst_{rank}.png", f"image {row['image_id']}")


def _point(entry: dict) -> tuple:
    return entry["at_score"]["recall"], entry["at_score"]["precision"]
