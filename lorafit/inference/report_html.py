"""A single self-contained HTML page: settings, tables, verdicts and the sheets, images inlined.

Everything is inside the one file (PNG as ``data:`` URIs, CSS inline, no scripts, no fonts or
stylesheets from the web), so the page opens offline, from a cluster's scratch disk copied to a
laptop, or attached to a message.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #111; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.chosen { background: #e4f4e4; font-weight: bold; }
.note { background: #f4f4f4; padding: 0.6em 0.9em; border-left: 4px solid #6a6; }
figure { margin: 0 0 1.5em; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ccc; }
dt { font-weight: bold; } dd { margin: 0 0 0.4em 1em; }
"""


@dataclass
class Table:
    """A table of the report; ``highlight`` is the index of a row to mark (the suggestion)."""

    title: str
    headers: Sequence[str]
    rows: Sequence[Sequence[object]]
    highlight: int | None = None


@dataclass
class Report:
    """What a report page shows, top to bottom."""

    title: str
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    sheets: list[tuple[str, Path]] = field(default_factory=list)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape("" if value is None else str(value))


def _image(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}">'


def render_html(report: Report) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(report.title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(report.title)}</h1>",
    ]
    for note in report.notes:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    for table in report.tables:
        parts.append(f"<h2>{html.escape(table.title)}</h2><table><tr>")
        parts.append("".join(f"<th>{html.escape(h)}</th>" for h in table.headers) + "</tr>")
        for index, row in enumerate(table.rows):
            marker = ' class="chosen"' if index == table.highlight else ""
            parts.append(f"<tr{marker}>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>")
        parts.append("</table>")
    for caption, path in report.sheets:
        parts.append(f"<figure><figcaption><h2>{html.escape(caption)}</h2></figcaption>{_image(path)}</figure>")
    if report.settings:
        parts.append("<h2>Settings</h2><dl>")
        parts += [f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in report.settings.items()]
        parts.append("</dl>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: Report, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path
