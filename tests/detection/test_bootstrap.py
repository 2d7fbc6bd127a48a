"""detection.bootstrap against pycocotools: the unweighted numbers bit for bit, a weighted draw equal to COCOeval
run on the resampled image list, and the paired intervals."""

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.bootstrap import (
    Matches,
    WeightedAccumulator,
    bootstrap,
    image_draws,
    match_once,
    paired_bootstrap,
    percentile_interval,
    sorted_matches,
)
from tests.detection.test_evaluation import CATEGORIES, EMPTY_IMAGE_ID, make_coco_fixture

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")


def _results(detections, iou_type):
    keep = ("image_id", "category_id", "score") + (("bbox",) if iou_type == "bbox" else ())
    results = [{key: d[key] for key in keep} for d in detections]
    if iou_type == "segm":
        for result, d in zip(results, detections, strict=True):
            rle = mask_util.encode(np.asfortranarray(d["mask"][:, :, None]))[0]
            result["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    return results


def _cocoeval(dataset, results, iou_type, accumulate=True):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(dataset)
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iou_type)
        coco_eval.evaluate()
        if accumulate:
            coco_eval.accumulate()
            coco_eval.summarize()
    return coco_eval


def _stats(coco_eval):
    return np.where(coco_eval.stats < 0, np.nan, coco_eval.stats)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    """The evaluator tests' fixture: crowd regions (uncompressed RLE), an image without objects, three sizes,
    duplicates and class confusions; plus a fourth category that has no ground truth."""
    gt_path, detections = make_coco_fixture(str(tmp_path_factory.mktemp("coco")), seed=3)
    with open(gt_path) as file:
        dataset = json.load(file)
    dataset["categories"].append({"id": 9, "name": "hexagon", "supercategory": "shape"})
    extra = {**detections[0], "category_id": 9, "score": 0.95}  # a false positive of a category without objects
    empty = {**detections[1], "image_id": EMPTY_IMAGE_ID, "mask": np.zeros((64, 64), np.uint8)}
    empty["mask"][5:20, 5:30] = 1  # a false positive on the image without objects
    empty["bbox"] = [5.0, 5.0, 25.0, 15.0]
    return dataset, [*detections, extra, empty]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("source", ["match_once", "evalImgs"])
def test_unweighted_equals_pycocotools_bit_for_bit(fixture, iou_type, source):
    dataset, detections = fixture
    results = _results(detections, iou_type)
    reference = _cocoeval(dataset, results, iou_type)
    matches = match_once(_coco(dataset), results, iou_type) if source == "match_once" else reference
    accumulator = WeightedAccumulator(matches)
    ones = np.ones(accumulator.num_images, np.int64)
    stats, per_category = accumulator.summarize(ones)
    assert np.array_equal(stats, _stats(reference), equal_nan=True)
    assert not np.isnan(stats[:3]).any() and 0.2 < stats[0] < 0.9
    precision, recall = accumulator.accumulate(ones)
    assert np.array_equal(precision, reference.eval["precision"][..., -1])
    assert np.array_equal(recall, reference.eval["recall"])
    # per category as detection.evaluation reports it; the category without ground truth is nan
    expected = []
    for k in range(len(reference.params.catIds)):
        values = reference.eval["precision"][:, :, k, 0, -1]
        values = values[values > -1]
        expected.append(values.mean() if values.size else np.nan)
    assert np.array_equal(per_category, expected, equal_nan=True) and np.isnan(per_category[-1])


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_weighted_draw_equals_cocoeval_on_the_resampled_images(fixture, iou_type):
    dataset, detections = fixture
    results = _results(detections, iou_type)
    accumulator = WeightedAccumulator(match_once(_coco(dataset), results, iou_type))
    image_ids = accumulator.params.imgIds
    for weights in image_draws(len(image_ids), 3, seed=11):
        images, annotations, resampled = [], [], []
        for image_id, count in zip(image_ids, weights.tolist(), strict=True):
            for _ in range(count):  # each copy a new image, with its objects and detections
                new_id = len(images) + 1
                images.append({**next(i for i in dataset["images"] if i["id"] == image_id), "id": new_id})
                objects = [a for a in dataset["annotations"] if a["image_id"] == image_id]
                annotations += [
                    {**a, "id": len(annotations) + 1 + j, "image_id": new_id} for j, a in enumerate(objects)
                ]
                resampled += [{**r, "image_id": new_id} for r in results if r["image_id"] == image_id]
        copy_dataset = {"images": images, "annotations": annotations, "categories": dataset["categories"]}
        expected = _stats(_cocoeval(copy_dataset, resampled, iou_type))
        stats, _ = accumulator.summarize(weights)
        np.testing.assert_allclose(stats, expected, rtol=0, atol=1e-12)


def test_sorted_matches_are_in_accumulate_order(fixture):
    dataset, detections = fixture
    coco_eval = _cocoeval(dataset, _results(detections, "bbox"), "bbox", accumulate=False)
    table = sorted_matches(coco_eval.evalImgs, coco_eval.params)
    assert len(table) == len(CATEGORIES) + 1 and all(len(row) == 4 for row in table)
    matches = table[0][0]
    assert (np.diff(matches.scores) <= 0).all()
    assert matches.matched.shape == matches.ignored.shape == (10, matches.scores.size)
    assert matches.ground_truths.sum() == sum(
        1 for a in dataset["annotations"] if a["category_id"] == coco_eval.params.catIds[0] and not a["iscrowd"]
    )
    assert Matches.from_cocoeval(coco_eval).table[0][0].scores.tolist() == matches.scores.tolist()


def test_bootstrap_is_seeded_and_brackets_the_draws(fixture):
    dataset, detections = fixture
    matches = match_once(_coco(dataset), _results(detections, "bbox"), "bbox")
    first, again, other = bootstrap(matches, 50, seed=1), bootstrap(matches, 50, seed=1), bootstrap(matches, 50, 2)
    assert np.array_equal(first.draws, again.draws, equal_nan=True)
    assert not np.array_equal(first.draws, other.draws, equal_nan=True)
    assert first.draws.shape == (50, 12) and first.per_category_draws.shape == (50, len(CATEGORIES) + 1)
    low, high = first.interval
    assert (low <= high).all() and (high - low)[0] > 0
    assert np.array_equal(first.interval, np.nanpercentile(first.draws, [2.5, 97.5], axis=0), equal_nan=True)


def test_paired_bootstrap_of_a_set_with_itself_is_zero(fixture):
    dataset, detections = fixture
    results = _results(detections, "bbox")
    a, b = (match_once(_coco(dataset), results, "bbox") for _ in range(2))
    paired = paired_bootstrap(a, b, 50, seed=0)
    assert np.array_equal(paired.interval[:, :3], np.zeros((2, 3)))
    assert (np.nan_to_num(paired.interval) == 0).all() and (np.nan_to_num(paired.b_better) == 0).all()
    assert (np.nan_to_num(paired.difference) == 0).all()


def test_removing_true_positives_gives_an_interval_below_zero(fixture):
    dataset, detections = fixture
    results = _results(detections, "bbox")
    reference = _cocoeval(dataset, results, "bbox", accumulate=False)
    matched = {dt_id for e in reference.evalImgs if e is not None
               for dt_id, gt_id in zip(e["dtIds"], e["dtMatches"][0], strict=True) if gt_id}  # fmt: skip
    # loadRes numbers the results from 1 in order: drop half of those matched at IoU 0.5
    dropped = set(sorted(matched)[::2])
    worse = [r for index, r in enumerate(results, 1) if index not in dropped]
    paired = paired_bootstrap(match_once(_coco(dataset), results, "bbox"),
                              match_once(_coco(dataset), worse, "bbox"), 50, seed=0)  # fmt: skip
    assert paired.difference[0] < 0 and paired.interval[1, 0] < 0 and paired.b_better[0] == 0
    np.testing.assert_allclose(paired.b.stats, _stats(_cocoeval(dataset, worse, "bbox")), rtol=0, atol=1e-12)


def test_bad_inputs_are_named(fixture):
    dataset, detections = fixture
    matches = match_once(_coco(dataset), _results(detections, "bbox"), "bbox")
    accumulator = WeightedAccumulator(matches)
    with pytest.raises(ValueError, match=r"weights of shape \(3,\)"):
        accumulator.summarize(np.ones(3))
    with pytest.raises(ValueError, match="no detections"):
        match_once(_coco(dataset), [], "bbox")
    with pytest.raises(ValueError, match=r"confidence=1\.5"):
        percentile_interval(np.zeros((4, 2)), 1.5)
    with pytest.raises(ValueError, match="num_draws=0"):
        image_draws(5, 0)
    other = {**dataset, "images": dataset["images"][:-1]}
    other["annotations"] = [a for a in dataset["annotations"] if a["image_id"] != dataset["images"][-1]["id"]]
    fewer = [d for d in detections if d["image_id"] != dataset["images"][-1]["id"]]
    with pytest.raises(ValueError, match="different images"):
        paired_bootstrap(matches, match_once(_coco(other), _results(fewer, "bbox"), "bbox"), 5)


def test_image_draws_resample_with_replacement():
    draws = image_draws(7, 40, seed=3)
    assert draws.shape == (40, 7) and (draws.sum(1) == 7).all() and (draws >= 0).all()
    assert (draws == 0).any() and (draws > 1).any()
    assert np.array_equal(draws, image_draws(7, 40, seed=3))


def test_percentile_interval_ignores_nan():
    samples = np.array([[1.0, np.nan], [2.0, np.nan], [3.0, np.nan]])
    interval = percentile_interval(samples, 0.5)
    assert interval[:, 0].tolist() == [1.5, 2.5] and np.isnan(interval[:, 1]).all()


def _coco(dataset):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(dataset)
        coco.createIndex()
    return coco
