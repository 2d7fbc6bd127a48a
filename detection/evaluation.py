"""COCO mAP evaluation of boxes and instance masks.

:class:`COCOEvaluator` follows detectron2's ``DatasetEvaluator`` and torchmetrics: ``reset()``, ``update()`` with
each batch of torchvision-style predictions, ``compute()`` once per epoch. Under ``torch.distributed`` the results
of every rank are gathered first, so every rank returns the same metrics.

The module-level helpers are the single code path shared with ``tools/eval_det.py``, which scores a results JSON
written by any detector.
The conversion of predictions to COCO results and their validation are in ``detection.coco_results`` (and
re-exported here).

Example:
    >>> evaluator = COCOEvaluator(annotations="instances_val.json", iou_types=("bbox", "segm"))
    >>> evaluator.update(model(images), [t["image_id"] for t in targets])  # doctest: +SKIP
    >>> evaluator.compute()["bbox_AP"]  # doctest: +SKIP
    0.412
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .coco_results import (
    _RESULT_FIELD,
    IOU_TYPES,
    binarize_masks,
    check_iou_types,
    encode_masks,
    to_coco_results,
    validate_results,
)
from .faster_cocoeval import faster_cocoeval

__all__ = [
    "BACKENDS",
    "IOU_TYPES",
    "STAT_NAMES",
    "COCOEvaluator",
    "binarize_masks",
    "category_names",
    "check_iou_types",
    "encode_masks",
    "evaluate_results",
    "format_per_category_table",
    "load_ground_truth",
    "read_json",
    "resolve_backend",
    "run_cocoeval",
    "to_coco_results",
    "validate_results",
]

BACKENDS = ("auto", "pycocotools", "faster_coco_eval")
# Names of COCOeval.stats[0..11], in order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def resolve_backend(backend: str) -> str:
    """Return the COCOeval implementation to use: ``"pycocotools"`` or ``"faster_coco_eval"``.

    ``"auto"`` picks faster_coco_eval when it is importable (about 6x faster, same numbers), else pycocotools.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {', '.join(repr(b) for b in BACKENDS)}")
    if backend != "auto":
        return backend
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return "pycocotools"
    return "faster_coco_eval"


def load_ground_truth(annotations: str | os.PathLike | Any, backend: str = "auto") -> Any:
    """Load a COCO ground-truth file (or convert a COCO object) for ``backend``.

    Args:
        annotations: Path to an instances JSON, or a pycocotools / faster_coco_eval ``COCO`` object.
        backend: ``"auto"``, ``"pycocotools"`` or ``"faster_coco_eval"``.

    Returns:
        The backend's ``COCO`` object. A COCO object of the other backend is converted from a deep copy of its
        dataset, since both COCOeval implementations write into the ground-truth annotations.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file is not JSON, or not a COCO instances file.
    """
    backend = resolve_backend(backend)
    if hasattr(annotations, "dataset"):
        if isinstance(annotations, _coco_class(backend)):
            return annotations
        return _build_coco(copy.deepcopy(annotations.dataset), backend)
    dataset = read_json(annotations)
    if not isinstance(dataset, dict) or not {"images", "categories"} <= dataset.keys():
        raise ValueError(f"{annotations}: not a COCO instances file (needs 'images' and 'categories')")
    dataset.setdefault("annotations", [])
    try:
        return _build_coco(dataset, backend)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{annotations}: not a COCO instances file ({type(error).__name__}: {error})") from None


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path) as file:
        try:
            return json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: malformed JSON ({error})") from None


def evaluate_results(
    coco_gt: Any,
    results: list[dict],
    iou_type: str,
    backend: str = "auto",
    *,
    verbose: bool = True,
    image_ids: Sequence[int] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Score COCO results against the ground truth on every image of ``coco_gt`` (or on ``image_ids``).

    Args:
        coco_gt: Ground truth, a pycocotools or faster_coco_eval ``COCO`` (converted if it is the other one).
        results: COCO results, as from :func:`to_coco_results`; not modified.
        iou_type: ``"bbox"`` or ``"segm"``.
        backend: ``"auto"``, ``"pycocotools"`` or ``"faster_coco_eval"``.
        verbose: Print COCOeval's 12-line summary and the per-category AP table.
        image_ids: Score these images only (COCOeval's ``params.imgIds``); None: every image.

    Returns:
        ``{f"{iou_type}_{name}": value}`` for the 12 names of :data:`STAT_NAMES` (COCOeval's -1, "no ground truth
        of that size", becomes nan), and ``{category name: AP}`` (nan for a category without ground truth).
        Without any result every value is 0.0 and a warning is issued: pycocotools cannot load an empty list.
    """
    (iou_type,) = check_iou_types([iou_type])
    backend = resolve_backend(backend)
    coco_gt = load_ground_truth(coco_gt, backend)
    if not results:
        warnings.warn(f"no detections to evaluate: every {iou_type} metric is 0.0", stacklevel=2)
        categories = coco_gt.loadCats(sorted(coco_gt.getCatIds()))
        return {f"{iou_type}_{name}": 0.0 for name in STAT_NAMES}, dict.fromkeys(category_names(categories), 0.0)
    coco_eval, summary = run_cocoeval(coco_gt, results, iou_type, backend, image_ids)
    stats = {f"{iou_type}_{name}": _nan_if_missing(s) for name, s in zip(STAT_NAMES, coco_eval.stats[:12], strict=True)}
    per_category = _per_category_ap(coco_eval, coco_gt)
    if verbose:
        table = format_per_category_table(per_category, iou_type)
        images = f", {len(image_ids)} of {len(coco_gt.getImgIds())} images" if image_ids is not None else ""
        print(f"COCO {iou_type} evaluation ({backend}, {len(results)} detections{images}):\n{summary}\n{table}")
    return stats, per_category


def run_cocoeval(
    coco_gt: Any, results: list[dict], iou_type: str, backend: str, image_ids: Sequence[int] | None = None
) -> tuple[Any, str]:
    """Run evaluate, accumulate and summarize (on ``image_ids`` only if given); return COCOeval and the summary."""
    # Fresh dicts because loadRes writes into them. Masks are scored without their box: otherwise COCOeval takes
    # the box area as the instance area, and the small/medium/large split differs from the mask's (detectron2).
    fields = ("image_id", "category_id", "score", _RESULT_FIELD[iou_type])
    results = [{key: result[key] for key in fields} for result in results]
    if backend == "faster_coco_eval":
        lines = []
        coco_eval = faster_cocoeval(coco_gt, results, iou_type, print_function=lines.append)
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        lines.clear()  # keep the summary only
        coco_eval.summarize()
        return coco_eval, "\n".join(lines[:12])  # pycocotools' 12 lines; it adds AR@0.5 and AR@0.75
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on every step
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
    with contextlib.redirect_stdout(io.StringIO()) as summary:
        coco_eval.summarize()
    return coco_eval, summary.getvalue().rstrip("\n")


def _per_category_ap(coco_eval: Any, coco_gt: Any) -> dict[str, float]:
    precision = coco_eval.eval["precision"]  # (iou thresholds, recall thresholds, categories, areas, max dets)
    category_ids = [int(c) for c in coco_eval.params.catIds]
    names = category_names(coco_gt.loadCats(category_ids))
    aps = {}
    for index, name in enumerate(names):
        valid = precision[:, :, index, 0, -1]  # area "all", 100 detections
        valid = valid[valid > -1]
        aps[name] = float(valid.mean()) if valid.size else math.nan
    return aps


def category_names(categories: list[dict]) -> list[str]:
    """Category names, with the id appended where two categories share a name."""
    names = [c.get("name", str(c["id"])) for c in categories]
    return [f"{n} (id {c['id']})" if names.count(n) > 1 else n for n, c in zip(names, categories, strict=True)]


def format_per_category_table(per_category: Mapping[str, float], iou_type: str) -> str:
    """Format ``{category name: AP}`` as an aligned two-column text table."""
    width = max([len("category"), *map(len, per_category)])
    rows = [f"Per-category {iou_type} AP:", f"{'category':<{width}}  AP"]
    rows += [f"{name:<{width}}  {ap:.3f}" for name, ap in per_category.items()]
    return "\n".join(rows)


def _nan_if_missing(stat: float) -> float:
    return math.nan if stat < 0 else float(stat)


def _coco_class(backend: str) -> type:
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO as FasterCOCO

        return FasterCOCO
    return COCO


def _build_coco(dataset: dict, backend: str) -> Any:
    coco = _coco_class(backend)()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class COCOEvaluator:
    """COCO box and mask AP of a detector over a dataset, for single- and multi-process evaluation.

    Args:
        annotations: Ground-truth instances JSON path, or a pycocotools ``COCO`` object.
        iou_types: Any of ``"bbox"``, ``"segm"``.
        label_to_category_id: Contiguous model label -> COCO category id; ``None`` for the identity.
        backend: ``"pycocotools"``, ``"faster_coco_eval"`` or ``"auto"`` (faster_coco_eval when importable).
        mask_threshold: Probability above which a predicted mask pixel is foreground.

    The images that got an update are scored (an update with no detection counts: its objects are missed).
    Images of the annotation file that got none (``limit_val_batches``, a partial run) are left out of the
    metrics, not counted as missed; ``compute()`` warns how many were scored and the printed summary says so.
    The ground truth is read once: ``reset()`` between epochs, not a new evaluator.

    Example:
        >>> evaluator = COCOEvaluator(annotations="val.json", label_to_category_id={1: 1, 2: 3, 3: 7})
        >>> evaluator.update(predictions, image_ids)  # doctest: +SKIP
        >>> sorted(evaluator.compute())[:3]  # doctest: +SKIP
        ['bbox_AP', 'bbox_AP50', 'bbox_AP75']
    """

    def __init__(
        self,
        *,
        annotations: str | os.PathLike | COCO,
        iou_types: Iterable[str] = ("bbox",),
        label_to_category_id: Mapping[int, int] | None = None,
        backend: str = "auto",
        mask_threshold: float = 0.5,
    ) -> None:
        self.iou_types = check_iou_types(iou_types)
        self.backend = resolve_backend(backend)
        self.coco_gt = load_ground_truth(annotations, self.backend)
        self.label_to_category_id = None if label_to_category_id is None else dict(label_to_category_id)
        self.mask_threshold = mask_threshold
        self._category_ids = set(self.coco_gt.getCatIds())
        self._per_category: dict[str, dict[str, float]] = {}
        # The results and scored images of the last compute() (all ranks'), for a report (detection.report).
        self.last_results: list[dict] = []
        self.last_image_ids: list[int] | None = None
        self.reset()

    def reset(self) -> None:
        """Forget every prediction seen so far."""
        self._results_by_image: dict[int, list[dict]] = {}

    def update(self, predictions: Sequence[Mapping[str, Any]], image_ids: Sequence[Any]) -> None:
        """Add one batch of predictions.

        Args:
            predictions: Per image, torchvision's output: ``boxes`` (N, 4) XYXY in original pixels, ``scores``,
                ``labels`` and for ``"segm"`` ``masks`` (N, 1, H, W) probabilities or (N, H, W) binary.
            image_ids: The COCO image id of each prediction (int or one-element tensor), or the targets,
                dicts with an ``image_id``. An image seen again (DistributedSampler pads by repeating
                images) keeps its first predictions.
        """
        image_ids = [_image_id(item) for item in image_ids]
        if len(predictions) != len(image_ids):
            raise ValueError(f"{len(predictions)} predictions for {len(image_ids)} image ids; pass one per image")
        for prediction, image_id in zip(predictions, image_ids, strict=True):
            if image_id not in self._results_by_image:
                self._results_by_image[image_id] = self._convert(prediction, image_id)

    def _convert(self, prediction: Mapping[str, Any], image_id: int) -> list[dict]:
        image = self.coco_gt.imgs.get(image_id)
        if image is None:
            raise ValueError(f"image_id {image_id} is not an image of the annotations")
        masks = prediction.get("masks")
        if (
            "segm" in self.iou_types
            and masks is not None
            and masks.shape[0]
            and tuple(masks.shape[-2:]) != (image["height"], image["width"])
        ):
            raise ValueError(
                f"image {image_id}: masks are {tuple(masks.shape[-2:])}, the image is "
                f"{(image['height'], image['width'])} (H, W); paste masks at the original image size"
            )
        results = to_coco_results(
            [prediction], [image_id], self.label_to_category_id, self.iou_types, mask_threshold=self.mask_threshold
        )
        unknown = {result["category_id"] for result in results} - self._category_ids
        if unknown:
            raise ValueError(
                f"image {image_id}: category ids {sorted(unknown)} are not among the annotation categories "
                f"{sorted(self._category_ids)}; set label_to_category_id to map model labels to them"
            )
        return results

    def compute(self) -> dict[str, float]:
        """Gather the predictions of all ranks and return the metrics (the same on every rank).

        Returns:
            For each iou type, ``{iou}_AP, {iou}_AP50, {iou}_AP75, {iou}_APs, {iou}_APm, {iou}_APl, {iou}_AR1,
            {iou}_AR10, {iou}_AR100, {iou}_ARs, {iou}_ARm, {iou}_ARl`` in [0, 1]; nan where no ground truth
            falls in that size range. No stage prefix: the Lightning task adds it.
        """
        results_by_image = _first_copy_per_image(_gather_from_ranks(self._results_by_image))
        image_ids = self._scored_images(results_by_image.keys())
        # In image-id order: score ties then break the same way whichever rank saw which image.
        results = [result for image_id in sorted(results_by_image) for result in results_by_image[image_id]]
        self.last_results, self.last_image_ids = results, image_ids
        verbose = _rank() == 0  # one printed summary, not one per process
        metrics = {}
        for iou_type in self.iou_types:
            stats, per_category = evaluate_results(
                self.coco_gt, results, iou_type, self.backend, verbose=verbose, image_ids=image_ids
            )
            metrics.update(stats)
            self._per_category[iou_type] = per_category
        return metrics

    def per_category_ap(self, iou_type: str = "bbox") -> dict[str, float]:
        """``{category name: AP@[.5:.95]}`` of the last ``compute()`` (nan for a category without ground truth)."""
        if iou_type not in self._per_category:
            raise ValueError(f"iou_type={iou_type!r} has no result; computed: {sorted(self._per_category)}")
        return dict(self._per_category[iou_type])

    def _scored_images(self, seen_image_ids: Iterable[int]) -> list[int] | None:
        """The images to score: those seen, or None when that is every image of the annotations."""
        seen, total = sorted(seen_image_ids), len(self.coco_gt.getImgIds())
        if len(seen) == total:
            return None
        if _rank() == 0:
            warnings.warn(
                f"scoring {len(seen)} of the {total} ground-truth images: the others got no update (e.g. "
                "limit_val_batches) and are left out, so the metrics are of a subset",
                stacklevel=3,
            )
        return seen


def _image_id(item: Any) -> int:
    if isinstance(item, Mapping):
        item = item["image_id"]
    return int(item)


def _rank() -> int:
    import torch.distributed as dist  # lazily: scoring a results file needs no torch

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _gather_from_ranks(local: dict[int, list[dict]]) -> list[dict[int, list[dict]]]:
    """The ``local`` object of every rank, in rank order; ``[local]`` outside a multi-process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def _first_copy_per_image(per_rank: list[dict[int, list[dict]]]) -> dict[int, list[dict]]:
    """Merge per-rank results by image id, keeping one copy of an image that several ranks saw."""
    merged: dict[int, list[dict]] = {}
    for results_by_image in per_rank:
        for image_id, results in results_by_image.items():
            merged.setdefault(image_id, results)
    return merged
