"""tools/compare_det.py: a file against itself, against a copy missing true positives, and bad input."""

import json

import pytest

from tests.tools import loader
from tests.tools.test_eval_det import STAT_NAMES, _write, reference_stats
from tests.tools.test_eval_det import files as files  # the fixture


def compare(*args):
    """Runs the tool in this process (a new process per test would mostly import torch)."""
    return loader.load_tool("compare_det").main([str(arg) for arg in args])


def test_a_file_against_itself_is_zero(files, tmp_path, capsys):
    gt_path, results_path, _ = files
    output = tmp_path / "comparison.json"
    assert compare("--annotations", gt_path, results_path, results_path, "--iou-type", "bbox", "segm",
                   "--bootstrap", "50", "--output", output) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "bbox_AP75" in printed and "P(B>A)" in printed and "category (AP)" in printed
    report = json.loads(output.read_text())
    for iou_type in ("bbox", "segm"):
        rows = report[iou_type]["metrics"]
        assert list(rows) == [f"{iou_type}_{name}" for name in STAT_NAMES]
        ap = rows[f"{iou_type}_AP"]
        assert ap["a"] == ap["b"] and ap["difference"] == 0 and ap["interval"] == [0, 0] and ap["b_better"] == 0
        assert set(report[iou_type]["per_category"]) == {"cat", "dog"}


def test_missing_true_positives_give_an_interval_below_zero(files, tmp_path):
    gt_path, results_path, results = files
    # Every result of the fixture finds its object: keep the first. Each draw with an object scores B lower.
    worse = _write(tmp_path / "worse.json", results[:1])
    output = tmp_path / "comparison.json"
    assert compare("--annotations", gt_path, results_path, worse, "--seed", "1", "--output", output) == 0
    report = json.loads(output.read_text())
    assert report["draws"] == 1000 and report["seed"] == 1
    ap = report["bbox"]["metrics"]["bbox_AP50"]
    expected = [reference_stats(gt_path, r, "bbox")[1] for r in (results, results[:1])]
    assert [ap["a"], ap["b"]] == pytest.approx(expected, abs=1e-12)
    assert ap["difference"] < 0 and ap["interval"][1] < 0 and ap["b_better"] == 0


@pytest.mark.parametrize("case", ["unknown image", "missing file", "no detections"])
def test_bad_input_exits_2_without_output(files, tmp_path, capsys, case):
    gt_path, results_path, results = files
    path, message = {
        "unknown image": (_write(tmp_path / "bad.json", [{**results[0], "image_id": 777}]), "image_id 777"),
        "missing file": (tmp_path / "nope.json", "nope.json: no such file"),
        "no detections": (_write(tmp_path / "empty.json", []), "empty.json: no detections to compare"),
    }[case]
    assert compare("--annotations", gt_path, results_path, path, "--output", tmp_path / "out.json") == 2
    error = capsys.readouterr().err
    assert error.startswith("compare_det: error: ") and message in error, error
    assert not (tmp_path / "out.json").exists()


def test_script_runs_as_a_process(files):
    gt_path, results_path, _ = files
    completed = loader.run_tool("compare_det", "--annotations", gt_path, results_path, results_path,
                                "--bootstrap", "5")  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert "bbox: B - A, 95% paired intervals (5 image resamplings, seed 0)" in completed.stdout
