"""backbones.report: the offline HTML page and the matplotlib figures."""

import numpy as np
import pytest

from backbones.report import HTMLReport, bar_chart, confusion_figure, save_figure


def test_page_escapes_text_and_shows_only_its_own_files(tmp_path):
    page = HTMLReport("a <b> & c")
    page.heading("numbers")
    page.table(["name", "value"], [["<script>", 0.12345], ["missing", float("nan")], ["none", None]])
    save_figure(bar_chart(["x", "y"], {"AP": [0.5, float("nan")]}, title="t"), tmp_path / "bars.png")
    page.image("bars.png", "bars")
    page.legend([("<cat>", (255, 0, 16)), ("none", None)])
    text = page.render()
    assert '#ff0010"></span>&lt;cat&gt;' in text and 'transparent"></span>none' in text
    assert "<script>" not in text and "&lt;script&gt;" in text and "a &lt;b&gt; &amp; c" in text
    assert "<td>0.123</td>" in text and text.count("&ndash;") == 2
    assert page.write(tmp_path / "report.html").read_text() == text
    with pytest.raises(ValueError, match="relative to the report, not a URL"):
        page.image("https://example.com/x.png", "remote")
    page.image("absent.png", "absent")
    with pytest.raises(FileNotFoundError, match=r"images that are not in .*\['absent.png'\]"):
        page.write(tmp_path / "report.html")


def test_figures_are_pngs(tmp_path):
    figure = confusion_figure(np.array([[3, 1], [0, 2]]), ["a", "bg"], ["a", "missed"], title="c", normalized=False)
    path = save_figure(figure, tmp_path / "c.png")
    with open(path, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"
