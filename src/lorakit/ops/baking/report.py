"""What a bake did (or would do): the report, the output's provenance metadata and the dry-run plan."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from lorakit.base.checkpoint import BaseModel
from lorakit.io.reader import ShardedFile
from lorakit.ops.baking.inputs import BakeInput
from lorakit.ops.baking.places import LOOSE, Place
from lorakit.ops.baking.tasks import Task
from lorakit.ops.metadata import InputRecord, PROVENANCE_KEY, file_sha256, provenance


DORA_RULE = "peft: W0 + sum(w*dW) + sum(m*(W0 + s*dW)/||W0 + s*dW|| - W0)"


@dataclass
class BakeReport:
    base: str
    output: str | None
    layout: str
    variant: str
    dtype: str
    device: str
    inputs: list[dict[str, object]] = field(default_factory=list)
    tensors: int = 0
    changed: int = 0
    copied: int = 0
    converted: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    skipped: list[dict[str, object]] = field(default_factory=list)
    not_applied: list[dict[str, object]] = field(default_factory=list)
    text_encoders: list[dict[str, object]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    plan: list[dict[str, object]] = field(default_factory=list)
    dry_run: bool = False
    seconds: float = 0.0
    # quantized bases: convention, delta retention overall / per block / per tensor, scale policy (else None)
    quantized: dict[str, object] | None = None
    # seconds per pipeline stage (pipeline.StageTimes) and the commit (fsync + rename of every output)
    stages: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        d = dict(self.__dict__)
        if not self.dry_run:
            d.pop("plan")
        return d


def output_metadata(bm: BaseModel, loras: list[BakeInput], report: BakeReport, dry_run: bool) -> dict[str, str]:
    """The baked file's metadata: provenance (inputs, hashes, base, dtype, DoRA rule) and the ModelSpec architecture."""
    records = []
    for i in loras:
        sha = None if dry_run or not os.path.isfile(i.path) else file_sha256(i.path)
        records.append(InputRecord(i.path, sha, weight=i.weight, format=i.model.format))
    if isinstance(bm.file, ShardedFile):
        name = os.path.basename(os.path.abspath(bm.file.folder))
        size = sum(os.path.getsize(os.path.join(bm.file.folder, s)) for s in bm.file.shard_names)
    else:
        name, size = os.path.basename(bm.file.path), os.path.getsize(bm.file.path)
    dora = any(p.dora is not None for i in loras for p in i.model.patches)
    meta = {PROVENANCE_KEY: provenance("bake", records,
                                       base={"file": name, "bytes": size,
                                             "layout": bm.layout, "variant": bm.variant},
                                       dtype=report.dtype,
                                       dora=DORA_RULE if dora else None,
                                       skipped=len(report.skipped) or None)}
    spec = bm.arch.spec
    meta["modelspec.architecture"] = spec.stamp.architecture(bm.variant) or spec.stamp.modelspec or spec.name
    meta.setdefault("modelspec.sai_model_spec", "1.0.1")
    return meta


def describe(tasks: list[Task], loras: list[BakeInput]) -> list[dict[str, object]]:
    """The dry-run plan: per tensor its action (bake/convert/copy) and, when baked, every change with its rows."""
    plan = []
    for t in tasks:
        entry: dict[str, object] = {"tensor": f"{t.where}/{t.key}" if t.where else t.key, "dtype": t.info.dtype,
                                    "out_dtype": t.out_code,
                                    "action": "bake" if t.changed else ("convert" if t.compute else "copy")}
        if t.changed and t.place is not None:
            lo, hi = t.place.rows
            changes = []
            for kind, group in (("add", t.additive), ("dora", t.doras)):
                for u in group:
                    a, b = max(lo, u.window[0]), min(hi, u.window[1])
                    changes.append({"input": os.path.basename(loras[u.input].path), "module": u.patch.source,
                                    "native": t.place.module if t.place.param == LOOSE
                                    else f"{t.place.module}.{t.place.param}", "native_rows": [a, b],
                                    "tensor_rows": _tensor_rows(t.place, a, b), "weight": u.weight, "kind": kind})
            entry["changes"] = changes
        plan.append(entry)
    return plan


def _tensor_rows(place: Place, a: int, b: int) -> list[int] | str:
    if place.transpose:
        return f"columns {a}:{b} (stored transposed)"
    lo, hi = place.rows
    if not place.swap:
        return [a - lo, b - lo]
    n, half = hi - lo, (hi - lo) // 2
    j0 = (a - lo + half) % n
    if j0 + (b - a) > n:
        return "all, halves swapped" if (a, b) == (lo, hi) else "halves swapped"
    return [j0, j0 + (b - a)]


def format_plan(report: BakeReport) -> Iterable[str]:
    """Human-readable lines of a dry-run plan."""
    copied = 0
    for e in report.plan:
        if e["action"] == "copy":
            copied += 1
            continue
        conv = f" {e['dtype']}→{e['out_dtype']}" if e["dtype"] != e["out_dtype"] else ""
        if e["action"] == "convert":
            yield f"{e['tensor']}: convert{conv}"
            continue
        yield f"{e['tensor']}{conv} ←"
        changes = cast("list[dict[str, Any]]", e["changes"])     # what describe lists for a baked tensor
        for c in changes:
            r, tr = c["native_rows"], c["tensor_rows"]
            where = tr if isinstance(tr, str) else f"{tr[0]}:{tr[1]}"
            yield (f"    {c['kind']} {c['input']}:{c['module']} ×{c['weight']:g}  {c['native']} rows {r[0]}:{r[1]}"
                   f" → tensor rows {where}")
    yield f"{copied} tensors copied unchanged"
