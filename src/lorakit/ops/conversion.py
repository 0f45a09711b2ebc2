"""``lorakit convert``: any readable LoRA format to kohya, diffusers or comfy, exactly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
import os
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
    meta[PROVENANCE_KEY] = provenance(operation, inputs, **details)
    return with_hashes(result.tensors, meta)


def convert(input: str | os.PathLike[str], output: str | os.PathLike[str] | None, to: str, *,
            dtype: torch.dtype | str | None = None, allow_lossy: bool = False, lossy_rank: int | None = None,
            allow_partial: bool = False, allow_pickle: bool = False, from_format: str | None = None,
            dry_run: bool = False, keep_algo: bool = False, progress: Progress | None = None,
            arch: str | None = None) -> ConvertReport:
    """Convert the LoRA ``input`` to format ``to`` (kohya, diffusers, comfy) and write it to ``output``.

    Exact by default: LyCORIS modules (LoHa, LoKr, Tucker LoCon) are written as exact plain LoRA factors
    (their new ranks in ``report.converted``) unless ``keep_algo`` (kohya/comfy); anything the target cannot
    hold exactly stops with a LossyConversionError unless ``allow_lossy`` (then re-factored and reported in
    ``lossy``). ``dtype`` is a torch dtype or a CLI spelling (``"bf16"``, ``"fp16"``, ``"fp8"``…); the relative
    error storing the factors in it adds is measured and reported in ``rounding``. ``progress(done, total,
    stage)`` is called per stage.
    """
    dtype = as_dtype(dtype)
    if to not in WRITABLE:
        raise UsageError(f"cannot write format {to!r}.", hint="choose one of: " + ", ".join(WRITABLE) + ".")
    src = os.fspath(input)
    if output is None and not dry_run:
        raise UsageError("no output path given.", hint="pass -o OUT.safetensors (or --dry-run).")
    if output is not None:
        check_output_path(os.fspath(output), [src])
    report_progress(progress, 0, 3, "reading")
    with open_weights(src, allow_pickle=allow_pickle) as f:
        parsed = parse(f, force_format=from_format, arch_name=arch)
        if parsed.unknown_keys and not allow_partial:
            raise KeyMappingError("keys not understood; converting without them would drop part of the LoRA",
                                  parsed.unknown_keys, path=src, hint="pass --allow-partial to convert the rest.")
        model = load(parsed)
    report_progress(progress, 1, 3, "converting")
    result = emit(model, to, allow_lossy=allow_lossy, lossy_rank=lossy_rank, dtype=dtype, fold_rounding="refuse",
                  keep_algo=keep_algo)
    rounding = worst_cast_error([(p.source or str(p.target), p.adapter) for p in model.patches
                                 if p.adapter is not None], dtype)
    warnings = list(result.warnings)   # what the target's consumer drops (T5 / .diff_b under diffusers names)
    out_dtype = next((str(t.dtype).replace("torch.", "") for t in result.tensors.values() if t.dim() > 0), None)
    report = ConvertReport(src, os.fspath(output) if output else None, model.format, to, model.arch.name,
                           model.arch.variant, len(model.patches), result.modules, len(result.tensors), out_dtype,
                           result.lossy, list(parsed.unknown_keys), warnings, dry_run, rounding,
                           list(result.converted), keep_algo)
    if dry_run:
        report_progress(progress, 3, 3)
        return report
    assert output is not None   # checked above: only a dry run goes without an output path
    report_progress(progress, 2, 3, "writing")
    title = os.path.splitext(os.path.basename(os.fspath(output)))[0]
    meta = lora_output_metadata(model, result, to, operation="convert",
                                inputs=[InputRecord(src, file_sha256(src) if os.path.isfile(src) else None,
                                                    format=model.format)],
                                title=title, target_format=to,
                                lossy=[m for m, _ in result.lossy] or None)
    require_finite_output(result.tensors, path=src, cause="factors (or an alpha) " + dtype_range_cause(
        dtype or next((t.dtype for t in result.tensors.values() if t.is_floating_point()), None)),
                          hint="write a wider --dtype (fp32); an alpha or factor beyond the float32 range "
                               "cannot be written at all — fix the input.")
    save_tensors(os.fspath(output), result.tensors, meta, inputs=[src])
    report_progress(progress, 3, 3)
    return report
