"""``lorakit resize``: lower a LoRA's rank by the exact optimal truncation (``math.md`` §4.1, §6).

A LoRA patch ``c·B·A`` (``c = α/r``) is never densified: the SVD of ``(c·B)·A`` comes from thin QRs
of both factors and the SVD of the small ``r × r`` core, in float64 (:func:`lorakit.lora.linalg.factored_svd`), so
the top-k truncation is exact (Eckart–Young) at ``O((out + in)·r²)`` cost. LoHa, LoKr, Full and
Tucker (``mid``) patches are densified and decomposed by a thin SVD; they come out as plain LoRAs.

Strength is preserved: a resized LoRA keeps its scale ``c`` (new ``α = c·k``, the ``up`` factor
carries ``U_k·Σ_k / c``), as sd-scripts' ``resize_lora`` does. A patch whose rank is already at most
the requested one is kept bit for bit. Patches on row windows of one fused target (split-format
files: diffusers q/k/v, proj_mlp) are resized separately, which keeps the format's structure; a
fused writer then stacks them (a fused kohya output of three rank-k parts has rank 3k).

Convolutions (SD1.5/SDXL LoCon: modules whose ``ModuleSpec.kernel`` is non-empty, 1×1 included) are resized
to ``conv_rank`` (CLI ``--conv-rank``; sd-scripts' ``--new_conv_rank``) in the flattened view
``ΔW (out, in·k·k)``: ``down`` comes back as (k, in, kh, kw), ``up`` as (out, k, 1, 1). This follows sd-scripts'
``resize_lora.py``, which gives every 4-D ``lora_down`` (1×1 too) ``new_conv_rank``, defaulting to
``new_rank``; ``lorakit merge --conv-rank`` instead follows ``svd_merge_lora.py`` (3×3 only). With
``conv_rank`` alone (no ``rank``, no ``dynamic``) only the convolutions change: Linear modules are written
unchanged (reported as ``unchanged``). ``dynamic`` rules apply to convolutions too, capped at ``conv_rank``
(else ``rank``).

Every patch reports its retained energy ``Σ_{i<k} s_i² / Σ s_i²`` and relative error (both exact: the
singular values are complete). ``verify`` re-reads the written file and reports, per target, the
relative Frobenius error against the input, computed from Gram matrices of the factors in float64
(no dense matrix for LoRA targets).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypedDict, cast


from lorakit.lora.adapters import Adapter, LoRA
from lorakit.lora.checks import dtype_range_cause, require_finite_model, require_finite_output
from lorakit.ops.conversion import lora_output_metadata
from lorakit.dtypes import as_dtype
from lorakit.errors import KeyMappingError, UsageError
from lorakit.formats import WRITABLE, emit, load, parse, read_lora
from lorakit.formats.emit import fold_error
from lorakit.io import check_output_path, open_weights, save_tensors
from lorakit.lora.linalg import check_ranks, dynamic_rank, exact_svd, factored_svd, parse_dynamic
from lorakit.ops.metadata import InputRecord, file_sha256
from lorakit.ops.worst import ROUNDING_FLOOR, worst as worst_of
from lorakit.lora.model import ArchInstance, LoraModel, Patch, Target

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from lorakit.lazy import torch

if TYPE_CHECKING:
    from typing_extensions import NotRequired     # typing has it from 3.11; the package supports 3.10

Progress = Callable[[int, int, str], None]


@dataclass
class ResizedModule:
    module: str                 # module name in the input file
    target: str                 # native target (component:module)
    rows: tuple[int, int] | None
    kind: str                   # input adapter kind
    rank_in: int | None
    rank_out: int
    retained_energy: float
    relative_error: float
    path: str                   # "factored" | "dense" | "unchanged"
    rounding_error: float = 0.0  # extra relative error from storing the new factors in the output dtype
    conv: bool = False           # a convolution (resized to conv_rank when given)

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__, rows=list(self.rows) if self.rows else None)


@dataclass
class ResizeReport:
    input: str
    output: str | None
    source_format: str
    target_format: str
    rank: int | None
    dynamic: str | None
    dtype: str | None
    conv_rank: int | None = None
    modules: list[ResizedModule] = field(default_factory=list)
    verified: dict[str, float] | None = None     # target -> relative error of the written file vs the input
    unknown_keys: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tensors_out: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    target_met: bool = False                     # every module already met the target: deltas written unchanged
    notes: list[str] = field(default_factory=list)   # informational lines (not warnings: exit code unaffected)

    @property
    def max_verify_error(self) -> float | None:
        return max(self.verified.values(), default=0.0) if self.verified is not None else None

    @property
    def worst(self) -> ResizedModule | None:
        return worst_of(self.modules, lambda m: m.relative_error)

    @property
    def worst_rounding(self) -> ResizedModule | None:
        """The module whose new factors lost most by being stored in the output dtype (None if none > 1e-6)."""
        return worst_of(self.modules, lambda m: m.rounding_error, above=ROUNDING_FLOOR)

    def to_json(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["modules"] = [m.to_json() for m in self.modules]
        d["max_verify_error"] = self.max_verify_error
        rounded = self.worst_rounding
        d["worst_rounding_error"] = ({"module": rounded.module, "rounding_error": rounded.rounding_error}
                                     if rounded else None)
        return d


# ---------------------------------------------------------------------------------------------
# One adapter
# ---------------------------------------------------------------------------------------------

class ResizeInfo(TypedDict):
    """What :func:`resize_adapter` did to one adapter."""

    rank: int
    retained_energy: float
    relative_error: float
    path: NotRequired[str]              # "factored" | "dense" | "unchanged" (set on every return)
    rounding_error: NotRequired[float]  # absent when the adapter is returned unchanged


def resize_adapter(adapter: Adapter, rank: int | None, dynamic: tuple[str, float] | None,
                   dtype: torch.dtype | None = None) -> tuple[Adapter, ResizeInfo]:
    """The best rank-``k`` LoRA of ``adapter`` (``k = rank`` or by ``dynamic`` capped at ``rank``).

    Returns the new adapter and ``{"rank", "retained_energy", "relative_error", "path"}``.
    """
    out_dtype = dtype or adapter.dtype
    lora = adapter if isinstance(adapter, LoRA) and adapter.mid is None else None
    factored = lora is not None
    if lora is not None:
        c = lora.scale
        # float64: the factors of a trained LoRA can be ill-conditioned, and the QRs are cheap (out × r)
        up, down = lora.up.double().flatten(1), lora.down.double().flatten(1)
        u, s, vh = (t.float() for t in factored_svd(up * c, down))
    else:
        c = 1.0
        u, s, vh = exact_svd(adapter.dense().flatten(1))
    n = int(s.numel())
    cap = min(rank, n) if rank is not None else n
    k = dynamic_rank(s, dynamic[0], dynamic[1], cap=cap) if dynamic is not None else cap
    k = max(1, min(k, n))
    s64 = s.double().square()
    total = float(s64.sum())
    err2 = float(s64[k:].sum()) / total if total > 0 else 0.0
    info: ResizeInfo = {"rank": k, "retained_energy": 1.0 - err2, "relative_error": math.sqrt(err2)}
    if lora is not None and k >= lora.rank:
        info.update({"rank": lora.rank, "path": "unchanged"})
        return (adapter if dtype is None else adapter.to(out_dtype)), info
    info["path"] = "factored" if factored else "dense"
    new_up = u[:, :k] * s[:k]
    new_down = vh[:k]
    if factored and c != 0:
        new_up, alpha = new_up / c, c * k
    else:
        alpha = float(k) if not factored else 0.0
    shape = adapter.weight_shape
    down_t = new_down.reshape(k, *shape[1:])
    up_t = new_up.reshape(shape[0], k, *([1] * (len(shape) - 2)))
    exact_factors = LoRA(alpha=float(alpha), down=down_t, up=up_t)
    new = LoRA(alpha=float(alpha), down=down_t.to(out_dtype).contiguous(), up=up_t.to(out_dtype).contiguous())
    info["rounding_error"] = fold_error(exact_factors, new)
    return new, info


# ---------------------------------------------------------------------------------------------
# Verification (Gram trick)
# ---------------------------------------------------------------------------------------------

def _target_rows(patches: list[Patch]) -> int:
    return max((p.rows[1] if p.rows else p.out_rows) for p in patches)


def _factors(patches: list[Patch], out_rows: int, sign: float) -> tuple[list[Tensor], list[Tensor]] | None:
    """fp64 factors ``(U_i, D_i)`` with ``U_i`` padded to the target's rows; None if a patch is not a plain LoRA."""
    ups, downs = [], []
    for p in patches:
        a = p.adapter
        if a is None:
            continue
        if not (isinstance(a, LoRA) and a.mid is None):
            return None
        up = torch.zeros((out_rows, a.rank), dtype=torch.float64)
        s, e = p.rows if p.rows else (0, a.out_features)
        up[s:e] = a.up.double().flatten(1) * (sign * a.scale)
        ups.append(up)
        downs.append(a.down.double().flatten(1))
    return ups, downs


def _dense(patches: list[Patch], out_rows: int) -> Tensor | None:
    total = None
    for p in patches:
        if p.adapter is None:
            continue
        d = p.adapter.dense().double()
        d = d.reshape(d.shape[0], -1)     # not flatten(1): loose parameters (norm scales) are 1-D
        if total is None:
            total = torch.zeros((out_rows, d.shape[1]), dtype=torch.float64)
        s, e = p.rows if p.rows else (0, d.shape[0])
        total[s:e] += d
    return total


def _gram_sq(ups: list[Tensor], downs: list[Tensor]) -> float:
    if not ups:
        return 0.0
    u, d = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    return max(0.0, float(((u.T @ u) * (d @ d.T)).sum()))


def verify_models(reference: LoraModel, candidate: LoraModel) -> dict[str, float]:
    """Per target: ``‖ΔW_candidate − ΔW_reference‖_F / ‖ΔW_reference‖_F`` (float64, Gram matrices when
    every patch is a plain LoRA, a dense difference otherwise). Bias deltas are not included."""
    ref, cand = reference.by_target(), candidate.by_target()
    out: dict[str, float] = {}
    for target in sorted(set(ref) | set(cand), key=str):
        a, b = ref.get(target, []), cand.get(target, [])
        rows = _target_rows(a + b)
        fa, fb = _factors(a, rows, 1.0), _factors(b, rows, -1.0)
        if fa is not None and fb is not None:
            norm2 = _gram_sq(*fa)
            err2 = _gram_sq(fa[0] + fb[0], fa[1] + fb[1])
        else:
            da, db = _dense(a, rows), _dense(b, rows)
            da = da if da is not None else torch.zeros_like(db)  # type: ignore[arg-type]
            db = db if db is not None else torch.zeros_like(da)
            norm2 = float(da.square().sum())
            err2 = float((db - da).square().sum())
        if norm2 == 0.0 and err2 == 0.0 and not any(p.adapter is not None for p in a + b):
            continue
        out[str(target)] = math.sqrt(err2 / norm2) if norm2 > 0 else (0.0 if err2 == 0 else math.inf)
    return out


# ---------------------------------------------------------------------------------------------
# The operation
# ---------------------------------------------------------------------------------------------

def _default_format(source: str) -> tuple[str, str | None]:
    if source in WRITABLE:
        return source, None
    target = "diffusers" if source == "peft" else "kohya"
    return target, f"input format {source!r} cannot be written; the output is {target} (pass --to to choose)."


def is_conv(arch: ArchInstance, target: Target, adapter: Adapter) -> bool:
    """A convolution module: the layout's ``ModuleSpec.kernel``, else a delta with trailing kernel dims (as
    sd-scripts' ``resize_lora.py`` tests ``lora_down.dim() == 4``; 1×1 counts)."""
    mod = arch.module_map(target.component).get(target.module)
    if mod is not None:
        return bool(mod.kernel)
    return len(adapter.weight_shape) > 2


def module_cap(conv: bool, rank: int | None, conv_rank: int | None) -> int | None:
    """The rank (or dynamic cap) one module is resized to: convolutions take ``conv_rank``, else ``rank``."""
    return conv_rank if conv and conv_rank is not None else rank


def _label(p: Patch) -> str:
    return p.source or (p.target.module + (f"[{p.rows[0]}:{p.rows[1]}]" if p.rows else ""))


def resize(input: str | os.PathLike[str], output: str | os.PathLike[str] | None, *, rank: int | None = None,
           dynamic: str | tuple[str, float] | None = None, verify: bool = False, to: str | None = None,
           dtype: torch.dtype | str | None = None, allow_pickle: bool = False, allow_partial: bool = False,
           progress: Progress | None = None, dry_run: bool = False, conv_rank: int | None = None) -> ResizeReport:
    """Resize every patch of a LoRA to ``rank`` (or a ``dynamic`` rank capped at ``rank``) and write it.

    ``dry_run`` computes the per-module plan (rank in → rank out, retained energy; LoRA factors are small)
    and writes nothing. A resize whose target is already met (every rank already at or below the
    requested one) writes the deltas unchanged (format/dtype as asked) and says so in ``notes``
    (``target_met``); it is not an error, so batches over files of mixed ranks work. ``dtype`` also
    takes the CLI's spellings (``"bf16"``, ``"fp16"``…). ``conv_rank`` is the rank of convolution modules
    (default ``rank``); given alone, Linear modules are kept unchanged (see the module docstring).
    """
    started = time.perf_counter()
    dtype = as_dtype(dtype)
    src = os.fspath(input)
    # a given (method, param) pair (a list from JSON too) is checked by parse_dynamic below
    dyn = parse_dynamic(dynamic) if isinstance(dynamic, str) else (
        cast("tuple[str, float]", tuple(dynamic)) if dynamic else None)
    if rank is None and dyn is None and conv_rank is None:
        raise UsageError("no rank given.", hint="pass --rank N, --conv-rank N or --dynamic METHOD:PARAM "
                                                "(e.g. sv_fro:0.95).")
    check_ranks(rank, conv_rank, dyn)
    if to is not None and to not in WRITABLE:
        raise UsageError(f"cannot write format {to!r}.", hint="choose one of: " + ", ".join(WRITABLE) + ".")
    if output is None and not dry_run:
        raise UsageError("no output path given.", hint="pass -o OUT.safetensors (or --dry-run).")
    out_path = check_output_path(os.fspath(output), [src]) if output is not None else None

    with open_weights(src, allow_pickle=allow_pickle) as f:
        parsed = parse(f)
        if parsed.unknown_keys and not allow_partial:
            raise KeyMappingError("keys not understood; resizing without them would drop part of the LoRA",
                                  parsed.unknown_keys, path=src, hint="pass --allow-partial to resize the rest.")
        model = load(parsed)
        require_finite_model(model)
    require_finite_model(model)
    fmt, warning = (to, None) if to else _default_format(model.format)
    report = ResizeReport(src, out_path, model.format, fmt, rank, f"{dyn[0]}:{dyn[1]:g}" if dyn else None,
                          str(dtype).replace("torch.", "") if dtype else None, conv_rank=conv_rank,
                          unknown_keys=list(parsed.unknown_keys))
    if warning:
        report.warnings.append(warning)
    dora = [_label(p) for p in model.patches if p.dora is not None]
    if dora:
        raise UsageError(f"{len(dora)} DoRA module(s) (e.g. {dora[0]!r}): a DoRA delta depends on the base weight, "
                         "so truncating its direction alone would not preserve it.", path=src,
                         hint="bake the DoRA into its base and extract a LoRA instead (`lorakit bake`, "
                              "`lorakit extract`).")

    new_patches: list[Patch] = []
    for i, p in enumerate(model.patches):
        if progress:
            progress(i, len(model.patches), _label(p))
        if p.adapter is None:
            new_patches.append(p if dtype is None or p.bias is None else p.with_adapter(None, bias=p.bias.to(dtype)))
            continue
        if p.target.loose:   # a loose parameter's diff (q/k norm scale) has no rank: kept as it is
            new_patches.append(p if dtype is None else p.with_adapter(p.adapter.to(dtype)))
            continue
        conv = is_conv(model.arch, p.target, p.adapter)
        cap = module_cap(conv, rank, conv_rank)
        bias = p.bias.to(dtype) if (p.bias is not None and dtype is not None) else p.bias
        if cap is None and dyn is None:     # --conv-rank alone: Linear modules are not resized
            new_patches.append(p.with_adapter(p.adapter if dtype is None else p.adapter.to(dtype), bias=bias))
            report.modules.append(ResizedModule(_label(p), str(p.target), p.rows, p.adapter.kind, p.adapter.rank,
                                                int(p.adapter.rank or 0), 1.0, 0.0, "unchanged", conv=conv))
            continue
        new, info = resize_adapter(p.adapter, cap, dyn, dtype)
        new_patches.append(p.with_adapter(new, bias=bias))
        report.modules.append(ResizedModule(_label(p), str(p.target), p.rows, p.adapter.kind, p.adapter.rank,
                                            int(info["rank"]), float(info["retained_energy"]),
                                            float(info["relative_error"]), str(info["path"]),
                                            float(info.get("rounding_error", 0.0)), conv=conv))
    if progress:
        progress(len(model.patches), len(model.patches), "")
    if conv_rank is not None and not any(m.conv for m in report.modules):
        report.warnings.append("--conv-rank had no effect: no module of this LoRA is a convolution.")
    if report.modules and all(m.path == "unchanged" for m in report.modules):
        ranks = sorted({m.rank_in for m in report.modules if m.rank_in is not None})
        asked = _asked(report.dynamic, rank, conv_rank)
        report.target_met = True
        report.notes.append(f"target already met: every module has a rank at most what {asked} keeps (ranks "
                            f"{_ranges(ranks)}); the deltas are written unchanged")
    report.dry_run = dry_run
    report.output = out_path
    if dry_run or out_path is None:
        if verify:
            report.warnings.append("--verify needs a written file; skipped in --dry-run.")
        report.seconds = time.perf_counter() - started
        return report

    meta = dict(model.metadata)
    old = sorted({m.rank_in for m in report.modules if m.rank_in is not None})
    new_ranks = sorted({m.rank_out for m in report.modules})
    what = _asked(report.dynamic, rank, conv_rank, cli=False)
    comment = f"resized by lorakit: {what}; ranks {_ranges(old)} -> {_ranges(new_ranks)}"
    if meta.get("ss_training_comment"):
        comment += "; " + meta["ss_training_comment"]
    meta["ss_training_comment"] = comment
    out_model = LoraModel(model.arch, new_patches, fmt, meta, model.path, list(model.unknown_keys))
    result = emit(out_model, fmt, dtype=dtype)
    report.warnings.extend(result.warnings)   # what diffusers drops: T5, .diff/.diff_b under diffusers names
    title = os.path.splitext(os.path.basename(out_path))[0]
    meta_out = lora_output_metadata(
        out_model, result, fmt, operation="resize",
        inputs=[InputRecord(src, file_sha256(src) if os.path.isfile(src) else None, format=model.format)],
        title=title, rank=rank, conv_rank=conv_rank, dynamic=report.dynamic, method="factored_svd")
    require_finite_output(result.tensors, path=src, cause="the resized factors (or an alpha) " +
                          dtype_range_cause(dtype or next((t.dtype for t in result.tensors.values()
                                                           if t.is_floating_point()), None)),
                          hint="write a wider --dtype (fp32); an alpha or factor beyond the float32 range "
                               "cannot be written at all — fix the input.")
    save_tensors(out_path, result.tensors, meta_out, inputs=[src])
    report.tensors_out = len(result.tensors)
    if report.dtype is None:
        report.dtype = next((str(t.dtype).replace("torch.", "") for t in result.tensors.values() if t.dim() > 0), None)
    if verify:
        report.verified = verify_models(model, read_lora(out_path))
    report.seconds = time.perf_counter() - started
    return report


def _asked(dynamic: str | None, rank: int | None, conv_rank: int | None, *, cli: bool = True) -> str:
    """The resize target: in CLI words (``--rank 8 --conv-rank 4``, ``--dynamic sv_fro:0.9 (cap 8)``) or for the
    training comment (``rank 8, conv rank 4``, ``dynamic resize with sv_fro:0.9 (cap 8)``)."""
    caps = [f"cap {rank}" if rank else "", f"conv cap {conv_rank}" if conv_rank else ""]
    if dynamic:
        head = f"--dynamic {dynamic}" if cli else f"dynamic resize with {dynamic}"
        return head + (f" ({', '.join(c for c in caps if c)})" if any(caps) else "")
    words = [f"--rank {rank}" if cli else f"rank {rank}", f"--conv-rank {conv_rank}" if cli else f"conv rank {conv_rank}"]
    return (" " if cli else ", ").join(w for w, v in zip(words, (rank, conv_rank)) if v)


def _ranges(values: list[int]) -> str:
    if not values:
        return "-"
    return str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}"
