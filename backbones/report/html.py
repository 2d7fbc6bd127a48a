"""A self-contained HTML report: one page, its style inline, its images PNG files beside it.

No script, font or style sheet is loaded from anywhere, so the page reads offline and can be archived as a
folder. Every text is escaped.

Example:
    >>> report = HTMLReport("Detection report")
    >>> report.heading("Summary")
    >>> report.table(["metric", "value"], [["AP", 0.412]])
    >>> report.write("out/report.html")  # doctest: +SKIP
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path

from backbones.data.files import write_atomically

__all__ = ["HTMLReport"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { border-bottom: 2px solid #4f82bd; padding-bottom: 0.2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #eef2f7; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
p.note { color: #555; font-size: 0.9em; }
nav a { margin-right: 1em; }
p.legend span.entry { display: inline-block; margin-right: 1.2em; white-space: nowrap; }
p.legend span.swatch { display: inline-block; width: 1em; height: 1em; border: 1px solid #888; margin-right: 0.3em;
  vertical-align: -0.15em; }
"""


class HTMLReport:
    """Builds a page section by section; :meth:`write` saves it (atomically) with its images beside it.

    Args:
        title: The page title and first heading.
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self._parts: list[str] = []
        self._anchors: list[tuple[str, str]] = []
        self._images: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        """A heading; level-2 headings also get a link in the page's table of contents."""
        anchor = ""
        if level == 2:
            anchor_id = f"section-{len(self._anchors) + 1}"
            self._anchors.append((anchor_id, text))
            anchor = f' id="{anchor_id}"'
        self._parts.append(f"<h{level}{anchor}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str, *, note: bool = False) -> None:
        """A paragraph of plain text (escaped); ``note`` sets it in a smaller grey type."""
        css = ' class="note"' if note else ""
        self._parts.append(f"<p{css}>{html.escape(text)}</p>")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]], *, digits: int = 3) -> None:
        """A table; floats are written with ``digits`` decimals, None and nan as a dash."""
        head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
        body = "".join("<tr>" + "".join(f"<td>{_cell(cell, digits)}</td>" for cell in row) + "</tr>" for row in rows)
        self._parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def legend(self, entries: Sequence[tuple[str, Sequence[int] | None]]) -> None:
        """A line of colour swatches with their names; a colour is RGB in 0..255, None for "not coloured"."""
        items = []
        for name, colour in entries:
            fill = "transparent" if colour is None else "#" + "".join(f"{int(c):02x}" for c in colour[:3])
            items.append(
                f'<span class="entry"><span class="swatch" style="background: {fill}"></span>{html.escape(name)}</span>'
            )
        self._parts.append(f'<p class="legend">{"".join(items)}</p>')

    def image(self, filename: str, alt: str) -> None:
        """An image file of the report's folder, by its name relative to the page."""
        if "://" in filename or os.path.isabs(filename):
            raise ValueError(
                f"image {filename!r}: give a file name relative to the report, not a URL or an absolute path"
            )
        self._images.append(filename)
        self._parts.append(f'<img src="{html.escape(filename)}" alt="{html.escape(alt)}">')

    def render(self) -> str:
        """The page as a string."""
        navigation = " ".join(f'<a href="#{key}">{html.escape(text)}</a>' for key, text in self._anchors)
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(self.title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(self.title)}</h1>\n<nav>{navigation}</nav>\n"
            + "\n".join(self._parts)
            + "\n</body>\n</html>\n"
        )

    def write(self, path: str | os.PathLike) -> Path:
        """Write the page to ``path``; every image it shows must already be in that folder."""
        folder = Path(path).parent
        missing = [name for name in self._images if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: the page shows images that are not in {folder}: {missing}")
        return write_atomically(path, self.render())


def _cell(value: object, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))
