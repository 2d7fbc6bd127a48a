"""detection.analysis and detection.error_analysis against raw pycocotools, tidecv and direct counts."""

import contextlib
import copy
import importlib.util
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.analysis import (
    accumulate,
    category_matches,
    confusion_matrix,
    greedy_match,
    image_errors,
    image_matches,
    threshold_index,
)
from detection.error_analysis import TIDE_ERRORS, coco_analyzer, tide_errors
from tests.detection import planted

IOU_TYPES = ("bbox", "segm")


def run_cocoeval(dataset: dict, results: list[dict], iou_type: str, **params) -> COCOeval:
    """Raw pycocotools: evaluate and accumulate (with ``params`` set first)."""
    field = "bbox" if iou_type == "bbox" else "segmentation"
    results = [{key: r[key] for key in ("image_id", "category_id", "score", field)} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(dataset)
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        for key, value in params.items():
            setattr(coco_eval.params, key, value)
        coco_eval.evaluate()
        coco_eval.accumulate()
        if not params:  # the summary needs the default thresholds
            coco_eval.summarize()
    return coco_eval


@pytest.fixture(scope="module", params=[(t, c) for t in IOU_TYPES for c in (False, True)], ids=str)
def evaluated(request):
    iou_type, crowd = request.param
    return run_cocoeval(planted.ground_truth(crowd=crowd), planted.detections(crowd=crowd), iou_type)


def test_accumulate_reproduces_cocoeval(evaluated):
    matches = category_matches(evaluated)
    for k, category in enumerate(evaluated.params.catIds):
        precision, scores, recall = accumulate(matches[category], evaluated.params.recThrs)
        np.testing.assert_allclose(precision, evaluated.eval["precision"][:, :, k, 0, -1])
        np.testing.assert_allclose(scores, evaluated.eval["scores"][:, :, k, 0, -1])
        np.testing.assert_allclose(recall, evaluated.eval["recall"][:, k, 0, -1])
    doubled = accumulate(matches[1], evaluated.params.recThrs, image_weights=np.full(3, 2.0))[0]
    np.testing.assert_allclose(doubled, evaluated.eval["precision"][:, :, 0, 0, -1])  # every image twice: same AP


def test_greedy_match_reproduces_cocoeval(evaluated):
    for image in image_matches(evaluated):
        for category in evaluated.params.catIds:
            dets, gts = np.flatnonzero(image.det_category == category), np.flatnonzero(image.gt_category == category)
            for t, iou in enumerate(evaluated.params.iouThrs):
                ious = image.iou[np.ix_(dets, gts)]
                det_gt, ignored = greedy_match(ious, image.gt_ignored[gts], image.gt_ignored[gts], iou)
                expected = image.det_gt[t, dets]
                np.testing.assert_array_equal(np.where(det_gt >= 0, gts[np.maximum(det_gt, 0)], -1), expected)
                np.testing.assert_array_equal(ignored, image.det_ignored[t, dets])


def test_tide_finds_each_planted_error_once(evaluated):
    tide = tide_errors(evaluated, image_matches(evaluated))
    assert tide["counts"] == dict.fromkeys(TIDE_ERRORS, 1)
    assert tide["AP"] == pytest.approx(evaluated.stats[1])  # the baseline is pycocotools' AP50
    assert all(tide["dAP"][kind] > 0 for kind in TIDE_ERRORS), tide["dAP"]  # each planted error costs AP
    assert tide["special"]["FalsePos"] > 0 and tide["special"]["FalseNeg"] > 0


def test_tide_fixes_by_direct_computation():
    """Fixing the Bkg error by hand (removing the detection) gives the dAP TIDE reports."""
    dataset, results = planted.ground_truth(), planted.detections()
    base = run_cocoeval(dataset, results, "bbox")
    tide = tide_errors(base, image_matches(base))
    for kind in ("Bkg", "Dupe", "Both"):
        index = [row[4] for row in planted.DETECTIONS].index(kind)
        fixed = run_cocoeval(dataset, results[:index] + results[index + 1 :], "bbox")
        assert tide["dAP"][kind] == pytest.approx(fixed.stats[1] - base.stats[1]), kind
    missed = [a for a in dataset["annotations"] if a["bbox"] != [10, 120, 30, 30]]  # the planted Miss
    fixed = run_cocoeval({**dataset, "annotations": missed}, results, "bbox")
    assert tide["dAP"]["Miss"] == pytest.approx(fixed.stats[1] - base.stats[1])


@pytest.mark.skipif(importlib.util.find_spec("tidecv") is None, reason="tidecv is not installed")
@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_tide_equals_tidecv(tmp_path, iou_type):
    from tidecv import TIDE, datasets

    gt_path, results_path = planted.write(tmp_path)
    tide = TIDE()
    with contextlib.redirect_stdout(io.StringIO()):
        mode = TIDE.BOX if iou_type == "bbox" else TIDE.MASK
        run = tide.evaluate(datasets.COCO(gt_path), datasets.COCOResult(results_path), mode=mode, name="run")
        errors = tide.get_all_errors()
    ours_eval = run_cocoeval(planted.ground_truth(), planted.detections(), iou_type)
    ours = tide_errors(ours_eval, image_matches(ours_eval))
    assert ours["AP"] * 100 == pytest.approx(run.ap)
    for kind in TIDE_ERRORS:
        assert ours["dAP"][kind] * 100 == pytest.approx(errors["main"]["run"][kind], abs=1e-9), kind
    for kind in ("FalsePos", "FalseNeg"):
        assert ours["special"][kind] * 100 == pytest.approx(errors["special"]["run"][kind], abs=1e-9), kind
    assert ours["counts"] == {error.short_name: n for error, n in run.count_errors().items()}


@pytest.mark.parametrize("score", [0.0, 0.8])
def test_confusion_matrix_counts_each_detection_and_object_once(evaluated, score):
    images = image_matches(evaluated)
    categories = list(evaluated.params.catIds)
    counts, ignored = confusion_matrix(images, categories, threshold_index(evaluated, 0.5), 0.5, score)
    kept = [d for d in planted.DETECTIONS if d[3] >= score]
    crowd = [planted.CROWD_DETECTION] if evaluated.cocoGt.anns.get(100) and planted.CROWD_DETECTION[3] >= score else []
    assert ignored == len(crowd)
    np.testing.assert_array_equal(counts[:, :-1].sum(axis=0), [sum(d[1] == c for d in kept) for c in categories])
    objects = [c for objects in planted.OBJECTS.values() for c, _ in objects]
    np.testing.assert_array_equal(counts[:-1].sum(axis=1), [objects.count(c) for c in categories])
    assert counts[-1, -1] == 0
    if score == 0.0:
        assert counts[1, 0] == 1  # the circle on the square: a class confusion, not a false positive and a miss
        assert np.trace(counts[:-1, :-1]) == 5  # the true positives at IoU 0.5
        np.testing.assert_array_equal(counts[-1, :-1], [1, 1, 2])  # Dupe (circle), Bkg (square), Loc and Both (car)
        np.testing.assert_array_equal(counts[:-1, -1], [1, 0, 1])  # the missed circle, the badly localised car


def test_image_errors_by_direct_count(evaluated):
    rows = image_errors(image_matches(evaluated), threshold_index(evaluated, 0.5))
    assert [row["image_id"] for row in rows] == [1, 2, 3]
    false_positives = [d[3] for d in planted.DETECTIONS if d[0] == 1 and d[4] != "TP"]
    assert rows[0]["error"] == pytest.approx(sum(false_positives) + 3)  # the square (Cls), circle, car missed
    assert rows[0]["false_positives"] == len(false_positives) and rows[0]["missed"] == 3
    assert rows[1]["error"] == rows[2]["error"] == 0


def _analyzer_reference(dataset: dict, results: list[dict], iou_type: str, category: int, same_group) -> np.ndarray:
    """The analyzer's Sim/Oth curve as the COCO API computes it: other-class objects become crowd regions."""
    groups = {c["id"]: c["supercategory"] for c in dataset["categories"]}
    dataset = copy.deepcopy(dataset)
    for annotation in dataset["annotations"]:
        other = annotation["category_id"]
        if other != category and (not same_group or groups[other] == groups[category]):
            annotation.update(iscrowd=1, ignore=1, category_id=category)
    results = [r for r in results if r["category_id"] == category]
    coco_eval = run_cocoeval(dataset, results, iou_type, iouThrs=np.array([0.1]))
    return coco_eval.eval["precision"][0, :, category - 1, 0, -1]


@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_analyzer_against_pycocotools(iou_type):
    dataset, results = planted.ground_truth(crowd=True), planted.detections(crowd=True)
    coco_eval = run_cocoeval(dataset, results, iou_type)
    supercategories = {c["id"]: c["supercategory"] for c in planted.CATEGORIES}
    analyzer = coco_analyzer(coco_eval, image_matches(coco_eval), supercategories)
    loc = run_cocoeval(dataset, results, iou_type, iouThrs=np.array([0.1]))
    for k, category in enumerate(coco_eval.params.catIds):
        curves = analyzer["per_category"][category]
        np.testing.assert_allclose(curves["C75"], coco_eval.eval["precision"][5, :, k, 0, -1])
        np.testing.assert_allclose(curves["C50"], coco_eval.eval["precision"][0, :, k, 0, -1])
        np.testing.assert_allclose(curves["Loc"], loc.eval["precision"][0, :, k, 0, -1])
        np.testing.assert_allclose(curves["Sim"], _analyzer_reference(dataset, results, iou_type, category, True))
        np.testing.assert_allclose(curves["Oth"], _analyzer_reference(dataset, results, iou_type, category, False))
        np.testing.assert_array_equal(curves["BG"], curves["Oth"] > 0)
        assert curves["FN"].mean() == 1
    overall = {kind: curve.mean() for kind, curve in analyzer["overall"].items()}
    assert overall["C75"] == pytest.approx(coco_eval.stats[2]) and overall["C50"] == pytest.approx(coco_eval.stats[1])
    area = {c: {kind: v.mean() for kind, v in curves.items()} for c, curves in analyzer["per_category"].items()}
    assert area[1]["Sim"] > area[1]["Loc"]  # the circle on the square: same supercategory
    assert area[3]["Oth"] > area[3]["Sim"]  # the car on the circle: another supercategory
    assert area[2]["BG"] > area[2]["Oth"]  # the square on the background


def test_category_without_supercategory_is_its_own():
    dataset, results = planted.ground_truth(), planted.detections()
    coco_eval = run_cocoeval(dataset, results, "bbox")
    images = image_matches(coco_eval)
    alone = coco_analyzer(coco_eval, images, dict.fromkeys(coco_eval.params.catIds))["per_category"][1]
    np.testing.assert_array_equal(alone["Sim"], alone["Loc"])  # no other category shares its (missing) group


def test_threshold_index_names_the_thresholds(evaluated):
    assert threshold_index(evaluated, 0.75) == 5
    with pytest.raises(ValueError, match=r"IoU 0.3: not a threshold of the evaluation; choose one of"):
        threshold_index(evaluated, 0.3)
