"""tools/benchmark_data.py with tiny sizes: the generated sets, the report's structure, the table."""

import json

import pytest

from backbones.data.coco import load_coco_annotations
from tests.tools.loader import load_tool


@pytest.mark.slow  # six loader runs with two worker processes each
def test_tiny_run(tmp_path, capsys):
    report = load_tool("benchmark_data").main([
        "--workdir", str(tmp_path), "--images", "40", "--folder-images", "90", "--folder-classes", "3",
        "--every", "16", "--json", str(tmp_path / "report.json"),
    ])  # fmt: skip
    assert json.loads((tmp_path / "report.json").read_text()) == report
    store = load_coco_annotations(tmp_path / "coco-40" / "instances.json", cache=False)
    assert store.num_images == 40 and store.num_annotations == report["config"]["annotations"] == 291
    assert len(store.categories) == 80 and (tmp_path / "coco-40" / "images" / store.file_name(0)).is_symlink()
    assert sum(1 for _ in (tmp_path / "folders-3-90").rglob("*.JPEG")) == 90
    runs = {run["mode"]: run for run in report["runs"]}
    assert list(runs) == ["pycocotools", "torchvision-coco", "ours-coco-first", "ours-coco-cached",
                          "torchvision-folder", "ours-folder"]  # fmt: skip
    for mode, run in runs.items():
        assert run["load_s"] > 0 and run["peak_rss_mb"] > 0
        if mode not in ("pycocotools", "ours-coco-first"):
            pids = {row["pid"] for row in run["pass"]}
            assert len(pids) == 2 and isinstance(run["worker_growth_mb"], float)
            assert max(row["samples"] for row in run["pass"]) == (40 if "coco" in mode else 90)
    table = capsys.readouterr().out
    assert "| ours-coco-cached |" in table and "40 images, 291 polygons" in table
