"""tools/eval_det.py, run as a script, against raw pycocotools."""

import contextlib
import importlib.util
import io
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.analysis import image_matches
from detection.error_analysis import tide_errors
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


def test_empty_results_give_zeros_with_a_warning_and_no_lightning(files, tmp_path):
    gt_path, _, _ = files
    output = tmp_path / "metrics.json"
    args = ["--annotations", gt_path, "--results", _write(tmp_path / "empty.json", []), "--output", output]
    # the tool run as a script; at exit it prints which training machinery it imported: pure COCO scoring needs none
    code = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print('imported:', [m for m in ('lightning',) if m in sys.modules]))\n"
        f"sys.argv = ['tools/eval_det.py', *{[str(a) for a in args]!r}]\n"
        "runpy.run_path('tools/eval_det.py', run_name='__main__')"
    )
    env = {**os.environ, "PYTHONPATH": str(loader.ROOT)}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=loader.ROOT, env=env)
    assert completed.returncode == 0, completed.stderr
    assert "no detections to evaluate" in completed.stderr
    assert set(json.loads(output.read_text())["metrics"].values()) == {0.0}
    assert completed.stdout.strip().splitlines()[-1] == "imported: []"


# ------------------------------------------------------------------ --report


@pytest.fixture
def planted_files(tmp_path):
    """The planted set of tests/detection/planted.py (every error type once, a crowd region) and its images."""
    import cv2

    from tests.detection import planted

    gt_path, results_path = planted.write(tmp_path, crowd=True)
    images = tmp_path / "images"
    images.mkdir()
    for image_id in planted.OBJECTS:
        cv2.imwrite(str(images / f"{image_id}.png"), np.full((planted.SIZE, planted.SIZE, 3), 60 * image_id, np.uint8))
    return gt_path, results_path, images


def _raw_cocoeval(gt_path, results, iou_type):
    """Raw pycocotools, evaluated, accumulated and summarized."""
    fields = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_path)
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes([{k: r[k] for k in fields} for r in results]), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def _at_score(coco_eval, k, t, score):
    """Precision and recall of category index k at IoU index t for the detections scoring >= score, counted."""
    true_positives = detections = num_gt = 0
    for entry in coco_eval.evalImgs[k * 4 * len(coco_eval.params.imgIds) : (k * 4 + 1) * len(coco_eval.params.imgIds)]:
        if entry is None:
            continue
        num_gt += int((entry["gtIgnore"] == 0).sum())
        for d, s in enumerate(entry["dtScores"]):
            if s >= score and not entry["dtIgnore"][t, d]:
                detections += 1
                true_positives += entry["dtMatches"][t, d] > 0
    return true_positives / detections, true_positives / num_gt


def _check_page(folder):
    """The page parses, shows only files of its folder, and loads nothing from the network."""
    from html.parser import HTMLParser

    class Links(HTMLParser):
        def __init__(self):
            super().__init__()
            self.links, self.ids, self.tags = [], set(), set()

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.tags.add(tag)
            self.ids.add(attrs.get("id"))
            self.links += [attrs[key] for key in ("src", "href") if key in attrs]

    text = (folder / "report.html").read_text()
    parser = Links()
    parser.feed(text)
    parser.close()
    assert "http://" not in text and "https://" not in text and not {"script", "link", "iframe"} & parser.tags
    images = [link for link in parser.links if not link.startswith("#")]
    assert images and all((folder / link).is_file() for link in images), images
    assert all(link[1:] in parser.ids for link in parser.links if link.startswith("#"))
    return text, images


def _run_report(*arguments):
    """eval_det in this process (the imports are paid once); returns the exit status."""
    main = loader.load_tool("eval_det").main
    with contextlib.redirect_stdout(io.StringIO()):
        return main([str(argument) for argument in arguments])


@pytest.mark.parametrize("iou_type", ["bbox", pytest.param("segm", marks=pytest.mark.slow)])
def test_report_numbers_equal_pycocotools(planted_files, tmp_path, iou_type):
    gt_path, results_path, images = planted_files
    folder = tmp_path / "report"
    status = _run_report("--annotations", gt_path, "--results", results_path, "--iou-type", iou_type,
                         "--report", folder, "--images", images, "--score-threshold", "0.5")  # fmt: skip
    assert status == 0
    metrics = json.loads((folder / "metrics.json").read_text())
    results = json.loads((tmp_path / "results.json").read_text())
    reference, report = _raw_cocoeval(gt_path, results, iou_type), metrics[iou_type]
    stats = [None if s < 0 else s for s in reference.stats]
    assert list(report["summary"].values()) == pytest.approx(stats)
    precision = reference.eval["precision"][:, :, :, :, -1]
    names = [c["name"] for c in reference.cocoGt.loadCats(reference.params.catIds)]
    for k, name in enumerate(names):
        row = report["per_category"][name]
        for key, value in (("AP", precision[:, :, k, 0]), ("AP50", precision[0, :, k, 0]),
                           ("AP75", precision[5, :, k, 0]), ("APs", precision[:, :, k, 1]),
                           ("APm", precision[:, :, k, 2]), ("APl", precision[:, :, k, 3])):  # fmt: skip
            expected = value[value > -1].mean() if (value > -1).any() else None  # nan is written as null
            assert row[key] == pytest.approx(expected), (name, key)
    aps = [row["AP"] for row in report["per_category"].values()]
    assert aps == sorted(aps, reverse=True)
    curves = report["pr_curves"]
    assert curves["recall"] == pytest.approx(reference.params.recThrs.tolist())
    for label, t, index in (("IoU=0.50", 0, 1), ("IoU=0.75", 5, 2), ("IoU=0.50:0.95", None, 0)):
        overall = curves[label]["overall"]
        assert overall["AP"] == pytest.approx(np.mean(overall["precision"])) == pytest.approx(stats[index])
        for k, name in enumerate(names):
            entry = curves[label]["per_category"][name]
            assert np.mean(entry["precision"]) == pytest.approx(entry["AP"])
            assert entry["AP"] == pytest.approx(report["per_category"][name][("AP", "AP50", "AP75")[index]])
            if t is not None:
                assert entry["scores"] == pytest.approx(reference.eval["scores"][t, :, k, 0, -1].tolist())
                point = _at_score(reference, k, t, 0.5)
                assert (entry["at_score"]["precision"], entry["at_score"]["recall"]) == pytest.approx(point)
    confusion = report["confusion"]
    counts = np.array(confusion["counts"])
    scored = [r for r in results if r["score"] >= 0.5]
    columns = counts[:, :-1].sum(axis=0) + np.eye(3, dtype=int)[1] * confusion["ignored_detections"]
    assert columns.tolist() == [sum(r["category_id"] == c for r in scored) for c in (1, 2, 3)]
    objects = [a["category_id"] for a in reference.cocoGt.anns.values() if not a["iscrowd"]]
    assert counts[:-1].sum(axis=1).tolist() == [objects.count(c) for c in (1, 2, 3)]
    for row in confusion["row_normalized"]:
        assert sum(row) == pytest.approx(1.0)
    assert report["tide"]["AP"] == pytest.approx(stats[1])
    tide = tide_errors(reference, image_matches(reference))  # tested against tidecv in tests/detection
    assert report["tide"] == {key: pytest.approx(value) for key, value in tide.items()}
    assert report["num_images"] == 3 and report["num_detections"] == len(results)
    analyzer = report["analyzer"]["overall"]
    assert (analyzer["C75"]["AP"], analyzer["C50"]["AP"], analyzer["FN"]["AP"]) == pytest.approx(
        (stats[2], stats[1], 1.0)
    )
    for name in names:
        if report["analyzer"]["per_category"][name] is not None:
            area = report["analyzer"]["per_category"][name]["C50"]["AP"]
            assert area == pytest.approx(report["per_category"][name]["AP50"])
    assert report["worst_images"][0]["image_id"] == 1 and report["worst_images"][0]["file_name"] == "1.png"
    text, shown = _check_page(folder)
    assert f"{iou_type}_worst_1.png" in shown and f"{iou_type}: TIDE error breakdown" in text


def test_report_without_images_says_so(planted_files, tmp_path):
    gt_path, results_path, _ = planted_files
    folder = tmp_path / "report"
    assert _run_report("--annotations", gt_path, "--results", results_path, "--report", folder) == 0
    text, shown = _check_page(folder)
    assert "Not drawn: no images folder was given" in text and not [s for s in shown if "worst" in s]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--confusion-iou", "0.3"], "confusion IoU 0.3: choose one of COCOeval's thresholds"),
        (["--images", "nowhere"], "nowhere: the images folder does not exist"),
        (["--score-threshold", "2"], "score threshold 2.0: choose a value in [0, 1]"),
    ],
)
def test_report_bad_options_exit_2(planted_files, tmp_path, arguments, message):
    gt_path, results_path, _ = planted_files
    main = loader.load_tool("eval_det").main
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        status = main(
            ["--annotations", gt_path, "--results", results_path, "--report", str(tmp_path / "r"), *arguments]
        )
    assert status == 2 and message in stderr.getvalue(), stderr.getvalue()
    assert not (tmp_path / "r").exists()


def test_bootstrap_adds_seeded_intervals_around_pycocotools(files, tmp_path, capsys):
    gt_path, results_path, results = files
    outputs = [tmp_path / "first.json", tmp_path / "again.json"]
    for output in outputs:  # in this process: a new one per run would mostly import torch
        status = loader.load_tool("eval_det").main(["--annotations", gt_path, "--results", results_path, "--iou-type",
                                                    "bbox", "segm", "--bootstrap", "50", "--seed", "3", "--output",
                                                    str(output)])  # fmt: skip
        assert status == 0, capsys.readouterr().err
        assert "segm 95% intervals (50 image resamplings, seed 3)" in capsys.readouterr().out
    report, again = (json.loads(output.read_text()) for output in outputs)
    assert report["bootstrap"] == again["bootstrap"]  # seeded: the same intervals
    assert report["bootstrap"]["draws"] == 50 and report["bootstrap"]["confidence"] == 0.95
    for iou_type in ("bbox", "segm"):
        expected = reference_stats(gt_path, results, iou_type)  # the point estimates stay pycocotools'
        assert [report["metrics"][f"{iou_type}_{name}"] for name in STAT_NAMES] == pytest.approx(expected, abs=1e-6)
        intervals = report["bootstrap"]["intervals"][iou_type]
        assert list(intervals["metrics"]) == [f"{iou_type}_{name}" for name in STAT_NAMES]
        assert set(intervals["per_category"]) == {"cat", "dog"}
        low, high = intervals["metrics"][f"{iou_type}_AP"]
        assert 0 <= low <= high <= 1
    assert report["bootstrap"]["intervals"]["bbox"]["metrics"]["bbox_APl"] == [None, None]  # never a large object


def test_bootstrap_needs_a_positive_number_of_draws(files, capsys):
    gt_path, results_path, _ = files
    with pytest.raises(SystemExit) as exit_:
        loader.load_tool("eval_det").main(["--annotations", gt_path, "--results", results_path, "--bootstrap", "0"])
    assert exit_.value.code == 2 and "'0'; give a positive number" in capsys.readouterr().err
