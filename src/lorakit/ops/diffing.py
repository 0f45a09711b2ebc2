"""``lorakit diff A B``: structural and numerical comparison of two LoRAs, or of two base models.

For LoRAs the comparison is on native targets (so a kohya file and its diffusers conversion compare
equal): modules only in one file, rank/alpha differences, and per module and per block the relative
size ‖ΔA‖/‖ΔB‖ and the cosine of the two deltas. LoRA pairs never form ΔW: with ΔW = s·B·A,
⟨s₁B₁A₁, s₂B₂A₂⟩ = s₁s₂·Σ((B₁ᵀB₂) ⊙ (A₁A₂ᵀ)) on the overlap of the two row windows; other adapter
kinds are densified one module at a time. Models are compared tensor by tensor on native names, every
component a checkpoint holds (an SDXL single file: UNet, CLIP-L, OpenCLIP-G), with fused row windows assembled
and transposed tensors turned back (BFL vs diffusers layouts, OpenCLIP's fused ``in_proj`` vs HF q/k/v compare
equal), holding two module tensors at most. Blocks: a module repeated per block index is totalled per block
(``transformer:double_blocks.3``, ``clip_l:text_model.encoder.layers.0``), any other by its layout group (an SD
UNet's ``unet:IN04`` / ``unet:M00`` / ``unet:OUT05``); every component also gets its own total. Files of two
architectures (SD 1.x vs SDXL) are refused.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TYPE_CHECKING


from lorakit.lora.adapters import LoRA
from lorakit.lora.transforms import stored_to_native
from lorakit.base.checkpoint import BaseModel, Slot, open_base
from lorakit.base.pipeline import is_pipeline, open_model
from lorakit.errors import LorakitError, ShapeMismatchError, UsageError
from lorakit.formats import load, parse
from lorakit.formats.parse import ParsedLora
from lorakit.io import open_weights
from lorakit.lora.model import LoraModel, Patch, Target, target_shape
from lorakit.progress import Progress
from lorakit.progress import report as report_progress

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch

EPS = 1e-30
EQUIVALENT = 1e-6
LISTED = 50


@dataclass
class Pair:
    """Accumulated ⟨A,A⟩, ⟨B,B⟩, ⟨A,B⟩ (and ‖A−B‖² measured directly, ``dd``, for models) over one module or
    block."""

    aa: float = 0.0
    bb: float = 0.0
    ab: float = 0.0
    modules: int = 0
    dd: float | None = None

    def add(self, other: "Pair") -> None:
        self.aa += other.aa
        self.bb += other.bb
        self.ab += other.ab
        self.modules += other.modules
        if other.dd is not None:
            self.dd = (self.dd or 0.0) + other.dd

    def to_json(self) -> dict[str, Any]:
        na, nb = math.sqrt(max(self.aa, 0.0)), math.sqrt(max(self.bb, 0.0))
        diff2 = self.dd if self.dd is not None else max(self.aa + self.bb - 2 * self.ab, 0.0)
        return {"norm_a": na, "norm_b": nb, "ratio": (na / nb) if nb > EPS else (math.inf if na > EPS else 1.0),
                "cosine": (self.ab / (na * nb)) if na > EPS and nb > EPS else None,
                "relative_difference": (math.sqrt(diff2) / na) if na > EPS else None,
                "difference_norm": math.sqrt(max(diff2, 0.0)), "modules": self.modules}

    @property
    def differs(self) -> bool:
        """‖A−B‖ above 1e-6 of the larger norm (or above zero for two zero tensors)."""
        diff2 = self.dd if self.dd is not None else max(self.aa + self.bb - 2 * self.ab, 0.0)
        scale = math.sqrt(max(self.aa, self.bb, 0.0))
        return math.sqrt(max(diff2, 0.0)) > (EQUIVALENT * scale if scale > EPS else EPS)


@dataclass
class DiffReport:
    kind: str                                   # "lora" or "model"
    a: dict[str, Any]
    b: dict[str, Any]
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    shared: int = 0
    rank_differences: list[dict[str, Any]] = field(default_factory=list)
    alpha_differences: list[dict[str, Any]] = field(default_factory=list)
    dtype_differences: list[dict[str, Any]] = field(default_factory=list)
    shape_mismatches: list[dict[str, Any]] = field(default_factory=list)
    bias_differences: list[dict[str, Any]] = field(default_factory=list)   # LoRAs: differing bias deltas
    dora_differences: list[dict[str, Any]] = field(default_factory=list)   # LoRAs: differing DoRA magnitudes
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    blocks: dict[str, dict[str, Any]] = field(default_factory=dict)
    components: dict[str, dict[str, Any]] = field(default_factory=dict)    # per-component totals
    differing_blocks: list[str] = field(default_factory=list)              # blocks whose deltas/tensors differ
    total: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # LoRAs: totals per block of the architecture's block scheme (IN04, D03 …; ``diff --plot``)
    slots: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def equivalent(self) -> bool:
        """Same modules and deltas/tensors equal to a relative 1e-6 (a lossless conversion compares equivalent);
        for LoRAs also the same bias deltas and DoRA magnitudes."""
        t = self.total
        if self.only_in_a or self.only_in_b or self.shape_mismatches or self.bias_differences \
                or self.dora_differences:
            return False
        rel = t.get("relative_difference")
        return rel <= EQUIVALENT if rel is not None else t.get("norm_b", 0.0) <= EPS

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["equivalent"] = self.equivalent
        return d


# ---------------------------------------------------------------------------------------------
# Inner products of patches without densifying
# ---------------------------------------------------------------------------------------------

def _window(p: Patch) -> tuple[int, int]:
    return p.rows if p.rows is not None else (0, p.out_rows)


def patch_inner(pa: Patch, pb: Patch) -> float:
    """⟨ΔA, ΔB⟩ of two patches placed at their row windows of the same target (strength 1)."""
    if pa.adapter is None or pb.adapter is None:
        return 0.0
    (a0, a1), (b0, b1) = _window(pa), _window(pb)
    lo, hi = max(a0, b0), min(a1, b1)
    if lo >= hi:
        return 0.0
    A, B = pa.adapter, pb.adapter
    if isinstance(A, LoRA) and isinstance(B, LoRA) and A.mid is None and B.mid is None:
        ua = A.up.flatten(1)[lo - a0:hi - a0].to(torch.float64)
        ub = B.up.flatten(1)[lo - b0:hi - b0].to(torch.float64)
        da, db = A.down.flatten(1).to(torch.float64), B.down.flatten(1).to(torch.float64)
        if da.shape[1] != db.shape[1]:
            raise ShapeMismatchError(str(pa.target), da.shape, db.shape)
        return A.scale * B.scale * float(((ua.T @ ub) * (da @ db.T)).sum())
    da, dbm = A.dense(), B.dense()      # reshape, not flatten(1): loose parameters (norm scales) are 1-D
    da = da.reshape(da.shape[0], -1)[lo - a0:hi - a0].to(torch.float64)
    dbm = dbm.reshape(dbm.shape[0], -1)[lo - b0:hi - b0].to(torch.float64)
    if da.shape != dbm.shape:
        raise ShapeMismatchError(str(pa.target), da.shape, dbm.shape)
    return float((da * dbm).sum())


def _gram(ps: list[Patch], qs: list[Patch]) -> float:
    return sum(patch_inner(p, q) for p in ps for q in qs)


# ---------------------------------------------------------------------------------------------
# Bias deltas and DoRA magnitudes (compared directly: no base weight needed)
# ---------------------------------------------------------------------------------------------

def _placed(parts: list[tuple[tuple[int, int], torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Row-windowed 1-D pieces assembled into one fp64 vector, with the mask of the rows they cover."""
    if not parts:
        return None
    n = max(w[1] for w, _ in parts)
    out = torch.zeros(n, dtype=torch.float64)
    mask = torch.zeros(n, dtype=torch.bool)
    for (r0, r1), v in parts:
        out[r0:r1] += v.reshape(-1).to(torch.float64)[: r1 - r0]
        mask[r0:r1] = True
    return out, mask


def _bias_vector(patches: list[Patch]) -> torch.Tensor | None:
    placed = _placed([(_window(p), p.bias) for p in patches if p.bias is not None])
    return placed[0] if placed is not None else None


def _dora_vectors(patches: list[Patch]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """DoRA magnitudes of one target: ``"out"`` assembled over the row windows (output-axis norms), and
    ``"in[a:b]"`` per window for input-axis (column) norms, which belong to their window's rows."""
    out_parts, vectors = [], {}
    for p in patches:
        if p.dora is None:
            continue
        m = p.dora
        w = _window(p) if p.rows is not None or p.adapter is not None or p.bias is not None else (0, m.shape[0])
        if m.dim() == 2 and m.shape[0] == 1 and w[1] - w[0] != 1:
            v = m.reshape(-1).to(torch.float64)
            vectors[f"in[{w[0]}:{w[1]}]"] = (v, torch.ones(v.numel(), dtype=torch.bool))
        else:
            out_parts.append((w, m))
    placed = _placed(out_parts)
    if placed is not None:
        vectors["out"] = placed
    return vectors


def _vector_difference(a: torch.Tensor | None, b: torch.Tensor | None) -> dict[str, Any] | None:
    """``None`` when equal to a relative 1e-6, else the norms and the relative difference."""
    if a is None and b is None:
        return None
    n = max(x.numel() for x in (a, b) if x is not None)
    va = torch.zeros(n, dtype=torch.float64) if a is None else a
    vb = torch.zeros(n, dtype=torch.float64) if b is None else b
    if va.numel() != vb.numel():
        return {"norm_a": float(va.norm()), "norm_b": float(vb.norm()), "relative_difference": None,
                "reason": f"lengths {va.numel()} vs {vb.numel()}"}
    na, nb, nd = float(va.norm()), float(vb.norm()), float((va - vb).norm())
    scale = max(na, nb)
    if nd <= EQUIVALENT * scale or (scale <= EPS and nd <= EPS):
        return None
    return {"norm_a": na, "norm_b": nb, "relative_difference": nd / scale if scale > EPS else None}


def _compare_extras(rep: "DiffReport", name: str, pa: list[Patch], pb: list[Patch]) -> None:
    d = _vector_difference(_bias_vector(pa), _bias_vector(pb))
    if d is not None:
        rep.bias_differences.append({"module": name, **d})
    va, vb = _dora_vectors(pa), _dora_vectors(pb)
    for key in sorted(set(va) | set(vb)):
        if key not in va or key not in vb:
            rep.dora_differences.append({"module": name, "axis": key, "only_in": "A" if key in va else "B"})
            continue
        (ma, ka), (mb, kb) = va[key], vb[key]
        if ka.shape != kb.shape or not torch.equal(ka, kb):
            rep.dora_differences.append({"module": name, "axis": key, "reason": "the magnitudes cover different rows"})
            continue
        d = _vector_difference(ma, mb)
        if d is not None:
            rep.dora_differences.append({"module": name, "axis": key, **d})


# ---------------------------------------------------------------------------------------------
# Grouping
# ---------------------------------------------------------------------------------------------

_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def block_of(component: str, module: str, group: str | None = None, *, repeated: bool = True) -> str:
    """The block a module belongs to, for per-block totals: its block index for a module repeated per block
    (``transformer:double_blocks.3``), else its layout group (``unet:IN04``, ``unet:M00``, ``transformer:embedders``);
    the first part of its name when the layout does not know it."""
    if group is not None and not repeated:
        return f"{component}:{group}"
    m = _BLOCK.match(module)
    if m:
        return f"{component}:{m.group(1)}"
    return f"{component}:{group or module.split('.')[0]}"


def _placement(arch: Any, component: str, module: str) -> tuple[str | None, bool]:
    """(layout group, repeated per block) of a native module or loose parameter of ``arch`` (an ArchInstance)."""
    mod = arch.module_map(component).get(module)
    if mod is not None:
        return mod.group, mod.spec.repeat is not None
    comp = arch.spec.components.get(component)
    for p in (comp.params if comp is not None else ()):
        if p.repeat is None and p.native == module:
            return p.group, False
    return None, True


def _group_key(arch: Any, component: str, module: str) -> str:
    group, repeated = _placement(arch, component, module)
    return block_of(component, module, group, repeated=repeated)


def _finish(rep: "DiffReport", blocks: dict[str, Pair], comps: dict[str, Pair], total: Pair) -> None:
    ordered = sorted(blocks.items(), key=lambda kv: _natural(kv[0]))
    rep.blocks = {k: v.to_json() for k, v in ordered}
    rep.differing_blocks = [k for k, v in ordered if v.differs]
    rep.components = {k: v.to_json() for k, v in comps.items()}
    rep.total = total.to_json()


def _same_architecture(kind: str, arch_a: Any, arch_b: Any, pa: str, pb: str) -> None:
    """Refuse files of two architectures (their module names overlap, their meaning does not)."""
    if arch_a.name != arch_b.name:
        raise UsageError(f"cannot diff a {arch_a.spec.label} {kind} ({pa}) against a {arch_b.spec.label} {kind} "
                         f"({pb}): the architectures differ.",
                         hint=f"compare {arch_a.spec.label} files with {arch_a.spec.label} files; to see whether a LoRA "
                              "fits a model, run `lorakit doctor LORA --base MODEL`.")


# ---------------------------------------------------------------------------------------------
# LoRA vs LoRA
# ---------------------------------------------------------------------------------------------

def _lora_side(path: str, model: LoraModel) -> dict[str, Any]:
    ranks = Counter(p.adapter.rank for p in model.patches if p.adapter is not None and p.adapter.rank is not None)
    alphas = Counter(p.adapter.alpha for p in model.patches if p.adapter is not None and p.adapter.alpha is not None)
    return {"file": path, "kind": "lora", "format": model.format, "architecture": model.arch.name,
            "architecture_label": model.arch.spec.label, "variant": model.arch.variant, "adapters": model.adapter_kinds(), "modules": len(model.by_target()),
            "patches": len(model.patches), "ranks": dict(sorted(ranks.items())),
            "alphas": dict(sorted(alphas.items())), "unknown_key_count": len(model.unknown_keys)}


def _shape(model: LoraModel, t: Target, patches: list[Patch]) -> tuple[int, ...] | None:
    live = [p for p in patches if p.adapter is not None]
    if not live:
        return None
    return tuple(target_shape(model, t, live))


def _ranks(patches: Iterable[Patch]) -> list[int]:
    return sorted(p.adapter.rank for p in patches if p.adapter is not None and p.adapter.rank is not None)


def _alphas(patches: Iterable[Patch]) -> list[float]:
    return sorted({float(p.adapter.alpha if p.adapter.alpha is not None else p.adapter.rank or 0)
                   for p in patches if p.adapter is not None})


def diff_loras(a: LoraModel, b: LoraModel) -> DiffReport:
    """Compare two loaded LoRAs on native targets from their factors (no dense ΔW for plain LoRAs)."""
    _same_architecture("LoRA", a.arch, b.arch, a.path or "A", b.path or "B")
    ta, tb = a.by_target(), b.by_target()
    rep = DiffReport("lora", _lora_side(a.path or "A", a), _lora_side(b.path or "B", b))
    rep.only_in_a = sorted(str(t) for t in ta if t not in tb)
    rep.only_in_b = sorted(str(t) for t in tb if t not in ta)
    from lorakit.ops.strength import block_label, block_order
    blocks: dict[str, Pair] = {}
    comps: dict[str, Pair] = {}
    slots: dict[str, Pair] = {}
    total = Pair()
    for t in ta.keys() ^ tb.keys():       # a module in one file only counts in its block's norm
        only = Pair(_gram(ta[t], ta[t]) if t in ta else 0.0, _gram(tb[t], tb[t]) if t in tb else 0.0, 0.0, 1)
        slots.setdefault(block_label(a.arch, t), Pair()).add(only)
    shared = sorted((t for t in ta if t in tb), key=str)
    rep.shared = len(shared)
    for t in shared:
        pa, pb = ta[t], tb[t]
        sa, sb = _shape(a, t, pa), _shape(b, t, pb)
        if sa and sb and sa != sb:
            rep.shape_mismatches.append({"module": str(t), "a": list(sa or ()), "b": list(sb or ())})
            continue
        _compare_extras(rep, str(t), pa, pb)
        ra, rb = _ranks(pa), _ranks(pb)
        if ra != rb:
            rep.rank_differences.append({"module": str(t), "a": ra, "b": rb})
        aa_, ab_ = _alphas(pa), _alphas(pb)
        if aa_ != ab_:
            rep.alpha_differences.append({"module": str(t), "a": aa_, "b": ab_})
        try:
            pair = Pair(_gram(pa, pa), _gram(pb, pb), _gram(pa, pb), 1)
        except ShapeMismatchError as exc:
            rep.shape_mismatches.append({"module": str(t), "a": list(exc.expected), "b": list(exc.got)})
            continue
        rep.modules[str(t)] = pair.to_json()
        blocks.setdefault(_group_key(a.arch, t.component, t.module), Pair()).add(pair)
        comps.setdefault(t.component, Pair()).add(pair)
        slots.setdefault(block_label(a.arch, t), Pair()).add(pair)
        total.add(pair)
    _finish(rep, blocks, comps, total)
    rep.slots = {k: slots[k].to_json() for k in block_order(a.arch, set(slots))}
    if any(p.dora is not None for p in a.patches + b.patches):
        rep.notes.append("DoRA magnitudes are compared directly (equal or not); the ratios and cosines cover the "
                         "low-rank deltas only (a DoRA's effect on W needs the base weight).")
    if any(p.bias is not None for p in a.patches + b.patches):
        rep.notes.append("bias deltas are compared directly; they are not included in the ratios and cosines.")
    return rep


def _natural(text: str) -> list[object]:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", text)]


# ---------------------------------------------------------------------------------------------
# Model vs model (streamed, one native tensor at a time)
# ---------------------------------------------------------------------------------------------

@dataclass
class _Native:
    """One native tensor of a base: its component, module (None: a loose parameter or passthrough), the file
    slots it is stored in."""

    component: str
    module: str | None
    slots: list[Slot]


def _native_slots(base: BaseModel) -> dict[str, _Native]:
    """Native tensors by name: ``<module>.<weight|bias>`` or the loose parameter's name, prefixed ``<component>:``
    outside the base's main component; ``passthrough:<key>`` for tensors of no component."""
    out: dict[str, _Native] = {}
    main = base.component
    for s in base.slots.values():
        name = f"{s.module}.{s.param}" if s.module is not None else s.param
        key = name if s.component == main else f"{s.component}:{name}"
        out.setdefault(key, _Native(s.component, s.module if s.module is not None else s.param, [])).slots.append(s)
    for k in base.passthrough:
        out["passthrough:" + k] = _Native("passthrough", None, [Slot(k, None, k, None, False, "passthrough")])
    return out


def _read_native(base: BaseModel, slots: list[Slot]) -> torch.Tensor:
    """A native tensor in ΔW orientation: swapped halves and transposed storage turned back, row windows of a
    fused weight assembled."""
    def read(s: Slot) -> torch.Tensor:
        return stored_to_native(base.file.get(s.key).to(torch.float32), swap=s.swap, transpose=s.transpose)

    if len(slots) == 1 and slots[0].rows is None:
        return read(slots[0])
    parts = []
    for s in slots:
        t = read(s)
        parts.append((s.rows or (0, t.shape[0]), t))
    rows = max(r[1] for r, _ in parts)
    out = torch.zeros((rows, *parts[0][1].shape[1:]), dtype=torch.float32)
    for (r0, r1), t in parts:
        out[r0:r1] = t
    return out


def _model_side(path: str, base: BaseModel) -> dict[str, Any]:
    dtypes = Counter(i.dtype for i in base.file.infos.values())
    spec = base.arch.spec
    return {"file": path, "kind": "model", "architecture": spec.name, "architecture_label": spec.label,
            "layout": base.layout, "prefix": base.prefix, "variant": base.variant,
            "components": {c: spec.components[c].label for c in base.components()},
            "sizes": dict(sorted(base.arch.params.get(base.component, {}).items())),
            "component_sizes": {c: dict(sorted(base.arch.params.get(c, {}).items())) for c in base.components()},
            "tensors": len(base.file.keys()), "dtypes": dict(dtypes)}


def _tensor_pair(ta: torch.Tensor, tb: torch.Tensor) -> Pair:
    """⟨A,A⟩, ⟨B,B⟩, ⟨A,B⟩ and ‖A−B‖² of two tensors in fp64 (equal tensors: one product)."""
    a = ta.reshape(-1).to(torch.float64)
    if torch.equal(ta, tb):
        aa = float(a.dot(a))
        return Pair(aa, aa, aa, 1, 0.0)
    b = tb.reshape(-1).to(torch.float64)
    d = a - b
    return Pair(float(a.dot(a)), float(b.dot(b)), float(a.dot(b)), 1, float(d.dot(d)))


def _model_block(base: BaseModel, n: _Native) -> str:
    if n.component == "passthrough":
        return "passthrough:" + n.slots[0].key.split(".")[0]
    return _group_key(base.arch, n.component, n.module or "")


def diff_models(a: BaseModel, b: BaseModel, *, path_a: str, path_b: str,
                progress: Progress | None = None) -> DiffReport:
    """Compare two base models tensor by tensor in bounded memory (norms, inner products and ‖A−B‖ per
    module/block/component); ``progress(done, total, tensor)`` is called once per shared tensor."""
    _same_architecture("model", a.arch, b.arch, path_a, path_b)
    rep = DiffReport("model", _model_side(path_a, a), _model_side(path_b, b))
    na, nb = _native_slots(a), _native_slots(b)
    rep.only_in_a = sorted(k for k in na if k not in nb)
    rep.only_in_b = sorted(k for k in nb if k not in na)
    shared = sorted((k for k in na if k in nb), key=_natural)
    rep.shared = len(shared)
    blocks: dict[str, Pair] = {}
    comps: dict[str, Pair] = {}
    total = Pair()
    for i, k in enumerate(shared):
        report_progress(progress, i, len(shared), k)
        da = {a.file.infos[s.key].dtype for s in na[k].slots}
        db = {b.file.infos[s.key].dtype for s in nb[k].slots}
        if da != db:
            rep.dtype_differences.append({"tensor": k, "a": sorted(da), "b": sorted(db)})
        ta, tb = _read_native(a, na[k].slots), _read_native(b, nb[k].slots)
        if ta.shape != tb.shape:
            rep.shape_mismatches.append({"module": k, "a": list(ta.shape), "b": list(tb.shape)})
            continue
        pair = _tensor_pair(ta, tb)
        del ta, tb
        if len(rep.modules) < 10_000:
            rep.modules[k] = pair.to_json()
        blocks.setdefault(_model_block(a, na[k]), Pair()).add(pair)
        comps.setdefault(na[k].component, Pair()).add(pair)
        total.add(pair)
    report_progress(progress, len(shared), len(shared))
    _finish(rep, blocks, comps, total)
    return rep


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def _common_reading(a: ParsedLora, b: ParsedLora, from_format: str | None) -> tuple[ParsedLora, ParsedLora]:
    """Two LoRAs read as one architecture when one of them fits the other's equally well (diffusers-named SD
    resnet keys read as SD 1.x or SDXL); otherwise as detected (a real mismatch is refused later)."""
    if a.arch.name == b.arch.name:
        return a, b
    if b.arch.spec.label in a.detection.also_fits:
        return parse(a.file, arch_name=b.arch.name, force_format=from_format), b
    if a.arch.spec.label in b.detection.also_fits:
        return a, parse(b.file, arch_name=a.arch.name, force_format=from_format)
    return a, b


def diff(a: str | os.PathLike[str], b: str | os.PathLike[str], *, allow_pickle: bool = False,
         from_format: str | None = None, progress: Progress | None = None) -> DiffReport:
    """Compare two LoRAs or two base models (detected from their keys); ``progress(done, total, tensor)``
    is called while two base models are compared (LoRAs are compared from their small factors)."""
    pa, pb = os.fspath(a), os.fspath(b)
    if is_pipeline(pa) or is_pipeline(pb):       # a pipeline folder is a model: both sides must be
        ma = open_model(pa, allow_pickle=allow_pickle)
        try:
            mb = open_model(pb, allow_pickle=allow_pickle)
        except BaseException:
            ma.file.close()
            raise
        with ma.file, mb.file:
            return diff_models(ma, mb, path_a=pa, path_b=pb, progress=progress)
    fa = open_weights(pa, allow_pickle=allow_pickle)
    try:
        fb = open_weights(pb, allow_pickle=allow_pickle)
    except BaseException:
        fa.close()
        raise
    with fa, fb:
        sides: list[tuple[str, Any]] = []
        for path, f in ((pa, fa), (pb, fb)):
            try:
                sides.append(("lora", parse(f, force_format=from_format)))
            except LorakitError as exc:      # not a LoRA, or keys no LoRA format explains: maybe a model
                if not f.keys():
                    raise
                try:
                    from lorakit.base.quant import dequantized
                    sides.append(("model", open_base(dequantized(f))))
                except LorakitError:
                    raise exc from None      # neither a LoRA nor a model: the LoRA-side message is clearer
        kinds = [k for k, _ in sides]
        if kinds[0] != kinds[1]:
            lora = pa if kinds[0] == "lora" else pb
            model = pb if kinds[0] == "lora" else pa
            raise UsageError(f"cannot diff a LoRA ({lora}) against a base model ({model}).",
                             hint=f"to see how the LoRA fits the model, run `lorakit doctor {lora} --base {model}`.")
        if kinds[0] == "lora":
            la, lb = _common_reading(sides[0][1], sides[1][1], from_format)
            return diff_loras(load(la), load(lb))
        return diff_models(sides[0][1], sides[1][1], path_a=pa, path_b=pb, progress=progress)


def _extra_text(e: Mapping[str, Any]) -> str:
    where = e["module"] + (f" {e['axis']}" if "axis" in e else "")
    if "only_in" in e:
        return f"{where}: only in {e['only_in']}"
    if e.get("relative_difference") is not None:
        return f"{where}: |A| {e['norm_a']:.4g}, |B| {e['norm_b']:.4g}, relative difference {e['relative_difference']:.3g}"
    return f"{where}: {e.get('reason', 'different')}"


def format_report(rep: DiffReport, *, top: int = 12) -> str:
    """The human-readable text of a diff report (the ``top`` most different blocks)."""
    a, b = rep.a, rep.b

    def side(s: Mapping[str, Any]) -> str:
        if s["kind"] == "lora":
            return (f"{s['file']}: {s['format']} {', '.join(s['adapters'])}, {s['modules']} modules, ranks "
                    + ", ".join(f"{k}×{v}" for k, v in s["ranks"].items()))
        comps = s.get("components") or {}
        return (f"{s['file']}: {s.get('architecture_label', '')} model ({s['layout']} layout, {s['variant']}), "
                f"{s['tensors']} tensors" + (f"; {', '.join(comps.values())}" if len(comps) > 1 else ""))

    lines = [f"A  {side(a)}", f"B  {side(b)}",
             f"modules  shared {rep.shared}, only in A {len(rep.only_in_a)}, only in B {len(rep.only_in_b)}"]
    for label, items in (("only in A", rep.only_in_a), ("only in B", rep.only_in_b)):
        if items:
            lines.append(f"  {label}: " + ", ".join(items[:8]) + (f" … and {len(items) - 8} more" if len(items) > 8
                                                                   else ""))
    if rep.rank_differences:
        d = rep.rank_differences[0]
        lines.append(f"ranks differ in {len(rep.rank_differences)} modules (e.g. {d['module']}: {d['a']} vs {d['b']})")
    if rep.alpha_differences:
        d = rep.alpha_differences[0]
        lines.append(f"alphas differ in {len(rep.alpha_differences)} modules (e.g. {d['module']}: {d['a']} vs {d['b']})")
    if rep.dtype_differences:
        d = rep.dtype_differences[0]
        lines.append(f"dtypes differ in {len(rep.dtype_differences)} tensors (e.g. {d['tensor']}: {d['a']} vs {d['b']})")
    for m in rep.shape_mismatches[:8]:
        lines.append(f"shape mismatch  {m['module']}: {m['a']} vs {m['b']}")
    for label, extras in (("bias deltas", rep.bias_differences), ("DoRA magnitudes", rep.dora_differences)):
        if extras:
            lines.append(f"{label} differ in {len(extras)} modules (e.g. {_extra_text(extras[0])})")

    def row(name: str, e: Mapping[str, Any]) -> str:
        cos = "   n/a" if e["cosine"] is None else f"{e['cosine']:+.4f}"
        ratio = "inf" if math.isinf(e["ratio"]) else f"{e['ratio']:.4g}"
        return f"  {name:<44} |A|/|B| {ratio:>9}  cos {cos}"

    if rep.blocks:
        lines.append("per block:")
        lines.extend(row(k, v) for k, v in rep.blocks.items())
    if len(rep.components) > 1:
        lines.append("per component:")
        lines.extend(row(k, v) for k, v in rep.components.items())
    if rep.differing_blocks and len(rep.differing_blocks) < len(rep.blocks):
        lines.append(f"differ in {len(rep.differing_blocks)} of {len(rep.blocks)} blocks: "
                     + ", ".join(rep.differing_blocks[:top]) + (" …" if len(rep.differing_blocks) > top else ""))
    if rep.total:
        lines.append(row("TOTAL", rep.total))
    lines.extend(f"note: {n}" for n in rep.notes)
    lines.append("equivalent (relative difference ≤ 1e-6)" if rep.equivalent else "different")
    return "\n".join(lines)
