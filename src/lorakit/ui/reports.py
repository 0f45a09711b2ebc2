"""What the UI shows of the library's reports: a short summary per operation, the per-group coverage table and
the library's per-block pictures (:mod:`lorakit.ops.plots`, when its extra is installed).

The summaries are plain text built from the report objects (the same fields the CLI prints); the full
report is shown next to them as JSON (``report.to_json()``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

BAR_WIDTH = 20


def as_json(report: Any) -> dict[str, Any]:
    """A report as plain JSON-able data (``to_json()`` where the report has one)."""
    data = report.to_json() if hasattr(report, "to_json") else report
    return json.loads(json.dumps(data, default=str))


def _warnings(report: Any) -> list[str]:
    return [f"warning: {w}" for w in getattr(report, "warnings", None) or []]


def merge_summary(r: Any) -> str:
    """The merge report in a few lines (the same facts the command prints)."""
    names = " + ".join(f"{os.path.basename(str(i['path']))}:{float(i['weight']):g}" for i in r.inputs)
    ranks = r.ranks
    rank = f"rank {ranks[0]}–{ranks[1]}" if ranks and ranks[0] != ranks[1] else f"rank {ranks[0]}" if ranks else \
        "no LoRA modules"
    lines = [f"{names} → {r.method} ({r.architecture}, {r.variant}); {r.modules_out} modules, {rank}, "
             f"{r.tensors_out} tensors ({r.dtype}, {r.target_format})"]
    if r.blocks:
        lines.append(f"blocks: {r.blocks}" + (f" ({len(r.dropped)} modules at 0 left out)" if r.dropped else ""))
    worst = r.min_retained_energy
    if worst:
        lines.append(f"lowest retained energy: {worst[1]:.6f} in {worst[0]}")
    if r.rounding is not None:
        lines.append(f"storing the merged factors as {r.dtype} adds up to {r.rounding[1]:.2e} relative error "
                     f"({r.rounding[0]}); dtype fp32 keeps them exact")
    return "\n".join(lines + _warnings(r))


def convert_summary(r: Any) -> str:
    """The convert report in a few lines (the same facts the command prints)."""
    lines = [f"{os.path.basename(r.input)}: {r.source_format} → {r.target_format} ({r.architecture}, {r.variant}); "
             f"{r.modules_in} modules in, {r.modules_out} out, {r.tensors_out} tensors ({r.dtype})"]
    if r.converted:
        lines.append(f"{len(r.converted)} LyCORIS module(s) written as plain LoRA factors, exactly")
    lines += [f"LOSSY {m}: relative error {e:.3e}" for m, e in r.lossy]
    if r.unknown_keys:
        lines.append(f"skipped {len(r.unknown_keys)} keys not understood (allow partial)")
    return "\n".join(lines + _warnings(r))


def resize_summary(r: Any) -> str:
    """The resize report in a few lines (the same facts the command prints)."""
    ranks_in = sorted({m.rank_in for m in r.modules if m.rank_in is not None})
    ranks_out = sorted({m.rank_out for m in r.modules})
    mean = sum(m.retained_energy for m in r.modules) / len(r.modules) if r.modules else 1.0
    worst = r.worst
    lines = [f"{os.path.basename(r.input)}: {r.source_format} → {r.target_format}; {len(r.modules)} modules, ranks "
             f"{_span(ranks_in)} → {_span(ranks_out)}; mean retained energy {mean:.4f}"
             + (f", worst relative error {worst.relative_error:.3e} ({worst.module})" if worst else "")]
    lines += [f"note: {n}" for n in r.notes]
    if r.verified is not None:
        lines.append(f"verified: max relative error of the written file vs the input {r.max_verify_error:.3e}")
    return "\n".join(lines + _warnings(r))


def extract_summary(r: Any) -> str:
    """The extract report in a few lines (the same facts the command prints)."""
    worst = r.worst
    ranks = sorted({m.rank for m in r.modules})
    lines = [f"{os.path.basename(r.original)} → {os.path.basename(r.tuned)}: {r.architecture} {r.variant}; "
             f"{len(r.modules)} modules extracted (rank {_span(ranks)}, {r.method}), {len(r.skipped)} unchanged "
             f"skipped; mean retained energy {r.mean_retained_energy:.4f}"
             + (f", worst relative error {worst.relative_error:.3e} ({worst.module})" if worst else "")
             + f"; {r.format}, {r.dtype}, alpha written"]
    lines += [f"unpaired: {u}" for u in r.unpaired]
    return "\n".join(lines + _warnings(r))


def bake_summary(r: Any) -> str:
    """The bake report in a few lines (the same facts the command prints)."""
    lines = [f"{os.path.basename(str(i['path']))} ×{float(i['weight']):g}: {i['format']}, {i['applied']} of "
             f"{i['modules']} modules applied" + (f", {i['skipped']} skipped" if i.get("skipped") else "")
             for i in r.inputs]
    lines.append(f"{os.path.basename(r.base)} ({r.layout}, {r.variant}): {r.changed} tensors baked, {r.converted} "
                 f"converted, {r.copied} copied; {r.bytes_out / 1e9:.3f} GB, dtype {r.dtype} in {r.seconds:.1f} s")
    lines += [f"{te['component']}: {te['changed']} tensors baked → {te['output']}" for te in r.text_encoders]
    return "\n".join(lines + _warnings(r))


def _span(values: list[int]) -> str:
    if not values:
        return "-"
    return str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}"


def coverage_rows(inspect_report: Mapping[str, Any]) -> list[list[Any]]:
    """Per component and module group of an inspect report: [component, group, present, total, bar].

    A stand-in for the library's per-block picture: one function, so that it can be swapped for a plot."""
    rows: list[list[Any]] = []
    for comp in (inspect_report.get("components") or {}).values():
        groups = comp.get("groups") or {}
        if not groups:
            rows.append([comp.get("label"), "(all)", comp.get("present", 0), comp.get("total"),
                         _bar(comp.get("present", 0), comp.get("total"))])
        for g in groups.values():
            rows.append([comp.get("label"), g.get("label"), g["present"], g["total"], _bar(g["present"], g["total"])])
    return rows


COVERAGE_HEADERS = ["component", "group", "present", "total", "coverage"]


def _bar(present: int, total: int | None) -> str:
    if not total:
        return "?"
    fill = round(BAR_WIDTH * present / total)
    return "█" * fill + "░" * (BAR_WIDTH - fill) + f" {100 * present / total:.0f}%"


def picture(kind: str, report: Mapping[str, Any]) -> Any | None:
    """The library's per-block picture of an inspect (``kind="strength"``) or doctor (``"doctor"``, one LoRA's
    diagnosis) report as a PIL image; None when matplotlib (``lorakit[plot]``) is not installed or the report has
    no blocks to draw."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    import io

    from PIL import Image

    from lorakit.ops.plots import doctor_figure, figure_bytes, strength_figure
    if kind == "strength":
        strength = report.get("strength") or {}
        if not strength.get("blocks"):
            return None
        fig = strength_figure(strength, os.path.basename(str(report.get("file", ""))))
    else:
        if not (report.get("coverage") or {}).get("blocks"):
            return None
        fig = doctor_figure(report)
    return Image.open(io.BytesIO(figure_bytes(fig)))
