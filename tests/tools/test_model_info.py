"""tools/model_info.py: parameters and multiply-adds against the ResNet paper's table."""

from __future__ import annotations

import pytest

from tests.tools.loader import load_tool, run_tool


@pytest.fixture(scope="module")
def model_info():
    return load_tool("model_info")


def _table(text: str) -> dict[str, tuple[str, str]]:
    """`| name | params | macs |` rows -> {name: (params, macs)}, as printed."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("model", "---"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def test_model_info_paper_stride_placement(model_info, capsys):
    assert model_info.main(["resnet18", "resnet50", "--stride-in-1x1"]) == 0
    out = capsys.readouterr().out
    assert "multiply-adds at 224" in out
    assert _table(out) == {"resnet18": ("11.69", "1.814"), "resnet50": ("25.56", "3.858")}


def test_model_info_torchvision_stride_placement(model_info, capsys):
    assert model_info.main(["resnet50"]) == 0
    assert _table(capsys.readouterr().out) == {"resnet50": ("25.56", "4.089")}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "flag", "params", "macs"),
    [
        ("resnet34", [], "21.80", "3.664"),
        ("resnet101", ["--stride-in-1x1"], "44.55", "7.570"),
        ("resnet152", ["--stride-in-1x1"], "60.19", "11.282"),
        ("resnet101", [], "44.55", "7.801"),
        ("resnet152", [], "60.19", "11.514"),
    ],
)
def test_model_info_deeper_rows(model_info, capsys, name, flag, params, macs):
    assert model_info.main([name, *flag]) == 0
    assert _table(capsys.readouterr().out) == {name: (params, macs)}


def test_model_info_count_matches_printed_values(model_info):
    params, macs = model_info.count("resnet18", image_size=128)
    assert params == pytest.approx(11.689512)
    # every map of a 128-pixel input is (4/7)^2 of the 224-pixel one's, and so is the work
    assert macs == pytest.approx(1.814 * (128 / 224) ** 2, rel=1e-3)


def test_model_info_unknown_name_is_one_error_line():
    done = run_tool("model_info", "resnet18x")
    assert done.returncode == 2
    assert done.stderr.startswith("model_info: error: unknown backbone 'resnet18x'; closest: resnet18")  # suggested
    assert done.stderr.count("\n") == 1 and _table(done.stdout) == {}
