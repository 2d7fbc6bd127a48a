"""Bootstrap confidence intervals for COCO detection metrics, from matches computed once.

The method is the PASCAL VOC retrospective's (Everingham et al., IJCV 2015): resample the test images with
replacement and recompute the metric; to compare two methods, use the same draws for both (paired) and look at
the distribution of the difference.

Rerunning COCOeval per draw would cost about a minute each at COCO size. Instead COCOeval's matching runs once
(``evaluate()``: per image, category and area range, the score-sorted detections with their match and ignore
flags per IoU threshold); a draw is then a multiplicity per image, and :class:`WeightedAccumulator` redoes
``accumulate()`` with each detection and ground truth counted as often as its image was drawn (cumulative sums of
weights instead of counts). With every weight 1 the 12 numbers are pycocotools' own, bit for bit; with integer
weights they are those of COCOeval run on the resampled image list (up to the order of exactly tied scores).

Only the positions where a detection is a true positive at some IoU threshold (or changes between counted and
ignored) are kept one by one: a run of false positives never starts a recall level, and its effect on precision
is its total weight, so each run is summed per draw into one number. 101-point interpolated precision is the
running maximum over recall buckets, so a draw costs a few passes over those positions.

numpy and pycocotools only; no Lightning. ``percentile_interval`` is generic; it lives here until the report
package has a shared home for it.

Example:
    >>> matches = match_once(coco_gt, results, "bbox")  # doctest: +SKIP
    >>> result = bootstrap(matches, num_draws=1000, seed=0)  # doctest: +SKIP
    >>> result.stats[0], result.interval[:, 0]  # AP and its 95% interval  # doctest: +SKIP
    (0.412, array([0.402, 0.421]))
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools.cocoeval import COCOeval

from backbones.report.stats import image_draws, percentile_interval

from .coco_results import _RESULT_FIELD
from .evaluation import load_ground_truth

__all__ = [
    "BootstrapResult",
    "Matches",
    "PairedBootstrapResult",
    "SortedMatches",
    "WeightedAccumulator",
    "bootstrap",
    "image_draws",
    "match_once",
    "paired_bootstrap",
    "percentile_interval",
    "sorted_matches",
]


@dataclass(frozen=True)
class SortedMatches:
    """The detections of one category and area range over all images, in ``COCOeval.accumulate``'s order.

    ``D`` detections (at most ``maxDets[-1]`` per image), ``T`` IoU thresholds, ``I`` images.

    Attributes:
        scores: (D,) descending; ties keep the image order, as accumulate's stable sort does.
        image: (D,) index of the detection's image in ``params.imgIds``.
        rank: (D,) position of the detection among its image's (score order): the ``maxDets`` cut.
        matched: (T, D) bool, matched to a ground truth at that threshold (``dtMatches`` != 0).
        ignored: (T, D) bool, ``dtIgnore``: matched to an ignored ground truth, or unmatched and outside the area.
        ground_truths: (I,) the number of ground truths not ignored, per image.
    """

    scores: np.ndarray
    image: np.ndarray
    rank: np.ndarray
    matched: np.ndarray
    ignored: np.ndarray
    ground_truths: np.ndarray


@dataclass(frozen=True)
class Matches:
    """COCOeval's matching of one results set, as score-sorted arrays per category and area range.

    Attributes:
        params: The ``COCOeval.params`` of the matching (``imgIds``, ``catIds``, ``iouThrs``, ``recThrs``,
            ``maxDets``, ``areaRng``/``areaRngLbl``).
        table: ``[k][a]`` :class:`SortedMatches`, or None where the category has neither a detection nor a
            ground truth counted in that area (COCOeval's -1 whatever the draw).
    """

    params: Any
    table: list[list[SortedMatches | None]]

    @classmethod
    def from_cocoeval(cls, coco_eval: COCOeval) -> Matches:
        """From a pycocotools COCOeval after ``evaluate()``."""
        if not coco_eval.evalImgs:
            raise ValueError("COCOeval.evalImgs is empty; run evaluate() first")
        return cls(coco_eval.params, sorted_matches(coco_eval.evalImgs, coco_eval.params))


def match_once(coco_gt: Any, results: list[dict], iou_type: str) -> Matches:
    """COCOeval's matching of ``results``, once, as :class:`Matches`.

    pycocotools' own ``evaluateImg`` matches every image and category that has both ground truth and
    detections. The others need no matching, and at COCO size they are most of pycocotools' time (100
    detections per image fall in about 60 categories, the ground truth in 3 to 7): detections of a category
    without ground truth in the image are false positives, ignored outside an area range, and are sorted and
    cut at ``maxDets[-1]`` per image here with numpy, as ``evaluateImg`` would.

    Args:
        coco_gt: Ground truth: a path or a pycocotools / faster_coco_eval ``COCO``.
        results: COCO results (not modified); must not be empty.
        iou_type: ``"bbox"`` or ``"segm"``.
    """
    if not results:
        raise ValueError("no detections: a bootstrap needs at least one result")
    coco_gt = load_ground_truth(coco_gt, "pycocotools")
    # As detection.evaluation scores them: fresh dicts (loadRes writes into them), masks without their box.
    fields = ("image_id", "category_id", "score", _RESULT_FIELD[iou_type])
    results = [{key: result[key] for key in fields} for result in results]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        p = coco_eval.params
        p.imgIds, p.catIds, p.maxDets = list(np.unique(p.imgIds)), list(np.unique(p.catIds)), sorted(p.maxDets)
        coco_eval._prepare()  # evaluate()'s first step: ground-truth ignore flags, masks as RLEs
    image_index = {image_id: i for i, image_id in enumerate(p.imgIds)}
    category_index = {category_id: k for k, category_id in enumerate(p.catIds)}
    num_k, num_a, num_i = len(p.catIds), len(p.areaRng), len(p.imgIds)
    both = [key for key, gts in coco_eval._gts.items() if gts and coco_eval._dts.get(key)]
    coco_eval.ious = {key: coco_eval.computeIoU(*key) for key in both}
    entries = [[[] for _ in range(num_a)] for _ in range(num_k)]
    for image_id, category_id in both:
        for a, area in enumerate(p.areaRng):
            entry = coco_eval.evaluateImg(image_id, category_id, area, p.maxDets[-1])
            entries[category_index[category_id]][a].append((image_index[image_id], entry))
    gts = [g for gts in coco_eval._gts.values() for g in gts]
    gt_area = np.array([g["area"] for g in gts], np.float64)
    gt_counted = ~np.array([bool(g["ignore"]) for g in gts], bool)
    gt_cell = np.array([category_index[g["category_id"]] * num_i + image_index[g["image_id"]] for g in gts], np.int64)
    ground_truths = np.zeros((num_k, num_a, num_i), np.int64)
    for a, (low, high) in enumerate(p.areaRng):
        inside = gt_counted & (gt_area >= low) & (gt_area <= high)
        ground_truths[:, a] = np.bincount(gt_cell[inside], minlength=num_k * num_i).reshape(num_k, num_i)
    lone = _lone_detections(coco_eval, image_index, category_index)
    table = [[_sorted_group(entries[k][a], _lone_block(lone, k, p.areaRng[a], len(p.iouThrs)), ground_truths[k, a],
                            len(p.iouThrs), p.maxDets[-1]) for a in range(num_a)] for k in range(num_k)]  # fmt: skip
    return Matches(p, table)


def _lone_detections(coco_eval: COCOeval, image_index: dict, category_index: dict) -> dict[str, np.ndarray]:
    """The detections of images and categories without ground truth, in score order per image and category,
    cut at ``maxDets[-1]``: arrays ``image``, ``category``, ``score``, ``area``, ``rank``."""
    dts = [d for key, dts in coco_eval._dts.items() if not coco_eval._gts.get(key) for d in dts]
    image = np.array([image_index[d["image_id"]] for d in dts], np.int64)
    category = np.array([category_index[d["category_id"]] for d in dts], np.int64)
    score = np.array([d["score"] for d in dts], np.float64)
    area = np.array([d["area"] for d in dts], np.float64)
    # evaluateImg's stable sort by score, in loadRes order (the annotation id), per image and category
    order = np.lexsort((np.array([d["id"] for d in dts], np.int64), -score, image, category))
    image, category, score, area = image[order], category[order], score[order], area[order]
    new_pair = np.concatenate([[True], (image[1:] != image[:-1]) | (category[1:] != category[:-1])])
    starts = np.flatnonzero(new_pair)
    rank = np.arange(image.size) - np.repeat(starts, np.diff(np.append(starts, image.size)))
    keep = rank < coco_eval.params.maxDets[-1]
    return {"image": image[keep], "category": category[keep], "score": score[keep], "area": area[keep],
            "rank": rank[keep]}  # fmt: skip


def _lone_block(lone: dict[str, np.ndarray], k: int, area_range: list[float], num_thresholds: int) -> tuple:
    mine = lone["category"] == k
    area = lone["area"][mine]
    outside = (area < area_range[0]) | (area > area_range[1])
    ignored = np.repeat(outside[None], num_thresholds, axis=0)
    return lone["image"][mine], lone["score"][mine], lone["rank"][mine], np.zeros_like(ignored), ignored


def sorted_matches(eval_imgs: list[dict | None], params: Any) -> list[list[SortedMatches | None]]:
    """Score-sorted match arrays per category and area range, from ``COCOeval.evalImgs``.

    Args:
        eval_imgs: ``COCOeval.evalImgs`` after ``evaluate()``: K x A x I entries (category, area, image), each
            None or a dict with ``dtScores``, ``dtMatches`` (T, D), ``dtIgnore`` (T, D) and ``gtIgnore`` (G,).
        params: ``COCOeval.params`` of that run.

    Returns:
        ``[k][a]``: :class:`SortedMatches`, or None where no image has a detection or a counted ground truth of
        that category and area.
    """
    num_images, num_areas = len(params.imgIds), len(params.areaRng)
    num_categories = len(params.catIds) if params.useCats else 1
    if len(eval_imgs) != num_categories * num_areas * num_images:
        raise ValueError(f"{len(eval_imgs)} evalImgs for {num_categories} categories x {num_areas} areas x "
                         f"{num_images} images; pass COCOeval.evalImgs of this params' evaluate()")  # fmt: skip
    max_dets, num_thresholds = params.maxDets[-1], len(params.iouThrs)
    table = []
    for k in range(num_categories):
        row = []
        for a in range(num_areas):
            start = (k * num_areas + a) * num_images
            entries = [(i, e) for i, e in enumerate(eval_imgs[start : start + num_images]) if e is not None]
            ground_truths = np.zeros(num_images, np.int64)
            for i, e in entries:
                ground_truths[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
            row.append(_sorted_group(entries, None, ground_truths, num_thresholds, max_dets))
        table.append(row)
    return table


def _sorted_group(entries, lone, ground_truths, num_thresholds, max_dets) -> SortedMatches | None:
    """One category and area: evaluateImg entries ``(image index, dict)`` and a block of unmatched detections
    ``(image, score, rank, matched, ignored)``, merged in accumulate's order."""
    blocks = [] if lone is None or not lone[0].size else [lone]
    entries = [(i, e) for i, e in entries if len(e["dtScores"])]
    if entries:
        lengths = np.array([min(len(e["dtScores"]), max_dets) for _, e in entries])
        starts = np.cumsum(lengths) - lengths
        blocks.append((
            np.repeat([i for i, _ in entries], lengths),
            np.concatenate([e["dtScores"][:max_dets] for _, e in entries]),
            np.arange(lengths.sum()) - np.repeat(starts, lengths),
            np.concatenate([np.asarray(e["dtMatches"])[:, :max_dets] for _, e in entries], axis=1) != 0,
            np.concatenate([np.asarray(e["dtIgnore"])[:, :max_dets] for _, e in entries], axis=1) != 0,
        ))  # fmt: skip
    if not blocks and not ground_truths.any():
        return None
    if not blocks:
        empty = np.zeros((num_thresholds, 0), bool)
        return SortedMatches(np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64), empty, empty, ground_truths)
    image, scores, rank, matched, ignored = (np.concatenate(part, axis=-1) for part in zip(*blocks, strict=True))
    # accumulate concatenates the images in order, each in score order, then sorts stably by score
    order = np.lexsort((rank, image, -scores))
    return SortedMatches(scores[order], image[order].astype(np.int64), rank[order].astype(np.int64),
                         matched[:, order], ignored[:, order], ground_truths)  # fmt: skip


class WeightedAccumulator:
    """``COCOeval.accumulate()`` + ``summarize()`` with a weight (multiplicity) per image, matches fixed.

    Args:
        matches: :class:`Matches` (from :func:`match_once`) or a pycocotools ``COCOeval`` after ``evaluate()``,
            with the standard ``maxDets`` (three values, the AP ones last) and areas ``all, small, medium, large``.

    Example:
        >>> accumulator = WeightedAccumulator(match_once(coco_gt, results, "bbox"))  # doctest: +SKIP
        >>> stats, per_category = accumulator.summarize(np.ones(accumulator.num_images, int))  # doctest: +SKIP
        >>> stats[0]  # COCOeval.stats[0], bit for bit  # doctest: +SKIP
        0.412
    """

    def __init__(self, matches: Matches | COCOeval) -> None:
        if isinstance(matches, COCOeval):
            matches = Matches.from_cocoeval(matches)
        p = matches.params
        if len(p.maxDets) != 3 or list(p.areaRngLbl) != ["all", "small", "medium", "large"]:
            raise ValueError(f"maxDets={p.maxDets}, areaRngLbl={p.areaRngLbl}; the bootstrap summarizes COCO's "
                             "12 numbers: three maxDets and the areas all, small, medium, large")  # fmt: skip
        self.params = p
        self.num_images = len(p.imgIds)
        self._thresholds = np.asarray(p.recThrs, np.float64)
        self._compress(matches.table)

    def _compress(self, table: list[list[SortedMatches | None]]) -> None:
        """Keep the detections that are a true positive at some threshold, or counted at some and ignored at
        others, one by one ("kept"); sum the rest, false positives at every threshold, per gap between kept.
        Then list per threshold the true positives and the ignored among the kept ("events"), with the static
        indices that turn one cumulative sum per draw into running counts per (threshold, group) segment."""
        p = self.params
        self.num_categories, self.num_areas = len(table), len(table[0])
        groups = [(k, a, m) for k, row in enumerate(table) for a, m in enumerate(row) if m is not None]
        num_t, num_g = len(p.iouThrs), len(groups)
        self._group_category = np.array([k for k, _, _ in groups], np.int64)
        self._group_area = np.array([a for _, a, _ in groups], np.int64)
        self._ground_truths = np.stack([m.ground_truths for _, _, m in groups]).astype(np.float64)  # (G, I)
        parts = {name: [] for name in ("image", "group", "rank", "tp", "ignored", "free_image", "free_slot")}
        first = []  # index of each group's first kept detection
        for g, (_, _, m) in enumerate(groups):
            is_tp, is_fp = m.matched & ~m.ignored, ~m.matched & ~m.ignored
            kept = np.flatnonzero(is_tp.any(0) | (is_fp.any(0) & ~is_fp.all(0)))
            free = np.flatnonzero(is_fp.all(0))
            slot = np.searchsorted(kept, free)  # the first kept detection after each free false positive
            before_a_kept = slot < kept.size  # after the last one it changes no precision that counts
            first.append(sum(len(x) for x in parts["image"]))
            parts["image"].append(m.image[kept])
            parts["group"].append(np.full(kept.size, g, np.int64))
            parts["rank"].append(m.rank[kept])
            parts["tp"].append(is_tp[:, kept])
            parts["ignored"].append(m.ignored[:, kept])
            parts["free_image"].append(m.image[free[before_a_kept]])
            parts["free_slot"].append(first[-1] + slot[before_a_kept])
        join = {name: _concatenate(values, rows=num_t if name in ("tp", "ignored") else None)
                for name, values in parts.items()}  # fmt: skip
        self._kept_image, self._free_image, self._free_slot = join["image"], join["free_image"], join["free_slot"]
        num_kept = self._kept_image.size
        first = np.array(first, np.int64)
        tp_t, tp_n = np.nonzero(join["tp"])  # (threshold, detection) order: groups contiguous within a threshold
        ignored_t, ignored_n = np.nonzero(join["ignored"])
        tp_key, ignored_key = tp_t * num_kept + tp_n, ignored_t * num_kept + ignored_n
        tp_g = join["group"][tp_n]
        segment_first = tp_t * num_kept + first[tp_g]
        # Running sums per segment: one cumulative sum over all events, read where the segment starts and here.
        self._tp_n, self._ignored_n = tp_n, ignored_n
        self._tp_segment = tp_t * num_g + tp_g
        self._tp_low = np.searchsorted(tp_key, segment_first)
        self._ignored_low = np.searchsorted(ignored_key, segment_first)
        self._ignored_high = np.searchsorted(ignored_key, tp_key, side="right")
        self._kept_low = first[tp_g]
        self._tp_in_top = [np.flatnonzero(join["rank"][tp_n] < m) for m in p.maxDets[:-1]]
        self._num_groups = num_g

    def _curves(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Interpolated precision (T, G, R) per group, true positives found (M, T, G), ground truths (G,)."""
        weights = np.asarray(weights)
        if weights.shape != (self.num_images,) or (weights < 0).any():
            raise ValueError(f"weights of shape {weights.shape}; need ({self.num_images},) non-negative counts")
        p, num_g = self.params, self._num_groups
        num_t, num_r = len(p.iouThrs), len(p.recThrs)
        weights = weights.astype(np.float64)  # integer counts: every sum below is exact
        ground_truths = self._ground_truths @ weights  # (G,) npig
        kept_weight = weights[self._kept_image]
        counted = kept_weight + np.bincount(self._free_slot, weights[self._free_image], minlength=kept_weight.size)
        tp_weight = kept_weight[self._tp_n]
        tp = _running(tp_weight, self._tp_low, np.arange(1, tp_weight.size + 1))
        # false positives = every detection counted up to here - true positives - those ignored at this threshold
        fp = _running(counted, self._kept_low, self._tp_n + 1) - tp
        fp -= _running(kept_weight[self._ignored_n], self._ignored_low, self._ignored_high)
        npig = ground_truths[self._tp_segment % num_g]
        recall = tp / np.where(npig > 0, npig, 1)  # npig 0: the group is -1, whatever this gives
        precision = tp / (fp + tp + np.spacing(1))  # accumulate's formula
        # Interpolated precision at recall threshold r: the best precision at any recall >= r. Bucket each true
        # positive by the highest threshold its recall reaches, take the best per bucket, then a running max
        # from the top (kept reversed, so that the running max runs forward on contiguous memory).
        bucket = self._bucket(recall)
        key = self._tp_segment * num_r + bucket  # nondecreasing: recall grows within a segment
        best = np.zeros(num_t * num_g * num_r)
        if key.size:
            starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
            best[key[starts] + num_r - 1 - 2 * bucket[starts]] = np.maximum.reduceat(precision, starts)
        interpolated = np.maximum.accumulate(best.reshape(num_t, num_g, num_r), axis=2)[:, :, ::-1]
        found = [np.bincount(self._tp_segment[top], tp_weight[top], num_t * num_g) for top in self._tp_in_top]
        found.append(np.bincount(self._tp_segment, tp_weight, num_t * num_g))
        return interpolated, np.stack(found).reshape(len(found), num_t, num_g), ground_truths

    def _bucket(self, recall: np.ndarray) -> np.ndarray:
        """``searchsorted(recThrs, recall, "right") - 1``: from a guess on the 0.01 grid, corrected exactly."""
        thresholds, last = self._thresholds, self._thresholds.size - 1
        if not np.allclose(thresholds, np.linspace(0, 1, last + 1)):
            return np.searchsorted(thresholds, recall, side="right") - 1
        bucket = np.clip(np.floor(recall * last).astype(np.int64), 0, last)
        bucket -= thresholds[bucket] > recall
        up = np.minimum(bucket + 1, last)
        return bucket + ((thresholds[up] <= recall) & (up > bucket))

    def accumulate(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Precision and recall of ``COCOeval.accumulate()`` with image ``i`` counted ``weights[i]`` times.

        Args:
            weights: (I,) non-negative integers, in ``params.imgIds`` order.

        Returns:
            ``precision`` (T, R, K, A) at ``maxDets[-1]`` (the only one summarize reads) and ``recall``
            (T, K, A, M); -1 where a category has no ground truth in that area among the drawn images.
        """
        interpolated, found, ground_truths = self._curves(weights)
        num_t, num_r, num_m = interpolated.shape[0], interpolated.shape[2], found.shape[0]
        valid = ground_truths > 0
        precision = np.full((num_t, num_r, self.num_categories, self.num_areas), -1.0)
        recall = np.full((num_t, self.num_categories, self.num_areas, num_m), -1.0)
        k, a = self._group_category[valid], self._group_area[valid]
        precision[:, :, k, a] = interpolated[:, valid].transpose(0, 2, 1)
        recall[:, k, a] = (found[:, :, valid] / ground_truths[valid]).transpose(1, 2, 0)
        return precision, recall

    def summarize(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """COCOeval's 12 numbers and the AP of each category for one weighting of the images.

        The means run over the same values in the same order as ``COCOeval.summarize()`` on the arrays of
        :meth:`accumulate`, without building them: the same floating-point results.

        Returns:
            ``stats`` (12,) in :data:`detection.evaluation.STAT_NAMES` order and ``per_category`` (K,) AP over
            IoU 0.5:0.95 (area all), as ``detection.evaluation`` reports it; nan where COCOeval gives -1.
        """
        interpolated, found, ground_truths = self._curves(weights)
        valid = ground_truths > 0
        thresholds = np.asarray(self.params.iouThrs)

        def precision_of(area: int) -> np.ndarray:  # (T, R, K valid) as summarize selects it, in category order
            groups = np.flatnonzero(valid & (self._group_area == area))
            return np.ascontiguousarray(interpolated[:, groups].transpose(0, 2, 1))

        def recall_of(area: int, m: int) -> np.ndarray:
            groups = np.flatnonzero(valid & (self._group_area == area))
            return found[m][:, groups] / ground_truths[groups]

        def mean(values: np.ndarray) -> float:
            return float(values.ravel().mean()) if values.size else np.nan

        everything = precision_of(0)
        stats = [mean(everything)]
        stats += [mean(everything[np.where(t == thresholds)[0]]) for t in (0.5, 0.75)]
        stats += [mean(precision_of(a)) for a in (1, 2, 3)]
        stats += [mean(recall_of(0, m)) for m in range(3)] + [mean(recall_of(a, 2)) for a in (1, 2, 3)]
        per_category = np.full(self.num_categories, np.nan)
        categories = self._group_category[valid & (self._group_area == 0)]
        by_category = everything.transpose(2, 0, 1).reshape(categories.size, -1 if categories.size else 0)
        for k, values in zip(categories.tolist(), by_category, strict=True):  # rows (T x R) in summarize's order
            per_category[k] = values.mean()  # row by row: an axis=1 mean sums in another order
        return np.array(stats), per_category


def _running(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``values[low[j]:high[j]].sum()`` for every j, from one cumulative sum."""
    sums = np.concatenate([[0.0], np.cumsum(values)])
    return sums[high] - sums[low]


def _concatenate(parts: list[np.ndarray], rows: int | None = None) -> np.ndarray:
    if parts:
        return np.concatenate(parts, axis=-1)
    return np.zeros((rows, 0), bool) if rows is not None else np.zeros(0, np.int64)


@dataclass(frozen=True)
class BootstrapResult:
    """Point estimates (pycocotools') and their percentile intervals over the draws.

    Attributes:
        stats: (12,) COCOeval's numbers, nan for -1; ``per_category``: (K,) AP per category.
        draws: (num_draws, 12) and ``per_category_draws``: (num_draws, K), the numbers of each draw.
        interval: (2, 12) and ``per_category_interval``: (2, K), lower and upper bounds.
    """

    stats: np.ndarray
    per_category: np.ndarray
    draws: np.ndarray
    per_category_draws: np.ndarray
    interval: np.ndarray
    per_category_interval: np.ndarray
    confidence: float


def bootstrap(
    coco_eval: Matches | COCOeval | WeightedAccumulator, num_draws: int = 1000, seed: int = 0, confidence: float = 0.95
) -> BootstrapResult:
    """Percentile intervals of the 12 COCO numbers and per-category AP from resampling the images.

    Args:
        coco_eval: The matches (:func:`match_once`), a pycocotools COCOeval after ``evaluate()``, or an
            accumulator made of either.
        num_draws: Resamplings of the images.
        seed: Seed of the draws: the same seed gives the same intervals.
        confidence: Coverage of the two-sided interval.
    """
    accumulator = coco_eval if isinstance(coco_eval, WeightedAccumulator) else WeightedAccumulator(coco_eval)
    stats, per_category = accumulator.summarize(np.ones(accumulator.num_images, np.int64))
    draws = [accumulator.summarize(w) for w in image_draws(accumulator.num_images, num_draws, seed)]
    stat_draws, category_draws = np.stack([d[0] for d in draws]), np.stack([d[1] for d in draws])
    return BootstrapResult(stats, per_category, stat_draws, category_draws, percentile_interval(stat_draws, confidence),
                           percentile_interval(category_draws, confidence), confidence)  # fmt: skip


@dataclass(frozen=True)
class PairedBootstrapResult:
    """B - A per metric and per category, with paired intervals.

    Attributes:
        a, b: The :class:`BootstrapResult` of each (same draws).
        difference: (12,) B - A of the point estimates; ``interval``: (2, 12) of B - A over the draws;
            ``b_better``: (12,) share of the draws where B > A (nan draws left out).
        per_category_difference, per_category_interval, per_category_b_better: the same per category.
    """

    a: BootstrapResult
    b: BootstrapResult
    difference: np.ndarray
    interval: np.ndarray
    b_better: np.ndarray
    per_category_difference: np.ndarray
    per_category_interval: np.ndarray
    per_category_b_better: np.ndarray


def paired_bootstrap(
    coco_eval_a: Matches | COCOeval | WeightedAccumulator,
    coco_eval_b: Matches | COCOeval | WeightedAccumulator,
    num_draws: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedBootstrapResult:
    """Compare two detectors on the same images: B - A with the same image draws for both.

    Args:
        coco_eval_a, coco_eval_b: The matches of A and B (:func:`match_once`), or COCOevals after ``evaluate()``.
        num_draws, seed, confidence: As for :func:`bootstrap`; both use the same draws.

    Raises:
        ValueError: The two runs were not evaluated on the same images and categories.
    """
    pa, pb = coco_eval_a.params, coco_eval_b.params
    if list(pa.imgIds) != list(pb.imgIds) or list(pa.catIds) != list(pb.catIds):
        raise ValueError("A and B were evaluated on different images or categories; use the same ground truth")
    a, b = (bootstrap(e, num_draws, seed, confidence) for e in (coco_eval_a, coco_eval_b))

    def compare(da: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        diff = db - da
        with np.errstate(invalid="ignore"):
            better = np.where(np.isnan(diff), np.nan, diff > 0)
        counted = ~np.isnan(better)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(counted, better, 0).sum(axis=0) / counted.sum(axis=0)
        return percentile_interval(diff, confidence), share

    interval, better = compare(a.draws, b.draws)
    category_interval, category_better = compare(a.per_category_draws, b.per_category_draws)
    return PairedBootstrapResult(a, b, b.stats - a.stats, interval, better, b.per_category - a.per_category,
                                 category_interval, category_better)  # fmt: skip
