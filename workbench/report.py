"""Self-contained HTML reports: every plot embedded, every number also in JSON.

A report is a list of sections (heading, paragraphs, tables, images); `write_report`
renders it to one HTML file that opens anywhere with no other files beside it.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.storage import atomic_write_text

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}img{max-width:100%;border:1px solid #eee}.mono{font-family:ui-monospace,monospace;font-size:.85em}
.ok{color:#0a7a2f;font-weight:600}.bad{color:#b00020;font-weight:600}
"""


@dataclass
class Section:
    """One titled part of a report."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[Sequence[str], Sequence[Sequence[Any]]]] = field(default_factory=list)
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (caption, PNG bytes)
    preformatted: list[str] = field(default_factory=list)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def render_html(title: str, sections: Sequence[Section], *, subtitle: str = "") -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f"<p>{html.escape(subtitle)}</p>")
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        parts.extend(f"<p>{p}</p>" for p in sec.paragraphs)  # paragraphs may hold simple trusted markup
        for header, rows in sec.tables:
            parts.append("<table><tr>" + "".join(f"<th>{_cell(h)}</th>" for h in header) + "</tr>")
            parts.extend("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
            parts.append("</table>")
        for caption, png in sec.images:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        parts.extend(f"<pre class='mono'>{html.escape(t)}</pre>" for t in sec.preformatted)
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(path: str | Path, title: str, sections: Sequence[Section], *, subtitle: str = "") -> Path:
    """Render and write the report atomically."""
    return atomic_write_text(path, render_html(title, sections, subtitle=subtitle))
