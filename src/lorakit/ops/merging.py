"""``lorakit merge``: LoRA + LoRA merging on the native internal form.

Strength semantics are linear (``math.md`` §2): the merge of inputs ``i`` with weights ``w_i`` is
``Σ_i w_i·ΔW_i`` per target weight, where ``ΔW_i`` is input ``i``'s delta at strength 1 (its α/r
included). ``--blocks`` multiplies a module's merged delta once.

Methods
- ``concat`` (default, exact): every input's factors are stacked along the rank with the coefficient
  ``c = w·m·α/r`` folded in (``√|c|`` on both factors, sign on the down; all of it on the up when
  ``|c|`` is a power of two). Row windows of fused targets are combined by the format writer's own
  block-diagonal fusing. LoHa/LoKr modules join through their exact low-rank rewrites (``math.md``
  §4.3) when those are smaller than the dense matrix; otherwise the module is written as a full
  ``diff`` (kohya/comfy) or refused.
- ``svd``: the exact top-k of the weighted sum from the stacked factors (QR + core SVD, no dense
  matrix), rank from ``--rank`` or a ``--dynamic`` rule; default rank = the largest input rank on the
  module. Retained energy is reported per module.
- ``ties``, ``dare_linear``, ``dare_ties``: PEFT 0.21.2 ``merge_utils`` definitions on the dense task
  tensors ``T_i = ΔW_i`` with weights ``w_i`` (exactly what PEFT's ``*_svd`` combinations feed them),
  one native module at a time, then an SVD to the target rank. DARE draws its Bernoulli masks from a
  ``torch.Generator`` seeded by ``--seed`` and the module name: same seed, same bytes.

Loose parameters (q/k norm scale ``diff`` entries) are merged as the exact weighted sum ``Σ w_i·diff_i`` by
every method (a 1-D parameter has no rank to truncate or sign pattern to trim); the report says so.

Convolutions (SD1.5/SDXL LoCon; any architecture whose ``ModuleSpec.kernel`` is non-empty) are merged in
the flattened view ``ΔW (out, in·k·k)``: ``concat`` stacks ``down`` (r, in, k, k) and ``up`` (out, r, 1, 1)
exactly (Tucker ``mid`` and conv LoHa/LoKr are first rewritten as plain factors, exactly, when those are
smaller than the dense matrix); ``svd`` and ties/dare factor the flattened sum and reshape ``down`` back to
(k, in, kh, kw), ``up`` to (out, k, 1, 1).
``conv_rank`` (CLI ``--conv-rank``; sd-scripts' ``--new_conv_rank``/``--conv_dim``) is the output rank of
modules with a kernel larger than 1×1, exactly as sd-scripts' ``svd_merge_lora.py`` chooses it (its
``conv2d_3x3`` test): 1×1 convolutions count as Linear there and take ``--rank``. Without ``conv_rank``
the 3×3 modules take ``--rank`` too (sd-scripts: ``new_conv_rank`` defaults to ``new_rank``); with
``--dynamic`` it is their rank cap. The per-module report says which modules are convolutions.

Metadata policy for merged files: keys whose value is identical in every input are carried over;
``ss_base_model_version`` and the ModelSpec architecture/implementation keys come from the first
input that has them; everything else (training tags, dataset statistics, per-input names) is dropped.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from lorakit.lora.adapters import Adapter, Full, LoHa, LoKr, LoRA, NotExact
from lorakit.ops.blocks import BlockWeights, parse_blocks
from lorakit.dtypes import parse_dtype, worst_cast_error
from lorakit.ops.conversion import lora_output_metadata
from lorakit.errors import ArchitectureError, MergeError, NonFiniteError, UsageError
from lorakit.lora.checks import all_finite, dtype_range_cause, require_dense_fits, require_finite_model, require_finite_output
from lorakit.formats import WRITABLE, emit, get_format, read_lora
from lorakit.formats.emit import is_pow2
from lorakit.io import check_output_path, save_tensors
from lorakit.lora.linalg import dynamic_rank, exact_svd, factored_svd, gram_fro_norm, parse_dynamic, truncate
from lorakit.ops.metadata import InputRecord, file_sha256
from lorakit.lora.model import ArchInstance, LoraModel, Patch, Target
from lorakit.progress import Progress
from lorakit.progress import report as report_progress
from lorakit.ops.recipes import WeightedInput, parse_weighted

MAJORITY_SIGN = ("total", "frequency")
IDENTITY_KEYS = ("ss_base_model_version", "modelspec.architecture", "modelspec.implementation", "ss_v2")


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

@dataclass
class ModuleStat:
    module: str
    rank: int
    retained_energy: float | None = None      # svd / ties / dare: Σ_{i<k} σ² / Σ σ² of the matrix truncated
    relative_error: float | None = None
    kernel: tuple[int, ...] | None = None     # a convolution's kernel (None: Linear)

    def to_json(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class MergeReport:
    inputs: list[dict[str, object]]
    output: str | None
    method: str
    target_format: str
    architecture: str
    variant: str
    modules_out: int
    tensors_out: int
    dtype: str | None
    rank: int | None = None
    conv_rank: int | None = None
    dynamic: str | None = None
    seed: int | None = None
    density: float | None = None
    blocks: str | None = None
    kohya_ratios: bool = False
    modules: list[ModuleStat] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)           # modules whose block multiplier is 0
    verify: dict[str, object] | None = None
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    rounding: tuple[str, float] | None = None   # (module, rel. error) storing the merged factors in dtype adds

    @property
    def ranks(self) -> tuple[int, int] | None:
        r = [m.rank for m in self.modules if m.rank]
        return (min(r), max(r)) if r else None

    @property
    def min_retained_energy(self) -> tuple[str, float] | None:
        e = [(m.module, m.retained_energy) for m in self.modules if m.retained_energy is not None]
        return min(e, key=lambda x: x[1]) if e else None

    def to_json(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["modules"] = [m.to_json() for m in self.modules]
        d["rank_range"] = list(self.ranks) if self.ranks else None
        worst = self.min_retained_energy
        d["min_retained_energy"] = {"module": worst[0], "retained_energy": worst[1]} if worst else None
        d["rounding"] = {"module": self.rounding[0], "relative_error": self.rounding[1]} if self.rounding else None
        return d


# ---------------------------------------------------------------------------------------------
# Merge-method registry
# ---------------------------------------------------------------------------------------------

# The options a method may take ("rank" covers --rank, --conv-rank and --dynamic).
METHOD_OPTIONS = frozenset({"rank", "density", "majority_sign", "seed", "kohya_ratios"})

# (target, contributions, ΔW shape, options, input weights, block multiplier) -> (patches, stat)
ModuleMerge = Callable[["Target", "list[Contribution]", "tuple[int, ...]", "MergeOptions", "Sequence[float]", float],
                       "tuple[list[Patch], ModuleStat]"]
# (task tensors, weights, density=, majority_sign=, generator=) -> merged dense tensor
DenseCombine = Callable[..., Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: how a module is merged, plus what the CLI and the option checks need to know."""

    name: str
    merge: ModuleMerge
    help: str
    exact: bool = False                   # the output equals the weighted sum (no rank choice, no truncation)
    options: frozenset[str] = frozenset()  # METHOD_OPTIONS this method accepts
    needs_density: bool = False           # --density is required
    random: bool = False                  # draws from a generator seeded by --seed and the module name
    combine: DenseCombine | None = None   # dense methods: the task-tensor combination (``--verify``'s reference)


_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(method: MergeMethod) -> MergeMethod:
    """Add a merge method to the registry (ValueError if its name is taken or an option is unknown)."""
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} registered twice")
    unknown = method.options - METHOD_OPTIONS
    if unknown:
        raise ValueError(f"merge method {method.name!r}: unknown option(s) {', '.join(sorted(unknown))}")
    _METHODS[method.name] = method
    return method


def unregister_merge_method(name: str) -> None:
    """Remove a registered merge method (tests and plugins that add one temporarily)."""
    del _METHODS[name]


def merge_method(name: str, *, help: str, exact: bool = False, options: Iterable[str] = (),
                 needs_density: bool = False, random: bool = False) -> Callable[[ModuleMerge], ModuleMerge]:
    """Decorator: register a module-merge function ``(target, contribs, shape, options, weights, multiplier)``."""
    def deco(fn: ModuleMerge) -> ModuleMerge:
        register_merge_method(MergeMethod(name, fn, help, exact, frozenset(options) | (
            {"density"} if needs_density else set()), needs_density, random))
        return fn
    return deco


def dense_merge_method(name: str, *, help: str, options: Iterable[str] = (),
                       random: bool = False) -> Callable[[DenseCombine], DenseCombine]:
    """Decorator: register a method defined on the dense task tensors ``T_i = ΔW_i`` of each module
    (``combine(tensors, weights, density=, majority_sign=, generator=)``), truncated by SVD to the output rank.
    It takes ``--density`` (required) and ``--rank``; ``random`` methods get a seeded generator."""
    def deco(fn: DenseCombine) -> DenseCombine:
        register_merge_method(MergeMethod(name, _dense_method, help, False, frozenset(options) | {"rank", "density"},
                                          True, random, fn))
        return fn
    return deco


def merge_methods() -> tuple[str, ...]:
    """The registered merge method names, in registration order."""
    return tuple(_METHODS)


def get_merge_method(name: str) -> MergeMethod:
    """A registered merge method (UsageError naming the known ones otherwise)."""
    try:
        return _METHODS[name]
    except KeyError:
        raise UsageError(f"unknown merge method {name!r}.", hint="use one of: " + ", ".join(_METHODS) + ".") from None


def methods_with(option: str) -> tuple[str, ...]:
    """The registered methods accepting ``option`` (one of :data:`METHOD_OPTIONS`)."""
    return tuple(m.name for m in _METHODS.values() if option in m.options)


def _listing(names: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# ---------------------------------------------------------------------------------------------
# Inputs, architectures, coefficients
# ---------------------------------------------------------------------------------------------

InputSpec = WeightedInput | tuple[str, float] | str | os.PathLike


def _weighted(inputs: Iterable[InputSpec]) -> list[WeightedInput]:
    out = []
    for item in inputs:
        if isinstance(item, WeightedInput):
            w = item
        elif isinstance(item, (tuple, list)):
            path, weight = item
            w = WeightedInput(os.fspath(path), float(weight))
        else:
            w = parse_weighted(os.fspath(item))
        out.append(w)              # WeightedInput checks that the weight is finite
    return out


def merge_arch(models: Sequence[LoraModel]) -> ArchInstance:
    """One layout instance for all inputs; sizes must agree, counts and flags take the largest."""
    first = models[0]
    for m in models[1:]:
        if m.arch.name != first.arch.name:
            raise ArchitectureError(f"inputs are for different architectures: {first.arch.name} ({first.path}) and "
                                    f"{m.arch.name} ({m.path}).", hint="merge LoRAs of one base model only.")
    params: dict[str, dict[str, int]] = {}
    owner: dict[tuple[str, str], str | None] = {}
    for m in models:
        for comp, p in m.arch.params.items():
            spec = first.arch.spec.components[comp]
            merged = params.setdefault(comp, {})
            for k, v in p.items():
                if k in spec.counts or k in spec.flags:
                    merged[k] = max(merged.get(k, 0), v)
                elif k in merged and merged[k] != v:
                    raise ArchitectureError(
                        f"inputs disagree on the {comp} size {k}: {merged[k]} in {owner[(comp, k)]} but {v} in "
                        f"{m.path} (different base models or variants).", hint="merge LoRAs of one base model only.")
                else:
                    merged[k] = v
                    owner.setdefault((comp, k), m.path)
    default = first.arch.spec.default_variant
    arch_spec = first.arch.spec
    variants = sorted({m.arch.variant for m in models} - {default, "any"})
    # variants only metadata names (Pony, Illustrious on SDXL) share their base's tensors: any mix of them merges;
    # structurally different ones only when the architecture declares them mixable (FLUX.1 dev + schnell)
    named_only = {v.name for v in arch_spec.variants if v.named_by}
    structural = [v for v in variants if v not in named_only]
    if len(structural) > 1 and not any(set(structural) <= group for group in arch_spec.mixable_variants):
        raise ArchitectureError(f"inputs are for different {arch_spec.label} variants: {', '.join(variants)}.",
                                hint="merge LoRAs of one base model only.")
    variant = variants[0] if len(variants) == 1 else structural[0] if len(structural) == 1 else default
    preset: dict[str, str] = {}
    for m in models:
        for comp_name, preset_name in m.arch.preset.items():
            preset.setdefault(comp_name, preset_name)
    return ArchInstance(first.arch.spec, params, variant, preset)


def module_seed(seed: int, module: str) -> int:
    """The DARE generator seed of one module: stable across runs, platforms and module order."""
    digest = hashlib.sha256(f"{int(seed)}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def merged_metadata(models: Sequence[LoraModel]) -> dict[str, str]:
    """Keys every input agrees on, plus base-model identity keys from the first input that has them."""
    metas = [m.metadata for m in models]
    out = {k: v for k, v in metas[0].items() if all(meta.get(k) == v for meta in metas[1:])}
    for key in IDENTITY_KEYS:
        for meta in metas:
            if key in meta:
                out.setdefault(key, meta[key])
                break
    titles = [m.metadata.get("modelspec.title") or os.path.splitext(os.path.basename(m.path or "?"))[0]
              for m in models]
    out.pop("modelspec.title", None)
    out["modelspec.merged_from"] = ", ".join(titles)
    return out


@dataclass
class Contribution:
    """One input patch on a target, with the user coefficient (weight × block multiplier)."""

    input: int
    coef: float
    rows: tuple[int, int] | None
    adapter: Adapter | None
    bias: Tensor | None


def _target_shape(arch: ArchInstance, target: Target, contribs: Sequence[Contribution]) -> tuple[int, ...]:
    mod = arch.module_map(target.component).get(target.module)
    first = next((c.adapter for c in contribs if c.adapter is not None), None)
    tail = tuple(first.weight_shape[1:]) if first is not None else ()
    if mod is not None and mod.out > 0:
        return (mod.out, *tail)
    rows = [c.rows[1] if c.rows else (c.adapter.out_features if c.adapter is not None else
                                      int(c.bias.shape[0]) if c.bias is not None else 0) for c in contribs]
    return (max(rows), *tail)


def factor_form(adapter: Adapter) -> tuple[Tensor, Tensor, float] | None:
    """Exact ``(up, down, scale)`` in fp32 with ``ΔW = scale·up@down``, or None when the module must be
    densified (full diffs, or a rewrite larger than the dense matrix). Convolutions come flattened:
    ``up`` (out, r), ``down`` (r, in·k·k); a Tucker ``mid`` is contracted into ``down`` exactly."""
    if isinstance(adapter, LoRA) and adapter.mid is None:
        if any(int(n) != 1 for n in adapter.up.shape[2:]):
            return None                      # not a LoCon up (out, r, 1, 1): no plain factor form
        return adapter.up.float().flatten(1), adapter.down.float().flatten(1), adapter.scale
    if len(adapter.weight_shape) > 2:       # conv: Tucker mid, LoHa/LoKr with a kernel
        return _conv_factor_form(adapter)
    if isinstance(adapter, LoHa):
        if adapter.t1 is not None or adapter.shape is not None and len(adapter.shape) != 2:
            return None
        a1, a2, b1, b2 = (t.float() for t in (adapter.w1a, adapter.w2a, adapter.w1b, adapter.w2b))
        up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
        down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
        out = _small(up, down)
        return out + (adapter.scale,) if out else None
    if isinstance(adapter, LoKr):
        if adapter.t2 is not None:
            return None
        p, q = _split(adapter.w1, adapter.w1a, adapter.w1b)
        a, b = _split(adapter.w2, adapter.w2a, adapter.w2b)
        if p.dim() != 2 or a.dim() != 2:
            return None
        out = _small(torch.kron(p, a), torch.kron(q, b))
        return out + (adapter.scale,) if out else None
    return None


def _conv_factor_form(adapter: Adapter) -> tuple[Tensor, Tensor, float] | None:
    """A convolution delta's exact plain factors in the flattened view ``(out, r)``, ``(r, in·k·k)`` (the
    adapter's own ``to_lora`` rewrite: Tucker contraction, face-splitting, Kronecker), when smaller than dense."""
    rank = adapter.plain_rank
    shape = adapter.weight_shape
    if rank is None or rank * (shape[0] + math.prod(shape[1:])) > math.prod(shape):
        return None
    try:
        lora = adapter.to_lora()
    except NotExact:
        return None
    return lora.up.float().flatten(1), lora.down.float().flatten(1), lora.scale


def _split(full: Tensor | None, left: Tensor | None, right: Tensor | None) -> tuple[Tensor, Tensor]:
    """A factorisation ``full = P·Q`` with the smaller inner size (identity on one side), exactly."""
    if full is None:
        return left.float(), right.float()  # type: ignore[union-attr]
    f = full.float()
    if f.dim() != 2:
        return f, f
    rows, cols = f.shape
    if rows <= cols:
        return torch.eye(rows), f
    return f, torch.eye(cols)


def _small(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor] | None:
    r, out, inp = up.shape[1], up.shape[0], down.shape[1]
    return (up, down) if r * (out + inp) <= out * inp else None


def _rank_of(adapter: Adapter | None, shape: tuple[int, ...]) -> int:
    if adapter is None:
        return 0
    if isinstance(adapter, LoRA):
        return adapter.rank
    f = factor_form(adapter)
    if f is not None:
        return int(f[0].shape[1])
    return min(shape[0], math.prod(shape[1:])) if len(shape) > 1 else 1


# ---------------------------------------------------------------------------------------------
# PEFT 0.21.2 merge_utils definitions (dense task tensors), with an explicit generator for DARE
# ---------------------------------------------------------------------------------------------

def magnitude_prune(t: Tensor, density: float) -> Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (PEFT's TIES pruning)."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    k = int(density * t.numel())
    top = torch.topk(t.abs().reshape(-1), k=k, largest=True)
    mask[top[1]] = 1
    return t * mask.reshape(t.shape)


def random_prune(t: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Keep each entry with probability ``density`` and rescale by 1/density (PEFT's DARE)."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(input=t, fill_value=density), generator=generator)
    return t * mask / density


def majority_sign_mask(stacked: Tensor, method: str = "total") -> Tensor:
    """Entries whose sign agrees with the elected sign (``total`` or ``frequency``, PEFT)."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority = torch.where(magnitude >= 0, 1, -1)
    return sign == majority


def combine_dense(tensors: list[Tensor], weights: Sequence[float], method: str, *, density: float,
                  majority_sign: str = "total", generator: torch.Generator | None = None) -> Tensor:
    """A registered dense method's combination of task tensors (``ties`` / ``dare_linear`` / ``dare_ties``: as
    PEFT 0.21.2 defines them)."""
    spec = _METHODS.get(method)
    if spec is None or spec.combine is None:
        raise ValueError(method)
    return spec.combine(tensors, weights, density=density, majority_sign=majority_sign, generator=generator)


def _weighted_stack(pruned: list[Tensor], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    stacked = torch.stack(pruned, dim=0)
    w = torch.tensor(list(weights)).to(stacked.device)
    return stacked, w.view(w.shape + (1,) * (stacked.dim() - 1))


def _sign_elected(stacked: Tensor, w: Tensor, majority_sign: str) -> Tensor:
    """PEFT's disjoint merge: the weighted entries agreeing with the elected sign, averaged over their count."""
    mask = majority_sign_mask(stacked, majority_sign)
    weighted = stacked * w
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def _dare_pruned(tensors: list[Tensor], density: float, generator: torch.Generator | None) -> list[Tensor]:
    if generator is None:
        raise ValueError("DARE needs a generator")
    return [random_prune(t, density, generator) for t in tensors]


# ---------------------------------------------------------------------------------------------
# The merge engine (in memory)
# ---------------------------------------------------------------------------------------------

@dataclass
class MergeOptions:
    method: str = "concat"
    rank: int | None = None
    dynamic: tuple[str, float] | None = None
    density: float | None = None
    conv_rank: int | None = None   # rank of modules whose kernel is larger than 1×1 (sd-scripts' conv2d_3x3)
    majority_sign: str = "total"
    seed: int = 0
    kohya_ratios: bool = False
    allow_full: bool = True        # concat may write densified modules as full ``diff`` modules

    def for_kernel(self, kernel: tuple[int, ...]) -> "MergeOptions":
        """The options one module is merged with: a kernel larger than 1×1 takes ``conv_rank`` when given."""
        if self.conv_rank is None or not uses_conv_rank(kernel):
            return self
        return replace(self, rank=self.conv_rank)


def uses_conv_rank(kernel: tuple[int, ...]) -> bool:
    """sd-scripts' ``svd_merge_lora.py``: ``new_conv_rank`` applies to kernels other than 1×1 only."""
    return math.prod(kernel) > 1


def module_kernel(arch: ArchInstance, target: Target, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A module's kernel from the architecture (``ModuleSpec.kernel``), else from the delta's trailing dims."""
    mod = arch.module_map(target.component).get(target.module)
    if mod is not None and mod.kernel and all(k > 0 for k in mod.kernel):
        return tuple(mod.kernel)
    return tuple(int(n) for n in shape[2:])


@dataclass
class MergeResult:
    model: LoraModel
    stats: list[ModuleStat]
    dropped: list[str]
    warnings: list[str]
    coefficients: dict[Target, list[Contribution]]   # what the output should equal (for --verify)


def gather(models: Sequence[LoraModel], weights: Sequence[float], arch: ArchInstance,
           blocks: BlockWeights | None, *, kohya_ratios: bool = False) -> tuple[dict[Target, list[Contribution]],
                                                                                list[str]]:
    """Every input patch per target with its coefficient; targets whose multiplier is 0 are dropped."""
    targets: dict[Target, list[Contribution]] = {}
    for i, (model, w) in enumerate(zip(models, weights)):
        for p in model.patches:
            if p.dora is not None:
                raise MergeError(f"{p.target} is a DoRA module; a DoRA delta depends on the base weight and cannot "
                                 "be merged with other LoRAs on its own.", path=model.path,
                                 hint="bake the DoRA LoRA into the base model first (lorakit bake).")
            if p.replace:
                raise MergeError(f"{p.target} is a replacement value (a BFL control LoRA's norm scale), not a "
                                 "difference; it cannot be weighted or summed with other LoRAs.", path=model.path,
                                 hint="bake the control LoRA into the base model (lorakit bake), then merge or "
                                      "extract from the baked model.")
            targets.setdefault(p.target, []).append(Contribution(i, float(w), p.rows, p.adapter, p.bias))
    dropped = []
    for target in list(targets):
        m = blocks.multiplier(target) if blocks is not None else 1.0
        if m == 0:
            dropped.append(str(target))
            del targets[target]
            continue
        contribs = targets[target]
        if kohya_ratios:
            _kohya_coefficients(target, contribs)
        for c in contribs:
            c.coef *= m
    return targets, dropped


def _kohya_coefficients(target: Target, contribs: list[Contribution]) -> None:
    """sd-scripts concat: input i lands at ratio·|ratio|·r_i/R of ΔW_i (``math.md`` §3.2)."""
    ranks: dict[int, int] = {}
    for c in contribs:
        if c.adapter is not None and not isinstance(c.adapter, LoRA):
            raise MergeError(f"{target}: --kohya-ratios reproduces sd-scripts, which merges LoRA modules only "
                             f"(this one is {c.adapter.kind}).", hint="drop --kohya-ratios.")
        if isinstance(c.adapter, LoRA):
            ranks[c.input] = ranks.get(c.input, 0) + c.adapter.rank
    total = sum(ranks.values())
    for c in contribs:
        r = ranks.get(c.input, 0)
        c.coef = c.coef * abs(c.coef) * (r / total if total else 1.0)


def merge_models(models: Sequence[LoraModel], weights: Sequence[float], options: MergeOptions, *,
                 blocks: BlockWeights | None = None, arch: ArchInstance | None = None,
                 metadata: dict[str, str] | None = None, progress: Progress | None = None) -> MergeResult:
    """Merge loaded LoRAs into one :class:`LoraModel` (fp32 factors; the caller emits and casts).
    ``progress(done, total, target)`` is called once per target module."""
    if not models:
        raise UsageError("no inputs to merge.")
    method = get_merge_method(options.method)
    arch = arch or merge_arch(models)
    targets, dropped = gather(models, weights, arch, blocks, kohya_ratios=options.kohya_ratios)
    if not targets:
        raise MergeError("nothing to merge: every module has block multiplier 0 or the inputs are empty.",
                         hint="check --blocks.")
    patches: list[Patch] = []
    stats: list[ModuleStat] = []
    warnings: list[str] = []
    loose = 0
    for i, (target, contribs) in enumerate(targets.items()):
        report_progress(progress, i, len(targets), str(target))
        shape = _target_shape(arch, target, contribs)
        kernel = () if target.loose else module_kernel(arch, target, shape)
        opts = options.for_kernel(kernel)
        if target.loose:
            new, stat = _loose_sum(target, contribs, shape)
            loose += 1
        else:
            new, stat = method.merge(target, contribs, shape, opts, [w for w in weights],
                                     blocks.multiplier(target) if blocks else 1.0)
        stat.kernel = kernel or None
        patches.extend(new)
        stats.append(stat)
    report_progress(progress, len(targets), len(targets))
    if loose and not method.exact:
        warnings.append(f"{loose} loose parameter(s) (q/k norm scales) merged as exact weighted sums Σ w·diff: "
                        f"--method {options.method} applies to weight matrices only.")
    model = LoraModel(arch, patches, "merge", dict(metadata or {}), None, [])
    return MergeResult(model, stats, dropped, warnings, targets)


def _loose_sum(target: Target, contribs: list[Contribution], shape: tuple[int, ...]) -> tuple[list[Patch], ModuleStat]:
    """A loose parameter (q/k norm scale): ``Σ coef·diff`` as one full diff (fp32), for every method — a 1-D
    parameter has no low-rank structure to truncate or to trim by sign."""
    if any(c.adapter is None or c.bias is not None or c.rows is not None for c in contribs):
        raise MergeError(f"{target}: a loose parameter takes plain diffs only (no bias or row window).",
                         hint="the input file is malformed; check it with lorakit doctor.")
    return [Patch(target, Full(alpha=None, diff=_dense_sum(contribs, shape)), None, source=target.module)], \
        ModuleStat(str(target), 0)


def _scaled_bias(contribs: Sequence[Contribution], out_rows: int) -> Tensor | None:
    items = [c for c in contribs if c.bias is not None]
    if not items:
        return None
    total = torch.zeros(out_rows, dtype=torch.float32)
    for c in items:
        s, e = c.rows if c.rows else (0, out_rows)
        total[s:e] += c.coef * c.bias.float().reshape(-1)  # type: ignore[union-attr]
    return total


def _fold(up: Tensor, down: Tensor, c: float) -> tuple[Tensor, Tensor]:
    """Fold the coefficient into the factors: all on up when |c| is a power of two (exact), else √|c| each."""
    if c == 1:
        return up, down
    if is_pow2(c):
        return up * c, down
    root = math.sqrt(abs(c))
    return up * root, down * (root if c > 0 else -root)


@merge_method("concat", exact=True, options=("kohya_ratios",),
              help="exact: every input's factors stacked along the rank (ranks add up)")
def _concat(target: Target, contribs: list[Contribution], shape: tuple[int, ...], options: MergeOptions,
            weights: Sequence[float] = (), multiplier: float = 1.0) -> tuple[list[Patch], ModuleStat]:
    forms = [factor_form(c.adapter) if c.adapter is not None else None for c in contribs]
    dense_needed = any(c.adapter is not None and f is None for c, f in zip(contribs, forms))
    if dense_needed:
        if not options.allow_full:
            kinds = sorted({c.adapter.kind for c, f in zip(contribs, forms) if c.adapter is not None and f is None})
            raise MergeError(f"{target}: {'/'.join(kinds)} modules cannot be concatenated exactly as LoRA factors "
                             "and this output format cannot hold a full diff.",
                             hint="use --method svd (reports the truncation error), or --to kohya / comfy.")
        total = _dense_sum(contribs, shape)
        bias = _scaled_bias(contribs, shape[0])
        return [Patch(target, Full(alpha=None, diff=total), None, bias=bias)], \
            ModuleStat(str(target), 0)
    patches = []
    rank = 0
    for c, f in zip(contribs, forms):
        if c.adapter is None:
            patches.append(Patch(target, None, c.rows, bias=c.coef * c.bias.float()))  # type: ignore[union-attr]
            continue
        up, down, scale = f  # type: ignore[misc]
        up, down = _fold(up, down, c.coef * scale)
        r = int(down.shape[0])
        rank += r
        down = down.reshape(r, *shape[1:])                          # conv: (r, in, k, k)
        up = up.reshape(up.shape[0], r, *([1] * (len(shape) - 2)))  # conv: (out, r, 1, 1)
        lora = LoRA(alpha=float(r), down=down.contiguous(), up=up.contiguous())
        bias = c.coef * c.bias.float() if c.bias is not None else None
        patches.append(Patch(target, lora, c.rows, bias=bias))
    return patches, ModuleStat(str(target), rank)


def _dense_sum(contribs: Sequence[Contribution], shape: tuple[int, ...]) -> Tensor:
    total = torch.zeros(shape, dtype=torch.float32)
    for c in contribs:
        if c.adapter is None:
            continue
        d = c.adapter.dense()
        if c.rows is None:
            total += c.coef * d.reshape(shape)
        else:
            total[c.rows[0]:c.rows[1]] += c.coef * d.reshape(c.rows[1] - c.rows[0], *shape[1:])
    return total


def stacked_factors(contribs: Sequence[Contribution], out_rows: int,
                    dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor] | None:
    """``(U_s, D_s)`` with ``U_s @ D_s = Σ coef·ΔW`` (rows placed), or None if a module must be densified."""
    ups, downs = [], []
    for c in contribs:
        if c.adapter is None:
            continue
        f = factor_form(c.adapter)
        if f is None:
            return None
        up, down, scale = f
        block = torch.zeros((out_rows, up.shape[1]), dtype=dtype)
        s, e = c.rows if c.rows else (0, out_rows)
        block[s:e] = up.to(dtype) * (c.coef * scale)
        ups.append(block)
        downs.append(down.to(dtype))
    if not ups:
        return None
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def _input_rank(contribs: Sequence[Contribution], shape: tuple[int, ...]) -> int:
    per_input: dict[int, int] = {}
    for c in contribs:
        per_input[c.input] = per_input.get(c.input, 0) + _rank_of(c.adapter, shape)
    return max(per_input.values()) if per_input else 1


def _choose_rank(s: Tensor, contribs: Sequence[Contribution], shape: tuple[int, ...], options: MergeOptions) -> int:
    if options.dynamic is not None:
        return dynamic_rank(s, options.dynamic[0], options.dynamic[1], cap=options.rank)
    k = options.rank if options.rank is not None else _input_rank(contribs, shape)
    return max(1, min(k, s.numel()))


def _lowrank_patch(target: Target, u: Tensor, s: Tensor, vh: Tensor, k: int, shape: tuple[int, ...],
                   bias: Tensor | None) -> Patch:
    """Rank-k factors ``U·√Σ`` and ``√Σ·Vᵀ`` (balanced: better range in low-precision outputs), α = k."""
    root = s[:k].clamp(min=0).sqrt()
    up = (u[:, :k] * root).reshape(shape[0], k, *([1] * (len(shape) - 2)))
    down = (vh[:k] * root[:, None]).reshape(k, *shape[1:])
    return Patch(target, LoRA(alpha=float(k), down=down.contiguous(), up=up.contiguous()), None, bias=bias)


@merge_method("svd", options=("rank",),
              help="the exact best rank-N approximation of the weighted sum, from the factors (no dense matrices)")
def _svd(target: Target, contribs: list[Contribution], shape: tuple[int, ...], options: MergeOptions,
         weights: Sequence[float] = (), multiplier: float = 1.0) -> tuple[list[Patch], ModuleStat]:
    bias = _scaled_bias(contribs, shape[0])
    if all(c.adapter is None for c in contribs):
        return [Patch(target, None, None, bias=bias)], ModuleStat(str(target), 0)
    stacked = stacked_factors(contribs, shape[0])     # conv: the flattened (out, in·k·k) view
    if stacked is not None:
        _require_finite_sum(target, *stacked)
        u, s, vh = factored_svd(*stacked)
    else:
        require_dense_fits(str(target), shape, 4, path=None,
                           fix="merge with --method concat (exact, keeps the factors) instead.")
        dense = _dense_sum(contribs, shape)
        _require_finite_sum(target, dense)
        u, s, vh = exact_svd(dense.flatten(1))
    return _truncated(target, u, s, vh, contribs, shape, options, bias)


def _truncated(target: Target, u: Tensor, s: Tensor, vh: Tensor, contribs: Sequence[Contribution],
               shape: tuple[int, ...], options: MergeOptions, bias: Tensor | None) -> tuple[list[Patch], ModuleStat]:
    """The merged module at the rank the options choose from the singular values, with its statistics."""
    k = _choose_rank(s, contribs, shape, options)
    lr = truncate(u, s, vh, k)
    return [_lowrank_patch(target, u, s, vh, lr.rank, shape, bias)], \
        ModuleStat(str(target), lr.rank, lr.retained_energy, lr.relative_error)


def _require_finite_sum(target: Target, *tensors: Tensor) -> None:
    """The weighted sum an SVD is about to factor must be finite (large weights overflow float32)."""
    if not all(all_finite(t) for t in tensors):
        raise NonFiniteError(f"module {str(target)!r}: the weighted sum of the inputs overflows float32 (weights × "
                             "ΔW beyond ±3.4e38), so it cannot be re-factored; nothing was written.",
                             hint="lower the merge weights (PATH:WEIGHT).")


def input_deltas(contribs: Sequence[Contribution], shape: tuple[int, ...]) -> tuple[list[int], list[Tensor]]:
    """Dense strength-1 delta of each input present on the target (PEFT's ``get_delta_weight``)."""
    order: list[int] = []
    dense: dict[int, Tensor] = {}
    for c in contribs:
        if c.adapter is None:
            continue
        if c.input not in dense:
            order.append(c.input)
            dense[c.input] = torch.zeros(shape, dtype=torch.float32)
        d = c.adapter.dense()
        if c.rows is None:
            dense[c.input] += d.reshape(shape)
        else:
            dense[c.input][c.rows[0]:c.rows[1]] += d.reshape(c.rows[1] - c.rows[0], *shape[1:])
    return order, [dense[i] for i in order]


def dense_merge(target: Target, contribs: Sequence[Contribution], shape: tuple[int, ...], options: MergeOptions,
                weights: Sequence[float], multiplier: float) -> Tensor | None:
    """The dense ties/dare result of one module (block multiplier applied once, at the end)."""
    order, tensors = input_deltas(contribs, shape)
    if not tensors:
        return None
    gen = None
    if get_merge_method(options.method).random:
        gen = torch.Generator(device="cpu").manual_seed(module_seed(options.seed, str(target)))
    assert options.density is not None     # dense methods require --density (checked with the options)
    result = combine_dense(tensors, [weights[i] for i in order], options.method, density=float(options.density),
                           majority_sign=options.majority_sign, generator=gen)
    return result * multiplier if multiplier != 1 else result


def _dense_method(target: Target, contribs: list[Contribution], shape: tuple[int, ...], options: MergeOptions,
                  weights: Sequence[float], multiplier: float) -> tuple[list[Patch], ModuleStat]:
    bias = _scaled_bias(contribs, shape[0])
    n = len({c.input for c in contribs if c.adapter is not None})
    require_dense_fits(str(target), shape, 6 * n + 4, path=None,
                       fix=f"--method {options.method} needs each input's dense ΔW; use --method svd (works on the "
                           "factors) or concat (exact), or a machine with more memory.")
    merged = dense_merge(target, contribs, shape, options, weights, multiplier)
    if merged is None:
        return [Patch(target, None, None, bias=bias)], ModuleStat(str(target), 0)
    _require_finite_sum(target, merged)
    u, s, vh = exact_svd(merged.flatten(1))
    return _truncated(target, u, s, vh, contribs, shape, options, bias)


@dense_merge_method("ties", options=("majority_sign",),
                    help="PEFT TIES on each module's dense delta (keep the top --density, elect signs), then SVD")
def _ties(tensors: list[Tensor], weights: Sequence[float], *, density: float, majority_sign: str = "total",
          generator: torch.Generator | None = None) -> Tensor:
    stacked, w = _weighted_stack([magnitude_prune(t, density) for t in tensors], weights)
    return _sign_elected(stacked, w, majority_sign)


@dense_merge_method("dare_linear", options=("seed",), random=True,
                    help="PEFT DARE (random drop to --density, rescale), weighted sum, then SVD")
def _dare_linear(tensors: list[Tensor], weights: Sequence[float], *, density: float, majority_sign: str = "total",
                 generator: torch.Generator | None = None) -> Tensor:
    stacked, w = _weighted_stack(_dare_pruned(tensors, density, generator), weights)
    return (stacked * w).sum(dim=0)


@dense_merge_method("dare_ties", options=("seed", "majority_sign"), random=True,
                    help="PEFT DARE pruning with TIES sign election, then SVD")
def _dare_ties(tensors: list[Tensor], weights: Sequence[float], *, density: float, majority_sign: str = "total",
               generator: torch.Generator | None = None) -> Tensor:
    stacked, w = _weighted_stack(_dare_pruned(tensors, density, generator), weights)
    return _sign_elected(stacked, w, majority_sign)


# ---------------------------------------------------------------------------------------------
# Verification (re-read the written file)
# ---------------------------------------------------------------------------------------------

def verify_merge(written: LoraModel, expected: dict[Target, list[Contribution]], arch: ArchInstance,
                 options: MergeOptions, weights: Sequence[float], blocks: BlockWeights | None) -> dict[str, object]:
    """Relative Frobenius error per module of the written file against the exact target.

    concat/svd: the target is ``Σ coef·ΔW_i``; the error comes from one stacked factorisation
    ``[B_out | −c·B_i]·[A_out; A_i]`` and small Gram matrices (fp64), without densifying.
    ties/dare: the target is the module's dense ties/dare result before truncation.
    """
    got = written.by_target()
    dense = get_merge_method(options.method).combine is not None
    errors: dict[str, float] = {}
    for target in sorted(set(expected) | set(got), key=str):
        contribs = expected.get(target, [])
        mine = [Contribution(-1, 1.0, p.rows, p.adapter, p.bias) for p in got.get(target, [])]
        shape = _target_shape(arch, target, contribs + mine)
        ref_bias = _scaled_bias(contribs, shape[0])
        out_bias = _scaled_bias(mine, shape[0])
        bias_diff = _norm2(_sub(out_bias, ref_bias))
        bias_ref = _norm2(ref_bias)
        if dense and not target.loose:
            ref = dense_merge(target, contribs, shape, options, weights,
                              blocks.multiplier(target) if blocks else 1.0) if contribs else None
            ref = ref if ref is not None else torch.zeros(shape)
            out = _dense_sum(mine, shape)
            num, den = float((out - ref).double().square().sum()), float(ref.double().square().sum())
        else:
            negated = [Contribution(c.input, -c.coef, c.rows, c.adapter, c.bias) for c in contribs]
            both = stacked_factors(mine + negated, shape[0], torch.float64)
            only_ref = stacked_factors(contribs, shape[0], torch.float64)
            if both is not None and (only_ref is not None or all(c.adapter is None for c in contribs)):
                num = gram_fro_norm(*both) ** 2
                den = gram_fro_norm(*only_ref) ** 2 if only_ref is not None else 0.0
            else:
                ref = _dense_sum(contribs, shape).double()
                num = float((_dense_sum(mine, shape).double() - ref).square().sum())
                den = float(ref.square().sum())
        num += bias_diff
        den += bias_ref
        errors[str(target)] = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
    worst = max(errors.items(), key=lambda kv: kv[1]) if errors else ("-", 0.0)
    return {"reference": "dense ties/dare result" if dense else "exact weighted sum",
            "max_relative_error": worst[1], "worst_module": worst[0], "modules": errors}


def _sub(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return -b if b is not None else None
    return a - b if b is not None else a


def _norm2(t: Tensor | None) -> float:
    return float(t.double().square().sum()) if t is not None else 0.0


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------

def _check_options(method: str, rank: int | None, dynamic: str | None, density: float | None,
                   majority_sign: str | None, seed: int | None, kohya_ratios: bool, to: str,
                   conv_rank: int | None = None) -> MergeOptions:
    spec = get_merge_method(method)
    if to not in WRITABLE:
        raise UsageError(f"cannot write format {to!r}.", hint="choose one of: " + ", ".join(WRITABLE) + ".")
    if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank <= 0):
        raise UsageError(f"--rank must be a positive integer, got {rank}.")
    if conv_rank is not None and (isinstance(conv_rank, bool) or int(conv_rank) != conv_rank or conv_rank <= 0):
        raise UsageError(f"--conv-rank must be a positive integer, got {conv_rank}.")
    dyn = parse_dynamic(dynamic) if dynamic else None      # ranges checked there, for every command
    if "rank" not in spec.options and (rank is not None or dyn is not None or conv_rank is not None):
        ranked = methods_with("rank")
        hint = f"use --method {ranked[0]} to choose the output rank." if ranked else None
        if spec.exact:
            raise UsageError(f"{method} is exact and its rank is the sum of the input ranks; --rank/--conv-rank/"
                             "--dynamic do not apply.", hint=hint)
        raise UsageError(f"--rank/--conv-rank/--dynamic do not apply to --method {method}.", hint=hint)
    if spec.needs_density:
        if density is None:
            raise UsageError(f"--method {method} needs --density (the fraction of entries kept, in (0, 1]).")
        if not 0 < density <= 1:
            raise UsageError(f"--density must be in (0, 1], got {density}.")
    elif density is not None:
        raise UsageError(f"--density applies to {'/'.join(methods_with('density'))}, not to {method}.")
    if majority_sign is not None:
        if majority_sign not in MAJORITY_SIGN:
            raise UsageError(f"--majority-sign must be one of {', '.join(MAJORITY_SIGN)}, got {majority_sign!r}.")
        if "majority_sign" not in spec.options:
            raise UsageError(f"--majority-sign applies to {_listing(methods_with('majority_sign'))}, not to {method}.")
    if seed is not None and "seed" not in spec.options:
        random = [m.name for m in _METHODS.values() if m.random]
        raise UsageError(f"--seed applies to {_listing(random)} (the only random methods), not to {method}.")
    if kohya_ratios and "kohya_ratios" not in spec.options:
        raise UsageError("--kohya-ratios reproduces sd-scripts' concat merge; it only applies to --method "
                         f"{' or '.join(methods_with('kohya_ratios'))}.")
    return MergeOptions(method=method, rank=int(rank) if rank is not None else None, dynamic=dyn, density=density,
                        conv_rank=int(conv_rank) if conv_rank is not None else None,
                        majority_sign=majority_sign or "total", seed=int(seed) if seed is not None else 0,
                        kohya_ratios=bool(kohya_ratios), allow_full=get_format(to).write_style == "kohya")


def merge(inputs: Sequence[InputSpec], output: str | os.PathLike[str] | None, *, method: str = "concat",
          rank: int | None = None, dynamic: str | None = None, to: str = "kohya", blocks: str | None = None,
          verify: bool = False, dtype: torch.dtype | str | None = None, density: float | None = None,
          majority_sign: str | None = None, seed: int | None = None, kohya_ratios: bool = False,
          dry_run: bool = False, allow_partial: bool = False, allow_pickle: bool = False,
          progress: Progress | None = None, conv_rank: int | None = None) -> MergeReport:
    """Merge LoRAs ``[(path, weight), …]`` into ``output`` (see the module docstring for the semantics).

    ``dtype`` is a torch dtype or a CLI spelling (``"fp16"``, ``"bf16"``, ``"fp8"``…); ``progress`` is called
    as ``progress(done, total, module)`` while the modules are merged. ``conv_rank`` is the output rank of
    convolutions with a kernel larger than 1×1 (svd/ties/dare; default ``rank``)."""
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    options = _check_options(method, rank, dynamic, density, majority_sign, seed, kohya_ratios, to, conv_rank)
    items = _weighted(inputs)
    if not items:
        raise UsageError("no inputs to merge.", hint="give at least one LoRA: lorakit merge A.safetensors:0.5 …")
    if output is None and not dry_run:
        raise UsageError("no output path given.", hint="pass -o OUT.safetensors (or --dry-run).")
    out_path = os.fspath(output) if output is not None else None
    if out_path is not None:
        check_output_path(out_path, [w.path for w in items])
    models = [read_lora(w.path, allow_pickle=allow_pickle, allow_partial=allow_partial) for w in items]
    for m in models:
        require_finite_model(m)
    weights = [w.weight for w in items]
    arch = merge_arch(models)
    block_weights = parse_blocks(blocks, arch) if blocks else None
    warnings: list[str] = []
    out_dtype = dtype
    if out_dtype is None:
        dtypes = {m.dtype for m in models if m.dtype is not None}
        out_dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
        if len(dtypes) > 1:
            warnings.append("inputs have different dtypes; writing float32 (pass --dtype to choose).")
    if any(w == 0 for w in weights):
        warnings.append("an input has weight 0 and contributes nothing.")
    for w, m in zip(items, models):
        if m.unknown_keys:
            warnings.append(f"{w.path}: {len(m.unknown_keys)} keys not understood were left out (--allow-partial).")

    result = merge_models(models, weights, options, blocks=block_weights, arch=arch,
                          metadata=merged_metadata(models), progress=progress)
    if options.conv_rank is not None and not any(s.kernel and uses_conv_rank(s.kernel) for s in result.stats):
        warnings.append(f"--conv-rank had no effect: no merged module is a convolution with a kernel larger than "
                        f"1×1 ({arch.spec.label} LoRA; 1×1 convolutions take --rank, as in sd-scripts).")
    spec = get_merge_method(method)
    rounds = spec.exact and out_dtype.itemsize < 4 and any(
        c.adapter is not None and not is_pow2(c.coef * c.adapter.scale)
        for cs in result.coefficients.values() for c in cs)
    emitted = emit(result.model, to, dtype=out_dtype)
    if rounds or emitted.rounded:
        worst = f" (worst measured when folding: {max(e for _, e in emitted.rounded):.2g})" if emitted.rounded else ""
        warnings.append(f"weights folded into {str(out_dtype).replace('torch.', '')} factors are rounded{worst}; "
                        "--verify measures every module; pass --dtype fp32 for an exact file.")
    loose = len(result.model.loose_targets())
    if loose and to != "comfy":
        warnings.append(f"{loose} norm-scale diff(s) written with lorakit's {to} spelling: lorakit reads and bakes "
                        "them, but only the comfy format (diffusion_model.<param>.diff) has keys ComfyUI applies.")
    warnings.extend(emitted.warnings)   # what diffusers drops: T5, .diff/.diff_b under diffusers names
    report = MergeReport(
        inputs=[{"path": w.path, "weight": w.weight, "format": m.format, "modules": len(m.by_target())}
                for w, m in zip(items, models)],
        output=out_path, method=method, target_format=to, architecture=arch.name, variant=arch.variant,
        modules_out=emitted.modules, tensors_out=len(emitted.tensors),
        dtype=str(out_dtype).replace("torch.", "") if out_dtype is not None else None,
        rank=options.rank, conv_rank=options.conv_rank, dynamic=dynamic,
        seed=options.seed if spec.random else None,
        density=density, blocks=blocks, kohya_ratios=options.kohya_ratios, modules=result.stats,
        dropped=result.dropped, warnings=warnings + result.warnings, dry_run=dry_run,
        rounding=worst_cast_error([(str(p.target), p.adapter) for p in result.model.patches
                                   if p.adapter is not None], out_dtype))
    if dry_run or out_path is None:
        if verify:
            report.warnings.append("--verify needs a written file; skipped in --dry-run.")
        return report
    records = [InputRecord(w.path, file_sha256(w.path) if os.path.isfile(w.path) else None, weight=w.weight,
                           format=m.format) for w, m in zip(items, models)]
    title = os.path.splitext(os.path.basename(out_path))[0]
    meta = lora_output_metadata(result.model, emitted, to, operation="merge", inputs=records, title=title,
                                method=method, rank=options.rank, conv_rank=options.conv_rank, dynamic=dynamic,
                                seed=options.seed if spec.random else None, density=density,
                                majority_sign=options.majority_sign if "majority_sign" in spec.options else None,
                                blocks=blocks, kohya_ratios=True if options.kohya_ratios else None,
                                strength="sd-scripts ratio·|ratio|·r/R" if options.kohya_ratios else "linear")
    require_finite_output(emitted.tensors, path=out_path,
                          cause="weights × factors (or an alpha) " + dtype_range_cause(out_dtype),
                          hint="lower the merge weights (PATH:WEIGHT), or write a wider --dtype (fp32).")
    save_tensors(out_path, emitted.tensors, meta, inputs=[w.path for w in items])
    if verify:
        written = read_lora(out_path)
        report.verify = verify_merge(written, result.coefficients, arch, options, weights, block_weights)
    return report
