"""Where the AP is lost: TIDE's error breakdown and the COCO analyzer's stacked PR curves.

Both read the matches of :mod:`detection.analysis` (COCOeval's own, per image), so their baseline is
pycocotools' AP.

TIDE (Bolya et al., ECCV 2020; ``tidecv`` 1.0.1), at foreground IoU 0.5 and background IoU 0.1: COCOeval's
matches are the true positives; every other detection gets the first type that applies: Loc (its class, IoU
in [0.1, 0.5] with a ground truth), Cls (another class, IoU >= 0.5), Dupe (its class, IoU >= 0.5 with an already
matched ground truth), Bkg (IoU <= 0.1 with every ground truth), Both (the rest). A ground truth nobody matched
and no Cls/Loc error points at is Miss. The dAP of a type is the AP with only that type fixed minus the AP,
negatives clamped to 0: a Cls/Loc error becomes a true positive when its ground truth is unmatched and it is the
highest-scoring error pointing there (else it is dropped), the other types' detections are dropped, a Miss
removes its ground truth. FalsePos scores every false positive 0 and every true positive 1; FalseNeg removes the
unmatched ground truths. Where they differ from tidecv: the AP averages over the categories with ground truth
(pycocotools'; tidecv also averages categories that only have detections, as 0), ``maxDets`` (100) applies per
image and category (tidecv: per image), a detection on a crowd region is ignored as COCOeval ignores it (tidecv
still classifies it), and a crowd region takes a detection at IoU >= 0.5 (tidecv: > 0.5).

The COCO analyzer (the COCO detection-eval page's ``analyze``; MMDetection's ``coco_error_analysis.py``), area
"all": C75 and C50 are COCOeval's PR curves at IoU 0.75 and 0.5, Loc at IoU 0.1, Sim with confusions within the
supercategory ignored (a category without one is its own), Oth with every class confusion ignored (detections
on another class's object, intersection over detection >= 0.1), BG with every remaining false positive removed
(precision 1 wherever Oth has any), FN with every object found (AP 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .analysis import CategoryMatches, ImageMatches, accumulate, greedy_match, threshold_index

__all__ = ["ANALYZER_TYPES", "TIDE_ERRORS", "TIDE_SPECIAL_ERRORS", "coco_analyzer", "tide_errors"]

TIDE_ERRORS = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
TIDE_SPECIAL_ERRORS = ("FalsePos", "FalseNeg")
ANALYZER_TYPES = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")


def tide_errors(
    coco_eval,
    images: Sequence[ImageMatches],
    *,
    foreground_iou: float = 0.5,
    background_iou: float = 0.1,
) -> dict:
    """TIDE's error breakdown of the matches at ``foreground_iou`` (a threshold of the evaluation).

    Returns:
        ``{"AP": AP at foreground_iou, "dAP": {type: dAP}, "special": {FalsePos, FalseNeg: dAP},
        "counts": {type: number of errors}}``, in [0, 1] (tidecv prints 100 times these).
    """
    t = threshold_index(coco_eval, foreground_iou)
    categories = list(coco_eval.params.catIds)
    points = {"category": [], "score": [], "tp": [], "error": [], "fix_category": [], "fix_tp": []}
    num_gt = dict.fromkeys(categories, 0)
    missed, unmatched = dict.fromkeys(categories, 0), dict.fromkeys(categories, 0)
    counts = dict.fromkeys(TIDE_ERRORS, 0)
    for image in images:
        regular = ~image.gt_ignored
        used = np.zeros(len(regular), bool)
        used[image.det_gt[t][(image.det_gt[t] >= 0) & ~image.det_ignored[t]]] = True
        best = {}  # ground truth -> the point index of the highest-scoring Cls/Loc error pointing at it
        for d in np.flatnonzero(~image.det_ignored[t]):  # by score
            category, score = int(image.det_category[d]), float(image.det_score[d])
            if image.det_gt[t, d] >= 0:
                _add(points, category, score, True, None, category, True)
                continue
            kind, target = _classify(image, d, regular, used, foreground_iou, background_iou)
            counts[kind] += 1
            fix_category, fix_tp = category, False  # dropped, unless it is the best fix of a free ground truth
            if target is not None and not used[target]:
                best.setdefault(target, len(points["score"]))
                fix_category = int(image.gt_category[target])
            _add(points, category, score, False, kind, fix_category, fix_tp)
        for index in best.values():
            points["fix_tp"][index] = True  # the first in score order is the highest score
        for g in np.flatnonzero(regular):
            category = int(image.gt_category[g])
            num_gt[category] += 1
            if not used[g]:
                unmatched[category] += 1
                if g not in best:
                    missed[category] += 1
                    counts["Miss"] += 1
    arrays = {key: np.asarray(value) for key, value in points.items()}
    ap = _tide_map(categories, arrays, num_gt, coco_eval.params.recThrs)
    delta = {}
    for kind in TIDE_ERRORS:
        fixed = dict(arrays)
        gts = dict(num_gt)
        if kind == "Miss":
            gts = {c: num_gt[c] - missed[c] for c in categories}
        else:
            chosen = arrays["error"] == kind if len(arrays["error"]) else np.zeros(0, bool)
            keep = ~chosen | arrays["fix_tp"].astype(bool)
            fixed["category"] = np.where(chosen, arrays["fix_category"], arrays["category"])
            fixed["tp"] = np.where(chosen, True, arrays["tp"])
            fixed = {key: value[keep] for key, value in fixed.items()}
        delta[kind] = max(_tide_map(categories, fixed, gts, coco_eval.params.recThrs) - ap, 0.0)
    perfect = {**arrays, "score": np.where(arrays["tp"].astype(bool), 1.0, 0.0)}
    found_all = {c: num_gt[c] - unmatched[c] for c in categories}
    special = {
        "FalsePos": _tide_map(categories, perfect, num_gt, coco_eval.params.recThrs) - ap,
        "FalseNeg": _tide_map(categories, arrays, found_all, coco_eval.params.recThrs) - ap,
    }
    return {"AP": ap, "dAP": delta, "special": special, "counts": counts}


def _classify(image: ImageMatches, d: int, regular, used, foreground: float, background: float):
    """TIDE's type of unmatched detection ``d`` and the ground truth a Cls/Loc fix would match."""
    if not regular.any():
        return "Bkg", None
    overlaps = np.where(regular, image.iou[d], 0.0)
    same = image.gt_category == image.det_category[d]
    same_class = overlaps * same
    g = int(np.argmax(same_class))
    if background <= same_class[g] <= foreground:
        return "Loc", g
    other_class = overlaps * ~same
    g = int(np.argmax(other_class))
    if other_class[g] >= foreground:
        return "Cls", g
    if (same_class * used).max() >= foreground:
        return "Dupe", None
    if overlaps.max() <= background:
        return "Bkg", None
    return "Both", None


def _add(points: dict, category, score, tp, error, fix_category, fix_tp) -> None:
    for key, value in zip(points, (category, score, tp, error, fix_category, fix_tp), strict=True):
        points[key].append(value)


def _tide_map(categories, points: dict, num_gt: dict, recall_thresholds) -> float:
    """The mean of the 101-point AP over the categories that have ground truth or a detection left (0 without gt)."""
    aps = []
    for category in categories:
        chosen = points["category"] == category if len(points["category"]) else np.zeros(0, bool)
        if num_gt[category] == 0:
            if chosen.any():
                aps.append(0.0)
            continue
        tp = points["tp"][chosen].astype(bool)[None]
        matches = CategoryMatches.from_images(
            [points["score"][chosen].astype(float)], [tp], [np.zeros_like(tp)], [num_gt[category]]
        )
        aps.append(float(accumulate(matches, recall_thresholds)[0].mean()))
    return float(np.mean(aps)) if aps else 0.0


def coco_analyzer(coco_eval, images: Sequence[ImageMatches], supercategories: dict[int, str | None]) -> dict:
    """The analyzer's PR curves per category id, and their mean over the categories with ground truth.

    Args:
        coco_eval: A pycocotools COCOeval after ``evaluate()`` and ``accumulate()`` (thresholds 0.5 and 0.75 in it).
        images: Its :func:`detection.analysis.image_matches`.
        supercategories: Category id -> supercategory name (None: the category is its own).

    Returns:
        ``{"per_category": {category id: {type: (R,) precision} or None without ground truth},
        "overall": {type: (R,) precision}}`` for the types of :data:`ANALYZER_TYPES`.
    """
    params = coco_eval.params
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # (T, R, K), area all, most detections
    t75, t50 = threshold_index(coco_eval, 0.75), threshold_index(coco_eval, 0.5)
    group = {c: supercategories.get(c) or f"__own_{c}" for c in params.catIds}
    loose = _loose_matches(images, params.catIds, group)
    per_category = {}
    for k, category in enumerate(params.catIds):
        if precision[t50, 0, k] < 0:
            per_category[category] = None  # no ground truth
            continue
        curves = {"C75": precision[t75, :, k], "C50": precision[t50, :, k]}
        for kind in ("Loc", "Sim", "Oth"):
            curves[kind] = accumulate(loose[kind][category], params.recThrs)[0][0]
        curves["BG"] = (curves["Oth"] > 0).astype(np.float64)
        curves["FN"] = np.ones_like(curves["BG"])
        per_category[category] = curves
    scored = [curves for curves in per_category.values() if curves is not None]
    overall = {kind: np.mean([c[kind] for c in scored], axis=0) for kind in ANALYZER_TYPES} if scored else {}
    return {"per_category": per_category, "overall": overall}


def _loose_matches(images, category_ids, group: dict, iou: float = 0.1) -> dict[str, dict[int, CategoryMatches]]:
    """Matches of each category at IoU 0.1 ("Loc"); for "Sim"/"Oth" a false positive on an object of another class
    (of the same supercategory / of any) is ignored, as if that object were a crowd region of the category."""
    kinds = ("Loc", "Sim", "Oth")
    parts = {kind: {c: ([], [], [], []) for c in category_ids} for kind in kinds}  # scores, matched, ignored, image
    num_gt = {c: np.zeros(len(images), np.int64) for c in category_ids}
    for position, image in enumerate(images):
        gt_group = np.array([group[c] for c in image.gt_category], dtype=object)
        for category in np.intersect1d(np.union1d(image.det_category, image.gt_category), category_ids):
            category = int(category)
            dets = np.flatnonzero(image.det_category == category)
            gts = np.flatnonzero(image.gt_category == category)
            num_gt[category][position] = np.count_nonzero(~image.gt_ignored[gts])
            if not dets.size:
                continue
            # crowd regions are the ignored ground truths (COCOeval's ignore flag is iscrowd)
            det_gt, ignored = greedy_match(
                image.iou[np.ix_(dets, gts)], image.gt_ignored[gts], image.gt_ignored[gts], iou
            )
            others = image.gt_category != category
            on_other = image.iof[np.ix_(dets, np.flatnonzero(others))] >= iou
            on_similar = image.iof[np.ix_(dets, np.flatnonzero(others & (gt_group == group[category])))] >= iou
            free = det_gt < 0
            variants = {"Loc": ignored, "Sim": ignored | (free & on_similar.any(axis=1)),
                        "Oth": ignored | (free & on_other.any(axis=1))}  # fmt: skip
            for kind in kinds:
                scores, matched, ignore, positions = parts[kind][category]
                scores.append(image.det_score[dets])
                matched.append((det_gt >= 0)[None])
                ignore.append(variants[kind][None])
                positions.append(position)
    return {
        kind: {
            c: CategoryMatches.from_images(*parts[kind][c][:3], num_gt[c], image_positions=parts[kind][c][3])
            for c in category_ids
        }
        for kind in kinds
    }
