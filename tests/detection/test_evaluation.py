"""COCOEvaluator against raw pycocotools on a small fixture (detectron2 tests/data/test_coco_evaluation.py)."""

import contextlib
import importlib.util
import io
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.evaluation import (
    STAT_NAMES,
    COCOEvaluator,
    encode_masks,
    evaluate_results,
    resolve_backend,
    to_coco_results,
)

# (H, W) of 7 images with non-contiguous ids
IMAGE_SIZES = {11: (120, 160), 12: (200, 200), 14: (96, 128), 15: (150, 110), 17: (180, 240), 20: (64, 64),
               23: (160, 120)}  # fmt: skip
EMPTY_IMAGE_ID = 20  # an image without annotations
CATEGORIES = {1: "circle", 3: "square", 7: "triangle"}  # non-contiguous ids, as in COCO
LABEL_TO_CATEGORY_ID = {1: 1, 2: 3, 3: 7}  # contiguous model labels
CATEGORY_ID_TO_LABEL = {c: label for label, c in LABEL_TO_CATEGORY_ID.items()}
SIDES = {"small": (10, 26), "medium": (40, 80), "large": (100, 118)}  # areas < 32^2, 32^2..96^2, > 96^2
HAS_FASTER_COCO_EVAL = importlib.util.find_spec("faster_coco_eval") is not None
needs_faster_coco_eval = pytest.mark.skipif(not HAS_FASTER_COCO_EVAL, reason="faster-coco-eval is not installed")
BACKENDS = ["pycocotools"] + ["faster_coco_eval"] * HAS_FASTER_COCO_EVAL
# pycocotools' decode with numpy 2, in the fixture's rasterisation
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")


def _polygon(category_id, x, y, side, rng):
    if category_id == 3:  # square
        return [x, y, x + side, y, x + side, y + side, x, y + side]
    if category_id == 7:  # triangle
        return [x + side / 2, y, x + side, y + side, x, y + side]
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False) + rng.uniform(0, 0.3)
    cx, cy, r = x + side / 2, y + side / 2, side / 2
    return np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).ravel().tolist()


def _rasterize(polygon, height, width):
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects([polygon], height, width)))


def _uncompressed_rle(mask):
    """COCO's crowd format: column-major run lengths, starting with a run of zeros."""
    flat = mask.ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]]))
    counts = runs.tolist() if flat[0] == 0 else [0, *runs.tolist()]
    return {"counts": counts, "size": list(mask.shape)}


def _box_of(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def _place(side, height, width, rng):
    return float(rng.uniform(0, width - side - 1)), float(rng.uniform(0, height - side - 1))


def _objects(image_id, rng):
    """(category id, size class, iscrowd) of each object of an image; every size and category appears."""
    if image_id == EMPTY_IMAGE_ID:
        return []
    height, width = IMAGE_SIZES[image_id]
    sizes = ["small", "medium"] + (["large"] if min(height, width) > 120 else [])
    objects = [(int(rng.choice(list(CATEGORIES))), size, 0) for size in sizes for _ in range(rng.integers(1, 3))]
    if image_id in (12, 17):
        objects.append((3, "medium", 1))
    return objects


def make_coco_fixture(directory, seed=0):
    """Write a ground-truth JSON and return its path and seeded noisy detections (with binary masks)."""
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []
    for image_id, (height, width) in IMAGE_SIZES.items():
        images.append({"id": image_id, "height": height, "width": width, "file_name": f"{image_id}.png"})
        for category_id, size, iscrowd in _objects(image_id, rng):
            side = float(rng.uniform(*SIDES[size]))
            polygon = _polygon(category_id, *_place(side, height, width, rng), side, rng)
            mask = _rasterize(polygon, height, width)
            annotation = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category_id,
                "segmentation": _uncompressed_rle(mask) if iscrowd else [polygon],
                "area": float(mask.sum()),
                "bbox": _box_of(mask),
                "iscrowd": iscrowd,
            }
            annotations.append(annotation)
            detections += _noisy_detections(annotation, mask, height, width, rng)
        detections += [_false_positive(image_id, height, width, rng) for _ in range(rng.integers(0, 3))]
    path = os.path.join(directory, "instances.json")
    categories = [{"id": i, "name": n, "supercategory": "shape"} for i, n in CATEGORIES.items()]
    with open(path, "w") as file:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, file)
    return path, detections


def _noisy_detections(annotation, mask, height, width, rng):
    if rng.random() > 0.85:  # missed
        return []
    shift = np.round(rng.normal(0, 0.08 * math.sqrt(annotation["area"]), 2)).astype(int)
    moved = np.roll(mask, tuple(shift[::-1]), axis=(0, 1))
    if not moved.any():
        return []
    category_id = annotation["category_id"] if rng.random() < 0.9 else int(rng.choice(list(CATEGORIES)))
    detection = _detection(annotation["image_id"], category_id, moved, float(rng.uniform(0.3, 1.0)))
    return [detection] + ([_detection(annotation["image_id"], category_id, mask, 0.2)] if rng.random() < 0.3 else [])


def _false_positive(image_id, height, width, rng):
    side = float(rng.uniform(8, 50))
    x, y = _place(side, height, width, rng)
    mask = _rasterize([x, y, x + side, y, x + side, y + side, x, y + side], height, width)
    return _detection(image_id, int(rng.choice(list(CATEGORIES))), mask, float(rng.uniform(0.0, 0.6)))


def _detection(image_id, category_id, mask, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": _box_of(mask), "score": score, "mask": mask}


def to_predictions(detections, image_ids, seed=0):
    """torchvision-style outputs (contiguous labels, XYXY boxes, (N, 1, H, W) probabilities) for ``image_ids``."""
    rng = np.random.default_rng(seed)
    predictions = []
    for image_id in image_ids:
        mine = [d for d in detections if d["image_id"] == image_id]
        height, width = IMAGE_SIZES[image_id]
        xywh = torch.tensor([d["bbox"] for d in mine], dtype=torch.float64).reshape(-1, 4)
        binary = np.stack([d["mask"] for d in mine]) if mine else np.zeros((0, height, width), np.uint8)
        # Foreground probabilities in [0.6, 1], background in [0, 0.4]: thresholding at 0.5 gives the binary masks.
        probabilities = np.where(binary, rng.uniform(0.6, 1.0, binary.shape), rng.uniform(0, 0.4, binary.shape))
        predictions.append(
            {
                "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                "scores": torch.tensor([d["score"] for d in mine], dtype=torch.float64),
                "labels": torch.tensor([CATEGORY_ID_TO_LABEL[d["category_id"]] for d in mine], dtype=torch.int64),
                "masks": torch.from_numpy(probabilities).float()[:, None],
            }
        )
    return predictions


def reference_stats(gt_path, detections, iou_type, image_ids=None):
    """COCOeval.stats and the precision array of pycocotools, run by hand, on every image (or `image_ids`)."""
    keep = ("image_id", "category_id", "score") + (("bbox",) if iou_type == "bbox" else ())
    results = [{k: d[k] for k in keep} for d in detections]
    if iou_type == "segm":  # one RLE per mask, and no box: the mask area decides small/medium/large
        for result, d in zip(results, detections, strict=True):
            rle = mask_util.encode(np.asfortranarray(d["mask"][:, :, None]))[0]
            result["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_path)
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return np.where(coco_eval.stats < 0, np.nan, coco_eval.stats), coco_eval.eval["precision"]


def stats_of(metrics, iou_type):
    return np.array([metrics[f"{iou_type}_{name}"] for name in STAT_NAMES])


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return make_coco_fixture(str(tmp_path_factory.mktemp("coco")))


def evaluate(gt_path, predictions, image_ids, backend="pycocotools"):
    evaluator = COCOEvaluator(
        annotations=gt_path, iou_types=("bbox", "segm"), label_to_category_id=LABEL_TO_CATEGORY_ID, backend=backend
    )
    for start in range(0, len(image_ids), 3):  # batches of 3
        evaluator.update(predictions[start : start + 3], image_ids[start : start + 3])
    return evaluator.compute(), evaluator


@pytest.mark.parametrize("backend", ["pycocotools", pytest.param("faster_coco_eval", marks=needs_faster_coco_eval)])
def test_evaluator_matches_raw_pycocotools(fixture, backend):
    gt_path, detections = fixture
    image_ids = list(IMAGE_SIZES)
    metrics, _ = evaluate(gt_path, to_predictions(detections, image_ids), image_ids, backend)
    assert len(metrics) == 24
    for iou_type in ("bbox", "segm"):
        expected, _ = reference_stats(gt_path, detections, iou_type)
        assert not np.isnan(expected).any() and 0.2 < expected[0] < 0.9  # the fixture exercises every stat
        tolerance = 1e-12 if backend == "pycocotools" else 1e-6
        np.testing.assert_allclose(stats_of(metrics, iou_type), expected, rtol=0, atol=tolerance)


@needs_faster_coco_eval
def test_backends_agree(fixture):
    gt_path, detections = fixture
    image_ids = list(IMAGE_SIZES)
    predictions = to_predictions(detections, image_ids)
    slow, slow_evaluator = evaluate(gt_path, predictions, image_ids, "pycocotools")
    fast, fast_evaluator = evaluate(gt_path, predictions, image_ids, "faster_coco_eval")
    assert slow.keys() == fast.keys()
    np.testing.assert_allclose(list(fast.values()), list(slow.values()), rtol=0, atol=1e-6)
    for iou_type in ("bbox", "segm"):
        slow_aps, fast_aps = slow_evaluator.per_category_ap(iou_type), fast_evaluator.per_category_ap(iou_type)
        assert list(slow_aps) == list(CATEGORIES.values())
        np.testing.assert_allclose(list(fast_aps.values()), list(slow_aps.values()), rtol=0, atol=1e-6)


def test_per_category_ap_matches_precision_array(fixture):
    gt_path, detections = fixture
    image_ids = list(IMAGE_SIZES)
    _, evaluator = evaluate(gt_path, to_predictions(detections, image_ids), image_ids)
    _, precision = reference_stats(gt_path, detections, "bbox")
    for index, name in enumerate(CATEGORIES.values()):  # categories in id order
        p = precision[:, :, index, 0, -1]
        assert evaluator.per_category_ap("bbox")[name] == pytest.approx(p[p > -1].mean(), abs=1e-12)
    with pytest.raises(ValueError, match="keypoints"):
        evaluator.per_category_ap("keypoints")


def test_verbose_evaluation_prints_summary_and_per_category_table(fixture, capsys):
    gt_path, detections = fixture
    image_ids = list(IMAGE_SIZES)
    results = to_coco_results(to_predictions(detections, image_ids), image_ids, LABEL_TO_CATEGORY_ID, ("bbox",))
    _, per_category = evaluate_results(gt_path, results, "bbox", "pycocotools", verbose=True)
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in printed
    table = printed[printed.index("Per-category bbox AP:") :].splitlines()
    assert [line.split()[0] for line in table[2:5]] == list(CATEGORIES.values())
    assert [float(line.split()[1]) for line in table[2:5]] == pytest.approx(list(per_category.values()), abs=5e-4)


def test_identity_mapping_rejects_contiguous_labels(fixture):
    gt_path, detections = fixture
    evaluator = COCOEvaluator(annotations=gt_path)  # labels 1, 2, 3 taken as category ids; 2 is not one
    predictions = to_predictions(detections, [11, 12])
    with pytest.raises(ValueError, match=r"category ids \[2\] are not among .*\[1, 3, 7\].*label_to_category_id"):
        evaluator.update(predictions, [11, 12])


def test_targets_with_tensor_image_ids_are_accepted(fixture):
    gt_path, detections = fixture
    image_ids = list(IMAGE_SIZES)
    predictions = to_predictions(detections, image_ids)
    targets = [{"image_id": torch.tensor(i), "boxes": torch.zeros(0, 4)} for i in image_ids]
    from_ids, _ = evaluate(gt_path, predictions, image_ids)
    from_targets, _ = evaluate(gt_path, predictions, targets)
    assert from_targets == pytest.approx(from_ids, nan_ok=True)


def test_no_predictions_gives_zeros_and_warns(fixture):
    gt_path, _ = fixture
    image_ids = list(IMAGE_SIZES)
    empty = to_predictions([], image_ids)
    for backend in BACKENDS:
        with pytest.warns(UserWarning, match="no detections"):
            metrics, evaluator = evaluate(gt_path, empty, image_ids, backend)
        assert metrics == {f"{t}_{name}": 0.0 for t in ("bbox", "segm") for name in STAT_NAMES}
        assert evaluator.per_category_ap("segm") == dict.fromkeys(CATEGORIES.values(), 0.0)


def test_image_with_zero_predictions_counts_as_missed(fixture):
    gt_path, detections = fixture
    image_ids = list(IMAGE_SIZES)
    kept = [d for d in detections if d["image_id"] != 12]  # image 12 has objects but no detection
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every image got an update: no warning
        metrics, _ = evaluate(gt_path, to_predictions(kept, image_ids), image_ids)
    for iou_type in ("bbox", "segm"):
        expected, _ = reference_stats(gt_path, kept, iou_type)
        np.testing.assert_allclose(stats_of(metrics, iou_type), expected, rtol=0, atol=1e-12)
    all_metrics, _ = evaluate(gt_path, to_predictions(detections, image_ids), image_ids)
    assert metrics["bbox_AR100"] < all_metrics["bbox_AR100"]  # its objects count as missed, not dropped


@pytest.mark.parametrize("backend", ["pycocotools", pytest.param("faster_coco_eval", marks=needs_faster_coco_eval)])
def test_images_never_seen_are_left_out_not_missed(fixture, backend, capsys):
    # limit_val_batches: image 12 (which has objects) is never given to the evaluator; it must not count as
    # an image whose objects were all missed, which would understate AP and AR.
    gt_path, detections = fixture
    image_ids = list(IMAGE_SIZES)
    others = [i for i in image_ids if i != 12]
    seen = [d for d in detections if d["image_id"] != 12]
    with pytest.warns(UserWarning, match="scoring 6 of the 7 ground-truth images"):
        partial, _ = evaluate(gt_path, to_predictions(seen, others), others, backend)
    assert "6 of 7 images" in capsys.readouterr().out  # the printed summary says so
    for iou_type in ("bbox", "segm"):
        expected, _ = reference_stats(gt_path, seen, iou_type, image_ids=others)
        np.testing.assert_allclose(stats_of(partial, iou_type), expected, rtol=0, atol=1e-12)
    missed, _ = reference_stats(gt_path, seen, "bbox")  # what counting image 12 as missed would give
    assert partial["bbox_AR100"] > missed[8]


def test_reset_reuses_the_ground_truth_with_the_same_results(fixture):
    gt_path, detections = fixture
    image_ids = list(IMAGE_SIZES)
    first, evaluator = evaluate(gt_path, to_predictions(detections, image_ids), image_ids)
    coco_gt = evaluator.coco_gt
    evaluator.reset()
    evaluator.update(to_predictions(detections, image_ids), image_ids)
    assert evaluator.compute() == pytest.approx(first, nan_ok=True) and evaluator.coco_gt is coco_gt


def test_duplicate_image_ids_are_counted_once(fixture):
    gt_path, detections = fixture
    image_ids = list(IMAGE_SIZES)
    predictions = to_predictions(detections, image_ids)
    once, _ = evaluate(gt_path, predictions, image_ids)
    # DistributedSampler padding repeats the first images; the first copy of an image wins.
    repeated_predictions = [*predictions, _shifted(predictions[0]), predictions[1]]
    twice, _ = evaluate(gt_path, repeated_predictions, image_ids + image_ids[:2])
    assert twice == pytest.approx(once, nan_ok=True)


def _shifted(prediction):
    return {**prediction, "boxes": prediction["boxes"] + 7.0, "masks": prediction["masks"].roll(7, dims=-1)}


@pytest.mark.parametrize("layout", ["probabilities", "bool", "uint8"])
def test_mask_rle_round_trips(layout):
    rng = np.random.default_rng(1)
    binary = rng.random((3, 37, 53)) > 0.6
    masks = {
        "probabilities": torch.from_numpy(np.where(binary, 0.9, 0.1)).float()[:, None],  # (N, 1, H, W)
        "bool": torch.from_numpy(binary),
        "uint8": torch.from_numpy(binary.astype(np.uint8)),
    }[layout]
    prediction = {"boxes": torch.zeros(3, 4), "scores": torch.ones(3), "labels": torch.ones(3, dtype=torch.int64)}
    results = to_coco_results([{**prediction, "masks": masks}], [5], iou_types=("segm",))
    json.dumps(results)  # counts are str
    rles = [{**r["segmentation"], "counts": r["segmentation"]["counts"].encode()} for r in results]
    np.testing.assert_array_equal(mask_util.decode(rles).transpose(2, 0, 1), binary)
    assert encode_masks(np.zeros((0, 37, 53), np.uint8)) == []


def test_to_coco_results_converts_boxes_and_labels():
    prediction = {
        "boxes": torch.tensor([[10.0, 20.0, 40.0, 25.0], [0.0, 0.0, 1.5, 2.5]]),
        "scores": torch.tensor([0.5, 0.25]),
        "labels": torch.tensor([2, 1]),
    }
    results = to_coco_results([prediction], [42], {1: 1, 2: 3})
    assert results == [
        {"image_id": 42, "category_id": 3, "bbox": [10.0, 20.0, 30.0, 5.0], "score": 0.5},
        {"image_id": 42, "category_id": 1, "bbox": [0.0, 0.0, 1.5, 2.5], "score": 0.25},
    ]
    with pytest.raises(ValueError, match=r"label 2 is not in label_to_category_id \(labels: \[1\]\)"):
        to_coco_results([prediction], [42], {1: 1})
    with pytest.raises(ValueError, match="'segm' needs 'masks'"):
        to_coco_results([prediction], [42], iou_types=("segm",))


def test_bad_arguments_are_named(fixture):
    gt_path, detections = fixture
    with pytest.raises(ValueError, match=r"backend='coco'; choose one of 'auto', 'pycocotools', 'faster_coco_eval'"):
        COCOEvaluator(annotations=gt_path, backend="coco")
    with pytest.raises(ValueError, match="keypoints"):
        COCOEvaluator(annotations=gt_path, iou_types=("keypoints",))
    assert resolve_backend("auto") == BACKENDS[-1]  # faster_coco_eval when installed
    evaluator = COCOEvaluator(annotations=gt_path, iou_types=("segm",), label_to_category_id=LABEL_TO_CATEGORY_ID)
    with pytest.raises(ValueError, match="image_id 99 is not an image"):
        evaluator.update(to_predictions([], [11]), [99])
    small_masks = {**to_predictions(detections, [11])[0]}
    small_masks["masks"] = small_masks["masks"][..., :50]
    with pytest.raises(ValueError, match=r"image 11: masks are \(120, 50\), the image is \(120, 160\)"):
        evaluator.update([small_masks], [11])


def test_evaluate_results_accepts_a_coco_object_of_either_backend(fixture):
    gt_path, detections = fixture
    image_ids = list(IMAGE_SIZES)
    results = to_coco_results(to_predictions(detections, image_ids), image_ids, LABEL_TO_CATEGORY_ID, ("segm",))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_path)
    expected, _ = reference_stats(gt_path, detections, "segm")
    for backend in BACKENDS:
        stats, _ = evaluate_results(coco_gt, results, "segm", backend, verbose=False)
        np.testing.assert_allclose(stats_of(stats, "segm"), expected, rtol=0, atol=1e-6)
    assert "counts" in results[0]["segmentation"] and "area" not in results[0]  # results are left unchanged


def _distributed_worker(rank, init_file, gt_path, predictions_by_rank, ids_by_rank, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metrics, _ = evaluate(gt_path, predictions_by_rank[rank], ids_by_rank[rank], "auto")
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
            json.dump(metrics, file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each importing torch
def test_distributed_gather_matches_single_process(fixture, tmp_path):
    gt_path, detections = fixture
    image_ids = list(IMAGE_SIZES)
    predictions = to_predictions(detections, image_ids)
    # DistributedSampler(shuffle=False) over 7 images on 2 ranks: indices 0..6 then 0 again as padding.
    padded = [*range(len(image_ids)), 0]
    ids_by_rank = [[image_ids[i] for i in padded[rank::2]] for rank in range(2)]
    predictions_by_rank = [[predictions[i] for i in padded[rank::2]] for rank in range(2)]
    predictions_by_rank[1][-1] = _shifted(predictions[0])  # a different padding copy: rank 0's first copy wins
    args = (str(tmp_path / "init"), gt_path, predictions_by_rank, ids_by_rank, str(tmp_path))
    mp.spawn(_distributed_worker, args=args, nprocs=2, join=True)

    expected, _ = evaluate(gt_path, predictions, image_ids, "auto")
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as file:
            assert json.load(file) == pytest.approx(expected, nan_ok=True)
