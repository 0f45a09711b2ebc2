"""The merge operation: read the inputs, check the options, merge, write the output and the report."""

from __future__ import annotations

from typing import TYPE_CHECKING

import os
from collections.abc import Sequence
from dataclasses import replace


from lorakit.dtypes import parse_dtype, worst_cast_error
from lorakit.errors import LorakitError, UsageError
from lorakit.formats import WRITABLE, emit, get_format, read_lora
from lorakit.formats.emit import is_pow2
from lorakit.io import check_output_path, save_tensors
from lorakit.lora.checks import dtype_range_cause, require_finite_model, require_finite_output
from lorakit.lora.experts import join_experts, split_by_expert, split_paths
from lorakit.lora.linalg import parse_dynamic
from lorakit.lora.model import LoraModel
from lorakit.ops.blocks import parse_blocks
from lorakit.ops.conversion import lora_output_metadata
from lorakit.ops.merging.contributions import InputSpec, merge_arch, merged_metadata, weighted_inputs
from lorakit.ops.merging.dense import MAJORITY_SIGN
from lorakit.ops.merging.plan import MergeOptions, merge_models, uses_conv_rank
from lorakit.ops.merging.registry import METHODS, get_merge_method, listing, methods_with
from lorakit.ops.merging.report import MergeReport
from lorakit.ops.merging.verify import verify_merge
from lorakit.ops.metadata import InputRecord, file_sha256
from lorakit.progress import Progress

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch



def one_architecture(models: list[LoraModel], *, allow_pickle: bool = False) -> list[LoraModel]:
    """Inputs detected as different architectures, each re-read as the architecture of another input when its keys
    fit that one as well (every module, no more unknown keys: a FLUX.2 Klein 4B attention-only LoRA is also a
    FLUX.1 one). Unchanged when no such reading exists (:func:`merge_arch` then reports the mismatch)."""
    names = list(dict.fromkeys(m.arch.name for m in models))
    if len(names) < 2:
        return models
    for target in names:
        out: list[LoraModel] = []
        for m in models:
            if m.arch.name == target:
                out.append(m)
                continue
            try:
                again = read_lora(m.path or "", allow_pickle=allow_pickle, allow_partial=True, arch=target)
            except LorakitError:
                break
            if len(again.patches) != len(m.patches) or len(again.unknown_keys) > len(m.unknown_keys):
                break
            out.append(again)
        else:
            return out
    return models

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
            raise UsageError(f"--majority-sign applies to {listing(methods_with('majority_sign'))}, not to {method}.")
    if seed is not None and "seed" not in spec.options:
        random = [m.name for m in METHODS.values() if m.random]
        raise UsageError(f"--seed applies to {listing(random)} (the only random methods), not to {method}.")
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
          progress: Progress | None = None, conv_rank: int | None = None,
          split_experts: bool = False) -> MergeReport:
    """Merge LoRAs ``[(path, weight), …]`` into ``output`` (see the module docstring for the semantics).

    ``dtype`` is a torch dtype or a CLI spelling (``"fp16"``, ``"bf16"``, ``"fp8"``…); ``progress`` is called
    as ``progress(done, total, module)`` while the modules are merged. ``conv_rank`` is the output rank of
    convolutions with a kernel larger than 1×1 (svd/ties/dare; default ``rank``). Paired experts (Wan 2.2 A14B):
    each expert merges its own inputs' modules; ``split_experts`` writes one file per expert, ``OUT_<tag>.<ext>``."""
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    options = _check_options(method, rank, dynamic, density, majority_sign, seed, kohya_ratios, to, conv_rank)
    items = weighted_inputs(inputs)
    if not items:
        raise UsageError("no inputs to merge.", hint="give at least one LoRA: lorakit merge A.safetensors:0.5 …")
    if output is None and not dry_run:
        raise UsageError("no output path given.", hint="pass -o OUT.safetensors (or --dry-run).")
    out_path = os.fspath(output) if output is not None else None
    if out_path is not None:
        check_output_path(out_path, [w.path for w in items])
    models = [read_lora(w.path, allow_pickle=allow_pickle, allow_partial=allow_partial) for w in items]
    models = one_architecture(models, allow_pickle=allow_pickle)
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
    parts = split_by_expert(result.model) if split_experts else {"": result.model}
    paths = split_paths(arch.spec, out_path, list(parts)) if split_experts and out_path else {"": out_path}
    emits = {c: emit(m, to, dtype=out_dtype) for c, m in parts.items()}
    emitted = next(iter(emits.values()))
    if split_experts:     # the report's counts and warnings cover every file
        emitted = replace(emitted, tensors={k: t for e in emits.values() for k, t in e.tensors.items()},
                          modules=sum(e.modules for e in emits.values()),
                          rounded=[x for e in emits.values() for x in e.rounded],
                          warnings=list(dict.fromkeys(w for e in emits.values() for w in e.warnings)))
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
        output=", ".join(p for p in paths.values() if p) or None, method=method, target_format=to, architecture=arch.name, variant=arch.variant,
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
    for comp, part in parts.items():
        path = paths[comp]
        assert path is not None     # checked above: only a dry run goes without an output path
        check_output_path(path, [w.path for w in items])
        title = os.path.splitext(os.path.basename(path))[0]
        meta = lora_output_metadata(part, emits[comp], to, operation="merge", inputs=records, title=title,
                                    method=method, rank=options.rank, conv_rank=options.conv_rank, dynamic=dynamic,
                                    seed=options.seed if spec.random else None, density=density,
                                    majority_sign=options.majority_sign if "majority_sign" in spec.options else None,
                                    blocks=blocks, kohya_ratios=True if options.kohya_ratios else None,
                                    strength="sd-scripts ratio·|ratio|·r/R" if options.kohya_ratios else "linear")
        require_finite_output(emits[comp].tensors, path=path,
                              cause="weights × factors (or an alpha) " + dtype_range_cause(out_dtype),
                              hint="lower the merge weights (PATH:WEIGHT), or write a wider --dtype (fp32).")
        save_tensors(path, emits[comp].tensors, meta, inputs=[w.path for w in items])
    if verify:
        written = join_experts([read_lora(p) for p in paths.values() if p]) if split_experts else read_lora(out_path)
        report.verify = verify_merge(written, result.coefficients, arch, options, weights, block_weights)
    return report
