"""The dry-run plan: which tensors of each model make each module."""

from __future__ import annotations

import math

from lorakit.base.checkpoint import BaseModel, Slot
from lorakit.ops.extraction.options import ExtractOptions
from lorakit.ops.extraction.pairing import Pairing, is_text_encoder, sorted_slots
from lorakit.ops.extraction.report import ExtractReport


def _slot_json(base: BaseModel, s: Slot) -> dict[str, object]:
    info = base.file.infos[s.key]
    return {"key": s.key, "param": s.param, "shape": list(info.shape), "dtype": info.dtype,
            "rows": list(s.rows) if s.rows else None, "swapped_halves": s.swap, "transposed": s.transpose}


def describe_plan(orig: BaseModel, tune: BaseModel, pairing: Pairing, opt: ExtractOptions) -> list[dict[str, object]]:
    """The dry-run plan: per paired native module, the tensors of each model, ΔW's shape and the rank (fixed,
    or the cap of ``--dynamic``; k×k convolutions: ``--conv-rank``). Reads headers only."""
    plan: list[dict[str, object]] = []
    params = ("weight", "bias") if opt.include_bias else ("weight",)
    base_rule = f"dynamic {opt.dyn[0]}:{opt.dyn[1]:g} (cap)" if opt.dyn else "fixed"
    for job in pairing.jobs:
        k_cap = opt.rank_cap(job)
        rule = base_rule if k_cap is not None else "left out: a k×k convolution needs --conv-rank"
        if is_text_encoder(tune, job.component):
            rule += f"; extracted if the text encoder differs by > {opt.te_min_diff:g} (decided from the data)"
        plan.append({"module": job.label, "component": job.component, "shape": list(job.shape),
                     "rank": min(k_cap, job.shape[0], math.prod(job.shape[1:])) if k_cap is not None else None,
                     "rank_rule": rule,
                     "original": [_slot_json(orig, s) for s in sorted_slots(job.original) if s.param in params],
                     "tuned": [_slot_json(tune, s) for s in sorted_slots(job.tuned) if s.param in params]})
    if opt.include_norms:
        for comp, _name, label, so, st in pairing.loose:
            plan.append({"module": label, "component": comp, "shape": list(tune.file.infos[st.key].shape),
                         "rank": None, "rank_rule": "exact diff (norm scale)", "original": [_slot_json(orig, so)],
                         "tuned": [_slot_json(tune, st)]})
    return plan


def _slots_text(slots: list[dict[str, object]]) -> str:
    parts = []
    for e in slots:
        rows = e["rows"]
        parts.append(f"{e['key']}{e['shape']}" + (f"@rows {rows[0]}:{rows[1]}" if rows else "")  # type: ignore[index]
                     + (" (halves swapped)" if e["swapped_halves"] else "")
                     + (" (transposed)" if e.get("transposed") else ""))
    return " + ".join(parts)


def format_plan(report: ExtractReport) -> list[str]:
    """Human-readable lines of a dry-run plan: one per paired native module."""
    lines = []
    for e in report.plan:
        if e["rank"] is None:
            rank = f", {e['rank_rule']}"
        else:
            rank = f", rank {'≤ ' if e['rank_rule'] != 'fixed' else ''}{e['rank']}"
        lines.append(f"{e['module']} {e['shape']}{rank}: TUNED {_slots_text(e['tuned'])}"  # type: ignore[arg-type]
                     f" − ORIGINAL {_slots_text(e['original'])}")  # type: ignore[arg-type]
    return lines
