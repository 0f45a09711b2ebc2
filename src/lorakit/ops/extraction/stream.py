"""Streaming the modules: difference, factorise, collect — one native module at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
import time
from concurrent.futures import ThreadPoolExecutor


from lorakit.base.checkpoint import BaseModel, Slot
from lorakit.errors import NonFiniteError
from lorakit.formats.emit import fold_error
from lorakit.lora.adapters import Full, LoRA
from lorakit.lora.model import Patch, Target
from lorakit.ops.extraction.decompose import clamp_factors, decompose, fro_sq, residual_sq
from lorakit.ops.extraction.options import ExtractOptions, Progress
from lorakit.ops.extraction.pairing import (Job, Pairing, RawSlots, covered, difference, is_text_encoder, param_slots,
                                            place_slots, read_slots)
from lorakit.ops.extraction.report import ExtractReport, ModuleResult

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from lorakit.lazy import torch


def _max_abs(t: Tensor) -> float:
    """``max|t|`` (NaN when ``t`` has a NaN, inf with an inf) without a temporary."""
    if not t.numel():
        return 0.0
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi)) if not (math.isnan(float(lo)) or math.isnan(float(hi))) else math.nan


def _check_finite(peak: float, what: str, path: str) -> None:
    if not math.isfinite(peak):
        raise NonFiniteError(f"{what}: the difference has NaN or Inf values.", path=path,
                             hint="check both checkpoints load correctly; a corrupt or overflowed tensor cannot "
                                  "be extracted.")


def _same_encoders(orig: BaseModel, tune: BaseModel, report: ExtractReport, jobs: list[Job], buf: Tensor,
                   te_min_diff: float) -> set[str]:
    """sd-scripts' text-encoder rule, per encoder: the encoders whose weights all differ by at most
    ``te_min_diff``. Each encoder's modules are read in file order up to the first one above the threshold."""
    paths = (orig.file.path or "", tune.file.path or "")
    same: set[str] = set()
    for comp in dict.fromkeys(j.component for j in jobs):
        if not is_text_encoder(tune, comp):
            continue
        peak, differs = 0.0, False
        for job in (j for j in jobs if j.component == comp):
            d = difference(buf, job, read_slots(tune, param_slots(list(job.tuned), "weight")),
                            read_slots(orig, param_slots(list(job.original), "weight")), paths)
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


def _factorize(d: Tensor, job: Job, peak: float, opt: ExtractOptions, t0: float) -> tuple[LoRA, ModuleResult]:
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
        err2 = min(1.0, residual_sq(flat, up, down) / total) if total > 0 else 0.0
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


def stream_modules(orig: BaseModel, tune: BaseModel, report: ExtractReport, pairing: Pairing, opt: ExtractOptions,
                   progress: Progress | None) -> list[Patch]:
    """Difference, factorise and collect every paired module, one at a time in one reused buffer."""
    from lorakit.base.quant.noise import noise_floor, noise_warnings, track_noise   # torch-backed codecs
    paths = (orig.file.path or "", tune.file.path or "")
    track_noise(orig.file, tune.file)
    numel = max((math.prod(j.shape) for j in pairing.jobs), default=0)
    buf = torch.empty(numel, dtype=torch.float32)      # one difference buffer, reused (no page faults per module)
    same = _same_encoders(orig, tune, report, pairing.jobs, buf, opt.te_min_diff)
    work = [j for j in pairing.jobs if j.component not in same]

    def read(job: Job) -> tuple[RawSlots, RawSlots]:
        return read_slots(tune, job.tuned), read_slots(orig, job.original)

    patches: list[Patch] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-read") as pool:
        pending = pool.submit(read, work[0]) if work else None
        for i, job in enumerate(work):
            if progress:
                progress(i, len(work), job.label)
            t0 = time.perf_counter()
            raw_t, raw_o = pending.result()  # type: ignore[union-attr]
            pending = pool.submit(read, work[i + 1]) if i + 1 < len(work) else None   # overlap I/O with maths
            d = difference(buf, job, raw_t, raw_o, paths)
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
                result.noise_floor = noise_floor(d, [(orig.file, s.key) for s in job.original]
                                                 + [(tune.file, s.key) for s in job.tuned])
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
    report.warnings += noise_warnings([(m.module, m.noise_floor) for m in report.modules],
                                      [orig.file, tune.file])
    return patches


def _stream_warnings(tune: BaseModel, report: ExtractReport, pairing: Pairing, opt: ExtractOptions) -> None:
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


def _bias_delta(raw_o: RawSlots, raw_t: RawSlots, out_rows: int, name: str, report: ExtractReport,
                min_diff: float, include_bias: bool, path: str) -> Tensor | None:
    bo = [(s, t) for s, t in raw_o if s.param == "bias"]
    bt = [(s, t) for s, t in raw_t if s.param == "bias"]
    if not bo and not bt:
        return None
    if not (bo and bt) or not covered([s for s, _ in bo], out_rows) or not covered([s for s, _ in bt], out_rows):
        report.unpaired.append(f"{name}.bias (missing or incomplete in one model)")
        return None
    db = torch.empty(out_rows, dtype=torch.float32)
    place_slots(db, bt, path, subtract=False)
    place_slots(db, bo, path, subtract=True)
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
                   out_dtype: torch.dtype | None = None) -> list[Patch]:
    """Report every loose parameter (q/k norm scale) that differs by more than ``min_diff``; with
    ``include_norms`` return a Full ``diff`` patch for each (fp32 difference stored at ``out_dtype``, default fp32;
    its rounding error is recorded). Unchanged parameters are skipped."""
    out_dtype = out_dtype or torch.float32
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
