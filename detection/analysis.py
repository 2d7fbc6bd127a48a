"""The matches behind COCO mAP, for the analyses the 12 numbers do not give: PR curves, confusions, worst images.

Everything starts from one pycocotools ``COCOeval`` that has run ``evaluate()`` (and ``accumulate()``):

- :func:`category_matches` turns its per-image matches (area "all", the top ``maxDets`` per image and category)
  into one score-sorted array set per category, exactly as ``accumulate()`` sorts them, and :func:`accumulate`
  turns such a set into COCOeval's precision, score and recall arrays (optionally with a weight per image,
  which is how a bootstrap resampling reweights the images without matching again).
- :func:`image_matches` gathers the same matches per image across categories, with class-agnostic IoU
  matrices, for the analyses that need a detection's overlap with objects of other classes
  (:func:`confusion_matrix`, :func:`image_errors`, and ``detection.error_analysis``).
- :func:`greedy_match` is COCOeval's matching rule (``evaluateImg``) for one image, category and threshold.

Example:
    >>> coco_eval = ...  # a pycocotools COCOeval after evaluate() and accumulate()  # doctest: +SKIP
    >>> matches = category_matches(coco_eval)  # doctest: +SKIP
    >>> precision, scores, recall = accumulate(matches[category_id], coco_eval.params.recThrs)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_util

__all__ = [
    "CategoryMatches",
    "ImageMatches",
    "accumulate",
    "cached_image_matches",
    "category_matches",
    "confusion_matrix",
    "greedy_match",
    "image_errors",
    "image_matches",
    "threshold_index",
]


@dataclass
class CategoryMatches:
    """The detections of one category over all images, sorted by score as COCOeval's ``accumulate()`` sorts them.

    Attributes:
        scores: (N,) detection scores, highest first (a stable sort of the detections in image order).
        image_index: (N,) the position of each detection's image in the image list.
        matched: (T, N) whether the detection matched a ground truth at each IoU threshold.
        ignored: (T, N) whether it is ignored there (matched to a crowd region): neither true nor false positive.
        num_gt: (I,) the number of non-ignored ground truths of the category in each image.
    """

    scores: np.ndarray
    image_index: np.ndarray
    matched: np.ndarray
    ignored: np.ndarray
    num_gt: np.ndarray

    @classmethod
    def from_images(
        cls,
        scores: Sequence[np.ndarray],
        matched: Sequence[np.ndarray],
        ignored: Sequence[np.ndarray],
        num_gt: Sequence[int],
        image_positions: Sequence[int] | None = None,
    ) -> CategoryMatches:
        """Concatenate per-image arrays (in image order; each image's detections by score) and sort by score.

        ``image_positions`` gives the image of each part when only some images have parts (``num_gt`` is then
        per image of the whole list); None: part i is image i.
        """
        positions = np.arange(len(scores)) if image_positions is None else np.asarray(image_positions, np.int64)
        thresholds = matched[0].shape[0] if matched else 1
        all_scores = np.concatenate(scores) if scores else np.zeros(0)
        order = np.argsort(-all_scores, kind="mergesort")  # stable, as COCOeval.accumulate
        image_index = np.repeat(positions, [len(s) for s in scores])[order]
        stack = (lambda parts: np.concatenate(parts, axis=1)[:, order]) if scores else (lambda _: np.zeros((1, 0)))
        return cls(
            scores=all_scores[order],
            image_index=image_index,
            matched=stack(matched).astype(bool).reshape(thresholds, -1),
            ignored=stack(ignored).astype(bool).reshape(thresholds, -1),
            num_gt=np.asarray(num_gt, dtype=np.int64),
        )


def category_matches(coco_eval) -> dict[int, CategoryMatches]:
    """COCOeval's matches per category id (area "all", the largest ``maxDets``), for :func:`accumulate`.

    The images are ``coco_eval.params.imgIds`` in order; an image without ground truth or detection of a
    category contributes nothing to it.
    """
    params, evaluated = coco_eval.params, _evaluated_images(coco_eval)
    max_det, thresholds = params.maxDets[-1], len(params.iouThrs)
    result = {}
    for category_id in params.catIds:
        scores, matched, ignored, num_gt = [], [], [], []
        for image_id in params.imgIds:
            entry = evaluated[category_id, image_id]
            if entry is None:
                scores.append(np.zeros(0))
                matched.append(np.zeros((thresholds, 0)))
                ignored.append(np.zeros((thresholds, 0)))
                num_gt.append(0)
                continue
            scores.append(np.asarray(entry["dtScores"][:max_det], dtype=np.float64))
            matched.append(np.asarray(entry["dtMatches"])[:, :max_det] > 0)
            ignored.append(np.asarray(entry["dtIgnore"])[:, :max_det] > 0)
            num_gt.append(int(np.count_nonzero(np.asarray(entry["gtIgnore"]) == 0)))
        result[category_id] = CategoryMatches.from_images(scores, matched, ignored, num_gt)
    return result


def accumulate(
    matches: CategoryMatches, recall_thresholds: Sequence[float], image_weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COCOeval's ``accumulate()`` for one category, area and ``maxDets``.

    Args:
        matches: The category's score-sorted matches.
        recall_thresholds: COCOeval's ``params.recThrs`` (101 points).
        image_weights: (I,) how many times each image counts (a bootstrap draw); None: once each.

    Returns:
        ``precision`` (T, R) with the interpolated precision at each recall threshold, ``scores`` (T, R) with
        the score there, ``recall`` (T,); -1 everywhere without ground truth, as in ``coco_eval.eval``.
    """
    recall_thresholds = np.asarray(recall_thresholds)
    thresholds = matches.matched.shape[0]
    precision = -np.ones((thresholds, len(recall_thresholds)))
    scores, recall = precision.copy(), -np.ones(thresholds)
    weights = np.ones(len(matches.num_gt)) if image_weights is None else np.asarray(image_weights, np.float64)
    num_gt = float(np.dot(matches.num_gt, weights))
    if num_gt == 0:
        return precision, scores, recall
    weight = weights[matches.image_index]
    true_positives = np.cumsum((matches.matched & ~matches.ignored) * weight, axis=1)
    false_positives = np.cumsum((~matches.matched & ~matches.ignored) * weight, axis=1)
    for t in range(thresholds):
        rc = true_positives[t] / num_gt
        pr = true_positives[t] / (false_positives[t] + true_positives[t] + np.spacing(1))
        recall[t] = rc[-1] if len(rc) else 0
        pr = np.maximum.accumulate(pr[::-1])[::-1]  # the precision envelope, as COCOeval's backward loop
        indices = np.searchsorted(rc, recall_thresholds, side="left")
        valid = indices < len(pr)
        precision[t] = np.where(valid, pr[np.minimum(indices, len(pr) - 1)] if len(pr) else 0, 0)
        scores[t] = np.where(valid, matches.scores[np.minimum(indices, len(pr) - 1)] if len(pr) else 0, 0)
    return precision, scores, recall


@dataclass
class ImageMatches:
    """One image's detections and ground truths over every category, with COCOeval's matches.

    Attributes:
        image_id: The COCO image id.
        det_ids, det_category, det_score: (D,) the detections COCOeval scored, highest score first.
        det_gt: (T, D) the index in the ground truths of the match at each IoU threshold, -1 for none.
        det_ignored: (T, D) matched to a crowd region (ignored).
        gt_ids, gt_category: (G,) every ground truth of the image.
        gt_ignored: (G,) COCOeval's ignore flag (crowd regions).
        iou: (D, G) class-agnostic IoU, crowd regions as COCOeval measures them (intersection over the detection).
        iof: (D, G) intersection over the detection's area, for every ground truth.
    """

    image_id: int
    det_ids: np.ndarray
    det_category: np.ndarray
    det_score: np.ndarray
    det_gt: np.ndarray
    det_ignored: np.ndarray
    gt_ids: np.ndarray
    gt_category: np.ndarray
    gt_ignored: np.ndarray
    iou: np.ndarray
    iof: np.ndarray


def image_matches(coco_eval) -> list[ImageMatches]:
    """COCOeval's matches (area "all") per image of ``params.imgIds``, with class-agnostic overlaps."""
    params, evaluated = coco_eval.params, _evaluated_images(coco_eval)
    field = "bbox" if params.iouType == "bbox" else "segmentation"
    max_det, thresholds = params.maxDets[-1], len(params.iouThrs)
    images = []
    for image_id in params.imgIds:
        gts = [g for c in params.catIds for g in coco_eval._gts[image_id, c]]
        gt_index = {g["id"]: i for i, g in enumerate(gts)}
        det_ids, det_gt, det_ignored = [], [], []
        for category_id in params.catIds:
            entry = evaluated[category_id, image_id]
            if entry is None or not entry["dtIds"]:
                continue
            det_ids += entry["dtIds"][:max_det]
            matches = np.asarray(entry["dtMatches"])[:, :max_det].astype(np.int64)
            det_gt.append(
                np.array([[gt_index.get(g, -1) for g in row] for row in matches], np.int64).reshape(matches.shape)
            )
            det_ignored.append(np.asarray(entry["dtIgnore"])[:, :max_det] > 0)
        dets = [coco_eval.cocoDt.anns[d] for d in det_ids]
        order = np.argsort([-d["score"] for d in dets], kind="mergesort")
        dets = [dets[i] for i in order]
        det_gt = np.concatenate(det_gt, axis=1)[:, order] if det_gt else np.zeros((thresholds, 0), np.int64)
        det_ignored = np.concatenate(det_ignored, axis=1)[:, order] if det_ignored else np.zeros((thresholds, 0), bool)
        crowd = [int(g.get("iscrowd", 0)) for g in gts]
        images.append(
            ImageMatches(
                image_id=image_id,
                det_ids=np.array([d["id"] for d in dets], np.int64),
                det_category=np.array([d["category_id"] for d in dets], np.int64),
                det_score=np.array([d["score"] for d in dets], np.float64),
                det_gt=det_gt,
                det_ignored=det_ignored,
                gt_ids=np.array([g["id"] for g in gts], np.int64),
                gt_category=np.array([g["category_id"] for g in gts], np.int64),
                gt_ignored=np.array([bool(g.get("ignore", 0) or g.get("iscrowd", 0)) for g in gts], bool),
                iou=_overlaps([d[field] for d in dets], [g[field] for g in gts], crowd),
                iof=_overlaps([d[field] for d in dets], [g[field] for g in gts], [1] * len(gts)),
            )
        )
    return images


def cached_image_matches(coco_eval) -> list[ImageMatches]:
    """:func:`image_matches` of ``coco_eval``, computed once per COCOeval object (kept on it)."""
    if getattr(coco_eval, "_resbone_image_matches", None) is None:
        coco_eval._resbone_image_matches = image_matches(coco_eval)
    return coco_eval._resbone_image_matches


def greedy_match(
    ious: np.ndarray, gt_ignored: np.ndarray, gt_crowd: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval's matching of one image and category (``evaluateImg``) at one IoU threshold.

    Args:
        ious: (D, G) with the detections by score, highest first.
        gt_ignored, gt_crowd: (G,) flags of the ground truths.
        threshold: The IoU a match needs (at least).

    Returns:
        ``det_gt`` (D,), the matched ground truth's index or -1, and ``det_ignored`` (D,), matched to an ignored one.
    """
    num_dets, num_gts = ious.shape
    det_gt, det_ignored = -np.ones(num_dets, np.int64), np.zeros(num_dets, bool)
    if not num_gts:
        return det_gt, det_ignored
    order = np.argsort(gt_ignored, kind="mergesort")  # ignored ground truths last, as COCOeval sorts them
    ious, ignored, crowd = ious[:, order], np.asarray(gt_ignored, bool)[order], np.asarray(gt_crowd, bool)[order]
    taken = np.zeros(num_gts, bool)
    for d in range(num_dets):
        # COCOeval keeps the best IoU >= the threshold (a tie goes to the later one) among the free regular
        # ground truths, and looks at the ignored ones (a crowd region can take many) only without such a match.
        candidates = (ious[d] >= min(threshold, 1 - 1e-10)) & (~taken | crowd)
        if (candidates & ~ignored).any():
            candidates &= ~ignored
        elif not candidates.any():
            continue
        overlaps = np.where(candidates, ious[d], -np.inf)
        match = num_gts - 1 - int(np.argmax(overlaps[::-1]))
        det_gt[d], det_ignored[d], taken[match] = order[match], ignored[match], True
    return det_gt, det_ignored


def threshold_index(coco_eval, iou: float) -> int:
    """The index of ``iou`` in ``coco_eval.params.iouThrs``; a ValueError names the thresholds there are."""
    thresholds = np.asarray(coco_eval.params.iouThrs)
    found = np.flatnonzero(np.isclose(thresholds, iou))
    if not found.size:
        raise ValueError(f"IoU {iou}: not a threshold of the evaluation; choose one of {np.round(thresholds, 2)}")
    return int(found[0])


def confusion_matrix(
    images: Iterable[ImageMatches], category_ids: Sequence[int], threshold: int, iou: float, score: float
) -> tuple[np.ndarray, int]:
    """A one-to-one confusion matrix of the detections scoring at least ``score``.

    Per image, each detection and each non-ignored ground truth is counted once: first COCOeval's own matches
    at IoU ``iou`` (index ``threshold``; greedy by score within a category) are the diagonal; then each
    remaining detection, highest score first, takes the unmatched ground truth of any class it overlaps most
    with IoU >= ``iou`` (a class confusion); a detection left over is a false positive on the background, a
    ground truth left over is missed. Detections COCOeval ignores (on a crowd region) are left out and counted.

    Returns:
        ``counts`` (K + 1, K + 1): rows are the ground-truth categories then "background" (no object), columns
        the predicted categories then "missed" (no detection); and the number of ignored detections.
    """
    index = {c: i for i, c in enumerate(category_ids)}
    size = len(category_ids)
    counts, ignored = np.zeros((size + 1, size + 1), np.int64), 0
    for image in images:
        keep = image.det_score >= score
        ignored += int(np.count_nonzero(keep & image.det_ignored[threshold]))
        taken = np.zeros(len(image.gt_ids), bool)
        taken[image.gt_ignored] = True  # crowd regions are no objects to count
        unmatched = []
        for d in np.flatnonzero(keep & ~image.det_ignored[threshold]):
            g = image.det_gt[threshold, d]
            if g >= 0:
                taken[g] = True
                counts[index[image.gt_category[g]], index[image.det_category[d]]] += 1
            else:
                unmatched.append(d)
        for d in unmatched:  # already by score
            overlaps = np.where(taken, -1.0, image.iou[d])
            g = int(np.argmax(overlaps)) if overlaps.size else -1
            if g >= 0 and overlaps[g] >= iou:
                taken[g] = True
                counts[index[image.gt_category[g]], index[image.det_category[d]]] += 1
            else:
                counts[size, index[image.det_category[d]]] += 1
        for g in np.flatnonzero(~taken):
            counts[index[image.gt_category[g]], size] += 1
    return counts, ignored


def image_errors(images: Iterable[ImageMatches], threshold: int) -> list[dict]:
    """Per image, the loss at IoU threshold index ``threshold``: each false positive's score plus each missed object.

    Returns:
        ``{"image_id", "error", "false_positives", "missed"}`` per image, the largest error first.
    """
    rows = []
    for image in images:
        counted = ~image.det_ignored[threshold]
        false_positive = counted & (image.det_gt[threshold] < 0)
        found = np.zeros(len(image.gt_ids), bool)
        found[image.det_gt[threshold][image.det_gt[threshold] >= 0]] = True
        missed = int(np.count_nonzero(~found & ~image.gt_ignored))
        error = float(image.det_score[false_positive].sum()) + missed
        rows.append(
            {
                "image_id": int(image.image_id),
                "error": error,
                "false_positives": int(np.count_nonzero(false_positive)),
                "missed": missed,
            }
        )
    return sorted(rows, key=lambda row: -row["error"])


def _evaluated_images(coco_eval) -> dict[tuple[int, int], dict | None]:
    """COCOeval's ``evalImgs`` of area "all", by (category id, image id)."""
    params = coco_eval.params
    if not getattr(coco_eval, "evalImgs", None):
        raise ValueError("the COCOeval has not run evaluate(); call it first (pycocotools keeps its matches)")
    num_areas, num_images = len(params.areaRng), len(params.imgIds)
    return {
        (category_id, image_id): coco_eval.evalImgs[k * num_areas * num_images + i]
        for k, category_id in enumerate(params.catIds)
        for i, image_id in enumerate(params.imgIds)
    }


def _overlaps(dets: list, gts: list, crowd: list[int]) -> np.ndarray:
    if not dets or not gts:
        return np.zeros((len(dets), len(gts)))
    return np.asarray(mask_util.iou(dets, gts, crowd), dtype=np.float64).reshape(len(dets), len(gts))
