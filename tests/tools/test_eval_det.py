"""tools/eval_det.py, run as a script, against raw pycocotools."""

import contextlib
import importlib.util
import io
import json
import os
import stat
import subprocess

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tests.tools import loader

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IMAGES = {4: (80, 100), 9: (120, 90), 13: (100, 100)}  # id: (H, W); image 13 has no annotation
CATEGORIES = {2: "cat", 5: "dog"}
HAS_FASTER_COCO_EVAL = importlib.util.find_spec("faster_coco_eval") is not None
BACKENDS = [
    "pycocotools",
    pytest.param("faster_coco_eval", marks=pytest.mark.skipif(not HAS_FASTER_COCO_EVAL, reason="not installed")),
]


def _rectangle_rle(x, y, w, h, height, width):
    mask = np.zeros((height, width), np.uint8)
    mask[y : y + h, x : x + w] = 1
    rle = mask_util.encode(np.asfortranarray(mask[:, :, None]))[0]
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _write(path, payload):
    path.write_text(json.dumps(payload))
    return str(path)


@pytest.fixture
def files(tmp_path):
    """Ground truth (rectangles of small and medium size, one crowd region) and noisy results."""
    rng = np.random.default_rng(0)
    boxes = {4: [(2, 10, 5, 12, 20), (5, 40, 30, 50, 40)], 9: [(2, 5, 5, 40, 60), (5, 60, 80, 20, 25), (2, 0, 0, 8, 8)]}
    annotations, results = [], []
    for image_id, objects in boxes.items():
        height, width = IMAGES[image_id]
        for category_id, x, y, w, h in objects:
            polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                "segmentation": [polygon], "area": float(w * h), "bbox": [x, y, w, h], "iscrowd": 0,
            })  # fmt: skip
            dx, dy = rng.integers(-3, 4, 2).tolist()
            results.append({
                "image_id": image_id, "category_id": category_id, "score": float(rng.uniform(0.2, 1)),
                "bbox": [float(x + dx), float(y + dy), float(w), float(h)],
                "segmentation": _rectangle_rle(x + max(dx, 0), y + max(dy, 0), w, h, height, width),
            })  # fmt: skip
    crowd = {"counts": [100 * 20, 100 * 10, 100 * 70], "size": [100, 100]}  # a band of rows, column-major
    annotations.append({"id": 99, "image_id": 13, "category_id": 5, "segmentation": crowd, "area": 1000.0,
                        "bbox": [0, 20, 100, 10], "iscrowd": 1})  # fmt: skip
    results.append({"image_id": 13, "category_id": 2, "score": 0.3, "bbox": [1.0, 1.0, 9.0, 9.0],
                    "segmentation": _rectangle_rle(1, 1, 9, 9, 100, 100)})  # fmt: skip
    images = [{"id": i, "height": h, "width": w, "file_name": f"{i}.jpg"} for i, (h, w) in IMAGES.items()]
    categories = [{"id": i, "name": name} for i, name in CATEGORIES.items()]
    ground_truth = {"images": images, "annotations": annotations, "categories": categories}
    return _write(tmp_path / "gt.json", ground_truth), _write(tmp_path / "results.json", results), results


def run_tool(*args):
    return loader.run_tool("eval_det", *args)


def run_in_process(*args) -> subprocess.CompletedProcess:
    """`main(args)` in this process, as a shell sees the script: exit status, stdout, stderr. The script itself
    runs as a process in the other tests; in-process the bad inputs take a second instead of a minute."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = loader.load_tool("eval_det").main([str(arg) for arg in args])
        except SystemExit as exit_:  # argparse's usage errors
            status = exit_.code
    return subprocess.CompletedProcess(args, status, stdout.getvalue(), stderr.getvalue())


def reference_stats(gt_path, results, iou_type):
    fields = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    results = [{key: result[key] for key in fields} for result in results]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_path)
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [None if s < 0 else float(s) for s in coco_eval.stats]


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_like_pycocotools(files, tmp_path, backend):
    gt_path, results_path, results = files
    output = tmp_path / "metrics.json"
    completed = run_tool("--annotations", gt_path, "--results", results_path, "--iou-type", "bbox", "segm",
                         "--backend", backend, "--output", output)  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.count("Average Precision") == completed.stdout.count("Average Recall") == 12  # 6 + 6
    assert "Per-category segm AP:" in completed.stdout
    assert "dog" in completed.stdout
    report = json.loads(output.read_text())
    assert report["backend"] == backend and set(report["per_category"]["bbox"]) == {"cat", "dog"}
    for iou_type in ("bbox", "segm"):
        expected = reference_stats(gt_path, results, iou_type)
        assert [report["metrics"][f"{iou_type}_{name}"] for name in STAT_NAMES] == pytest.approx(expected, abs=1e-6)
    assert report["metrics"]["bbox_APl"] is None  # nan (no large object) is written as null
    assert sorted(os.listdir(tmp_path)) == ["gt.json", "metrics.json", "results.json"]  # no temporary file left
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(output.stat().st_mode) == 0o666 & ~umask  # a normal file, not mkstemp's 0600


def _corrupt(tmp_path, gt_path, results, case):
    """Return the arguments of a bad invocation and a text the error must contain."""
    bad = tmp_path / "bad.json"
    if case == "missing annotations":
        return ["--annotations", tmp_path / "nope.json"], "nope.json: no such file"
    if case == "missing results":
        return ["--results", tmp_path / "nope.json"], "nope.json: no such file"
    if case == "malformed results":
        bad.write_text('[{"image_id": 4,')
        return ["--results", bad], "bad.json: malformed JSON"
    if case == "malformed annotations":
        bad.write_text("{images")
        return ["--annotations", bad], "bad.json: malformed JSON"
    if case == "not annotations":
        return ["--annotations", _write(bad, [1, 2])], "bad.json: not a COCO instances file"
    if case == "unknown image":
        return ["--results", _write(bad, [*results, {**results[0], "image_id": 777}])], "image_id 777"
    if case == "unknown category":
        return ["--results", _write(bad, [{**results[0], "category_id": 3}])], "category_id 3, not among"
    if case == "missing segmentation":
        without_mask = {key: value for key, value in results[0].items() if key != "segmentation"}
        return ["--results", _write(bad, [without_mask])], "lacks segmentation"
    if case == "wrong mask size":
        return ["--results", _write(bad, [{**results[0], "segmentation": results[-1]["segmentation"]}])], "size"
    assert case == "missing output directory"
    return ["--output", tmp_path / "nowhere" / "metrics.json"], "the output directory does not exist"


BAD_INPUTS = [
    "missing annotations", "missing results", "malformed results", "malformed annotations", "not annotations",
    "unknown image", "unknown category", "missing segmentation", "wrong mask size", "missing output directory",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_without_output(files, tmp_path, case):
    gt_path, results_path, results = files
    arguments, message = _corrupt(tmp_path, gt_path, results, case)
    defaults = {"--annotations": gt_path, "--results": results_path, "--output": tmp_path / "metrics.json"}
    defaults.update(dict(zip(arguments[::2], arguments[1::2], strict=True)))
    completed = run_in_process(*[str(v) for pair in defaults.items() for v in pair], "--iou-type", "bbox", "segm")
    assert completed.returncode == 2
    assert completed.stderr.startswith("eval_det: error: ") and message in completed.stderr, completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    assert "Traceback" not in completed.stderr and not (tmp_path / "metrics.json").exists()
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_unknown_backend_is_a_usage_error(files):
    gt_path, results_path, _ = files
    completed = run_in_process("--annotations", gt_path, "--results", results_path, "--backend", "detectron2")
    assert completed.returncode == 2 and "invalid choice: 'detectron2'" in completed.stderr


def test_empty_results_give_zeros_with_a_warning(files, tmp_path):
    gt_path, _, _ = files
    output = tmp_path / "metrics.json"
    completed = run_tool("--annotations", gt_path, "--results", _write(tmp_path / "empty.json", []), "--output", output)
    assert completed.returncode == 0, completed.stderr
    assert "no detections to evaluate" in completed.stderr
    assert set(json.loads(output.read_text())["metrics"].values()) == {0.0}
