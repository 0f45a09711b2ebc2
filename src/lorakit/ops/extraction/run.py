"""The extract operation: open both models, check them, stream the modules, write the LoRA and the report."""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
import math
import os
import time


from lorakit.base.checkpoint import BaseModel, base_expert, open_base
from lorakit.base.pipeline import open_model
from lorakit.devices import parse_device
from lorakit import dtypes
from lorakit.dtypes import as_dtype
from lorakit.errors import KeyMappingError, UsageError
from lorakit.formats import emit
from lorakit.io import WeightFile, check_output_path, save_tensors
from lorakit.lora.checks import dtype_range_cause, require_finite_output
from lorakit.lora.linalg import parse_dynamic
from lorakit.lora.experts import EXPERT_KEY, expert_tag, split_by_expert, split_paths
from lorakit.lora.model import LoraModel
from lorakit.ops.conversion import lora_output_metadata
from lorakit.ops.extraction.decompose import DEFAULT_DYNAMIC_CAP, DEFAULT_NITER, DEFAULT_OVERSAMPLE, DEFAULT_TE_MIN_DIFF
from lorakit.ops.extraction.options import ExtractOptions, Progress, validate_options
from lorakit.ops.extraction.pairing import PAIR_HINT, check_compatible, layout_label, pair_models
from lorakit.ops.extraction.plan import describe_plan
from lorakit.ops.extraction.report import ExtractReport
from lorakit.ops.extraction.stream import stream_modules
from lorakit.ops.metadata import InputRecord

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch


def _opened(source: str | os.PathLike[str] | WeightFile, allow_pickle: bool, expert: str | None = None) -> BaseModel:
    """A model given as a path (opened here) or as an already opened weight file (e.g. in memory); ``expert``: the
    expert a checkpoint of one of paired experts holds."""
    if isinstance(source, WeightFile):
        return open_base(source, expert=expert)
    return open_model(source, allow_pickle=allow_pickle, expert=expert)


def _disk_size(path: str) -> int | None:
    if not os.path.exists(path):
        return None                       # an in-memory model (its label is no path)
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
            dt = dtypes.ST_DTYPES[base.file.infos[s.key].dtype][0]
            return dt if dt in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
    return torch.bfloat16


def extract(original: str | os.PathLike[str] | WeightFile, tuned: str | os.PathLike[str] | WeightFile,
            output: str | os.PathLike[str] | None,
            *, rank: int | None = None, dynamic: str | tuple[str, float] | None = None, conv_rank: int | None = None,
            min_diff: float = 0.0, te_min_diff: float = DEFAULT_TE_MIN_DIFF, to: str = "kohya", device: str = "cpu",
            exact: bool = False, seed: int = 0, alpha: float | None = None, include_bias: bool = False,
            include_norms: bool = False, dtype: torch.dtype | str | None = None, oversample: int = DEFAULT_OVERSAMPLE,
            niter: int = DEFAULT_NITER, allow_pickle: bool = False, progress: Progress | None = None,
            dry_run: bool = False, clamp_quantile: float | None = None, split_experts: bool = False) -> ExtractReport:
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
    it adds error, measured per module (``clamp_error``) and included in ``relative_error``. ``original`` and
    ``tuned`` may also be opened weight files (e.g. a host's loaded model, :mod:`lorakit.io.memory`).

    Paired experts (Wan 2.2 A14B): a checkpoint of one expert whose name does not say which takes its partner's
    expert (the written file says which, in its metadata); models holding both experts (pipeline folders) give one
    file holding both (``to="aitoolkit"``) or, with ``split_experts``, one file per expert, ``OUT_<tag>.<ext>``.
    """
    started = time.perf_counter()
    dtype = as_dtype(dtype)
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise UsageError(f"--clamp-quantile must be in (0, 1], got {clamp_quantile}.",
                         hint="sd-scripts' default is 0.99; leave it out for unclamped (optimal) factors.")
    src_o, src_t = (m.path if isinstance(m, WeightFile) else os.fspath(m) for m in (original, tuned))
    dyn: tuple[str, float] | None = (parse_dynamic(dynamic) if isinstance(dynamic, str)
                                     else ((str(dynamic[0]), float(dynamic[1])) if dynamic else None))
    validate_options(rank, dyn, conv_rank, min_diff, te_min_diff, to, alpha, oversample, niter, include_norms)
    dev = parse_device(device)
    cap = rank if rank is not None else DEFAULT_DYNAMIC_CAP
    out_path = os.fspath(output) if output is not None else None
    if out_path is None and not dry_run:
        raise UsageError("no output path given.", hint="pass -o OUT.safetensors (or --dry-run).")
    if out_path is not None:
        check_output_path(out_path, [src_o, src_t])

    orig = _opened(original, allow_pickle)
    tune: BaseModel | None = None
    try:
        tune = _opened(tuned, allow_pickle)
        orig, tune, expert = _align_experts(orig, tune, original, tuned, allow_pickle)
    except BaseException:
        orig.file.close()
        if tune is not None:
            tune.file.close()
        raise
    with orig.file, tune.file:
        check_compatible(orig, tune, (src_o, src_t))
        out_dtype = _output_dtype(tune, dtype)
        report = ExtractReport(
            src_o, src_t, out_path, layout_label(orig), layout_label(tune), tune.arch.name, tune.variant, to,
            str(out_dtype).replace("torch.", ""), "exact_svd" if exact else "randomized_svd", rank,
            f"{dyn[0]}:{dyn[1]:g}" if dyn else None, alpha, seed, min_diff, str(dev), clamp_quantile=clamp_quantile,
            conv_rank=conv_rank, te_min_diff=te_min_diff)
        for base, path in ((orig, src_o), (tune, src_t)):
            if base.passthrough:
                report.ignored_keys[os.path.basename(path)] = list(base.passthrough)
        opt = ExtractOptions(cap, conv_rank, dyn, exact, oversample, niter, seed, alpha, min_diff, te_min_diff, include_bias,
                       include_norms, clamp_quantile, dev, out_dtype)
        pairing = pair_models(orig, tune, report)
        report.components = list(pairing.components)
        if not pairing.jobs:
            raise KeyMappingError("no module of ORIGINAL could be paired with one of TUNED", report.unpaired,
                                  path=f"{orig.file.path} vs {tune.file.path}", hint=PAIR_HINT)
        if dry_run:
            report.dry_run = True
            report.plan = describe_plan(orig, tune, pairing, opt)
            report.seconds = time.perf_counter() - started
            return report
        patches = stream_modules(orig, tune, report, pairing, opt, progress)
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
    parts = split_by_expert(model) if split_experts else {"": model}
    paths = split_paths(arch.spec, out_path, list(parts)) if split_experts else {"": out_path}
    results = {c: emit(m, to, dtype=out_dtype) for c, m in parts.items()}
    inputs = [InputRecord(src_o, None, format=report.original_layout, size=_disk_size(src_o)),
              InputRecord(src_t, None, format=report.tuned_layout, size=_disk_size(src_t))]
    for comp, part in parts.items():
        result, path = results[comp], paths[comp]
        check_output_path(path, [src_o, src_t])
        report.warnings.extend(result.warnings)   # what diffusers drops: .diff/.diff_b under diffusers names
        title = os.path.splitext(os.path.basename(path))[0]
        meta = lora_output_metadata(
            part, result, to, operation="extract", inputs=inputs, title=title, method=report.method, rank=rank,
            dynamic=report.dynamic, rank_cap=cap if dyn else None, seed=seed if not exact else None, alpha=alpha,
            oversample=oversample if not exact else None, niter=niter if not exact else None, min_diff=min_diff,
            include_bias=include_bias or None, include_norms=include_norms or None, modules=len(report.modules),
            norms=len(report.loose_written) or None, skipped=len(report.skipped) or None,
            clamp_quantile=clamp_quantile, conv_rank=conv_rank,
            te_min_diff=te_min_diff if report.text_encoders else None,
            text_encoders_left_out=[e["component"] for e in report.text_encoders if not e["extracted"]] or None)
        require_finite_output(result.tensors, path=path, cause="the extracted factors " + dtype_range_cause(out_dtype),
                              hint="write a wider --dtype (fp32 or bf16).")
        save_tensors(path, result.tensors, meta, inputs=[src_o, src_t])
        report.tensors_out += len(result.tensors)
        report.output_bytes += os.path.getsize(path)
    report.output = ", ".join(paths.values())
    report.seconds = time.perf_counter() - started
    return report


def _align_experts(orig: BaseModel, tune: BaseModel, src_o: str | os.PathLike[str] | WeightFile,
                   src_t: str | os.PathLike[str] | WeightFile, allow_pickle: bool
                   ) -> tuple[BaseModel, BaseModel, str | None]:
    """Both checkpoints as the same expert when only one of them says which (by its name or metadata), and that
    expert (None: not one of paired experts). A caller's opened file is read again, not closed."""
    told_o, told_t = base_expert(orig.file, orig), base_expert(tune.file, tune)
    if told_o is not None and told_t is None:
        if not isinstance(src_t, WeightFile):
            tune.file.close()
        tune = _opened(src_t, allow_pickle, told_o)
    elif told_t is not None and told_o is None:
        if not isinstance(src_o, WeightFile):
            orig.file.close()
        orig = _opened(src_o, allow_pickle, told_t)
    return orig, tune, told_o or told_t


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
