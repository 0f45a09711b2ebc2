"""The bake operation: open the base and its component files, check coverage, plan one task per tensor, run the
pipeline, publish the outputs."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TYPE_CHECKING, TypeVar, cast


from lorakit.base.checkpoint import BaseModel, open_base
from lorakit.base.pipeline import is_pipeline, open_pipeline
from lorakit.devices import parse_device
from lorakit.dtypes import dtype_code, is_float, itemsize, parse_dtype, short_name
from lorakit.errors import Interrupted, OutputError, PickleRefusedError, UsageError
from lorakit.io import WeightFile, open_weights
from lorakit.ops.baking.coverage import coverage
from lorakit.ops.baking.inputs import (BakeInput, as_weighted, base_desc, check_architectures, check_strengths,
                                      check_zero_ups, component_flags, flag_of, read_lora)
from lorakit.ops.baking.outputs import FileOutput, PipelineOutput, check_output
from lorakit.ops.baking.pipeline import ByteProgress, DEFAULT_CHUNK_BYTES, Pipeline
from lorakit.ops.baking.places import base_places
from lorakit.ops.baking.report import BakeReport, describe, output_metadata
from lorakit.ops.baking.tasks import Task, plan_tasks
from lorakit.ops.metadata import PROVENANCE_KEY
from lorakit.progress import Progress, ProgressBar

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch


_F = TypeVar("_F", bound=Callable[..., Any])


def _whole_bake_threads(fn: _F) -> _F:
    """Set torch's intra-op threads (the ``threads`` option, default half the CPUs) for the whole call, reading and
    checking the LoRAs included: on a 2-core machine the NaN/Inf check of an SDXL LoRA is several times slower
    with 2 threads than with 1, since the reader and writer threads need a core."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        saved = torch.get_num_threads()
        torch.set_num_threads(kwargs.get("threads") or _default_threads())
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(saved)
    return cast(_F, run)


_Path = str | os.PathLike[str]


# component -> (file, output), or just the file (a dry run needs no output)
ComponentFiles = Mapping[str, tuple[_Path, _Path | None] | _Path]


def _component_paths(components: ComponentFiles | None, aliases: dict[str, tuple[_Path | None, _Path | None]],
                     dry_run: bool) -> dict[str, tuple[str, str | None]]:
    """component -> (file, output) from ``components=`` and the flagged components' files; checks pairs."""
    paths: dict[str, tuple[str, str | None]] = {}
    for c, (f, o) in aliases.items():
        flag = component_flags()[c]
        if f is None and o is not None:
            raise UsageError(f"--{flag}-out given without --{flag}.", hint=f"pass the {c} file with --{flag}.")
        if f is not None and o is None and not dry_run:
            raise UsageError(f"--{flag} given without --{flag}-out.", hint=f"pass --{flag}-out OUT.safetensors.")
        if f is not None:
            paths[c] = (os.fspath(f), os.fspath(o) if o is not None else None)
    for c, given in (components or {}).items():
        f, o = (given if isinstance(given, (tuple, list)) else (given, None))
        if c in paths:
            raise UsageError(f"{c} given twice (--{component_flags()[c]} and --component {c}=…).", hint="give it once.")
        if o is None and not dry_run:
            raise UsageError(f"--component {c}={f} given without an output.",
                             hint=f"pass --component {c}=FILE:OUT.safetensors.")
        paths[c] = (os.fspath(f), os.fspath(o) if o is not None else None)
    return paths


def _keyword_files(given: Mapping[str, _Path | None]) -> dict[str, tuple[_Path | None, _Path | None]]:
    """``NAME=file, NAME_out=output`` keywords (components with a command-line flag) -> {NAME: (file, output)}."""
    known = component_flags()
    out: dict[str, tuple[_Path | None, _Path | None]] = {}
    for key in given:
        name = key[:-4] if key.endswith("_out") else key
        if name not in known:
            raise TypeError(f"bake() got an unexpected keyword argument {key!r} (component keywords: "
                            + ", ".join(f"{c}=, {c}_out=" for c in known) + ")")
        out[name] = (given.get(name), given.get(name + "_out"))
    return out


def _check_components(bm: BaseModel, paths: dict[str, tuple[str, str | None]]) -> None:
    """Separate component files must name components of the base's architecture that the base lacks."""
    spec = bm.arch.spec
    for c in paths:
        if c not in spec.components:
            raise UsageError(f"{spec.label} has no component {c!r}.",
                             hint="components: " + ", ".join(spec.components) + ".")
        if c in bm.parts:
            raise UsageError(f"the base already holds the {spec.components[c].label} ({c}); its LoRA modules are "
                             "baked into the base output.", hint=f"drop {flag_of(c)}.")


@_whole_bake_threads
def bake(base: str | os.PathLike[str], inputs: Sequence[object], output: str | os.PathLike[str] | None, *,
         dtype: torch.dtype | str | None = None, device: str = "cpu", allow_partial: bool = False,
         dry_run: bool = False, components: ComponentFiles | None = None,
         flagged: Mapping[str, tuple[_Path | None, _Path | None]] | None = None,
         allow_pickle: bool = False, progress: Progress | bool | None = None,
         chunk_bytes: int = DEFAULT_CHUNK_BYTES, threads: int | None = None,
         allow_zero_lora: bool = False, requant: str | None = None, retention_only: bool = False,
         **component_files: _Path | None) -> BakeReport:
    """Bake LoRAs (``path[:weight]`` strings, ``(path, weight)`` pairs or WeightedInput) into ``base``.

    Every component the base holds (the denoiser; in single-file checkpoints also text encoders) gets its
    LoRA modules; tensors of no component (a VAE) are copied untouched. ``base`` may be a diffusers pipeline
    folder (``model_index.json``): the subfolders its architecture names (:attr:`Container.folder`) are baked,
    every other file is copied, and ``output`` is a new folder published in one rename. Components held in
    separate files are given as ``components={name: (file, output)}``, as ``flagged={name: (file, output)}`` (the same,
    with the messages of the command-line flags), or as keywords ``NAME=file, NAME_out=output`` for any component
    with a command-line flag (FLUX.1's ``clip_l=…, clip_l_out=…``); LoRA modules of a component neither the base
    nor a given file holds are reported in ``not_applied``.
    The output keeps the base's layout and, unless ``dtype`` is given, every tensor's dtype (``dtype``
    changes the main component's (denoiser's) floating tensors only; other components of a full checkpoint
    and separate component files are never converted). Nothing is written unless every LoRA module fits the
    base (or ``allow_partial``); ``dry_run`` returns the per-tensor plan without touching base tensor data.
    ``threads`` sets torch's intra-op threads for the duration of the bake (default: half the CPUs,
    1 to 8 — the reader and writer threads need a core for their copies). A LoRA whose ups are all zero is
    refused unless ``allow_zero_lora``; a baked tensor that would hold NaN/Inf is refused (NonFiniteError).
    ``progress`` is called as ``progress(bytes_done, bytes_total, "")`` (``True``: a bar on stderr when it is a
    terminal; default none).
    A quantized base (ComfyUI scaled fp8, mixed precision, GGUF) is baked in its own format
    (:mod:`lorakit.ops.baking.quantized`): ``report.quantized`` says how much of each delta survived; ``requant``
    names the GGUF type for baked tensors whose own type cannot be written (K-quants); ``dtype`` writes the baked
    tensors unquantized instead; ``retention_only`` measures the retention and writes nothing.
    """
    t_start = time.perf_counter()
    out_dtype = parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    dev = parse_device(device)
    weighted = [as_weighted(i) for i in inputs]
    if not weighted:
        raise UsageError("no LoRA given.", hint="pass BASE then one or more LoRA[:WEIGHT].")
    base_path = os.fspath(base)
    out_path = os.fspath(output) if output is not None else None
    te_paths = _component_paths(components, {**_keyword_files(component_files), **(flagged or {})}, dry_run)
    if out_path is None and not dry_run and not retention_only:
        raise UsageError("no output path given.", hint="pass -o OUT (or --dry-run).")
    all_inputs = [base_path, *(w.path for w in weighted), *(f for f, _ in te_paths.values())]

    opened: list[WeightFile] = []
    outputs: list[FileOutput | PipelineOutput] = []
    pipeline = is_pipeline(base_path)
    qbase = None
    try:
        if pipeline:
            bases = open_pipeline(base_path, opened)
        else:
            try:
                bfile = open_weights(base_path)
            except PickleRefusedError:
                raise PickleRefusedError("is a pickle checkpoint; bake streams safetensors bases only.",
                                         path=base_path, hint="convert the base to .safetensors first "
                                                              "(--allow-pickle applies to LoRA inputs).") from None
            opened.append(bfile)
            from lorakit.ops.baking.quantized import quantized_base     # torch-backed: imported when baking
            qbase = quantized_base(bfile)       # the base-format hook: None for a plain base
            bases = [("", open_base(qbase or bfile))]
        if requant is not None and qbase is None:
            raise UsageError("--requant applies to quantized (GGUF) bases only.", path=base_path)
        bm = bases[0][1]
        for _fo, b in bases:
            _check_components(b, te_paths)
        te_files: dict[str, WeightFile] = {}
        for c, (te_path, _o) in te_paths.items():
            te_files[c] = open_weights(te_path)
            opened.append(te_files[c])
        if not dry_run and not retention_only:
            assert out_path is not None     # checked above: only a dry run goes without an output path
            check_output(out_path, None if pipeline else bm.file, all_inputs)
            outs = [os.path.realpath(out_path)]
            for c, (_f, te_out) in te_paths.items():
                assert te_out is not None   # _component_paths requires an output unless dry_run
                check_output(te_out, te_files[c], all_inputs)
                outs.append(os.path.realpath(te_out))
            if len(set(outs)) != len(outs):
                named = ", ".join(["-o", *(f"--{component_flags()[c]}-out" if c in component_flags()
                                           else f"--component {c}=…:OUT" for c in te_paths)])
                raise OutputError("two outputs have the same path.", path=out_path,
                                  hint=f"give {named} different paths.")
        desc = base_desc(bm)
        loras = [BakeInput(w.path, w.weight, read_lora(w.path, desc, allow_pickle=allow_pickle, shape_only=dry_run,
                                                       base=bm))
                 for w in weighted]
        check_architectures(loras, bm, desc)
        check_strengths(loras)
        if not dry_run and not allow_zero_lora:
            check_zero_ups(loras)

        layout = bm.layout + ("+prefix " + repr(bm.prefix) if bm.prefix else "")
        if pipeline:
            layout = "diffusers pipeline (" + ", ".join(f"{fo}: {b.layout}" for fo, b in bases) + ")"
        report = BakeReport(base_path, out_path, layout, bm.variant, short_name(out_dtype) if out_dtype else "keep",
                            str(dev), dry_run=dry_run)
        uses, te_places = coverage([b for _fo, b in bases], loras, te_files, allow_partial, report)

        convert = _converter(out_dtype)
        meta = output_metadata(bm, loras, report, dry_run)
        tasks: list[Task] = []
        baked = [(fo, b) for fo, b in bases if any(uses.get(c) for c in b.parts)]
        pipe_out = (PipelineOutput(base_path, out_path)  # type: ignore[arg-type]
                    if pipeline and baked and not dry_run else None)
        for folder, b in baked:
            main = bm.component
            codes = {k: (convert(k, i.dtype) if k in b.slots and b.slots[k].component == main else i.dtype)
                     for k, i in b.file.infos.items()}
            where = pipe_out.part(folder, b.file) if pipe_out is not None else out_path
            out = None if dry_run or qbase is not None else FileOutput(b.file, where, codes, meta,  # type: ignore[arg-type]
                                                                       all_inputs)
            if out is not None:
                outputs.append(out)
            part_tasks = plan_tasks(b.file, out, base_places(b), uses, codes)
            for t in part_tasks:
                t.where = folder
            tasks += part_tasks
        qtasks = list(tasks) if qbase is not None else []     # the quantized base's tasks (written by its writer)
        if pipe_out is not None:
            outputs.append(pipe_out)       # committed after the parts it holds
        if not baked:
            report.output = None
            held = " or ".join(c for _fo, b in bases for c in b.components())
            report.warnings.append(f"no {held} module applies; the base output was not written.")
        for c, te_file in te_files.items():
            codes = {k: i.dtype for k, i in te_file.infos.items()}
            te_out = te_paths[c][1]
            meta_te = {PROVENANCE_KEY: meta[PROVENANCE_KEY]}
            out = None if dry_run or retention_only else FileOutput(te_file, te_out, codes, meta_te,  # type: ignore[arg-type]
                                                                     all_inputs)
            if out is not None:
                outputs.append(out)
            te_tasks = plan_tasks(te_file, out, te_places[c], {c: uses[c]}, codes)
            tasks += te_tasks
            report.text_encoders.append({"component": c, "file": te_file.path, "output": te_out,
                                         "changed": sum(t.changed for t in te_tasks)})
        report.tensors = len(tasks)
        report.changed = sum(t.changed for t in tasks)
        report.converted = sum(1 for t in tasks if t.compute and not t.changed)
        report.copied = len(tasks) - report.changed - report.converted
        report.bytes_in = sum(t.info.nbytes for t in tasks)
        report.bytes_out = sum(o.size for o in outputs if isinstance(o, FileOutput)) if outputs else sum(
            t.info.numel * itemsize(t.out_code) for t in tasks)
        if dry_run:
            report.plan = describe(tasks, loras)
            report.seconds = time.perf_counter() - t_start
            return report
        if qbase is not None:
            from lorakit.ops.baking.quantized import bake_quantized
            qbar = ProgressBar("bake", unit="bytes") if progress is True else (progress or None)
            try:
                bake_quantized(qbase, None if retention_only else out_path, qtasks, report,
                               meta, device=dev, chunk_bytes=chunk_bytes, inputs=all_inputs, dtype=out_dtype,
                               requant=requant, progress=qbar)
            finally:
                if isinstance(qbar, ProgressBar) and progress is True:     # the bar made here; a caller's stays open
                    qbar.close()
            quant_ids = {id(t) for t in qtasks}
            tasks = [t for t in tasks if id(t) not in quant_ids and t.out is not None]   # component files stream
        if retention_only:
            report.seconds = time.perf_counter() - t_start
            return report
        callback = ProgressBar("bake", unit="bytes") if progress is True else (progress or None)
        prog = ByteProgress(report.bytes_in, callback)
        saved_threads = torch.get_num_threads()
        torch.set_num_threads(threads or _default_threads())
        pipe = Pipeline(tasks, dev, chunk_bytes, prog)
        try:
            pipe.run()
        finally:
            torch.set_num_threads(saved_threads)
            prog.close()
        t_commit = time.perf_counter()
        for o in outputs:
            o.commit()
        outputs.clear()
        report.stages = {**pipe.times.to_json(), "commit": round(time.perf_counter() - t_commit, 4)}
        report.seconds = time.perf_counter() - t_start
        return report
    except KeyboardInterrupt:
        raise Interrupted("interrupted; no output was written.") from None
    finally:
        for o in outputs:
            o.abort()
        for f in opened:
            f.close()


def _default_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 2
    return max(1, min(8, cpus // 2))


def _converter(out_dtype: torch.dtype | None) -> Callable[[str, str], str]:
    if out_dtype is None:
        return lambda _k, code: code
    target = dtype_code(out_dtype)
    return lambda _k, code: target if is_float(code) else code
