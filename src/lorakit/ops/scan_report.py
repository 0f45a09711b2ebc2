"""``scan --report FILE.html``: one self-contained HTML page of a library scan — the summary, charts (inline
base64 PNG) and a table of every file. No scripts, no external resources."""

from __future__ import annotations

import html
import os
from collections import Counter
from typing import Any

from lorakit.ops.plots import count_figure, figure_data_uri
from lorakit.ops.scan import ScanReport

_STYLE = """body{font:14px system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}th{background:#f3f3f3}
.ok{color:#2b7a2b}.warning{color:#a86b00}.error,.dangerous{color:#b3261e;font-weight:bold}
.charts img{margin:4px 12px 12px 0;border:1px solid #eee}code{font-size:11px}"""
COLUMNS = ("path", "status", "kind", "architecture", "variant", "format", "adapters", "ranks", "size", "autov2",
           "problems")


def _cell(rec: dict[str, Any], col: str) -> str:
    v = rec.get(col)
    if col == "size":
        return f"{(v or 0) / 1e6:.2f} MB"
    if col == "problems":
        items = ([rec["error"]["message"]] if rec.get("error") else []) + list(rec.get("problems") or [])
        return "<br>".join(html.escape(p) for p in items)
    if isinstance(v, dict):
        return html.escape(", ".join(f"{k}×{x}" for k, x in v.items()))
    if isinstance(v, list):
        return html.escape(", ".join(map(str, v)))
    if col == "path":
        return f"<code>{html.escape(str(v))}</code>"
    return html.escape("" if v is None else str(v))


def render_report(report: ScanReport, title: str = "lorakit scan") -> str:
    """The HTML page of a scan report (a string)."""
    s = report.summary()
    charts = []
    for key, label in (("kind", "kind"), ("architecture", "architecture"), ("format", "LoRA format"),
                       ("status", "status")):
        if s[key]:
            charts.append((label, figure_data_uri(count_figure(s[key], f"files per {label}"))))
    ranks: Counter[str] = Counter()
    for r in report.records:
        for k, n in (r.get("ranks") or {}).items():
            ranks[f"rank {k}"] += 1
    if ranks:
        charts.append(("rank", figure_data_uri(count_figure(dict(sorted(ranks.items(), key=lambda kv: int(
            kv[0].split()[1]))), "LoRAs per rank"))))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>{s['files']} files, {s['bytes'] / 1e9:.2f} GB; {s['read']} read, {s['from_index']} from the index; "
             f"{s['duplicate_groups']} duplicate groups ({s['duplicate_files']} files); "
             f"{len(s['problems'])} files with problems.</p>",
             "<div class='charts'>" + "".join(f"<img alt='{html.escape(a)}' src='{u}'>" for a, u in charts) + "</div>"]
    if report.duplicates:
        parts.append("<h2>Duplicates</h2><table><tr><th>SHA-256</th><th>size</th><th>files</th></tr>")
        for g in report.duplicates:
            parts.append(f"<tr><td><code>{g['sha256'][:16]}…</code></td><td>{g['size'] / 1e6:.2f} MB</td><td>"
                         + "<br>".join(f"<code>{html.escape(p)}</code>" for p in g["paths"]) + "</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Files</h2><table><tr>" + "".join(f"<th>{c}</th>" for c in COLUMNS) + "</tr>")
    for r in report.records:
        parts.append("<tr>" + "".join(
            f"<td class='{html.escape(str(r.get('status')))}'>{_cell(r, c)}</td>" if c == "status"
            else f"<td>{_cell(r, c)}</td>" for c in COLUMNS) + "</tr>")
    parts.append("</table></body></html>\n")
    return "\n".join(parts)


def write_report(report: ScanReport, path: str | os.PathLike[str]) -> str:
    """Write the HTML page atomically; returns its path."""
    from lorakit.io.textout import atomic_text
    with atomic_text(path) as out:
        out.write(render_report(report))
    return os.fspath(path)
