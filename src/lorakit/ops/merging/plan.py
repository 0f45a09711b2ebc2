"""Gathering every input's contributions per target and running the chosen method on each target."""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace


from lorakit.errors import MergeError, UsageError
from lorakit.lora.adapters import Full, LoRA
from lorakit.lora.model import ArchInstance, LoraModel, Patch, Target
from lorakit.ops.blocks import BlockWeights
from lorakit.ops.merging.contributions import Contribution, dense_sum, merge_arch, target_shape
from lorakit.ops.merging.registry import get_merge_method
from lorakit.ops.merging.report import ModuleStat
from lorakit.progress import Progress, report as report_progress

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from lorakit.lazy import torch


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
        shape = target_shape(arch, target, contribs)
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
    return [Patch(target, Full(alpha=None, diff=dense_sum(contribs, shape)), None, source=target.module)], \
        ModuleStat(str(target), 0)


def scaled_bias(contribs: Sequence[Contribution], out_rows: int) -> Tensor | None:
    """``Σ coef·Δb`` of the contributions' bias deltas (row windows placed); None when none has one."""
    items = [c for c in contribs if c.bias is not None]
    if not items:
        return None
    total = torch.zeros(out_rows, dtype=torch.float32)
    for c in items:
        s, e = c.rows if c.rows else (0, out_rows)
        total[s:e] += c.coef * c.bias.float().reshape(-1)  # type: ignore[union-attr]
    return total
