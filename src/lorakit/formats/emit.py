"""Write the internal model in a target format: fuse split patches, split fused ones, fold or store α.

All restructuring is exact (see ``flux.md`` §6): split → fused stacks the downs and places the ups
block-diagonally; fused → split gives each part the rows of ``up`` and only the ``down`` rows whose
columns that part uses (which recovers the original smaller rank of a block-diagonal file and shares
the whole down otherwise). What a target cannot hold exactly raises :class:`LossyConversionError`,
or with ``allow_lossy`` is re-factored by SVD and reported.

LyCORIS modules (LoHa, LoKr, Tucker LoCon ``lora_mid``) are written as plain LoRA factors by default, exactly
(:meth:`~lorakit.lora.adapters.Adapter.to_lora`: face-splitting / Kronecker mixed-product / Tucker contraction, no
SVD), before any fusing or splitting; ``keep_algo`` keeps their LyCORIS keys where the naming can carry them.
A module whose exact plain rank would hold more numbers than its dense weight is refused (or SVD'd with
``allow_lossy``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, cast


from lorakit.lora.adapters import Adapter, Full, LoHa, LoKr, LoRA, NotExact, lora_from_dense
from lorakit.errors import LossyConversionError, NonFiniteError, UsageError
from lorakit.layouts import Alias, ArchSpec, NameIndex, evaluate
from lorakit.layouts.base import ParamIndex, ParamMatch, Rule, param_name
from lorakit.lora.experts import experts_in
from lorakit.lora.model import LoraModel, Patch, Target
from lorakit.lora.transforms import swap_halves, swap_parts
from lorakit.formats.spec import WRITE_SUFFIXES, FormatSpec, get_format

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from lorakit.lazy import torch


@dataclass
class Piece:
    """One output module: the adapter and extras for a name in the target naming."""

    component: str
    name: str               # module name in the target naming (before prefix/flattening)
    adapter: Adapter | None
    bias: Tensor | None = None
    dora: Tensor | None = None


@dataclass
class EmitResult:
    tensors: dict[str, Tensor]
    lossy: list[tuple[str, float]] = field(default_factory=list)   # (module, relative error)
    modules: int = 0
    ranks: dict[str, int] = field(default_factory=dict)            # output module -> rank (LoRA family)
    alphas: dict[str, float] = field(default_factory=dict)         # output module -> stored alpha
    rounded: list[tuple[str, float]] = field(default_factory=list)  # (module, rel. error) of folding α (> FOLD_TOL)
    converted: list[tuple[str, str, int]] = field(default_factory=list)  # (input module, LyCORIS algo, plain rank)
    warnings: list[str] = field(default_factory=list)              # what a consumer of the target will drop
    notes: list[str] = field(default_factory=list)                 # how to use the file (nothing is lost)


FOLD_TOL = 1e-6     # relative error above which folding α into the written factors counts as lossy


# ---------------------------------------------------------------------------------------------
# Restructuring primitives
# ---------------------------------------------------------------------------------------------

def restrict(adapter: Adapter, start: int, stop: int) -> Adapter:
    """The part of ``adapter`` on output rows ``[start, stop)``, exactly."""
    if isinstance(adapter, LoRA) and adapter.mid is None:
        up = adapter.up[start:stop]
        used = up.flatten(1).ne(0).any(dim=0)
        if bool(used.all()) or not bool(used.any()):
            return LoRA(alpha=adapter.alpha, down=adapter.down, up=up)
        idx = torch.nonzero(used).flatten()
        r = int(idx.numel())
        return LoRA(alpha=adapter.scale * r, down=adapter.down[idx], up=up[:, idx])
    return adapter.row_slice(start, stop)


def is_lycoris(adapter: Adapter | None) -> bool:
    """LoHa, LoKr or a Tucker LoCon (``lora_mid``): modules a plain-LoRA consumer cannot read."""
    return isinstance(adapter, (LoHa, LoKr)) or isinstance(adapter, LoRA) and adapter.mid is not None


def patch_label(p: Patch) -> str:
    """``component:module`` of a patch, with its row window when it covers part of the weight."""
    return f"{p.target}[{p.rows[0]}:{p.rows[1]}]" if p.rows else str(p.target)


def input_axis_dora(dora: Tensor | None, out_rows: int) -> bool:
    """True for an input-axis DoRA magnitude: shape ``(1, in)``, one value per input column (LyCORIS
    ``wd_on_output=False``). Output-axis magnitudes are ``(out,)`` (one value per output row)."""
    return dora is not None and dora.dim() == 2 and dora.shape[0] == 1 and out_rows != 1


def is_pow2(c: float) -> bool:
    """Whether scaling by ``c`` is exact in binary floating point (``c = ±2^k``)."""
    if c == 0 or not math.isfinite(c):
        return False
    m, _ = math.frexp(abs(c))
    return m == 0.5


def fuse(parts: list[tuple[tuple[int, int], Adapter | None, Tensor | None, Tensor | None]], out_rows: int,
         tail: tuple[int, ...]) -> tuple[Adapter | None, Tensor | None, Tensor | None]:
    """Combine adapters on row windows of one weight into one adapter covering all rows, exactly."""
    adapters = [(rows, a) for rows, a, _, _ in parts if a is not None]
    bias = _place([(rows, b) for rows, _, b, _ in parts if b is not None], out_rows)
    doras = [(rows, d) for rows, _, _, d in parts if d is not None]
    dora = None
    if doras and any(a is not None and d is None for _, a, _, d in parts):
        # DoRA normalizes W0 + ΔW of its own module: folding another module's delta into it changes both
        raise NotExact("DoRA and non-DoRA adapters on one weight cannot be combined into one module")
    if any(input_axis_dora(d, e - s) for (s, e), d in doras):
        # an input-axis magnitude normalizes whole columns: it cannot be stacked with other row windows
        if len(doras) != 1 or doras[0][0] != (0, out_rows):
            raise NotExact("an input-axis DoRA magnitude (one value per column) normalizes the whole weight; "
                           "it cannot be combined with other row windows")
        dora = doras[0][1]
    elif doras:
        covered = sorted(rows for rows, _ in doras)
        if covered[0][0] != 0 or covered[-1][1] != out_rows or any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
            raise NotExact("DoRA magnitudes do not cover every row of the fused weight")
        dora = torch.cat([d.reshape(-1) for _, d in sorted(doras, key=lambda x: x[0])], dim=0)
    if not adapters:
        return None, bias, dora
    if len(adapters) == 1 and adapters[0][0] == (0, out_rows):
        return adapters[0][1], bias, dora
    if all(isinstance(a, LoRA) and a.mid is None for _, a in adapters):
        return _blockdiag(adapters, out_rows), bias, dora  # type: ignore[arg-type]
    if all(isinstance(a, Full) for _, a in adapters):
        first = adapters[0][1]
        total = torch.zeros((out_rows, *tail), dtype=torch.float32)
        for (s, e), a in adapters:
            total[s:e] += a.dense()
        return Full(alpha=None, diff=total.to(first.dtype)), bias, dora
    if all(isinstance(a, LoHa) and a.t1 is None for _, a in adapters):
        return _fuse_loha(adapters, out_rows), bias, dora  # type: ignore[arg-type]
    if all(isinstance(a, LoKr) for _, a in adapters):
        return _fuse_lokr(adapters, out_rows), bias, dora  # type: ignore[arg-type]
    raise NotExact("LoHa/LoKr parts on one fused weight cannot be combined into one module")


def _same(tensors: list[Tensor | None]) -> bool:
    first = tensors[0]
    if first is None:
        return all(t is None for t in tensors)
    return all(t is not None and t.shape == first.shape and t.dtype == first.dtype and torch.equal(t, first)
               for t in tensors[1:])


def _fuse_loha(adapters: list[tuple[tuple[int, int], LoHa]], out_rows: int) -> LoHa:
    """LoHa parts that share ``w1b``/``w2b`` (row slices of one LoHa, or one part alone) become one LoHa whose
    ``w1a``/``w2a`` hold each part's rows at its window and zeros elsewhere: exact."""
    parts = [a for _, a in adapters]
    if not (_same([a.w1b for a in parts]) and _same([a.w2b for a in parts])):
        raise NotExact("LoHa parts on one fused weight with different factors cannot be combined into one module")
    ref = parts[0]
    ref = next((a for a in parts if a.scale != 0), ref)    # a zero scale cannot be a reference
    ref_scale = ref.scale or 1.0
    w1a = torch.zeros((out_rows, ref.w1a.shape[1]), dtype=torch.float32)
    w2a = torch.zeros((out_rows, ref.w2a.shape[1]), dtype=torch.float32)
    for (s, e), a in adapters:
        ratio = a.scale / ref_scale
        w1a[s:e] += a.w1a.to(torch.float32) * ratio if ratio != 1 else a.w1a.to(torch.float32)
        w2a[s:e] += a.w2a.to(torch.float32)
    return LoHa(alpha=ref.alpha, w1a=w1a.to(ref.w1a.dtype), w1b=ref.w1b, w2a=w2a.to(ref.w2a.dtype), w2b=ref.w2b)


def _fuse_lokr(adapters: list[tuple[tuple[int, int], LoKr]], out_rows: int) -> LoKr:
    """LoKr parts that share their second factor (row slices of one LoKr, or one part alone) become one LoKr
    whose first factor holds each part's rows at its block window and zeros elsewhere, when every window
    is aligned with the second factor's row blocks: exact."""
    parts = [a for _, a in adapters]
    ref = parts[0]
    k = ref._rows2
    if not (_same([a.w2 for a in parts]) and _same([a.w2a for a in parts]) and _same([a.w2b for a in parts])
            and _same([a.t2 for a in parts])):
        raise NotExact("LoKr parts on one fused weight with different second factors cannot be combined")
    if out_rows % k or any(s % k or e % k for (s, e), _ in adapters):
        raise NotExact(f"LoKr parts do not align with blocks of {k} rows")
    decomposed = ref.w1 is None
    if any((a.w1 is None) != decomposed for a in parts) or (decomposed and not _same([a.w1b for a in parts])):
        raise NotExact("LoKr parts with different first-factor layouts cannot be combined")
    rows1 = ref.w1a if decomposed else ref.w1
    assert rows1 is not None
    w1 = torch.zeros((out_rows // k, *rows1.shape[1:]), dtype=torch.float32)
    ref = next((a for a in parts if a.scale != 0), ref)    # a zero scale cannot be a reference
    ref_scale = ref.scale or 1.0
    for (s, e), a in adapters:
        src = (a.w1a if decomposed else a.w1).to(torch.float32)  # type: ignore[union-attr]
        ratio = a.scale / ref_scale
        w1[s // k:e // k] += src * ratio if ratio != 1 else src
    w1 = w1.to(rows1.dtype)
    return replace(ref, w1a=w1) if decomposed else replace(ref, w1=w1)


def _blockdiag(adapters: list[tuple[tuple[int, int], LoRA]], out_rows: int) -> LoRA:
    """Stack the downs and place the ups at their row windows. Parts that share one identical down
    (a fused file split by sharing its down) share one column block, which restores the fused rank."""
    ref = _reference_scale([a for _, a in adapters])
    dtype = adapters[0][1].up.dtype
    groups: list[tuple[Tensor, list[tuple[tuple[int, int], LoRA]]]] = []
    for rows, a in adapters:
        for down, members in groups:
            if down.shape == a.down.shape and down.dtype == a.down.dtype and torch.equal(down, a.down):
                members.append((rows, a))
                break
        else:
            groups.append((a.down, [(rows, a)]))
    total_rank = sum(int(down.shape[0]) for down, _ in groups)
    tail_up = adapters[0][1].up.shape[2:]
    up_f = torch.zeros((out_rows, total_rank, *tail_up), dtype=torch.float32)
    col = 0
    for down, members in groups:
        r = int(down.shape[0])
        for (s, e), a in members:
            ratio = a.scale / ref
            up = a.up.to(torch.float32)
            up_f[s:e, col:col + r] += up * ratio if ratio != 1 else up
        col += r
    down = torch.cat([d.to(dtype) for d, _ in groups], dim=0)
    return LoRA(alpha=ref * total_rank, down=down, up=up_f.to(dtype))


def _reference_scale(adapters: list[Adapter]) -> float:
    """The first non-zero scale among parts being fused (the others are expressed relative to it); 1 when
    every part has scale 0 (their factors are then multiplied by 0: an exact zero delta)."""
    return next((a.scale for a in adapters if a.scale != 0), 1.0)


def _place(items: list[tuple[tuple[int, int], Tensor]], out_rows: int) -> Tensor | None:
    if not items:
        return None
    total = torch.zeros(out_rows, dtype=torch.float32)
    for (s, e), t in items:
        total[s:e] += t.float().reshape(-1)
    return total.to(items[0][1].dtype)


def fold_scale(adapter: Adapter) -> Adapter:
    """Move the adapter's scale into its factors so that it needs no α (α = rank ⇒ scale 1)."""
    if isinstance(adapter, LoRA):
        c = adapter.scale
        if c == 1:
            return LoRA(alpha=None, down=adapter.down, up=adapter.up, mid=adapter.mid)
        if is_pow2(c):
            up = (adapter.up.float() * c).to(adapter.up.dtype)
            return LoRA(alpha=None, down=adapter.down, up=up, mid=adapter.mid)
        root = math.sqrt(abs(c))
        sign = 1.0 if c > 0 else -1.0
        down = (adapter.down.float() * (sign * root)).to(adapter.down.dtype)
        up = (adapter.up.float() * root).to(adapter.up.dtype)
        return LoRA(alpha=None, down=down, up=up, mid=adapter.mid)
    if isinstance(adapter, LoHa) and adapter.scale != 1:
        folded = adapter.scaled(adapter.scale)
        folded.alpha = None
        return folded
    if isinstance(adapter, LoKr) and adapter.scale != 1:
        folded_kr = adapter.scaled(adapter.scale)
        folded_kr.alpha = None
        return folded_kr
    return adapter


# ---------------------------------------------------------------------------------------------
# Planning the output modules
# ---------------------------------------------------------------------------------------------

class Emitter:
    def __init__(self, model: LoraModel, fmt: FormatSpec, *, allow_lossy: bool, lossy_rank: int | None,
                 keep_algo: bool = False, dtype: torch.dtype | None = None) -> None:
        self.fmt = fmt
        self.allow_lossy = allow_lossy
        self.lossy_rank = lossy_rank
        self.keep_algo = keep_algo
        self.dtype = dtype
        self.converted: list[tuple[str, str, int]] = []
        self.too_large: list[tuple[str, str, int, int, int]] = []   # (module, algo, rank, plain numbers, dense)
        self.plain_rounded: list[tuple[str, float]] = []
        self.model = model if keep_algo else self._plain_model(model)
        self.lossy: list[tuple[str, float]] = []
        self.refused: list[str] = []
        self.reasons: set[str] = set()
        self.impossible: list[str] = []          # not representable at all, --allow-lossy or not
        self.impossible_reasons: set[str] = set()
        self.native: dict[str, NameIndex] = {}
        self.native_params: dict[str, ParamIndex] = {}
        self.paired = len(experts_in(model)) > 1     # a file holding several experts: their paired rules

    def _plain_model(self, model: LoraModel) -> LoraModel:
        """``model`` with every LyCORIS patch replaced by its exact plain LoRA (kept as it is when that LoRA would
        hold more numbers than the dense weight: :meth:`pieces` then refuses it, or SVDs it with --allow-lossy).
        The factors are stored in the source's dtype; rounding beyond :data:`FOLD_TOL` is recorded."""
        patches = []
        for p in model.patches:
            a = p.adapter
            if not is_lycoris(a):
                patches.append(p)
                continue
            assert a is not None
            label, rank, shape = patch_label(p), int(a.plain_rank), tuple(a.weight_shape)  # type: ignore[arg-type]
            dense_n = math.prod(shape)
            plain_n = rank * (shape[0] + math.prod(shape[1:]))
            if plain_n > dense_n:
                self.too_large.append((label, a.kind, rank, plain_n, dense_n))
                patches.append(p)
                continue
            exact = a.to_lora()
            src = a.dtype
            want = self.dtype if self.dtype is not None and self.dtype.is_floating_point else src
            # Adapter.to keeps the class (dataclasses.replace), so a LoRA stays a LoRA
            out = cast(LoRA, exact.to(want)) if want != exact.dtype else exact
            if out is not exact:
                if not all(_finite(t) for t in out.tensors().values()):
                    spelled = str(want).replace("torch.", "")
                    raise NonFiniteError(f"{label}: the plain LoRA factors of this {a.kind} module exceed the "
                                         f"{spelled} range.", path=model.path,
                                         hint="write it with --dtype fp32, or keep the LyCORIS keys with --keep-algo.")
                if self.dtype is None or self.dtype == src:
                    err = fold_error(exact, out)
                    if not err <= FOLD_TOL:
                        self.plain_rounded.append((label, err))
            self.converted.append((label, a.kind, rank))
            patches.append(p.with_adapter(out))
        return replace(model, patches=patches)

    def naming_for(self, component: str) -> str:
        """The naming the target format writes this component in (its architecture's first rule for it)."""
        rule = write_rule(self.model.arch.spec, self.fmt, component, self.paired)
        if rule is None:
            return "native"
        comp = self.model.arch.spec.components[component]
        return next((n for n in rule.namings if n == "native" or n in comp.namings), "native")

    def match(self, target: Target):
        comp = self.model.arch.spec.components[target.component]
        index = self.native.get(target.component)
        if index is None:
            index = self.native[target.component] = NameIndex.of(comp, "native", flat=False)
        m = index.match(target.module)
        if m is None:
            raise NotExact(f"{target} is not a module of the layout")
        return m

    def match_loose(self, target: Target) -> ParamMatch | None:
        """The layout's loose parameter a target names (q/k norm scales), or None for a Linear module."""
        comp = self.model.arch.spec.components[target.component]
        index = self.native_params.get(target.component)
        if index is None:
            index = self.native_params[target.component] = ParamIndex.of(comp, "native", flat=False)
        return index.match(target.module)

    def _loose_piece(self, target: Target, m: ParamMatch, patches: list[Patch]) -> Piece | None:
        """A loose parameter's patches as one ``diff`` under the parameter's full name in the target naming.
        One Full patch is written as it is (exact); several are summed in fp32."""
        label = str(target)
        naming = self.naming_for(target.component)
        name = param_name(m.spec, naming)
        params = self.model.arch.params.get(target.component, {})
        want = tuple(evaluate(x, params, -1) for x in m.spec.shape)
        reason = None
        if name is None:
            reason = f"the {naming} naming has no name for loose parameters such as {m.native}"
        elif any(p.bias is not None or p.dora is not None or p.rows is not None for p in patches):
            reason = "a loose parameter (norm scale) takes a plain diff only (no bias, DoRA or row window)"
        elif not all(isinstance(p.adapter, Full) for p in patches):
            reason = "a loose parameter (norm scale) takes a full diff only, not LoRA-family factors"
        else:
            shapes = {tuple(p.adapter.weight_shape) for p in patches}  # type: ignore[union-attr]
            if len(shapes) != 1 or any(len(sh) != len(want) or any(w >= 0 and g != w for g, w in zip(sh, want))
                                       for sh in shapes):
                reason = f"diff shape(s) {sorted(shapes)} do not fit the parameter's shape {list(want)}"
        if reason is not None:
            self.reasons.add(reason)
            self.refused.append(label)
            return None
        assert name is not None     # a missing name set ``reason`` above
        text = name.format(i=m.index) if m.index is not None else name
        full = patches[0].adapter
        assert isinstance(full, Full)   # checked above
        if len(patches) > 1:
            total = torch.zeros(full.weight_shape, dtype=torch.float32)
            for p in patches:
                total += p.adapter.dense()  # type: ignore[union-attr]
            full = Full(alpha=None, diff=total.to(full.dtype))
        if m.spec.module_keyed:     # ComfyUI's spelling: <module>.diff for its weight, <module>.diff_b for its bias
            stem, _, leaf = text.rpartition(".")
            if leaf == "weight":
                return Piece(target.component, stem, full)
            if leaf == "bias":
                return Piece(target.component, stem, None, bias=full.diff)
        return Piece(target.component, text, full)

    def pieces(self) -> list[Piece]:
        replaced = [str(p.target) for p in self.model.patches if p.replace]
        if replaced:
            raise LossyConversionError(
                replaced, f"format {self.fmt.name!r} cannot hold replacement values (a BFL control LoRA's norm "
                "scales are the norms' new values, not differences; no LoRA format spells them)",
                path=self.model.path, hint="bake the LoRA into its base model (lorakit bake), which sets those norms; "
                "--allow-lossy does not help here.")
        out: list[Piece] = []
        for target, patches in self.model.by_target().items():
            loose = self.match_loose(target)
            if loose is not None:
                piece = self._loose_piece(target, loose, patches)
                if piece is not None:
                    out.append(piece)
                continue
            m = self.match(target)
            params = self.model.arch.params[target.component]
            out_rows = evaluate(m.spec.out, params, -1)
            if out_rows < 0:
                out_rows = max([p.rows[1] for p in patches if p.rows] + [p.out_rows for p in patches if not p.rows])
            tail = self._tail(patches)
            naming = self.naming_for(target.component)
            aliases = m.spec.names(naming)
            if not aliases:
                aliases = (Alias(m.spec.native),)
                naming = "native"
            windows = [(a, self._window(a, params, out_rows)) for a in aliases]
            for alias, (s, e) in windows:
                name = alias.template.format(i=m.index) if m.index is not None else alias.template
                parts = []
                for p in patches:
                    ps, pe = p.rows if p.rows else (0, p.out_rows)
                    if pe <= s or ps >= e:
                        continue
                    parts.append(p)
                if not parts:
                    continue
                try:
                    piece = self._piece(target, name, parts, s, e, tail)
                    if alias.swap_halves:
                        piece = self._swapped(piece)
                    if is_lycoris(piece.adapter) and (not self.keep_algo or self.fmt.lora_only):
                        raise NotExact(self._too_large_reason())
                except NotExact as exc:
                    piece = self._lossy(target, name, parts, s, e, tail, alias.swap_halves, str(exc))
                if piece is not None and self.fmt.write_style == "peft" and input_axis_dora(
                        piece.dora, piece.adapter.out_features if piece.adapter is not None else e - s):
                    self._impossible(f"{target.component}:{name}", "PEFT/diffusers DoRA magnitudes are per output "
                                     "row; an input-axis (per column) magnitude has no representation")
                    piece = None
                if piece is not None:
                    out.append(piece)
        if self.fmt.write_style == "peft":
            self._check_dora_mix(out)
        if self.impossible:
            raise LossyConversionError(
                self.impossible, f"format {self.fmt.name!r} cannot represent these modules "
                f"({'; '.join(sorted(self.impossible_reasons))})", path=self.model.path,
                hint="choose another --to format (kohya or comfy keep them); --allow-lossy does not help here.")
        if self.refused:
            hint = None
            if self.too_large:
                keep = ("--keep-algo to keep the LyCORIS keys (kohya/comfy)" if not self.fmt.lora_only else
                        "--to kohya/comfy --keep-algo to keep the LyCORIS keys")
                hint = f"pass {keep}, or --allow-lossy --lossy-rank N to re-factor them by SVD at rank N."
            raise LossyConversionError(self.refused, f"format {self.fmt.name!r} cannot hold these modules exactly "
                                       f"({'; '.join(sorted(self.reasons))})", path=self.model.path, hint=hint)
        return out

    def _too_large_reason(self) -> str:
        if not self.too_large:
            return f"the {self.fmt.name} format's loader reads LoRA factors only"
        label, algo, rank, plain_n, dense_n = self.too_large[0]
        more = f" and {len(self.too_large) - 1} more" if len(self.too_large) > 1 else ""
        return (f"the exact plain LoRA of a LyCORIS module would hold more numbers than its dense weight (e.g. {algo} "
                f"{label}: rank {rank}, {plain_n} numbers > {dense_n}{more})")

    def _impossible(self, label: str, reason: str) -> None:
        self.impossible.append(label)
        self.impossible_reasons.add(reason)

    def _check_dora_mix(self, pieces: list[Piece]) -> None:
        """PEFT (and diffusers' loader) sets ``use_dora`` once per component: a component mixing DoRA and
        plain LoRA modules would load the plain ones as DoRA with a made-up magnitude."""
        for comp in sorted({p.component for p in pieces}):
            loras = [p for p in pieces if p.component == comp and isinstance(p.adapter, LoRA)]
            dora = [f"{comp}:{p.name}" for p in loras if p.dora is not None]
            plain = [f"{comp}:{p.name}" for p in loras if p.dora is None]
            if dora and plain:
                named, what = (plain, "without") if len(plain) <= len(dora) else (dora, "with")
                self.impossible.extend(named)
                self.impossible_reasons.add(
                    f"one {comp} component mixes {len(dora)} DoRA and {len(plain)} plain LoRA modules, and its "
                    f"use_dora flag is one for all (listed: the modules {what} DoRA)")

    @staticmethod
    def _tail(patches: list[Patch]) -> tuple[int, ...]:
        for p in patches:
            if p.adapter is not None:
                return tuple(p.adapter.weight_shape[1:])
        return ()

    @staticmethod
    def _window(alias: Alias, params: Mapping[str, int], out_rows: int) -> tuple[int, int]:
        if alias.rows is None:
            return 0, out_rows
        s = evaluate(alias.rows[0], params)
        return s, s + evaluate(alias.rows[1], params)

    def _piece(self, target: Target, name: str, parts: list[Patch], s: int, e: int,
               tail: tuple[int, ...]) -> Piece:
        pieces = []
        for p in parts:
            ps, pe = p.rows if p.rows else (0, p.out_rows)
            if s <= ps and pe <= e:
                pieces.append(((ps - s, pe - s), p.adapter, p.bias, p.dora))
            elif ps <= s and e <= pe:
                a = restrict(p.adapter, s - ps, e - ps) if p.adapter is not None else None
                b = p.bias[s - ps:e - ps] if p.bias is not None else None
                if input_axis_dora(p.dora, p.out_rows):
                    raise NotExact("an input-axis DoRA magnitude (one value per column) normalizes the whole "
                                   f"weight; it cannot be split into the row window {name}")
                d = p.dora[s - ps:e - ps] if p.dora is not None else None
                pieces.append(((0, e - s), a, b, d))
            else:
                raise NotExact(f"rows [{ps}, {pe}) straddle the boundary of {name}")
        adapter, bias, dora = fuse(pieces, e - s, tail)
        return Piece(target.component, name, adapter, bias, dora)

    @staticmethod
    def _swapped(piece: Piece) -> Piece:
        adapter, bias, dora = swap_parts(piece.adapter, piece.bias, piece.dora)
        return Piece(piece.component, piece.name, adapter, bias, dora)

    def _lossy(self, target: Target, name: str, parts: list[Patch], s: int, e: int, tail: tuple[int, ...],
               swap: bool, reason: str) -> Piece | None:
        label = f"{target.component}:{name}"
        if any(p.dora is not None for p in parts):
            # an SVD re-factoring of ΔW cannot carry a DoRA magnitude (its delta depends on the base weight)
            self._impossible(label, f"DoRA module: {reason}")
            return None
        self.reasons.add(reason)
        if not self.allow_lossy:
            self.refused.append(label)
            return None
        total = torch.zeros((e - s, *tail), dtype=torch.float32)
        bias = None
        for p in parts:
            ps, pe = p.rows if p.rows else (0, p.out_rows)
            lo, hi = max(ps, s), min(pe, e)
            if p.adapter is not None:
                total[lo - s:hi - s] += p.adapter.dense()[lo - ps:hi - ps]
            if p.bias is not None:
                bias = torch.zeros(e - s) if bias is None else bias
                bias[lo - s:hi - s] += p.bias.float()[lo - ps:hi - ps]
        if swap:
            total = swap_halves(total)
            bias = swap_halves(bias) if bias is not None else None
        dtype = next(p.adapter.dtype for p in parts if p.adapter is not None)
        from lorakit.lora.checks import require_finite
        require_finite(total, name=label, path=self.model.path)   # SVD of NaN/Inf fails; say why instead
        lora, err = lora_from_dense(total, self.lossy_rank)
        self.lossy.append((label, err))
        return Piece(target.component, name, lora.to(dtype), bias.to(dtype) if bias is not None else None, None)


# ---------------------------------------------------------------------------------------------
# Tensor naming
# ---------------------------------------------------------------------------------------------

def write_rule(arch: ArchSpec, fmt: FormatSpec, component: str, paired: bool) -> Rule | None:
    """The rule ``fmt`` writes ``component`` with; ``paired``: the file holds several experts of ``arch``, which the
    format must tell apart (its paired rules), else UsageError."""
    if not paired or component not in arch.experts:
        return arch.write_rule(fmt.name, component)
    rule = arch.write_rule(fmt.name, component, paired=True)
    if rule is None:
        have = sorted({f for f, rules in arch.rules.items() if any(r.paired for r in rules)})
        raise UsageError(f"format {fmt.name!r} cannot hold several {arch.label} experts in one file (its keys do not "
                         "say which expert they are for).",
                         hint="write one file per expert with --split-experts"
                              + (f", or write --to {' / '.join(have)} (a combined file)" if have else "") + ".")
    return rule


def _prefix_and_flat(arch: ArchSpec, fmt: FormatSpec, component: str, paired: bool = False) -> tuple[str, bool]:
    rule = write_rule(arch, fmt, component, paired)
    if rule is None:
        raise LossyConversionError([component], f"format {fmt.name!r} has no names for the {arch.label} "
                                   f"{arch.components[component].label} component",
                                   hint="choose another --to format.")
    return rule.prefix, rule.flat


def worst_dtype(model: LoraModel, modules: list[tuple[str, float]]) -> torch.dtype | None:
    """The dtype of the first patch named in ``modules`` (what its plain factors were rounded to); else the
    model's (None for a model without adapters)."""
    names = {m for m, _ in modules}
    return next((p.adapter.dtype for p in model.patches if p.adapter is not None and patch_label(p) in names),
                model.dtype)


def consumer_warnings(fmt: FormatSpec, pieces: list[Piece], tensors: Mapping[str, Tensor],
                      arch: ArchSpec | None = None) -> list[str]:
    """What the target's usual consumer silently drops from the written file, said once per kind of key.
    diffusers 0.42.1 (checked on a tiny FluxTransformer2DModel): ``load_lora_adapter`` drops ``.diff`` /
    ``.diff_b`` keys under diffusers module names without a warning (norm ``.diff`` keys get an "unsupported
    keys" warning through the pipeline); a pipeline loads only the components its architecture's
    :attr:`~lorakit.layouts.ArchSpec.diffusers_loads` lists (FLUX.1: never ``text_encoder_2.``, T5)."""
    out: list[str] = []
    if fmt.name != "diffusers":
        return out
    loader = arch.diffusers_loader if arch is not None else "diffusers' load_lora_weights"
    for suffix, what in ((".diff_b", "bias diff"), (".diff", "full weight diff")):
        keys = sorted(k for k in tensors if k.endswith(suffix))
        if keys:
            out.append(f"{len(keys)} {what}(s) are written as '{suffix}' under diffusers module names (e.g. "
                       f"{keys[0]!r}); {loader} does not apply these keys (load_lora_adapter drops them without a "
                       "warning), so their deltas are lost for diffusers (kohya/comfy keep them).")
    if arch is None or arch.diffusers_loads is None:
        return out
    dropped: dict[str, int] = {}
    for p in pieces:
        if p.component not in arch.diffusers_loads:
            dropped[p.component] = dropped.get(p.component, 0) + 1
    for comp, n in sorted(dropped.items()):
        rule = arch.write_rule(fmt.name, comp)
        loaded = ", ".join(f"'{r.prefix}'" for c in arch.diffusers_loads if (r := arch.write_rule(fmt.name, c)))
        out.append(f"{n} {arch.components[comp].label} module(s) are written under "
                   f"'{rule.prefix if rule else comp}'; {loader} loads only {loaded} keys, so diffusers drops the "
                   f"{arch.components[comp].label} part (kohya/comfy keep it).")
    return out


def expert_notes(fmt: FormatSpec, pieces: list[Piece], arch: ArchSpec) -> list[str]:
    """A single-expert file of a non-first expert has the first expert's keys: only its user can send it to its
    own expert (diffusers: the architecture's loader option)."""
    experts = sorted({p.component for p in pieces if p.component in arch.experts})
    if len(experts) != 1 or experts[0] == arch.experts[0]:
        return []
    how = f" ({arch.diffusers_loader})" if fmt.name == "diffusers" else ""
    return [f"this file is for the {arch.components[experts[0]].label}, with the same keys as a "
            f"{arch.components[arch.experts[0]].label} file (its metadata says which); load it into that "
            f"expert{how}."]


def _finite(t: Tensor) -> bool:
    """Every value finite (:func:`lorakit.lora.checks.all_finite`: a finite sum proves it, element-wise otherwise;
    elementwise ``isfinite`` on bf16 is many times slower on CPU)."""
    from lorakit.lora.checks import all_finite
    return all_finite(t)


def fold_error(adapter: LoRA, folded: LoRA) -> float:
    """Relative Frobenius error of ``folded`` (scale 1) against ``adapter``'s exact delta ``c·B·A``, from the
    factors alone: ‖B'A' − cBA‖ = ‖[B', −cB]·[A'; A]‖ by the Gram trick, in float64 (no dense ΔW)."""
    from lorakit.lora.linalg import gram_fro_norm
    c = adapter.scale
    b0, a0 = adapter.up.double().flatten(1), adapter.down.double().flatten(1)
    b1, a1 = folded.up.double().flatten(1) * folded.scale, folded.down.double().flatten(1)
    want = abs(c) * gram_fro_norm(b0, a0)
    diff = gram_fro_norm(torch.cat([b1, -c * b0], dim=1), torch.cat([a1, a0], dim=0))
    if want == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / want


def emit(model: LoraModel, fmt_name: str, *, allow_lossy: bool = False, lossy_rank: int | None = None,
         dtype: torch.dtype | None = None, fold_rounding: str = "report", keep_algo: bool = False) -> EmitResult:
    """Write ``model``'s tensors in ``fmt_name``. LyCORIS modules become exact plain LoRA factors unless
    ``keep_algo`` (kohya/comfy only; ``result.converted`` lists each with its new rank). Folding α into (or
    forming plain factors in) low-precision factors can round them: each module's error above :data:`FOLD_TOL`
    is measured into ``result.rounded``; with ``fold_rounding="refuse"`` (``convert``) such modules raise
    LossyConversionError unless ``allow_lossy``, which reports them in ``result.lossy`` instead."""
    fmt = get_format(fmt_name)
    if fmt.write_style is None:
        raise LossyConversionError([], f"format {fmt_name!r} is read-only")
    if keep_algo and fmt.lora_only and any(is_lycoris(p.adapter) for p in model.patches):
        raise UsageError(f"--keep-algo: the {fmt.name} naming cannot carry LoHa/LoKr/Tucker (lora_mid) modules "
                         "(its loader reads lora_A/lora_B factors only).", path=model.path,
                         hint="drop --keep-algo to write them as plain LoRA factors exactly, or write --to kohya "
                              "or comfy.")
    emitter = Emitter(model, fmt, allow_lossy=allow_lossy, lossy_rank=lossy_rank, keep_algo=keep_algo, dtype=dtype)
    pieces = emitter.pieces()
    model = emitter.model
    suffixes = WRITE_SUFFIXES[fmt.write_style]
    tensors: dict[str, Tensor] = {}
    result = EmitResult(tensors, emitter.lossy, converted=emitter.converted)

    def cast(t: Tensor, name: str) -> Tensor:
        t = t.contiguous()
        out = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        if out is not t and not _finite(out) and _finite(t):
            raise NonFiniteError(f"{name}: its values exceed the {str(dtype).replace('torch.', '')} range "
                                 f"(largest magnitude {float(t.abs().max()):.3g}).", path=model.path,
                                 hint="write it with --dtype fp32 or bf16.")
        return out.clone()

    for piece in pieces:
        prefix, flat = _prefix_and_flat(model.arch.spec, fmt, piece.component, emitter.paired)
        stem = prefix + (piece.name.replace(".", "_") if flat else piece.name)
        adapter = piece.adapter
        if adapter is not None and fmt.fold_alpha:
            if dtype is not None and dtype.is_floating_point:
                adapter = adapter.to(dtype)     # fold in the output precision: one rounding, not two
            folded = fold_scale(adapter)
            if not all(_finite(t) for t in folded.tensors().values()):
                spelled = str(folded.dtype).replace("torch.", "")
                raise NonFiniteError(
                    f"{piece.component}:{piece.name}: folding its scale {adapter.scale:g} into {spelled} factors "
                    f"overflows (format {fmt.name!r} stores no alpha).", path=model.path,
                    hint="write it as --dtype fp32, or to kohya/comfy, which keep alpha separate.")
            if isinstance(adapter, LoRA) and adapter.mid is None and adapter.scale != 1 and isinstance(folded, LoRA):
                err = fold_error(adapter, folded)
                if not err <= FOLD_TOL:   # NaN counts as lossy
                    result.rounded.append((f"{piece.component}:{piece.name}", err))
            adapter = folded
        if adapter is not None:
            for role, t in adapter.tensors().items():
                key = f"{stem}.{suffixes.get(role, role)}"
                tensors[key] = cast(t, key)
            # kohya-style files always carry α (sd-scripts' loader requires it); α = rank when none is set
            stored = adapter.alpha if adapter.alpha is not None else adapter.rank
            if not fmt.fold_alpha and stored is not None:
                tensors[f"{stem}.{suffixes['alpha']}"] = torch.tensor(float(stored), dtype=torch.float32)
            if adapter.rank is not None:
                result.ranks[stem] = adapter.rank
                result.alphas[stem] = float(adapter.alpha if adapter.alpha is not None else adapter.rank)
        if piece.bias is not None:
            key = suffixes["bias"] if isinstance(adapter, LoRA) and "bias" in suffixes else suffixes["diff_b"]
            b = piece.bias
            if key == suffixes.get("bias") and isinstance(adapter, LoRA) and adapter.scale != 1:
                b = (b.float() / adapter.scale).to(b.dtype)
            tensors[f"{stem}.{key}"] = cast(b, f"{stem}.{key}")
        if piece.dora is not None:
            rows = adapter.out_features if adapter is not None else int(piece.dora.shape[0])
            if input_axis_dora(piece.dora, rows):
                d = piece.dora.reshape(1, -1)    # kohya/LyCORIS (1, in); PEFT targets refuse it in pieces()
                shape = adapter.weight_shape if adapter is not None else ()
                if len(shape) > 2 and d.shape[1] == shape[1]:
                    d = d.reshape(1, -1, *([1] * (len(shape) - 2)))   # per input channel of a conv
            else:
                d = piece.dora.reshape(-1)
                if fmt.write_style == "kohya":
                    d = d.reshape(-1, *([1] * (len(adapter.weight_shape) - 1))) if adapter is not None else d
            tensors[f"{stem}.{suffixes['dora']}"] = cast(d, f"{stem}.{suffixes['dora']}")
        result.modules += 1
    result.warnings.extend(consumer_warnings(fmt, pieces, tensors, model.arch.spec))
    result.notes.extend(expert_notes(fmt, pieces, model.arch.spec))
    if emitter.plain_rounded:
        if fold_rounding == "refuse" and not allow_lossy:
            worst = max(emitter.plain_rounded, key=lambda x: x[1])
            spelled = str(dtype or worst_dtype(model, emitter.plain_rounded)).replace("torch.", "")
            raise LossyConversionError(
                [m for m, _ in emitter.plain_rounded], f"the exact plain LoRA factors of LyCORIS modules are products "
                f"of the source's values, which {spelled} rounds (worst relative error {worst[1]:.2g} in "
                f"{worst[0]!r})", path=model.path,
                hint="pass --dtype fp32 for an exact plain file, --keep-algo to keep the LyCORIS keys (kohya/comfy), "
                     "or --allow-lossy to accept the rounding.")
        (result.lossy if fold_rounding == "refuse" else result.rounded).extend(emitter.plain_rounded)
    if result.rounded and fold_rounding == "refuse":
        if not allow_lossy:
            worst = max(result.rounded, key=lambda x: x[1])
            spelled = str(dtype or model.dtype).replace("torch.", "")
            raise LossyConversionError(
                [m for m, _ in result.rounded], f"folding α into {spelled} factors for format {fmt.name!r} rounds "
                f"them (worst relative error {worst[1]:.2g} in {worst[0]!r})", path=model.path,
                hint="pass --dtype fp32 for an exact file, or --allow-lossy to accept the rounding.")
        result.lossy.extend(result.rounded)
    return result
