"""``lorakit convert``: any readable LoRA format to kohya, diffusers or comfy, exactly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field


from lorakit.lora.checks import dtype_range_cause, require_finite_output
from lorakit.dtypes import as_dtype, worst_cast_error
from lorakit.errors import KeyMappingError, UsageError
from lorakit.formats import WRITABLE, emit, load, parse
from lorakit.formats.emit import EmitResult
from lorakit.io import check_output_path, open_weights, save_tensors
from lorakit.io.header import loads_json
from lorakit.ops.metadata import (PROVENANCE_KEY, InputRecord, carry_over, diffusers_adapter_metadata, file_sha256,
                       network_metadata, provenance, with_hashes)
from lorakit.lora.experts import EXPERT_KEY, expert_tag, experts_in, join_experts, split_by_expert, split_paths
from lorakit.lora.model import LoraModel
from lorakit.progress import Progress
from lorakit.progress import report as report_progress

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch


@dataclass
class ConvertReport:
    """What :func:`convert` did: formats, module and tensor counts, dtype, lossy/rounded modules, warnings."""

    input: str
    output: str | None
    source_format: str
    target_format: str
    architecture: str
    variant: str
    modules_in: int
    modules_out: int
    tensors_out: int
    dtype: str | None
    lossy: list[tuple[str, float]] = field(default_factory=list)
    unknown_keys: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    rounding: tuple[str, float] | None = None   # (module, rel. error) the output dtype adds, worst module (> 1e-6)
    converted: list[tuple[str, str, int]] = field(default_factory=list)   # LyCORIS -> plain: (module, algo, rank)
    keep_algo: bool = False
    outputs: list[str] = field(default_factory=list)    # every file written (one per expert with split_experts)
    notes: list[str] = field(default_factory=list)      # how to load the output (nothing is lost)

    def to_json(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["lossy"] = [{"module": m, "relative_error": e} for m, e in self.lossy]
        d["rounding"] = {"module": self.rounding[0], "relative_error": self.rounding[1]} if self.rounding else None
        d["converted"] = [{"module": m, "from": a, "rank": r} for m, a, r in self.converted]
        return d


def lora_output_metadata(model: LoraModel, result: EmitResult, fmt: str, *, operation: str,
                         inputs: list[InputRecord], title: str | None, **details: object) -> dict[str, str]:
    """Metadata for a LoRA file lorakit writes: carried-over keys, updated network keys, provenance, hashes."""
    meta = carry_over(model.metadata)
    meta.update(network_metadata(result.ranks, result.alphas, fmt=fmt, arch=model.arch.spec,
                                 variant=model.arch.variant))
    algos = sorted({a for k in result.tensors for a, tag in (("loha", ".hada_"), ("lokr", ".lokr_"),
                                                              ("locon", ".lora_mid.")) if tag in k})
    try:
        args = loads_json(meta.get("ss_network_args") or "{}")
    except ValueError:
        args = None
    if algos:   # LyCORIS tensors: kohya-style loaders need the LyCORIS network module to read them
        meta["ss_network_module"] = "lycoris.kohya"
        meta["ss_network_args"] = json.dumps({**(args if isinstance(args, dict) else {}), "algo": algos[0]})
    elif isinstance(args, dict) and "algo" in args:   # plain LoRA factors now: the input's LyCORIS algo is stale
        rest = {k: v for k, v in args.items() if k != "algo"}
        if rest:
            meta["ss_network_args"] = json.dumps(rest)
        else:
            meta.pop("ss_network_args", None)
    if title:
        meta.setdefault("modelspec.title", title)   # a carried-over title is the user's; keep it
    if fmt == "diffusers":
        meta["format"] = "pt"
        has_dora = any(k.endswith("lora_magnitude_vector") for k in result.tensors)
        has_bias = any(k.endswith("lora_B.bias") for k in result.tensors)
        if result.ranks:
            meta["lora_adapter_metadata"] = diffusers_adapter_metadata(result.ranks, has_dora=has_dora,
                                                                       has_bias=has_bias)
    experts = experts_in(model)
    if len(experts) > 1:
        meta.pop(EXPERT_KEY, None)
    elif experts and (experts[0] != model.arch.spec.experts[0] or EXPERT_KEY in meta):
        meta[EXPERT_KEY] = expert_tag(model.arch.spec, experts[0])   # a single-expert file says which expert
    meta[PROVENANCE_KEY] = provenance(operation, inputs, **details)
    return with_hashes(result.tensors, meta)


def convert(input: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], output: str | os.PathLike[str] | None,
            to: str, *, dtype: torch.dtype | str | None = None, allow_lossy: bool = False,
            lossy_rank: int | None = None, allow_partial: bool = False, allow_pickle: bool = False,
            from_format: str | None = None, dry_run: bool = False, keep_algo: bool = False,
            progress: Progress | None = None, arch: str | None = None, split_experts: bool = False,
            expert: str | None = None) -> ConvertReport:
    """Convert the LoRA ``input`` to format ``to`` (kohya, diffusers, comfy) and write it to ``output``.

    Exact by default: LyCORIS modules (LoHa, LoKr, Tucker LoCon) are written as exact plain LoRA factors
    (their new ranks in ``report.converted``) unless ``keep_algo`` (kohya/comfy); anything the target cannot
    hold exactly stops with a LossyConversionError unless ``allow_lossy`` (then re-factored and reported in
    ``lossy``). ``dtype`` is a torch dtype or a CLI spelling (``"bf16"``, ``"fp16"``, ``"fp8"``…); the relative
    error storing the factors in it adds is measured and reported in ``rounding``. ``progress(done, total,
    stage)`` is called per stage.

    Paired experts (Wan 2.2 A14B): several inputs are single-expert files of distinct experts, joined into one
    file (a format with a combined spelling, e.g. comfy's AI-Toolkit ``transformer_1``/``transformer_2``);
    ``split_experts`` writes one file per expert instead, ``OUT_<tag>.<ext>`` (``report.outputs``); ``expert``
    names the expert of a single untagged input.
    """
    dtype = as_dtype(dtype)
    if to not in WRITABLE:
        raise UsageError(f"cannot write format {to!r}.", hint="choose one of: " + ", ".join(WRITABLE) + ".")
    srcs = [os.fspath(input)] if isinstance(input, (str, os.PathLike)) else [os.fspath(x) for x in input]
    if not srcs:
        raise UsageError("no input given.", hint="lorakit convert IN [IN2] -o OUT --to FORMAT")
    if expert is not None and len(srcs) > 1:
        raise UsageError("--expert names the expert of a single input.", hint="tag each file by its name instead "
                         "(*_high_noise / *_low_noise) or convert them one by one.")
    src = srcs[0]
    if output is None and not dry_run:
        raise UsageError("no output path given.", hint="pass -o OUT.safetensors (or --dry-run).")
    report_progress(progress, 0, 3, "reading")
    models: list[LoraModel] = []
    unknown: list[str] = []
    for path in srcs:
        with open_weights(path, allow_pickle=allow_pickle) as f:
            parsed = parse(f, force_format=from_format, arch_name=arch, expert=expert)
            if parsed.unknown_keys and not allow_partial:
                raise KeyMappingError("keys not understood; converting without them would drop part of the LoRA",
                                      parsed.unknown_keys, path=path, hint="pass --allow-partial to convert the rest.")
            unknown += parsed.unknown_keys
            models.append(load(parsed))
    model = models[0] if len(models) == 1 else join_experts(models)
    if len(models) > 1 and len(experts_in(model)) < len(models):
        raise UsageError("several inputs are joined only as single-expert files of distinct experts.", path=srcs[1],
                         hint="convert one LoRA at a time.")
    parts = split_by_expert(model) if split_experts else {"": model}
    outs = {c: p for c, p in split_paths(model.arch.spec, os.fspath(output), list(parts)).items()} \
        if split_experts and output is not None else {c: (os.fspath(output) if output else None) for c in parts}
    for out in outs.values():
        if out is not None:
            check_output_path(out, srcs)
    report_progress(progress, 1, 3, "converting")
    results = {c: emit(m, to, allow_lossy=allow_lossy, lossy_rank=lossy_rank, dtype=dtype, fold_rounding="refuse",
                       keep_algo=keep_algo) for c, m in parts.items()}
    rounding = worst_cast_error([(p.source or str(p.target), p.adapter) for p in model.patches
                                 if p.adapter is not None], dtype)
    # what the target's consumer drops (T5 / .diff_b under diffusers names)
    warnings = list(dict.fromkeys(w for r in results.values() for w in r.warnings))
    out_dtype = next((str(t.dtype).replace("torch.", "") for r in results.values() for t in r.tensors.values()
                      if t.dim() > 0), None)
    outputs = [o for o in outs.values() if o is not None]
    report = ConvertReport(" + ".join(srcs), outputs[0] if outputs else None, model.format, to, model.arch.name,
                           model.arch.variant, len(model.patches), sum(r.modules for r in results.values()),
                           sum(len(r.tensors) for r in results.values()), out_dtype,
                           [x for r in results.values() for x in r.lossy], sorted(unknown), warnings, dry_run,
                           rounding, [x for r in results.values() for x in r.converted], keep_algo, outputs,
                           list(dict.fromkeys(n for r in results.values() for n in r.notes)))
    if dry_run:
        report_progress(progress, 3, 3)
        return report
    report_progress(progress, 2, 3, "writing")
    records = [InputRecord(s, file_sha256(s) if os.path.isfile(s) else None, format=m.format)
               for s, m in zip(srcs, models)]
    for comp, part in parts.items():
        result, out_path = results[comp], outs[comp]
        assert out_path is not None   # checked above: only a dry run goes without an output path
        title = os.path.splitext(os.path.basename(out_path))[0]
        meta = lora_output_metadata(part, result, to, operation="convert", inputs=records, title=title,
                                    target_format=to, lossy=[m for m, _ in result.lossy] or None)
        require_finite_output(result.tensors, path=src, cause="factors (or an alpha) " + dtype_range_cause(
            dtype or next((t.dtype for t in result.tensors.values() if t.is_floating_point()), None)),
                              hint="write a wider --dtype (fp32); an alpha or factor beyond the float32 range "
                                   "cannot be written at all — fix the input.")
        save_tensors(out_path, result.tensors, meta, inputs=srcs)
    report_progress(progress, 3, 3)
    return report
