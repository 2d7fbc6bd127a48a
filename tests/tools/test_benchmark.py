"""tools/benchmark.py with tiny settings: the report's structure and sane ratios."""

import json
import math

import pytest
import torch

from tests.tools.loader import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("benchmark")


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_classifier_all_modes(tool, tmp_path, capsys):
    out = tmp_path / "r18.json"
    tool.main([
        "--model", "resnet18", "--batch-size", "2", "--image-size", "64", "--warmup", "1", "--repeats", "1",
        "--modes", "train,inference,data,eval", "--channels-last", "--data-images", "3",
        "--data-root", str(tmp_path / "shapes"), "--eval-images", "6", "--json", str(out),
    ])  # fmt: skip
    report = json.loads(out.read_text())
    assert report["config"]["modes"] == ["inference", "train", "data", "eval"]  # inference first, always
    rows = {(r["mode"], r["side"]): r for r in report["results"]}
    assert set(rows) == {(m, s) for m in ("inference", "train") for s in ("ours", "torchvision")}
    assert rows["inference", "ours"]["setup"] == tool.FAST_PATH
    assert rows["train", "ours"]["setup"] == "channels-last"
    for row in rows.values():
        assert len(row["seconds"]) == 1 and _positive(row["images_per_s"]) and _positive(row["peak_memory_mb"])
    for mode in ("inference", "train"):
        assert _positive(report["ratios"][mode]["throughput"]) and _positive(report["ratios"][mode]["peak_memory"])
    assert rows["train", "torchvision"]["peak_memory_mb"] > rows["inference", "torchvision"]["peak_memory_mb"]
    assert report["output_relative_difference"] < 1e-4  # same weights, fused or not
    assert report["data"]["images"] == 3 and _positive(report["data"]["images_per_s_per_worker"])
    assert report["data"]["dataset"] == "synthetic shapes classes, image folders"  # the model's task's data
    evaluation = report["eval"]
    assert (evaluation["ground_truth"], evaluation["detections"]) == (42, 252)
    for seconds in evaluation["seconds"].values():
        assert _positive(seconds["bbox"]) and _positive(seconds["segm"])
    if len(evaluation["seconds"]) == 2:
        assert evaluation["stats_max_abs_difference"] < 1e-6
    assert 0 < evaluation["stats"]["pycocotools"]["bbox_AP50"] < 1
    printed = capsys.readouterr().out
    assert "| inference | ours |" in printed and "ours/torchvision: throughput" in printed


@pytest.mark.slow  # the full-size R-50 detector beside torchvision's (the only detectors the tool compares)
def test_detector_inference(tool, tmp_path):
    out = tmp_path / "det.json"
    report = tool.main([
        "--model", "faster_rcnn_r50_fpn", "--batch-size", "1", "--image-size", "64", "--warmup", "0",
        "--repeats", "1", "--modes", "inference", "--no-memory", "--json", str(out),
    ])  # fmt: skip
    assert json.loads(out.read_text())["ratios"].keys() == {"inference"}
    assert _positive(report["ratios"]["inference"]["throughput"])
    assert report["ratios"]["inference"]["peak_memory"] is None and report["memory"] is None
    assert report["output_compared"] == "FPN features" and report["output_relative_difference"] < 1e-4


@pytest.mark.parametrize(
    "argv, message",
    [(["--modes", "inference,fly"], "--modes='inference,fly'; choose from"),
     (["--model", "deeplabv3_r50", "--batch-size", "1"], "cannot train DeepLab"),
     (["--repeats", "0"], "--repeats=0; give a positive number")],
)  # fmt: skip
def test_bad_arguments_are_named(tool, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        tool.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "\nbenchmark: error: " in err and message in err, err


def test_coco_benchmark_bad_argument_is_named(capsys):
    with pytest.raises(SystemExit) as exit_:
        load_tool("benchmark_coco").main(["--images", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "benchmark_coco: error: --images=0; give a positive number" in err


def test_peak_tensor_memory_follows_new_storages(tool):
    x = torch.ones(1000)  # 4,000 bytes, made before: not counted
    tracker = tool.PeakTensorMemory()
    with tracker:
        x.add_(1)  # in place: nothing new
        view = x[:10]  # a view: nothing new
        y = x * 2  # 4,000 bytes, kept
        for _ in range(3):
            (y + 1).sum()  # 4,000 bytes (+4 for the sum) at a time, freed each loop
    assert view.sum() == 20 and tracker.peak == 4000 + 4000 + 4
    assert tracker.current == 4000  # y is still alive


def test_exported_model_is_timed_beside_ours(tool, tmp_path, capsys):
    """`--exported FILE`: a third inference row (onnxruntime or the .pt2 program) and its ratio."""
    from backbones import create_model
    from backbones.export import NormalizedModel, write_exported

    path = tmp_path / "r18.pt2"
    module = NormalizedModel(create_model("resnet18", num_classes=1000).eval(), (0.5,) * 3, (0.25,) * 3)
    write_exported(module, torch.rand(2, 3, 64, 64), path, metadata={"task": "classification"}, output_names=["logits"])
    report = tool.main([
        "--model", "resnet18", "--batch-size", "2", "--image-size", "64", "--warmup", "0", "--repeats", "1",
        "--modes", "inference", "--no-memory", "--exported", str(path),
    ])  # fmt: skip
    rows = {r["side"]: r for r in report["results"]}
    assert rows["exported"]["setup"] == "r18.pt2, torch.export program" and _positive(rows["exported"]["images_per_s"])
    assert _positive(report["ratios"]["inference"]["exported_throughput"])
    assert "exported/torchvision: throughput" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tool.main(["--model", "resnet18", "--modes", "train", "--exported", str(path)])


def test_coco_bootstrap_benchmark_matches_pycocotools(tmp_path, capsys):
    out = tmp_path / "bootstrap.json"
    load_tool("benchmark_coco").main(["--images", "4", "--bootstrap", "5", "--json", str(out)])
    report = json.loads(out.read_text())
    assert (report["images"], report["ground_truth"], report["detections"], report["draws"]) == (4, 28, 400, 5)
    assert report["point_max_abs_difference"] == 0  # the unweighted numbers are pycocotools' bit for bit
    assert set(report["cpu_seconds"]) == {"match_once", "prepare", "draws", "pycocotools"}
    assert "5 resamplings" in capsys.readouterr().out
