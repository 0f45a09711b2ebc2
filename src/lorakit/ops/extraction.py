"""``lorakit extract``: a LoRA from the difference of a fine-tuned model and its base (``math.md`` §5).

Any registered architecture (FLUX.1, SD1.x, SD2.x, SDXL). Both models may be in any base layout that
:func:`lorakit.base.checkpoint.open_base` reads (FLUX: BFL, ComfyUI-prefixed, diffusers single file or sharded folder;
SD: single-file checkpoints holding UNet and text encoders, bare UNet files); tensors are paired through their
component, native module and row window, so every patch is written on a native target whatever the input
layouts. Every component both models hold is compared: the denoiser and, for SD models, each text encoder.

Work is streamed one native module at a time: the module's full native weight is assembled from the slots of
each model (diffusers q/k/v rows, OpenCLIP's fused ``in_proj_weight`` read as one ``3·D × D`` weight, the
``norm_out.linear`` half swap, the transposed ``text_projection`` turned back with
:func:`lorakit.lora.transforms.stored_to_native`), the difference ``D = W_tuned − W_original`` is formed in fp32 (one
reused buffer) and decomposed, and only the low-rank factors are kept. The next module's tensors are read by a
background thread while the current one is decomposed (at most one extra module pair in memory). Fused weights
are written split in the output's naming by :func:`lorakit.formats.emit` (exactly: the parts share the down).

Decomposition: seeded randomized SVD (tall orientation, oversampling, power iterations; same inputs
and seed give the same bytes) or, with ``exact=True``, a thin SVD. A fixed ``rank`` keeps ``k =
min(rank, out, in)`` values; ``dynamic=("sv_fro", 0.9)`` etc. chooses ``k`` per module from the
values computed at the cap rank (``sv_fro`` measures energy against the exact ``‖D‖_F²``;
``sv_cumulative`` against the computed values unless ``exact``). Each module's retained energy and
relative Frobenius error are exact (they use ``‖D‖_F``, and a direct residual when the error is
small enough for cancellation to matter).

Convolutions follow sd-scripts' ``networks/extract_lora_from_models.py``: a ``k×k`` convolution (k > 1) is SVD'd
as the ``(out, in·k·k)`` matrix at ``conv_rank`` (``--conv_dim``) and written as a 4-D down ``(r, in, k, k)`` and
up ``(out, r, 1, 1)``; without ``conv_rank`` it is left out (reported). A 1×1 convolution is treated as a Linear
layer (SVD of ``(out, in)`` at ``rank``) and written with 4-D factors ``(r, in, 1, 1)`` / ``(out, r, 1, 1)``.

Text encoders follow sd-scripts' rule too: an encoder is extracted only when its largest absolute weight
difference (over all its modules) exceeds ``te_min_diff`` (sd-scripts' ``--min_diff``, default 0.01); otherwise
it is left out whole and reported as the same in both models. Unlike sd-scripts, the rule is applied per
encoder (SDXL's CLIP-L and OpenCLIP-G separately), and a changed encoder's modules then follow the per-module
rule below like the denoiser's. The decision reads the encoder's modules in file order and stops at the first
one above the threshold (a changed encoder costs one extra module read; an unchanged one is read once, by the
decision, and never again).

Skipping: modules whose ``max|D| ≤ min_diff`` are skipped and counted; the default 0 skips only
modules that are exactly unchanged. Bias differences are written as ``diff_b`` entries with
``include_bias``. Differences of loose parameters (q/k norm scales) are always reported; with
``include_norms`` they are also written, exactly (fp32 difference, stored at the output dtype; the
rounding is reported), as ``diff`` entries on the parameter's full name: ``lora_unet_<param, . → _>.diff``
(kohya), ``diffusion_model.<param>.diff`` (comfy: ComfyUI's key for non-``.weight`` parameters) or
``transformer.<diffusers param>.diff`` (diffusers: lorakit's own spelling; diffusers does not load it).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lorakit.lora.adapters import Full, LoRA
from lorakit.base.checkpoint import BaseModel, Slot, base_expert, open_base
from lorakit.ops.conversion import lora_output_metadata
from lorakit.dtypes import ST_DTYPES, as_dtype
from lorakit.errors import ArchitectureError, KeyMappingError, NonFiniteError, ShapeMismatchError, UsageError
from lorakit.formats import WRITABLE, emit
from lorakit.formats.emit import fold_error
from lorakit.lora.checks import dtype_range_cause, require_finite_output
from lorakit.io import check_output_path, open_weights, save_tensors
from lorakit.lora.linalg import dynamic_rank, exact_svd, parse_dynamic, randomized_svd
from lorakit.ops.metadata import InputRecord
from lorakit.lora.experts import EXPERT_KEY, expert_tag
from lorakit.lora.model import LoraModel, Patch, Target
from lorakit.lora.transforms import fit_shape, stored_to_native

DEFAULT_DYNAMIC_CAP = 128      # rank cap of --dynamic when --rank is not given
DEFAULT_OVERSAMPLE = 16
DEFAULT_NITER = 2
DEFAULT_TE_MIN_DIFF = 0.01     # sd-scripts' --min_diff: a text encoder at or below it is "the same"
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
    module: str                  # native name (``component:name`` outside the main component)
    shape: tuple[int, ...]       # ΔW's shape, out × in × *kernel
    rank: int
    retained_energy: float
    relative_error: float
    max_abs_diff: float
    svd: str
    seconds: float
    rounding_error: float = 0.0     # extra relative error from storing the factors in the output dtype
    clamp_error: float = 0.0        # --clamp-quantile: ‖B'A' − BA‖/‖BA‖ of the clamped factors (0 without it)
    component: str = ""

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
    ignored_keys: dict[str, list[str]] = field(default_factory=dict)   # input -> tensors of no component (VAE)
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
    conv_rank: int | None = None          # rank of k×k convolutions (sd-scripts' --conv_dim)
    te_min_diff: float = DEFAULT_TE_MIN_DIFF
    components: list[str] = field(default_factory=list)       # the components both models hold (compared)
    # per text encoder: component, label, max_abs_diff (the largest seen), extracted (sd-scripts' rule)
    text_encoders: list[dict[str, object]] = field(default_factory=list)
    convs_left_out: list[str] = field(default_factory=list)   # changed k×k convolutions (no conv_rank given)

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

_PAIR_HINT = ("both files must be base models of one architecture (FLUX.1 transformers in BFL, ComfyUI or diffusers "
              "layout; SD1/SD2/SDXL single-file checkpoints or UNet files).")


def _layout_label(base: BaseModel) -> str:
    name = base.arch.spec.native_layout if base.layout == "native" else base.layout
    return name + (f", prefix {base.prefix!r}" if base.prefix else "")


def _label(base: BaseModel, component: str, module: str) -> str:
    """How reports name a module: its native name, prefixed ``component:`` outside the main component."""
    return module if component == base.component else f"{component}:{module}"


def _is_text_encoder(base: BaseModel, component: str) -> bool:
    return base.arch.spec.components[component].role != "denoiser"


def _check_compatible(orig: BaseModel, tune: BaseModel, paths: tuple[str, str]) -> None:
    where = f"{paths[0]} vs {paths[1]}"
    if orig.arch.name != tune.arch.name:
        raise ArchitectureError(
            f"ORIGINAL is {orig.arch.spec.label} ({orig.variant}) and TUNED is {tune.arch.spec.label} "
            f"({tune.variant}); a difference of two architectures is not a fine-tune.", path=where,
            hint="pass the exact base the tuned model was trained from (same architecture, variant and sizes).")
    spec = tune.arch.spec
    shared = [c for c in spec.components if c in orig.parts and c in tune.parts]
    diffs = []
    for comp in shared:
        po, pt = orig.arch.params.get(comp, {}), tune.arch.params.get(comp, {})
        where_c = f"{spec.components[comp].label} " if len(shared) > 1 else ""
        diffs += [f"{where_c}{k}: {po.get(k)} vs {pt.get(k)}" for k in sorted(set(po) | set(pt))
                  if po.get(k) != pt.get(k)]
    if diffs:
        raise ArchitectureError(
            f"ORIGINAL ({orig.variant}) and TUNED ({tune.variant}) are different {spec.label} models "
            f"({'; '.join(diffs)}); a difference of mismatched models is not a fine-tune.", path=where,
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


@dataclass(frozen=True)
class Job:
    """One paired native module: where its tensors are in each model and ΔW's shape."""

    component: str
    module: str
    label: str
    shape: tuple[int, ...]          # out × in × *kernel
    tuned: tuple[Slot, ...]
    original: tuple[Slot, ...]

    @property
    def spatial(self) -> bool:
        """A convolution with a kernel larger than 1×1 (sd-scripts' "Conv2d 3×3": needs --conv-rank)."""
        return len(self.shape) > 2 and math.prod(self.shape[2:]) > 1

    @property
    def target(self) -> Target:
        return Target(self.component, self.module)


@dataclass
class Pairing:
    jobs: list[Job]                                       # in TUNED's file order
    loose: list[tuple[str, str, str, Slot, Slot]]         # (component, name, label, ORIGINAL slot, TUNED slot)
    components: list[str]


def _read(base: BaseModel, slots: tuple[Slot, ...] | list[Slot]) -> RawSlots:
    """The slots' tensors as stored (file dtype), shapes checked against the native windows later."""
    return [(s, base.file.get(s.key)) for s in slots]


def _place(dst: Tensor, raw: RawSlots, path: str, *, subtract: bool) -> None:
    """Write (or subtract) stored slot tensors into their windows of the native fp32 tensor ``dst``: a transposed
    tensor is turned back (a view), a 1×1 convolution stored as a Linear weight (or back) is reshaped, swapped
    halves are placed crosswise (no copy)."""
    for s, stored in raw:
        win = dst if s.rows is None else dst[s.rows[0]:s.rows[1]]
        try:
            t = fit_shape(stored_to_native(stored, transpose=s.transpose), tuple(win.shape))
        except ValueError:
            raise ShapeMismatchError(s.key, win.shape, stored.shape, path=path,
                                     hint="the file's tensor does not have the size its architecture implies.") from None
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


def _difference(buf: Tensor, job: Job, raw_t: RawSlots, raw_o: RawSlots, paths: tuple[str, str]) -> Tensor:
    """``W_tuned − W_original`` of a job's weight, in native orientation, in (a view of) ``buf``."""
    d = buf[:math.prod(job.shape)].view(job.shape)
    _place(d, [(s, t) for s, t in raw_t if s.param == "weight"], paths[1], subtract=False)
    _place(d, [(s, t) for s, t in raw_o if s.param == "weight"], paths[0], subtract=True)
    return d


def _file_position(base: BaseModel, slots: tuple[Slot, ...] | list[Slot]) -> tuple[str, int]:
    infos = [base.file.infos[s.key] for s in slots]
    first = min(infos, key=lambda i: (i.file, i.start))
    return (first.file or "", first.start)


def _param_slots(slots: list[Slot], param: str) -> list[Slot]:
    return [s for s in slots if s.param == param]


def _weight_shape(base: BaseModel, component: str, module: str, slots: list[Slot]) -> tuple[int, ...]:
    """ΔW's shape of a module (``out × in × *kernel``); kernel sizes the layout leaves open come from the file."""
    m = base.arch.module_map(component)[module]
    if all(d > 0 for d in m.shape):
        return m.shape
    w = next(s for s in slots if s.param == "weight")
    stored = tuple(base.file.shape(w.key))
    stored = stored[::-1] if w.transpose else stored
    return (m.out, *stored[1:])


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


@dataclass(frozen=True)
class _Options:
    """The decomposition and selection options of one run."""

    cap: int
    conv_rank: int | None
    dyn: tuple[str, float] | None
    exact: bool
    oversample: int
    niter: int
    seed: int
    alpha: float | None
    min_diff: float
    te_min_diff: float
    include_bias: bool
    include_norms: bool
    clamp_quantile: float | None
    dev: torch.device
    out_dtype: torch.dtype

    def rank_cap(self, job: Job) -> int | None:
        """The rank (cap) of a job: ``conv_rank`` for k×k convolutions (None: left out), else ``cap``."""
        return self.conv_rank if job.spatial else self.cap


# ---------------------------------------------------------------------------------------------
# The operation
# ---------------------------------------------------------------------------------------------

def extract(original: str | os.PathLike[str], tuned: str | os.PathLike[str], output: str | os.PathLike[str] | None,
            *, rank: int | None = None, dynamic: str | tuple[str, float] | None = None, conv_rank: int | None = None,
            min_diff: float = 0.0, te_min_diff: float = DEFAULT_TE_MIN_DIFF, to: str = "kohya", device: str = "cpu",
            exact: bool = False, seed: int = 0, alpha: float | None = None, include_bias: bool = False,
            include_norms: bool = False, dtype: torch.dtype | str | None = None, oversample: int = DEFAULT_OVERSAMPLE,
            niter: int = DEFAULT_NITER, allow_pickle: bool = False, progress: Progress | None = None,
            dry_run: bool = False, clamp_quantile: float | None = None) -> ExtractReport:
    """Extract a LoRA ``tuned − original`` and write it to ``output`` in format ``to``.

    ``rank`` fixes the rank (the cap with ``dynamic``; default cap 128 there); ``conv_rank`` is the rank (cap) of
    k×k convolutions, which are left out without it (sd-scripts' ``--conv_dim``); 1×1 convolutions take ``rank``.
    A text encoder whose weights all differ by at most ``te_min_diff`` is not extracted (sd-scripts' rule).
    ``alpha`` stores that α and scales the up factors by ``k/α`` so that the delta is unchanged. ``dtype``
    defaults to the tuned model's weight dtype (bf16 for fp8 or other non-float inputs). Returns a per-module
    report. ``dry_run`` pairs the tensors of both models per native module from their headers alone (no tensor
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
    dyn: tuple[str, float] | None = (parse_dynamic(dynamic) if isinstance(dynamic, str)
                                     else ((str(dynamic[0]), float(dynamic[1])) if dynamic else None))
    _validate(rank, dyn, conv_rank, min_diff, te_min_diff, to, alpha, oversample, niter, include_norms)
    dev = _device(device)
    cap = rank if rank is not None else DEFAULT_DYNAMIC_CAP
    out_path = os.fspath(output) if output is not None else None
    if out_path is None and not dry_run:
        raise UsageError("no output path given.", hint="pass -o OUT.safetensors (or --dry-run).")
    if out_path is not None:
        check_output_path(out_path, [src_o, src_t])

    with open_weights(src_o, allow_pickle=allow_pickle) as fo, open_weights(src_t, allow_pickle=allow_pickle) as ft:
        orig, tune = open_base(fo), open_base(ft)
        # one expert of a pair: a checkpoint whose name does not say which expert it is takes the other's
        told_o, told_t = base_expert(fo, orig), base_expert(ft, tune)
        if told_o is not None and told_t is None:
            tune = open_base(ft, expert=told_o)
        elif told_t is not None and told_o is None:
            orig = open_base(fo, expert=told_t)
        expert = told_o or told_t
        _check_compatible(orig, tune, (src_o, src_t))
        out_dtype = _output_dtype(tune, dtype)
        report = ExtractReport(
            src_o, src_t, out_path, _layout_label(orig), _layout_label(tune), tune.arch.name, tune.variant, to,
            str(out_dtype).replace("torch.", ""), "exact_svd" if exact else "randomized_svd", rank,
            f"{dyn[0]}:{dyn[1]:g}" if dyn else None, alpha, seed, min_diff, str(dev), clamp_quantile=clamp_quantile,
            conv_rank=conv_rank, te_min_diff=te_min_diff)
        for base, path in ((orig, src_o), (tune, src_t)):
            if base.passthrough:
                report.ignored_keys[os.path.basename(path)] = list(base.passthrough)
        opt = _Options(cap, conv_rank, dyn, exact, oversample, niter, seed, alpha, min_diff, te_min_diff, include_bias,
                       include_norms, clamp_quantile, dev, out_dtype)
        pairing = _pair(orig, tune, report)
        report.components = list(pairing.components)
        if not pairing.jobs:
            raise KeyMappingError("no module of ORIGINAL could be paired with one of TUNED", report.unpaired,
                                  path=f"{orig.file.path} vs {tune.file.path}", hint=_PAIR_HINT)
        if dry_run:
            report.dry_run = True
            report.plan = _plan(orig, tune, pairing, opt)
            report.seconds = time.perf_counter() - started
            return report
        patches = _stream(orig, tune, report, pairing, opt, progress)
        arch = tune.arch

    if not patches:
        raise UsageError(_nothing_to_extract(report, include_norms), path=src_t,
                         hint="check that TUNED really is a fine-tune of ORIGINAL, or lower --min-diff"
                              + (" / --te-min-diff" if report.text_encoders else "")
                              + (", or pass --conv-rank N" if report.convs_left_out else "") + ".")
    assert out_path is not None   # checked above (only a dry run has none)
    metadata: dict[str, str] = {}
    if any(m.shape[2:] and math.prod(m.shape[2:]) > 1 for m in report.modules):   # as sd-scripts records --conv_dim
        conv_alpha = float(alpha if alpha is not None else conv_rank)  # type: ignore[arg-type]
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)})
    if expert is not None:
        metadata[EXPERT_KEY] = expert_tag(arch.spec, expert)    # which expert the file is for
    model = LoraModel(arch, patches, to, metadata, None)
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
        clamp_quantile=clamp_quantile, conv_rank=conv_rank,
        te_min_diff=te_min_diff if report.text_encoders else None,
        text_encoders_left_out=[e["component"] for e in report.text_encoders if not e["extracted"]] or None)
    require_finite_output(result.tensors, path=out_path, cause="the extracted factors " + dtype_range_cause(out_dtype),
                          hint="write a wider --dtype (fp32 or bf16).")
    save_tensors(out_path, result.tensors, meta, inputs=[src_o, src_t])
    report.tensors_out = len(result.tensors)
    report.output_bytes = os.path.getsize(out_path)
    report.seconds = time.perf_counter() - started
    return report


def _nothing_to_extract(report: ExtractReport, include_norms: bool) -> str:
    same = [e for e in report.text_encoders if not e["extracted"]]
    identical = (report.min_diff == 0 and not report.convs_left_out
                 and all(e["max_abs_diff"] == 0 for e in same))
    text = (f"nothing to extract: all {len(report.skipped)} compared modules"
            + (" and loose parameters" if include_norms else "") + " differ by at most "
            f"--min-diff {report.min_diff:g}")
    if report.convs_left_out:
        text += (f"; {len(report.convs_left_out)} changed k×k convolution(s) are extracted only with --conv-rank "
                 "(--conv_dim)")
    if same:
        text += (f"; the text encoder(s) {', '.join(str(e['label']) for e in same)} differ by at most --te-min-diff "
                 f"{report.te_min_diff:g}")
    return text + (" (the models are identical)" if identical else "") + "."


def _validate(rank: int | None, dyn: tuple[str, float] | None, conv_rank: int | None, min_diff: float,
              te_min_diff: float, to: str, alpha: float | None, oversample: int, niter: int,
              include_norms: bool) -> None:
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
    if not te_min_diff >= 0:
        raise UsageError(f"--te-min-diff must be ≥ 0, got {te_min_diff}.")
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


def _same_encoders(orig: BaseModel, tune: BaseModel, report: ExtractReport, jobs: list[Job], buf: Tensor,
                   te_min_diff: float) -> set[str]:
    """sd-scripts' text-encoder rule, per encoder: the encoders whose weights all differ by at most
    ``te_min_diff``. Each encoder's modules are read in file order up to the first one above the threshold."""
    paths = (orig.file.path or "", tune.file.path or "")
    same: set[str] = set()
    for comp in dict.fromkeys(j.component for j in jobs):
        if not _is_text_encoder(tune, comp):
            continue
        peak, differs = 0.0, False
        for job in (j for j in jobs if j.component == comp):
            d = _difference(buf, job, _read(tune, _param_slots(list(job.tuned), "weight")),
                            _read(orig, _param_slots(list(job.original), "weight")), paths)
            p = _max_abs(d)
            _check_finite(p, job.label, paths[1])
            peak = max(peak, p)
            if peak > te_min_diff:
                differs = True
                break
        report.text_encoders.append({"component": comp, "label": tune.arch.spec.components[comp].label,
                                     "max_abs_diff": peak, "extracted": differs})
        if not differs:
            same.add(comp)
    return same


def _factorize(d: Tensor, job: Job, peak: float, opt: _Options, t0: float) -> tuple[LoRA, ModuleResult]:
    """The rank-k factors of one difference (conv factors 4-D: down ``(k, in, *kernel)``, up ``(out, k, 1, 1)``)."""
    flat = d.flatten(1)
    k_cap = opt.rank_cap(job)
    assert k_cap is not None
    dec = decompose(flat.to(opt.dev), k_cap, dynamic=opt.dyn, exact=opt.exact, oversample=opt.oversample,
                    niter=opt.niter, seed=opt.seed)
    up, down = dec.up.to("cpu"), dec.down.to("cpu")
    clamp_err = 0.0
    if opt.clamp_quantile is not None:   # sd-scripts' clamp: adds error, measured against D itself
        cu, cd = clamp_factors(up, down, opt.clamp_quantile)
        clamp_err = fold_error(LoRA(alpha=float(dec.rank), down=down, up=up),
                               LoRA(alpha=float(dec.rank), down=cd, up=cu))
        up, down = cu, cd
        total = fro_sq(flat)
        err2 = min(1.0, _residual_sq(flat, up, down) / total) if total > 0 else 0.0
        dec.relative_error, dec.retained_energy = math.sqrt(err2), 1.0 - err2
    stored_alpha = float(dec.rank)
    if opt.alpha is not None:
        up = up * (dec.rank / opt.alpha)
        stored_alpha = float(opt.alpha)
    if d.dim() > 2:
        down = down.reshape(dec.rank, *job.shape[1:])
        up = up.reshape(job.shape[0], dec.rank, *([1] * (d.dim() - 2)))
    exact_factors = LoRA(alpha=stored_alpha, down=down, up=up)
    adapter = LoRA(alpha=stored_alpha, down=down.to(opt.out_dtype).clone(), up=up.to(opt.out_dtype).contiguous())
    result = ModuleResult(job.label, job.shape, dec.rank, dec.retained_energy, dec.relative_error, peak, dec.svd,
                          time.perf_counter() - t0, fold_error(exact_factors, adapter), clamp_err, job.component)
    return adapter, result


def _stream(orig: BaseModel, tune: BaseModel, report: ExtractReport, pairing: Pairing, opt: _Options,
            progress: Progress | None) -> list[Patch]:
    paths = (orig.file.path or "", tune.file.path or "")
    numel = max((math.prod(j.shape) for j in pairing.jobs), default=0)
    buf = torch.empty(numel, dtype=torch.float32)      # one difference buffer, reused (no page faults per module)
    same = _same_encoders(orig, tune, report, pairing.jobs, buf, opt.te_min_diff)
    work = [j for j in pairing.jobs if j.component not in same]

    def read(job: Job) -> tuple[RawSlots, RawSlots]:
        return _read(tune, job.tuned), _read(orig, job.original)

    patches: list[Patch] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-read") as pool:
        pending = pool.submit(read, work[0]) if work else None
        for i, job in enumerate(work):
            if progress:
                progress(i, len(work), job.label)
            t0 = time.perf_counter()
            raw_t, raw_o = pending.result()  # type: ignore[union-attr]
            pending = pool.submit(read, work[i + 1]) if i + 1 < len(work) else None   # overlap I/O with maths
            d = _difference(buf, job, raw_t, raw_o, paths)
            bias = _bias_delta(raw_o, raw_t, job.shape[0], job.label, report, opt.min_diff, opt.include_bias, paths[1])
            del raw_t, raw_o
            peak = _max_abs(d)
            _check_finite(peak, job.label, paths[1])
            adapter = None
            if peak <= opt.min_diff:
                report.skipped.append(job.label)
            elif opt.rank_cap(job) is None:
                report.convs_left_out.append(job.label)
            else:
                adapter, result = _factorize(d, job, peak, opt, t0)
                report.modules.append(result)
            if adapter is not None or bias is not None:
                patches.append(Patch(job.target, adapter, None, bias=bias, source=job.label))
    del buf
    for entry in report.text_encoders:
        seen = [m.max_abs_diff for m in report.modules if m.component == entry["component"]]
        entry["max_abs_diff"] = max([float(entry["max_abs_diff"]), *seen])  # type: ignore[arg-type]
    loose = [x for x in pairing.loose if x[0] not in same]
    patches += _compare_loose(orig, tune, loose, report, opt.min_diff, opt.include_norms, opt.out_dtype)
    if progress:
        progress(len(work), len(work), "")
    _stream_warnings(tune, report, pairing, opt)
    return patches


def _stream_warnings(tune: BaseModel, report: ExtractReport, pairing: Pairing, opt: _Options) -> None:
    spec = tune.arch.spec
    if opt.conv_rank is not None and not any(j.spatial for j in pairing.jobs):
        has_none = not any(any(k != "1" for k in m.kernel) for c in pairing.components
                           for m in spec.components[c].modules)
        report.warnings.append("--conv-rank had no effect: no compared weight is a k×k convolution"
                               + (f" ({spec.label} models have none)." if has_none else "."))
    if report.convs_left_out:
        report.warnings.append(
            f"{len(report.convs_left_out)} changed k×k convolution(s) were not extracted (e.g. "
            f"{report.convs_left_out[0]}): as in sd-scripts, convolutions with kernels larger than 1×1 are extracted "
            "only with --conv-rank N (--conv_dim N).")
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
        report.warnings.append(f"{len(rounded)} norm-scale diff(s) were rounded to "
                               f"{str(opt.out_dtype).replace('torch.', '')} (largest error "
                               f"{worst['rounding_error']:.3g} in {worst['name']}); pass --save-precision fp32 to "
                               "store them exactly.")


def _pair(orig: BaseModel, tune: BaseModel, report: ExtractReport) -> Pairing:
    """Pair both models' slots per component and native module (headers only); the unpaired ones go to the
    report. Components only one model holds are not compared (a warning says so)."""
    spec = tune.arch.spec
    comps = [c for c in spec.components if c in orig.parts and c in tune.parts]
    for c in spec.components:
        if (c in orig.parts) != (c in tune.parts):
            report.warnings.append(f"the {spec.components[c].label} ({c}) is only in "
                                   f"{'ORIGINAL' if c in orig.parts else 'TUNED'}: not compared.")
    jobs: list[Job] = []
    loose: list[tuple[str, str, str, Slot, Slot]] = []
    for comp in comps:
        om, tm = orig.by_module(comp), tune.by_module(comp)
        for name in sorted(set(om) ^ set(tm)):
            report.unpaired.append(f"{_label(tune, comp, name)} (only in {'ORIGINAL' if name in om else 'TUNED'})")
        lo = {s.param: s for s in orig.slots.values() if s.module is None and s.component == comp}
        lt = {s.param: s for s in tune.slots.values() if s.module is None and s.component == comp}
        for name in sorted(set(lo) ^ set(lt)):
            report.unpaired.append(f"{_label(tune, comp, name)} (only in {'ORIGINAL' if name in lo else 'TUNED'})")
        loose += [(comp, n, _label(tune, comp, n), lo[n], lt[n]) for n in sorted(set(lo) & set(lt))]
        for name, cm in tune.arch.module_map(comp).items():
            if name not in om or name not in tm:
                continue
            bad = [lbl for lbl, sl in (("ORIGINAL", om[name]), ("TUNED", tm[name]))
                   if not _covered(_param_slots(sl, "weight"), cm.out)]
            if bad:
                report.unpaired.append(f"{_label(tune, comp, name)} (weight rows incomplete in {' and '.join(bad)})")
                continue
            jobs.append(Job(comp, name, _label(tune, comp, name), _weight_shape(tune, comp, name, tm[name]),
                            tuple(tm[name]), tuple(om[name])))
    jobs.sort(key=lambda j: _file_position(tune, j.tuned))   # sequential reads of TUNED
    return Pairing(jobs, loose, comps)


def _sorted_slots(slots: tuple[Slot, ...]) -> list[Slot]:
    return sorted(slots, key=lambda s: (s.param, s.rows or (0, 0)))


def _slot_json(base: BaseModel, s: Slot) -> dict[str, object]:
    info = base.file.infos[s.key]
    return {"key": s.key, "param": s.param, "shape": list(info.shape), "dtype": info.dtype,
            "rows": list(s.rows) if s.rows else None, "swapped_halves": s.swap, "transposed": s.transpose}


def _plan(orig: BaseModel, tune: BaseModel, pairing: Pairing, opt: _Options) -> list[dict[str, object]]:
    """The dry-run plan: per paired native module, the tensors of each model, ΔW's shape and the rank (fixed,
    or the cap of ``--dynamic``; k×k convolutions: ``--conv-rank``). Reads headers only."""
    plan: list[dict[str, object]] = []
    params = ("weight", "bias") if opt.include_bias else ("weight",)
    base_rule = f"dynamic {opt.dyn[0]}:{opt.dyn[1]:g} (cap)" if opt.dyn else "fixed"
    for job in pairing.jobs:
        k_cap = opt.rank_cap(job)
        rule = base_rule if k_cap is not None else "left out: a k×k convolution needs --conv-rank"
        if _is_text_encoder(tune, job.component):
            rule += f"; extracted if the text encoder differs by > {opt.te_min_diff:g} (decided from the data)"
        plan.append({"module": job.label, "component": job.component, "shape": list(job.shape),
                     "rank": min(k_cap, job.shape[0], math.prod(job.shape[1:])) if k_cap is not None else None,
                     "rank_rule": rule,
                     "original": [_slot_json(orig, s) for s in _sorted_slots(job.original) if s.param in params],
                     "tuned": [_slot_json(tune, s) for s in _sorted_slots(job.tuned) if s.param in params]})
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


def _compare_loose(orig: BaseModel, tune: BaseModel, loose: list[tuple[str, str, str, Slot, Slot]],
                   report: ExtractReport, min_diff: float, include_norms: bool = False,
                   out_dtype: torch.dtype = torch.float32) -> list[Patch]:
    """Report every loose parameter (q/k norm scale) that differs by more than ``min_diff``; with
    ``include_norms`` return a Full ``diff`` patch for each (fp32 difference stored at ``out_dtype``;
    its rounding error is recorded). Unchanged parameters are skipped."""
    patches: list[Patch] = []
    for comp, name, label, so, st in loose:
        a, b = orig.file.get(so.key), tune.file.get(st.key)
        if tuple(a.shape) != tuple(b.shape):
            report.unpaired.append(f"{label} (shapes {list(a.shape)} vs {list(b.shape)})")
            continue
        d = b.float() - a.float()
        diff = _max_abs(d)
        _check_finite(diff, label, tune.file.path or "")
        if diff <= min_diff:
            continue
        entry: dict[str, object] = {"name": label, "max_abs_diff": diff, "written": include_norms}
        if include_norms:
            stored = d.to(out_dtype)
            entry["rounding_error"] = _max_abs(stored.float() - d)
            patches.append(Patch(Target(comp, name, loose=True), Full(alpha=None, diff=stored.contiguous()),
                                 source=label))
            report.loose_written.append(label)
        report.loose_differences.append(entry)
    return patches
