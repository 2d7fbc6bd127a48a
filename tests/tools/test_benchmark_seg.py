"""tools/benchmark_seg.py with a tiny model: pixels counted as the model is called, ratios, bad options named."""

import json
import math

import pytest

from tests.tools.loader import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("benchmark_seg")


def test_modes_report_pixel_and_time_ratios(tool, tmp_path, capsys):
    out = tmp_path / "seg.json"
    report = tool.main([
        "--model", "deeplabv3_r18", "--output-stride", "16", "--num-classes", "3", "--image-size", "32", "64",
        "--crop-size", "16", "32", "--stride", "11", "22", "--scales", "0.5", "1.0", "--warmup", "0",
        "--repeats", "1", "--modes", "msflip,slide", "--json", str(out),
    ])  # fmt: skip
    assert json.loads(out.read_text())["results"] == report["results"]
    rows = {row["mode"]: row for row in report["results"]}
    assert list(rows) == ["whole", "slide", "msflip"]  # whole first: the reference
    # 3 x 3 windows of 16x32 on 32x64; views 16x32 and 32x64, each with its mirror image
    assert [rows[m]["pixel_ratio"] for m in rows] == [1.0, 9 * 16 * 32 / (32 * 64), 2 * (16 * 32 + 32 * 64) / (32 * 64)]
    assert rows["whole"]["time_ratio"] == 1.0
    for row in rows.values():
        assert math.isfinite(row["seconds_per_image"]) and row["seconds_per_image"] > 0
        assert row["overhead"] == pytest.approx(row["time_ratio"] / row["pixel_ratio"])
    assert rows["slide"]["inference"] == "slide (crop 16x32, stride 11x22)"
    assert "| slide | slide (crop 16x32, stride 11x22) |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [(["--modes", "whole,tiles"], "--modes='whole,tiles'; choose from whole, slide, msflip, msflip-slide"),
     (["--crop-size", "16", "16", "--stride", "32", "8"], "stride=[32, 8] exceeds crop_size=[16, 16] in height"),
     (["--scales", "0"], "scales=[0.0]; give one or more positive factors"),
     (["--repeats", "0"], "--repeats=0; give a positive number")],
)  # fmt: skip
def test_bad_arguments_are_named(tool, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        tool.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "benchmark_seg: error: " in err and message in err, err
