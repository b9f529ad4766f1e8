"""The self-contained HTML report: every figure embedded, no network references.

``render_report`` takes already-computed sections (text, tables, PNG bytes) and returns
one HTML string. Images are inlined as base64 data URIs and the stylesheet is inline,
so the file opens offline anywhere.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

_CSS = (
    "\n"
    "body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;"
    "color:#222;line-height:1.45}\n"
    "h1{border-bottom:2px solid #444;padding-bottom:.3rem}h2{margin-top:2.2rem;border-bottom:1px solid #ccc}\n"
    "table{border-collapse:collapse;font-size:.85rem;margin:.6rem 0}"
    "td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:right}\n"
    "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}figure{margin:1rem 0}"
    "img{max-width:100%;border:1px solid #eee}\n"
    "figcaption{font-size:.85rem;color:#555}"
    ".note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5rem 1rem}\n"
    "code{background:#f4f4f4;padding:0 .2rem}nav a{margin-right:1rem}\n"
)


@dataclass
class Section:
    """One report section: a title, paragraphs, tables (title → DataFrame) and figures (caption → PNG bytes)."""

    title: str
    paragraphs: Sequence[str] = ()
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)


def _anchor(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")


def _figure(caption: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _table(title: str, frame: pd.DataFrame) -> str:
    body = frame.to_html(float_format=lambda x: f"{x:.3f}", border=0, escape=True)
    return f"<h3>{html.escape(title)}</h3>{body}"


def render_report(title: str, intro: Sequence[str], sections: Sequence[Section]) -> str:
    """One self-contained HTML page. Text is escaped; only the embedded images are binary."""
    nav = " ".join(f'<a href="#{_anchor(s.title)}">{html.escape(s.title)}</a>' for s in sections)
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *(f"<p class='note'>{html.escape(p)}</p>" for p in intro),
        f"<nav>{nav}</nav>",
    ]
    for s in sections:
        parts.append(f'<h2 id="{_anchor(s.title)}">{html.escape(s.title)}</h2>')
        parts += [f"<p>{html.escape(p)}</p>" for p in s.paragraphs]
        parts += [_figure(c, png) for c, png in s.figures.items()]
        parts += [_table(t, f) for t, f in s.tables.items()]
    parts.append("</body></html>")
    return "\n".join(parts)
