"""``lorakit extract``: a LoRA from the difference of two FLUX.1 transformers (``math.md`` §5).

Both models may be in any base layout that :func:`lorakit.basemodel.open_base` reads (BFL, ComfyUI-
prefixed, diffusers single file or sharded folder); tensors are paired through their native (BFL)
module and row window, so every patch is written on a native target whatever the input layouts.
Work is streamed one native module at a time: the module's full native weight is assembled from the
slots of each model (diffusers q/k/v/proj_mlp rows, the ``norm_out.linear`` half swap), the
difference ``D = W_tuned − W_original`` is formed in fp32 (one reused buffer) and decomposed, and only
the low-rank factors are kept. The next module's tensors are read by a background thread while the
current one is decomposed (disk reads overlap the maths; at most one extra module pair in memory).

Decomposition: seeded randomized SVD (tall orientation, oversampling, power iterations; same inputs
and seed give the same bytes) or, with ``exact=True``, a thin SVD. A fixed ``rank`` keeps ``k =
min(rank, out, in)`` values; ``dynamic=("sv_fro", 0.9)`` etc. chooses ``k`` per module from the
values computed at the cap rank (``sv_fro`` measures energy against the exact ``‖D‖_F²``;
``sv_cumulative`` against the computed values unless ``exact``). Each module's retained energy and
relative Frobenius error are exact (they use ``‖D‖_F``, and a direct residual when the error is
small enough for cancellation to matter).

Skipping: modules whose ``max|D| ≤ min_diff`` are skipped and counted; the default 0 skips only
modules that are exactly unchanged. Bias differences are written as ``diff_b`` entries with
``include_bias``. Differences of loose parameters (q/k norm scales) are always reported; with
``include_norms`` they are also written, exactly (fp32 difference, stored at the output dtype; the
rounding is reported), as ``diff`` entries on the parameter's full name: ``lora_unet_<param, . → _>.diff``
(kohya), ``diffusion_model.<param>.diff`` (comfy: ComfyUI's key for non-``.weight`` parameters) or
``transformer.<diffusers param>.diff`` (diffusers: lorakit's own spelling; diffusers does not load it).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .adapters import Full, LoRA
from .basemodel import COMPONENT, BaseModel, Slot, open_base
from .conversion import lora_output_metadata
from .dtypes import ST_DTYPES, as_dtype
from .errors import ArchitectureError, KeyMappingError, NonFiniteError, ShapeMismatchError, UsageError
from .formats import WRITABLE, emit
from .formats.emit import fold_error
from .checks import dtype_range_cause, require_finite_output
from .io import check_output_path, open_weights, save_tensors
from .linalg import dynamic_rank, exact_svd, parse_dynamic, randomized_svd
from .metadata import InputRecord
from .model import LoraModel, Patch, Target

DEFAULT_DYNAMIC_CAP = 128      # rank cap of --dynamic when --rank is not given
DEFAULT_OVERSAMPLE = 16
DEFAULT_NITER = 2
_DIRECT_RESIDUAL_BELOW = 1e-3  # squared relative error under which the energy difference loses digits

Progress = Callable[[int, int, str], None]


# ---------------------------------------------------------------------------------------------
# One matrix
# ---------------------------------------------------------------------------------------------

@dataclass
class Decomposition:
    """``D ≈ up @ down`` (scale 1) with its exact error bookkeeping."""

    up: Tensor
    down: Tensor
    rank: int
    s: Tensor                   # the singular values computed (all of them when ``complete``)
    retained_energy: float
    relative_error: float
    svd: str                    # "randomized" | "exact"


def fro_sq(d: Tensor) -> float:
    """``‖D‖_F²`` accurately: fp32 row norms (short sums) added in float64. A single fp32 reduction over
    tens of millions of elements is off by about 1 % (measured on the largest FLUX.1 weight difference)."""
    return float(torch.linalg.vector_norm(d, dim=1).double().square().sum())


def _residual_sq(d: Tensor, up: Tensor, down: Tensor, chunk: int = 4096) -> float:
    """``‖D − up·down‖_F²`` in row chunks (bounded memory)."""
    return sum(fro_sq(d[i:i + chunk] - up[i:i + chunk] @ down) for i in range(0, d.shape[0], chunk))


def decompose(d: Tensor, rank: int, *, dynamic: tuple[str, float] | None = None, exact: bool = False,
              oversample: int = DEFAULT_OVERSAMPLE, niter: int = DEFAULT_NITER, seed: int = 0) -> Decomposition:
    """Best rank-``k`` factors of a dense fp32 difference (``k = rank`` or chosen by ``dynamic``, ≤ ``rank``)."""
    m, n = d.shape
    full = min(m, n)
    cap = max(1, min(rank, full))
    total = fro_sq(d)
    complete = exact or min(cap + oversample, full) >= full
    if complete:
        u, s, vh = exact_svd(d)
        kind = "exact"
    else:
        u, s, vh = randomized_svd(d, cap, oversample=oversample, niter=niter, seed=seed)
        kind = "randomized"
    if dynamic is not None:
        k = dynamic_rank(s, dynamic[0], dynamic[1], cap=cap, total_energy=None if complete else total)
    else:
        k = cap
    k = max(1, min(k, s.numel()))
    up, down = u[:, :k] * s[:k], vh[:k]
    s64 = s.double().square()
    if complete:
        tot = float(s64.sum())
        err2 = float(s64[k:].sum()) / tot if tot > 0 else 0.0
    else:
        err2 = max(0.0, 1.0 - float(s64[:k].sum()) / total) if total > 0 else 0.0
        if err2 < _DIRECT_RESIDUAL_BELOW and total > 0:
            err2 = min(1.0, _residual_sq(d, up, down) / total)
    return Decomposition(up, down, k, s, 1.0 - err2, math.sqrt(err2), kind)


def _quantile(x: Tensor, q: float) -> float:
    """``torch.quantile(x, q)`` (linear interpolation between the two nearest ranks) without its 2²⁴-element
    limit: position ``q·(n−1)`` in the sorted values."""
    v = x.flatten().sort().values
    pos = torch.tensor(q, dtype=v.dtype) * (v.numel() - 1)     # in the values' dtype, as torch.quantile does
    lo, hi = int(pos.floor()), int(pos.ceil())
    return float(torch.lerp(v[lo], v[hi], pos - pos.floor()))


def clamp_factors(up: Tensor, down: Tensor, q: float) -> tuple[Tensor, Tensor]:
    """sd-scripts' ``--clamp_quantile`` (networks/extract_lora_from_models.py): with ``up = U·S`` and
    ``down = Vh``, ``hi = quantile(cat(up.flatten(), down.flatten()), q)`` of the signed values, and both
    factors are clamped to ``[−hi, hi]`` (in float32, as sd-scripts computes)."""
    hi = _quantile(torch.cat([up.flatten(), down.flatten()]).float(), q)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------

@dataclass
class ModuleResult:
    module: str
    shape: tuple[int, int]
    rank: int
    retained_energy: float
    relative_error: float
    max_abs_diff: float
    svd: str
    seconds: float
    rounding_error: float = 0.0     # extra relative error from storing the factors in the output dtype
    clamp_error: float = 0.0        # --clamp-quantile: ‖B'A' − BA‖/‖BA‖ of the clamped factors (0 without it)

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__, shape=list(self.shape))


@dataclass
class ExtractReport:
    original: str
    tuned: str
    output: str | None
    original_layout: str
    tuned_layout: str
    architecture: str
    variant: str
    format: str
    dtype: str
    method: str                          # "randomized_svd" | "exact_svd"
    rank: int | None
    dynamic: str | None
    alpha: float | None
    seed: int
    min_diff: float
    device: str
    modules: list[ModuleResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)          # unchanged modules (max|D| ≤ min_diff)
    unpaired: list[str] = field(default_factory=list)
    ignored_keys: dict[str, list[str]] = field(default_factory=dict)   # input -> non-transformer keys
    bias_modules: list[str] = field(default_factory=list)     # diff_b written
    bias_differences: list[str] = field(default_factory=list) # differing biases not written (no include_bias)
    loose_differences: list[dict[str, object]] = field(default_factory=list)   # name, max_abs_diff, written
    loose_written: list[str] = field(default_factory=list)    # loose parameters written as diff (include_norms)
    warnings: list[str] = field(default_factory=list)
    tensors_out: int = 0
    output_bytes: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    plan: list[dict[str, object]] = field(default_factory=list)   # dry run: paired tensors per native module
    clamp_quantile: float | None = None   # sd-scripts' --clamp_quantile, when given

    @property
    def mean_retained_energy(self) -> float:
        return sum(m.retained_energy for m in self.modules) / len(self.modules) if self.modules else 1.0

    @property
    def worst(self) -> ModuleResult | None:
        return max(self.modules, key=lambda m: m.relative_error, default=None)

    @property
    def worst_clamp(self) -> ModuleResult | None:
        """The module whose factors lost most to ``clamp_quantile`` (None without it)."""
        m = max(self.modules, key=lambda m: m.clamp_error, default=None)
        return m if m is not None and m.clamp_error > 0 else None

    @property
    def worst_rounding(self) -> ModuleResult | None:
        """The module whose factors lost most by being stored in the output dtype (None if none lost > 1e-6)."""
        m = max(self.modules, key=lambda m: m.rounding_error, default=None)
        return m if m is not None and m.rounding_error > 1e-6 else None

    def to_json(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["modules"] = [m.to_json() for m in self.modules]
        d["mean_retained_energy"] = self.mean_retained_energy
        worst = self.worst
        d["worst_relative_error"] = {"module": worst.module, "relative_error": worst.relative_error} if worst else None
        rounded = self.worst_rounding
        d["worst_rounding_error"] = ({"module": rounded.module, "rounding_error": rounded.rounding_error}
                                     if rounded else None)
        clamped = self.worst_clamp
        d["worst_clamp_error"] = {"module": clamped.module, "clamp_error": clamped.clamp_error} if clamped else None
        ranks = sorted({m.rank for m in self.modules})
        d["rank_range"] = [ranks[0], ranks[-1]] if ranks else None   # the ranks written (text shows the same)
        if not self.dry_run:
            d.pop("plan")
        return d


# ---------------------------------------------------------------------------------------------
# Pairing and streaming
# ---------------------------------------------------------------------------------------------

def _layout_label(base: BaseModel) -> str:
    name = "bfl" if base.layout == "native" else base.layout
    return name + (f", prefix {base.prefix!r}" if base.prefix else "")


def _check_compatible(orig: BaseModel, tuned: BaseModel, paths: tuple[str, str]) -> None:
    po, pt = orig.arch.params.get(COMPONENT, {}), tuned.arch.params.get(COMPONENT, {})
    if po == pt:
        return
    diffs = [f"{k}: {po.get(k)} vs {pt.get(k)}" for k in sorted(set(po) | set(pt)) if po.get(k) != pt.get(k)]
    raise ArchitectureError(
        f"ORIGINAL ({orig.variant}) and TUNED ({tuned.variant}) are different FLUX.1 models "
        f"({'; '.join(diffs)}); a difference of mismatched models is not a fine-tune.",
        path=f"{paths[0]} vs {paths[1]}",
        hint="pass the exact base the tuned model was trained from (same variant and sizes).")


def _covered(slots: list[Slot], out_rows: int) -> bool:
    windows = sorted(s.rows or (0, out_rows) for s in slots)
    pos = 0
    for a, b in windows:
        if a != pos:
            return False
        pos = b
    return pos == out_rows


RawSlots = list[tuple[Slot, Tensor]]


def _read(base: BaseModel, slots: list[Slot]) -> RawSlots:
    """The slots' tensors as stored (file dtype), shapes checked against the native windows later."""
    return [(s, base.file.get(s.key)) for s in slots]


def _place(dst: Tensor, raw: RawSlots, path: str, *, subtract: bool) -> None:
    """Write (or subtract) stored slot tensors into their windows of the native fp32 tensor ``dst``."""
    for s, t in raw:
        win = dst if s.rows is None else dst[s.rows[0]:s.rows[1]]
        if tuple(t.shape) != tuple(win.shape):
            raise ShapeMismatchError(s.key, win.shape, t.shape, path=path,
                                     hint="the file's tensor does not have the size its architecture implies.")
        parts = [(win, t)]
        if s.swap:   # the file stores the native halves swapped
            h = t.shape[0] // 2
            parts = [(win[:h], t[h:]), (win[h:], t[:h])]
        for w, src in parts:
            if subtract:
                w.sub_(src)          # mixed dtypes promote inside the kernel: no fp32 temporary
            else:
                w.copy_(src)


def _assemble(base: BaseModel, slots: list[Slot], shape: tuple[int, ...]) -> Tensor:
    """The full native tensor (fp32) of one module parameter from its file slots."""
    out = torch.empty(shape, dtype=torch.float32)
    _place(out, _read(base, slots), base.file.path or "", subtract=False)
    return out


def _file_position(base: BaseModel, slots: list[Slot]) -> tuple[str, int]:
    infos = [base.file.infos[s.key] for s in slots]
    first = min(infos, key=lambda i: (i.file, i.start))
    return (first.file or "", first.start)


def _param_slots(slots: list[Slot], param: str) -> list[Slot]:
    return [s for s in slots if s.param == param]


def _max_abs(t: Tensor) -> float:
    """``max|t|`` (NaN when ``t`` has a NaN, inf with an inf) without a temporary."""
    if not t.numel():
        return 0.0
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi)) if not (math.isnan(float(lo)) or math.isnan(float(hi))) else math.nan


def _disk_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    return sum(os.path.getsize(os.path.join(folder, x)) for x in sorted(os.listdir(folder))
               if x.endswith((".safetensors", ".sft")))


def _output_dtype(base: BaseModel, requested: torch.dtype | None) -> torch.dtype:
    if requested is not None:
        return requested
    for s in base.slots.values():
        if s.module is not None and s.param == "weight":
            dt = ST_DTYPES[base.file.infos[s.key].dtype][0]
            return dt if dt in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
    return torch.bfloat16


def _check_finite(peak: float, what: str, path: str) -> None:
    if not math.isfinite(peak):
        raise NonFiniteError(f"{what}: the difference has NaN or Inf values.", path=path,
                             hint="check both checkpoints load correctly; a corrupt or overflowed tensor cannot "
                                  "be extracted.")


# ---------------------------------------------------------------------------------------------
# The operation
# ---------------------------------------------------------------------------------------------

def extract(original: str | os.PathLike[str], tuned: str | os.PathLike[str], output: str | os.PathLike[str] | None,
            *, rank: int | None = None, dynamic: str | tuple[str, float] | None = None, conv_rank: int | None = None,
            min_diff: float = 0.0, to: str = "kohya", device: str = "cpu", exact: bool = False, seed: int = 0,
            alpha: float | None = None, include_bias: bool = False, include_norms: bool = False,
            dtype: torch.dtype | str | None = None, oversample: int = DEFAULT_OVERSAMPLE, niter: int = DEFAULT_NITER,
            allow_pickle: bool = False, progress: Progress | None = None, dry_run: bool = False,
            clamp_quantile: float | None = None) -> ExtractReport:
    """Extract a LoRA ``tuned − original`` and write it to ``output`` in format ``to``.

    ``rank`` fixes the rank (the cap with ``dynamic``; default cap 128 there). ``alpha`` stores that α
    and scales the up factors by ``k/α`` so that the delta is unchanged. ``dtype`` defaults to the
    tuned model's weight dtype (bf16 for fp8 or other non-float inputs). Returns a per-module report.
    ``dry_run`` pairs the tensors of both models per native module from their headers alone (no tensor
    data is read, nothing is written) and returns that plan in ``report.plan``. ``dtype`` also takes the
    CLI's spellings (``"bf16"``, ``"fp16"``…). ``clamp_quantile`` (sd-scripts' ``--clamp_quantile``, in
    (0, 1]) clamps both factors of every module to ``±quantile(concat(up·S, Vh), q)`` as sd-scripts does;
    it adds error, measured per module (``clamp_error``) and included in ``relative_error``.
    """
    started = time.perf_counter()
    dtype = as_dtype(dtype)
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise UsageError(f"--clamp-quantile must be in (0, 1], got {clamp_quantile}.",
                         hint="sd-scripts' default is 0.99; leave it out for unclamped (optimal) factors.")
    src_o, src_t = os.fspath(original), os.fspath(tuned)
    dyn = parse_dynamic(dynamic) if isinstance(dynamic, str) else (tuple(dynamic) if dynamic else None)
    _validate(rank, dyn, conv_rank, min_diff, to, alpha, oversample, niter, include_norms)
    dev = _device(device)
    cap = rank if rank is not None else DEFAULT_DYNAMIC_CAP
    out_path = os.fspath(output) if output is not None else None
    if out_path is None and not dry_run:
        raise UsageError("no output path given.", hint="pass -o OUT.safetensors (or --dry-run).")
    if out_path is not None:
        check_output_path(out_path, [src_o, src_t])

    with open_weights(src_o, allow_pickle=allow_pickle) as fo, open_weights(src_t, allow_pickle=allow_pickle) as ft:
        orig, tune = open_base(fo), open_base(ft)
        _check_compatible(orig, tune, (src_o, src_t))
        out_dtype = _output_dtype(tune, dtype)
        report = ExtractReport(
            src_o, src_t, out_path, _layout_label(orig), _layout_label(tune), tune.arch.name, tune.variant, to,
            str(out_dtype).replace("torch.", ""), "exact_svd" if exact else "randomized_svd", rank,
            f"{dyn[0]}:{dyn[1]:g}" if dyn else None, alpha, seed, min_diff, str(dev), clamp_quantile=clamp_quantile)
        for base, path in ((orig, src_o), (tune, src_t)):
            if base.passthrough:
                report.ignored_keys[os.path.basename(path)] = list(base.passthrough)
        if dry_run:
            report.dry_run = True
            report.plan = _plan(orig, tune, report, cap=cap, dyn=dyn, include_bias=include_bias,
                                include_norms=include_norms)
            report.seconds = time.perf_counter() - started
            return report
        patches = _stream(orig, tune, report, cap=cap, conv_rank=conv_rank, dyn=dyn, exact=exact,
                          oversample=oversample, niter=niter, seed=seed, alpha=alpha, min_diff=min_diff,
                          include_bias=include_bias, include_norms=include_norms, dev=dev, out_dtype=out_dtype,
                          progress=progress, clamp_quantile=clamp_quantile)
        arch = tune.arch

    if not patches:
        raise UsageError(f"nothing to extract: all {len(report.skipped)} paired modules"
                         + (" and loose parameters" if include_norms else "") + " differ by at most "
                         f"--min-diff {min_diff:g}" + (" (the models are identical)" if min_diff == 0 else "") + ".",
                         path=src_t, hint="check that TUNED really is a fine-tune of ORIGINAL, or lower --min-diff.")
    model = LoraModel(arch, patches, to, {}, None)
    result = emit(model, to, dtype=out_dtype)
    report.warnings.extend(result.warnings)   # what diffusers drops: .diff/.diff_b under diffusers names
    title = os.path.splitext(os.path.basename(out_path))[0]
    inputs = [InputRecord(src_o, None, format=report.original_layout, size=_disk_size(src_o)),
              InputRecord(src_t, None, format=report.tuned_layout, size=_disk_size(src_t))]
    meta = lora_output_metadata(
        model, result, to, operation="extract", inputs=inputs, title=title, method=report.method, rank=rank,
        dynamic=report.dynamic, rank_cap=cap if dyn else None, seed=seed if not exact else None, alpha=alpha,
        oversample=oversample if not exact else None, niter=niter if not exact else None, min_diff=min_diff,
        include_bias=include_bias or None, include_norms=include_norms or None, modules=len(report.modules),
        norms=len(report.loose_written) or None, skipped=len(report.skipped) or None,
        clamp_quantile=clamp_quantile)
    require_finite_output(result.tensors, path=out_path, cause="the extracted factors " + dtype_range_cause(out_dtype),
                          hint="write a wider --dtype (fp32 or bf16).")
    save_tensors(out_path, result.tensors, meta, inputs=[src_o, src_t])
    report.tensors_out = len(result.tensors)
    report.output_bytes = os.path.getsize(out_path)
    report.seconds = time.perf_counter() - started
    return report


def _validate(rank: int | None, dyn: tuple[str, float] | None, conv_rank: int | None, min_diff: float, to: str,
              alpha: float | None, oversample: int, niter: int, include_norms: bool) -> None:
    if rank is None and dyn is None:
        raise UsageError("no rank given.", hint="pass --rank N (e.g. --rank 64) or --dynamic METHOD:PARAM "
                                                "(e.g. --dynamic sv_fro:0.9 --rank 128).")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}.")
    if conv_rank is not None and conv_rank < 1:
        raise UsageError(f"--conv-rank must be at least 1, got {conv_rank}.")
    if dyn is not None:
        parse_dynamic(f"{dyn[0]}:{dyn[1]}")
    if not min_diff >= 0:
        raise UsageError(f"--min-diff must be ≥ 0, got {min_diff}.")
    if to not in WRITABLE:
        raise UsageError(f"cannot write format {to!r}.", hint="choose one of: " + ", ".join(WRITABLE) + ".")
    if alpha is not None and not (alpha > 0 and math.isfinite(alpha)):
        raise UsageError(f"--alpha must be a positive number, got {alpha}.")
    if oversample < 0 or niter < 0:
        raise UsageError("--oversample and --niter must be ≥ 0.")


def _device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}.", hint="use cpu or cuda.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available to torch.",
                         hint="use --device cpu (the default).")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {device!r}.", hint="use cpu or cuda.")
    return dev


def _stream(orig: BaseModel, tune: BaseModel, report: ExtractReport, *, cap: int, conv_rank: int | None,
            dyn: tuple[str, float] | None, exact: bool, oversample: int, niter: int, seed: int,
            alpha: float | None, min_diff: float, include_bias: bool, dev: torch.device, out_dtype: torch.dtype,
            progress: Progress | None, include_norms: bool = False,
            clamp_quantile: float | None = None) -> list[Patch]:
    om, tm, loose_o, loose_t, work = _pair(orig, tune, report)
    modules = tune.arch.module_map(COMPONENT)

    def read(name: str) -> tuple[RawSlots, RawSlots]:
        return _read(tune, tm[name]), _read(orig, om[name])

    numel = max((modules[n].out * modules[n].inp for n in work), default=0)
    buf = torch.empty(numel, dtype=torch.float32)      # one difference buffer, reused (no page faults per module)
    patches: list[Patch] = []
    saw_conv = False
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-read") as pool:
        pending = pool.submit(read, work[0]) if work else None
        for i, name in enumerate(work):
            if progress:
                progress(i, len(work), name)
            t0 = time.perf_counter()
            raw_t, raw_o = pending.result()  # type: ignore[union-attr]
            pending = pool.submit(read, work[i + 1]) if i + 1 < len(work) else None   # overlap I/O with maths
            cm = modules[name]
            shape = (cm.out, cm.inp)
            d = buf[:cm.out * cm.inp].view(shape)
            _place(d, [(s, t) for s, t in raw_t if s.param == "weight"], tune.file.path, subtract=False)
            _place(d, [(s, t) for s, t in raw_o if s.param == "weight"], orig.file.path, subtract=True)
            bias = _bias_delta(raw_o, raw_t, cm.out, name, report, min_diff, include_bias, tune.file.path)
            del raw_t, raw_o
            peak = _max_abs(d)
            _check_finite(peak, name, tune.file.path)
            if peak <= min_diff:
                report.skipped.append(name)
                adapter = None
            else:
                saw_conv = saw_conv or d.dim() > 2
                k_cap = conv_rank if (d.dim() > 2 and conv_rank) else cap
                dec = decompose(d.flatten(1).to(dev), k_cap, dynamic=dyn, exact=exact, oversample=oversample,
                                niter=niter, seed=seed)
                up, down = dec.up.to("cpu"), dec.down.to("cpu")
                clamp_err = 0.0
                if clamp_quantile is not None:   # sd-scripts' clamp: adds error, measured against D itself
                    cu, cd = clamp_factors(up, down, clamp_quantile)
                    clamp_err = fold_error(LoRA(alpha=float(dec.rank), down=down, up=up),
                                           LoRA(alpha=float(dec.rank), down=cd, up=cu))
                    up, down = cu, cd
                    total = fro_sq(d.flatten(1))
                    err2 = min(1.0, _residual_sq(d.flatten(1), up, down) / total) if total > 0 else 0.0
                    dec.relative_error, dec.retained_energy = math.sqrt(err2), 1.0 - err2
                stored_alpha = float(dec.rank)
                if alpha is not None:
                    up = up * (dec.rank / alpha)
                    stored_alpha = float(alpha)
                exact_factors = LoRA(alpha=stored_alpha, down=down, up=up)
                adapter = LoRA(alpha=stored_alpha, down=down.to(out_dtype).clone(), up=up.to(out_dtype).contiguous())
                report.modules.append(ModuleResult(name, shape, dec.rank, dec.retained_energy, dec.relative_error,
                                                   peak, dec.svd, time.perf_counter() - t0,
                                                   fold_error(exact_factors, adapter), clamp_err))
                del dec, up, down
            if adapter is not None or bias is not None:
                patches.append(Patch(Target(COMPONENT, name), adapter, None, bias=bias, source=name))
    del buf
    paired = len(work)
    if conv_rank is not None and not saw_conv:
        report.warnings.append("--conv-rank had no effect: no compared weight is a convolution (FLUX.1 "
                               "transformers have none).")
    patches += _compare_loose(orig, tune, loose_o, loose_t, report, min_diff, include_norms, out_dtype)
    if progress:
        progress(len(work), len(work), "")
    if paired == 0:
        raise KeyMappingError("no module of ORIGINAL could be paired with one of TUNED", report.unpaired,
                              path=f"{orig.file.path} vs {tune.file.path}",
                              hint="both files must be FLUX.1 transformers (BFL, ComfyUI or diffusers layout).")
    if report.bias_differences:
        report.warnings.append(f"{len(report.bias_differences)} module(s) also changed their bias; pass "
                               "--include-bias to write those differences (diff_b).")
    left_out = [d for d in report.loose_differences if not d["written"]]
    if left_out:
        report.warnings.append(f"{len(left_out)} loose parameter(s) (q/k norm scales) differ and are not in the "
                               "output; pass --include-norms to write them as diff entries.")
    if report.loose_written and report.format != "comfy":
        report.warnings.append(f"{len(report.loose_written)} norm-scale diff(s) written with lorakit's "
                               f"{report.format} spelling: lorakit reads and bakes them, but only the comfy format "
                               "(diffusion_model.<param>.diff) has keys ComfyUI applies; other loaders ignore them.")
    rounded = [d for d in report.loose_differences if d["written"] and d["rounding_error"]]
    if rounded:
        worst = max(rounded, key=lambda d: d["rounding_error"])  # type: ignore[arg-type,return-value]
        report.warnings.append(f"{len(rounded)} norm-scale diff(s) were rounded to {str(out_dtype).replace('torch.', '')}"
                               f" (largest error {worst['rounding_error']:.3g} in {worst['name']}); pass "
                               "--save-precision fp32 to store them exactly.")
    return patches


def _pair(orig: BaseModel, tune: BaseModel, report: ExtractReport) -> tuple[
        dict[str, list[Slot]], dict[str, list[Slot]], dict[str, Slot], dict[str, Slot], list[str]]:
    """Pair both models' slots per native module (headers only); the unpaired ones go to the report.
    Returns the module slots of each model, their loose parameters and the paired modules in TUNED's file order."""
    om, tm = orig.by_module(), tune.by_module()
    modules = tune.arch.module_map(COMPONENT)
    for name in sorted(set(om) ^ set(tm)):
        report.unpaired.append(f"{name} (only in {'ORIGINAL' if name in om else 'TUNED'})")
    loose_o = {s.param: s for s in orig.slots.values() if s.module is None}
    loose_t = {s.param: s for s in tune.slots.values() if s.module is None}
    for name in sorted(set(loose_o) ^ set(loose_t)):
        report.unpaired.append(f"{name} (only in {'ORIGINAL' if name in loose_o else 'TUNED'})")
    work = []
    for name in modules:
        if name not in om or name not in tm:
            continue
        rows = modules[name].out
        bad = [lbl for lbl, sl in (("ORIGINAL", om[name]), ("TUNED", tm[name]))
               if not _covered(_param_slots(sl, "weight"), rows)]
        if bad:
            report.unpaired.append(f"{name} (weight rows incomplete in {' and '.join(bad)})")
        else:
            work.append(name)
    work.sort(key=lambda n: _file_position(tune, tm[n]))   # sequential reads of TUNED
    return om, tm, loose_o, loose_t, work


def _sorted_slots(slots: list[Slot]) -> list[Slot]:
    return sorted(slots, key=lambda s: (s.param, s.rows or (0, 0)))


def _slot_json(base: BaseModel, s: Slot) -> dict[str, object]:
    info = base.file.infos[s.key]
    return {"key": s.key, "param": s.param, "shape": list(info.shape), "dtype": info.dtype,
            "rows": list(s.rows) if s.rows else None, "swapped_halves": s.swap}


def _plan(orig: BaseModel, tune: BaseModel, report: ExtractReport, *, cap: int, dyn: tuple[str, float] | None,
          include_bias: bool, include_norms: bool) -> list[dict[str, object]]:
    """The dry-run plan: per paired native module, the tensors of each model, the native shape and the
    rank (fixed, or the cap of ``--dynamic``). Reads headers only."""
    om, tm, loose_o, loose_t, work = _pair(orig, tune, report)
    if not work:
        raise KeyMappingError("no module of ORIGINAL could be paired with one of TUNED", report.unpaired,
                              path=f"{orig.file.path} vs {tune.file.path}",
                              hint="both files must be FLUX.1 transformers (BFL, ComfyUI or diffusers layout).")
    modules = tune.arch.module_map(COMPONENT)
    plan: list[dict[str, object]] = []
    for name in work:
        cm = modules[name]
        params = ("weight", "bias") if include_bias else ("weight",)
        plan.append({"module": name, "shape": [cm.out, cm.inp],
                     "rank": min(cap, cm.out, cm.inp), "rank_rule": f"dynamic {dyn[0]}:{dyn[1]:g} (cap)" if dyn
                     else "fixed",
                     "original": [_slot_json(orig, s) for s in _sorted_slots(om[name]) if s.param in params],
                     "tuned": [_slot_json(tune, s) for s in _sorted_slots(tm[name]) if s.param in params]})
    if include_norms:
        for name in sorted(set(loose_o) & set(loose_t)):
            plan.append({"module": name, "shape": list(tune.file.infos[loose_t[name].key].shape), "rank": None,
                         "rank_rule": "exact diff (norm scale)", "original": [_slot_json(orig, loose_o[name])],
                         "tuned": [_slot_json(tune, loose_t[name])]})
    return plan


def _slots_text(slots: list[dict[str, object]]) -> str:
    parts = []
    for e in slots:
        rows = e["rows"]
        parts.append(f"{e['key']}{e['shape']}" + (f"@rows {rows[0]}:{rows[1]}" if rows else "")  # type: ignore[index]
                     + (" (halves swapped)" if e["swapped_halves"] else ""))
    return " + ".join(parts)


def format_plan(report: ExtractReport) -> list[str]:
    """Human-readable lines of a dry-run plan: one per paired native module."""
    lines = []
    for e in report.plan:
        rank = "" if e["rank"] is None else f", rank {'≤ ' if e['rank_rule'] != 'fixed' else ''}{e['rank']}"
        lines.append(f"{e['module']} {e['shape']}{rank}: TUNED {_slots_text(e['tuned'])}"  # type: ignore[arg-type]
                     f" − ORIGINAL {_slots_text(e['original'])}")  # type: ignore[arg-type]
    return lines


def _bias_delta(raw_o: RawSlots, raw_t: RawSlots, out_rows: int, name: str, report: ExtractReport,
                min_diff: float, include_bias: bool, path: str) -> Tensor | None:
    bo = [(s, t) for s, t in raw_o if s.param == "bias"]
    bt = [(s, t) for s, t in raw_t if s.param == "bias"]
    if not bo and not bt:
        return None
    if not (bo and bt) or not _covered([s for s, _ in bo], out_rows) or not _covered([s for s, _ in bt], out_rows):
        report.unpaired.append(f"{name}.bias (missing or incomplete in one model)")
        return None
    db = torch.empty(out_rows, dtype=torch.float32)
    _place(db, bt, path, subtract=False)
    _place(db, bo, path, subtract=True)
    peak = _max_abs(db)
    _check_finite(peak, name + ".bias", path)
    if peak <= min_diff:
        return None
    if not include_bias:
        report.bias_differences.append(name)
        return None
    report.bias_modules.append(name)
    return db


def _compare_loose(orig: BaseModel, tune: BaseModel, loose_o: dict[str, Slot], loose_t: dict[str, Slot],
                   report: ExtractReport, min_diff: float, include_norms: bool = False,
                   out_dtype: torch.dtype = torch.float32) -> list[Patch]:
    """Report every loose parameter (q/k norm scale) that differs by more than ``min_diff``; with
    ``include_norms`` return a Full ``diff`` patch for each (fp32 difference stored at ``out_dtype``;
    its rounding error is recorded). Unchanged parameters are skipped."""
    patches: list[Patch] = []
    for name in sorted(set(loose_o) & set(loose_t)):
        a, b = orig.file.get(loose_o[name].key), tune.file.get(loose_t[name].key)
        if tuple(a.shape) != tuple(b.shape):
            report.unpaired.append(f"{name} (shapes {list(a.shape)} vs {list(b.shape)})")
            continue
        d = b.float() - a.float()
        diff = _max_abs(d)
        _check_finite(diff, name, tune.file.path or "")
        if diff <= min_diff:
            continue
        entry: dict[str, object] = {"name": name, "max_abs_diff": diff, "written": include_norms}
        if include_norms:
            stored = d.to(out_dtype)
            entry["rounding_error"] = _max_abs(stored.float() - d)
            patches.append(Patch(Target(COMPONENT, name, loose=True), Full(alpha=None, diff=stored.contiguous()),
                                 source=name))
            report.loose_written.append(name)
        report.loose_differences.append(entry)
    return patches
