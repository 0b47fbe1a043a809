"""report.html: one self-contained page (inline CSS, every image a base64 data: URI, no script, nothing fetched),
so it can be mailed, archived next to the runs or opened offline, and headless Chromium renders it without a network
(scripts/screenshot_report.sh). What this module writes is well-formed XML as well as HTML (void elements
self-closed, everything escaped); a section's own "html" is the caller's and is inserted as given."""

from __future__ import annotations

import base64
import html
import math
import re
from typing import Any, Sequence

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; color: #1d2330;
       margin: 0 auto; padding: 1.5em 2em 3em; max-width: 1180px; line-height: 1.45; background: #fff; }
h1 { font-size: 1.6em; border-bottom: 2px solid #d9dee8; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #e4e8ef; padding-bottom: .2em; }
nav ol { columns: 2; font-size: .92em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .88em; }
th, td { border: 1px solid #d9dee8; padding: .25em .6em; }
th { background: #f2f4f8; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
figure { display: inline-block; margin: .6em 1.2em .6em 0; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e8ef; }
figcaption { font-size: .85em; color: #505a6b; margin-top: .25em; }
code, pre { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: .9em; }
pre { background: #f5f6f8; padding: .6em; overflow-x: auto; }
"""


def _slug(text: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, k = base, 2
    while slug in used:
        slug, k = f"{base}-{k}", k + 1
    used.add(slug)
    return slug


def _img(caption: str, png: bytes, where: str) -> str:
    if not isinstance(png, (bytes, bytearray)) or not bytes(png[:8]) == PNG_MAGIC:
        raise ValueError(f"build_html: image {caption!r} in section {where!r} is not PNG bytes "
                         f"(pass what ftlab.report.plots returns)")
    src = "data:image/png;base64," + base64.b64encode(bytes(png)).decode("ascii")
    cap = html.escape(str(caption))
    return f'<figure><img src="{src}" alt="{cap}" /><figcaption>{cap}</figcaption></figure>'


def build_html(title: str, sections: Sequence[dict]) -> str:
    """The page: title, a contents list, then each section's heading, its HTML (already escaped, e.g. from
    table_html) and its images, captioned."""
    used: set[str] = set()
    body, toc = [], []
    for i, s in enumerate(sections):
        if not isinstance(s, dict) or "heading" not in s:
            raise ValueError(f"build_html: sections[{i}] needs a dict with 'heading' (and optional 'html', 'images')")
        heading = str(s["heading"])
        anchor = _slug(heading, used)
        toc.append(f'<li><a href="#{anchor}">{html.escape(heading)}</a></li>')
        parts = [f'<section id="{anchor}">', f"<h2>{html.escape(heading)}</h2>"]
        if s.get("html"):
            parts.append(str(s["html"]))
        for k, item in enumerate(s.get("images") or ()):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"build_html: section {heading!r} images[{k}] must be (caption, png_bytes)")
            parts.append(_img(item[0], item[1], heading))
        parts.append("</section>")
        body.append("\n".join(parts))
    t = html.escape(str(title))
    nav = f'<nav><ol>{"".join(toc)}</ol></nav>' if len(toc) > 1 else ""
    return ("<!DOCTYPE html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8" />\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1" />\n'
            f"<title>{t}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{t}</h1>\n{nav}\n" + "\n".join(body) + "\n</body>\n</html>\n")


def fmt_cell(v: Any) -> tuple[str, bool]:
    """(text, is_number) of one table cell: ints as they are, floats to two decimals (points), small ones to
    three significant digits, None as an en dash (not measured, never 0)."""
    if v is None:
        return "\u2013", False
    if isinstance(v, bool):
        return str(v).lower(), False
    if isinstance(v, int):
        return str(v), True
    if isinstance(v, float):
        if math.isnan(v):
            return "nan", True
        if math.isinf(v):
            return "inf" if v > 0 else "-inf", True
        if v != 0 and abs(v) < 0.01:
            return f"{v:.3g}", True
        if abs(v) >= 1e5:
            return f"{v:,.0f}", True
        return f"{v:.2f}", True
    try:  # numpy scalars and the like, without importing numpy here
        return fmt_cell(v.item())
    except (AttributeError, ValueError):
        return str(v), False


def table_html(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An escaped HTML table; numbers right-aligned and formatted by fmt_cell."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    out = [f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>"]
    for i, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(f"table_html: row {i} has {len(row)} cells for {len(columns)} columns {list(columns)}")
        cells = []
        for v in row:
            text, num = fmt_cell(v)
            cells.append(f'<td class="num">{html.escape(text)}</td>' if num else f"<td>{html.escape(text)}</td>")
        out.append(f"<tr>{''.join(cells)}</tr>")
    out.append("</tbody>\n</table>")
    return "\n".join(out)
