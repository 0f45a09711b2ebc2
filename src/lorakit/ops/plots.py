"""Pictures of LoRAs: per-block strength (``inspect --plot``), what applies (``doctor --plot``), two LoRAs side by
side (``diff --plot``), charts of a library (``scan --report``). Drawn with matplotlib's object API (a
:class:`~matplotlib.figure.Figure` and the Agg canvas; no pyplot, no global state), an optional extra:
``pip install 'lorakit[plot]'``. Every figure is built from a report's numbers, which the figure's bars carry
exactly (the bar heights are the report's values) and labelled with the report's block names."""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lorakit.errors import UsageError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

APPLIES, NOT_APPLIED, UNCHECKED = "#3a923a", "#c8382c", "#9a9a9a"
PALETTE = ("#3568a8", "#e08a2c", "#5a9e4b", "#b04a8f", "#7a6cc0", "#2f9c9c", "#a8743a")


def require_matplotlib() -> None:
    """Raise a UsageError naming the extra when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("pictures need matplotlib, which is not installed.",
                         hint="pip install 'lorakit[plot]'") from None


def _figure(n_bars: int, height: float = 4.2) -> "Figure":
    require_matplotlib()
    from matplotlib.figure import Figure
    return Figure(figsize=(max(6.0, min(40.0, 1.5 + 0.28 * n_bars)), height), dpi=100, layout="constrained")


def _component_of(label: str, components: Sequence[str]) -> str | None:
    return label if label in components else label.split(":")[0] if ":" in label else None


def strength_figure(strength: Mapping[str, Any], title: str = "") -> "Figure":
    """Bars of ‖ΔW‖_F per block (``inspect``'s ``strength`` report), coloured by component, labelled with the
    architecture's block names."""
    blocks = strength["blocks"]
    labels = [b["block"] for b in blocks]
    values = [b["norm"] for b in blocks]
    comps = list(strength.get("components", {}))
    cells = strength.get("cells") or []
    fig = _figure(len(labels), height=8.0 if cells else 4.2)
    ax = fig.add_subplot(2, 1, 1) if cells else fig.add_subplot()
    colours = []
    for lab in labels:
        c = _component_of(lab, comps)
        colours.append(PALETTE[(comps.index(c) + 1) % len(PALETTE)] if c in comps else PALETTE[0])
    ax.bar(range(len(labels)), values, color=colours, gid="strength")
    ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 12 else 0, fontsize=8)
    ax.set_ylabel("‖ΔW‖_F (from the factors)")
    ax.set_title(title or f"{strength.get('architecture_label', strength.get('architecture', ''))}: strength per "
                 f"block (total {strength.get('total', math.nan):.4g})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if cells:
        _heatmap(fig, cells, [b for b in labels if any(c["block"] == b for c in cells)])
    return fig


def _heatmap(fig: "Figure", cells: Sequence[Mapping[str, Any]], blocks: list[str]) -> None:
    """‖ΔW‖ per module inside the repeated blocks: one row per module of a block, one column per block (blank
    where the LoRA has no such module)."""
    parts = list(dict.fromkeys(c["part"] for c in cells))
    grid = [[math.nan] * len(blocks) for _ in parts]
    for c in cells:
        grid[parts.index(c["part"])][blocks.index(c["block"])] = c["norm"]
    ax = fig.add_subplot(2, 1, 2)
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xticks(range(len(blocks)), blocks, rotation=90 if len(blocks) > 12 else 0, fontsize=7)
    ax.set_yticks(range(len(parts)), parts, fontsize=7)
    ax.set_title("‖ΔW‖_F per module of the repeated blocks", fontsize=9)
    fig.colorbar(im, ax=ax)


def doctor_figure(diagnosis: Mapping[str, Any]) -> "Figure":
    """Stacked bars per block: modules that apply, that will not, and that were not checked (no base given)."""
    cov = diagnosis.get("coverage") or {}
    blocks = cov.get("blocks") or []
    labels = [b["block"] for b in blocks]
    fig = _figure(len(labels))
    ax = fig.add_subplot()
    x = range(len(labels))
    ok = [b["applies"] for b in blocks]
    bad = [b["not_applied"] for b in blocks]
    unk = [b["unchecked"] for b in blocks]
    ax.bar(x, ok, color=APPLIES, label="applies", gid="applies")
    ax.bar(x, bad, bottom=ok, color=NOT_APPLIED, label="will not apply", gid="not_applied")
    ax.bar(x, unk, bottom=[a + b for a, b in zip(ok, bad)], color=UNCHECKED, label="not checked (no base)",
           gid="unchecked")
    ax.set_xticks(list(x), labels, rotation=90 if len(labels) > 12 else 0, fontsize=8)
    ax.set_ylabel("modules")
    ax.legend(fontsize=8)
    ax.set_title(f"{os.path.basename(str(diagnosis.get('file', '')))}: {diagnosis.get('verdict', '')}", fontsize=10)
    return fig


def diff_figure(report: Mapping[str, Any]) -> "Figure":
    """Grouped bars of ‖ΔA‖ and ‖ΔB‖ per block, and each block's cosine below (``diff``'s ``slots``)."""
    slots = report.get("slots") or {}
    labels = list(slots)
    fig = _figure(len(labels), height=6.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    x = list(range(len(labels)))
    w = 0.4
    top.bar([i - w / 2 for i in x], [slots[k]["norm_a"] for k in labels], w, label="A", color=PALETTE[0], gid="a")
    top.bar([i + w / 2 for i in x], [slots[k]["norm_b"] for k in labels], w, label="B", color=PALETTE[1], gid="b")
    top.set_ylabel("‖ΔW‖_F")
    top.legend(fontsize=8)
    top.set_title(f"A {os.path.basename(str(report['a'].get('file', '')))} vs B "
                  f"{os.path.basename(str(report['b'].get('file', '')))}", fontsize=10)
    cos = [slots[k]["cosine"] if slots[k]["cosine"] is not None else math.nan for k in labels]
    bottom.bar(x, cos, color=PALETTE[2], gid="cosine")
    bottom.set_ylim(-1.05, 1.05)
    bottom.set_ylabel("cosine")
    bottom.set_xticks(x, labels, rotation=90 if len(labels) > 12 else 0, fontsize=8)
    for ax in (top, bottom):
        ax.grid(axis="y", alpha=0.3)
    return fig


def count_figure(counts: Mapping[str, int], title: str, xlabel: str = "files") -> "Figure":
    """Horizontal bars of counts (a library's kinds, architectures, formats)."""
    items = list(counts.items())
    require_matplotlib()
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.0, max(1.6, 0.35 * len(items) + 0.9)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.barh(range(len(items)), [v for _, v in items], color=PALETTE[0])
    ax.set_yticks(range(len(items)), [k for k, _ in items], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    return fig


def figure_bytes(fig: "Figure", fmt: str = "png") -> bytes:
    """The figure rendered (png, svg, pdf)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    return buf.getvalue()


def figure_data_uri(fig: "Figure") -> str:
    """The figure as an inline ``data:image/png;base64,…`` URI (self-contained HTML)."""
    return "data:image/png;base64," + base64.b64encode(figure_bytes(fig)).decode("ascii")


def save_figure(fig: "Figure", path: str | os.PathLike[str]) -> str:
    """Write the figure to ``path`` (format from the extension: .png, .svg, .pdf), atomically."""
    from lorakit.io.textout import write_bytes_atomic
    p = os.fspath(path)
    ext = os.path.splitext(p)[1].lower().lstrip(".") or "png"
    if ext not in ("png", "svg", "pdf"):
        raise UsageError(f"cannot draw a .{ext} file.", path=p, hint="name the picture .png, .svg or .pdf.")
    write_bytes_atomic(p, figure_bytes(fig, ext))
    return p
