"""One self-contained HTML page from run directories (compress, bench, advise, lottery, reproduce).

Markdown reports are rendered with markdown-it (already installed with rich), PNG plots are
embedded as data URIs and the style sheet is inline, so the page opens offline with no CDN.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
from pathlib import Path

from markdown_it import MarkdownIt

from slimkit.errors import SlimkitError
from slimkit.io.outputs import HTML_GENERATOR
from slimkit.io.text import read_text

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1200px;color:#222;
     padding:0 1rem;line-height:1.45}
h1{border-bottom:2px solid #36c;padding-bottom:.3rem}
h2{margin-top:2.2rem;color:#234}
section.run{border:1px solid #ddd;border-radius:8px;padding:1rem 1.4rem;margin:1.5rem 0;background:#fcfcfd}
table{border-collapse:collapse;margin:.8rem 0;font-size:.88rem}
th,td{border:1px solid #ccc;padding:.25rem .55rem;text-align:right}
th{background:#eef2f8}
td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.6rem 0}
code,pre{background:#f3f3f3;border-radius:3px;padding:.1rem .3rem;font-size:.85rem}
pre{padding:.6rem;overflow-x:auto}
.meta{color:#666;font-size:.85rem}
nav a{margin-right:1rem}
"""

# html=False: raw HTML in a report (or in a file name quoted by one) is shown as text, never run
_MD = MarkdownIt("commonmark", {"html": False}).enable("table")


def _png(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">' \
           f"<figcaption class=meta>{html.escape(path.name)}</figcaption></figure>"


def _csv_table(path: Path, limit: int = 60) -> str:
    import csv

    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        rows = list(csv.reader(f))
    if not rows:
        return ""
    head, body = rows[0], rows[1 : limit + 1]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body]
    more = f"<p class=meta>{len(rows) - 1 - len(body)} more rows in {path.name}</p>" if len(rows) - 1 > len(body) else ""
    return "\n".join(out) + "</table>" + more


def _inline_images(rendered: str, directory: Path, used: set[str]) -> str:
    """Markdown image links to PNGs beside the report become data URIs (the page travels alone)."""
    import re

    def swap(match):
        name = html.unescape(match.group(1))
        path = directory / name
        if path.suffix == ".png" and path.is_file() and path.resolve().parent == directory.resolve():
            used.add(path.name)
            return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'
        return match.group(0)

    return re.sub(r'src="([^"]+)"', swap, rendered)


def _section(directory: Path, index: int) -> str:
    parts = [f'<section class=run id="run{index}"><h2>{html.escape(directory.name)}</h2>',
             f"<p class=meta>{html.escape(str(directory.resolve()))}</p>"]
    mds = sorted(directory.glob("*.md"))
    used: set[str] = set()
    for md in mds:
        parts.append(_inline_images(_MD.render(read_text(md)), directory, used))
    if not mds:
        for csv_file in sorted(directory.glob("*.csv")):
            parts.append(f"<h3>{html.escape(csv_file.name)}</h3>" + _csv_table(csv_file))
    for png in sorted(directory.glob("*.png")):
        if png.name not in used:
            parts.append(_png(png))
    for child in sorted(p for p in directory.iterdir() if p.is_dir() and (p / "report.md").exists()):
        parts.append(f"<h3>{html.escape(child.name)}</h3>" + _MD.render(read_text(child / "report.md")))
        parts += [_png(p) for p in sorted(child.glob("*.png"))]
    parts.append("</section>")
    return "\n".join(parts)


def _find_runs(directory: Path) -> list[Path]:
    """The directory itself when it holds reports or plots, else its hashed run sub-directories."""
    if any(directory.glob("*.md")) or any(directory.glob("*.png")) or any(directory.glob("*.csv")):
        return [directory]
    return sorted(p for p in directory.iterdir() if p.is_dir() and (any(p.glob("*.md")) or any(p.glob("*.png"))))


def render_html(directories: list[Path], title: str = "slimkit report") -> str:
    runs: list[Path] = []
    for d in directories:
        if not d.is_dir():
            raise SlimkitError(f"not a directory: {d}")
        found = _find_runs(d)
        if not found:
            raise SlimkitError(f"{d} holds no report (.md), plot (.png) or table (.csv) to show")
        runs += found
    nav = " ".join(f'<a href="#run{i}">{html.escape(r.name)}</a>' for i, r in enumerate(runs))
    body = "\n".join(_section(r, i) for i, r in enumerate(runs))
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8>{HTML_GENERATOR}<title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class=meta>generated {stamp} from {len(runs)} run(s); self-contained, works offline</p>"
            f"<nav>{nav}</nav>{body}</body></html>")
