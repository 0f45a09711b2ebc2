"""``lorakit bake``: add LoRAs into a base model's weights, streaming, with fp32 accumulation.

For every base tensor: read → fp32 → add ``Σ wᵢ·ΔWᵢ`` (exactly the rows of each patch that land in
this tensor) → cast once to the output dtype → write. LoRA patches live on native targets (component,
module) with row windows, and every base tensor is a (component, module, rows[, swapped halves][,
transposed]) slot of a native tensor, so any LoRA layout bakes into any base layout (BFL, ComfyUI-prefixed,
diffusers single file or sharded, single-file checkpoints holding a denoiser and text encoders, diffusers
pipeline folders), and the output keeps the base's layout, names, shard assignment and (by default) dtypes.
Convolution deltas are added flattened (``out × in·k·k``, the base tensor's layout); a weight the base stores
``in × out`` (OpenCLIP's ``text_projection``) gets ΔWᵀ.

Work is done in row chunks of bounded size through a three-stage thread pipeline (read → compute →
write) with reused buffers, so peak memory depends on the chunk size, not on the model size.
Tensors no patch touches are copied file-to-file by the kernel (``copy_file_range``) when their
dtype is kept.

Formulas (all contributions are computed against the base weight W0, so the result does not depend on
the order of the inputs):
- additive patches (LoRA/LoCon/LoHa/LoKr/full diff, biases, diffs of loose parameters such as q/k norm
  scales) contribute ``w·ΔW`` (``w·Δb``);
- a DoRA patch with weight ``s`` contributes ``m ⊙ (W0 + s·ΔW)/‖W0 + s·ΔW‖ − W0`` (PEFT's formula, for
  any ``s``), the norm taken per output row (PEFT, LyCORIS ``wd_on_out``) or per input column (LyCORIS
  input-axis magnitudes, shape ``(1, in)``). For one DoRA LoRA this is ``m·(W+ΔW)/‖W+ΔW‖`` at s = 1
  (PEFT = LyCORIS, ``math.md`` §8). With other LoRAs in the same bake it equals PEFT's unfused forward
  pass and diffusers/PEFT ``fuse_lora`` with the DoRA adapters fused first (PEFT 0.21.2 fusing a DoRA
  adapter after plain ones also rescales their deltas by m/‖·‖).
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import torch

from lorakit.lora.adapters import LoKr, LoRA, NotExact
from lorakit.base.checkpoint import BaseModel, match_tensor, open_base, open_component
from lorakit.base.pipeline import is_pipeline, open_pipeline, refuse_scaled_fp8
from lorakit.dtypes import dtype_code, is_float, itemsize, parse_dtype, short_name, torch_dtype
from lorakit.errors import (CoverageError, InputFileError, Interrupted, LorakitError, MergeError, NonFiniteError, OutputError,
                     PickleRefusedError, UnsupportedArchitectureError,
                     UnsupportedDtypeError, UsageError)
from lorakit.lora.checks import all_finite, require_finite_model
from lorakit.formats import load, parse
from lorakit.io import SafetensorsWriter, TensorInfo, WeightFile, check_output_path, open_weights
from lorakit.io.header import MAX_HEADER_BYTES
from lorakit.io.ranges import copy_range, copy_slow, pread_into, pwrite_from, read_ahead
from lorakit.io.reader import ShardedFile, check_shard_name, input_files, read_index
from lorakit.io.tempfiles import clean_stale_temps, create_temp_dir
from lorakit.io.writer import SLOW_WRITE_HOOK, fsync_dir
from lorakit.layouts import ComponentSpec, NameIndex, available, evaluate, resolve
from lorakit.ops.metadata import PROVENANCE_KEY, InputRecord, carry_over, file_sha256, provenance
from lorakit.lora.model import LoraModel, Patch
from lorakit.progress import Progress, ProgressBar
from lorakit.ops.recipes import WeightedInput, parse_weighted

LOOSE = "loose"                       # _Place.param of a loose parameter (its native name is the place's module)
DEFAULT_CHUNK_BYTES = 16 << 20        # one pipeline chunk (source or output bytes, whichever is larger)
WORK_ELEMENTS = 3 << 20               # fp32 elements per compute block (cache-friendly, ~12 MB)
POOL = 3                              # buffers per pipeline stage
WRITEBACK_LAG = 4                     # written ranges kept in the page cache before they are dropped
DORA_RULE = "peft: W0 + sum(w*dW) + sum(m*(W0 + s*dW)/||W0 + s*dW|| - W0)"

# =============================================================================================
# Report
# =============================================================================================

@dataclass
class BakeReport:
    base: str
    output: str | None
    layout: str
    variant: str
    dtype: str
    device: str
    inputs: list[dict[str, object]] = field(default_factory=list)
    tensors: int = 0
    changed: int = 0
    copied: int = 0
    converted: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    skipped: list[dict[str, object]] = field(default_factory=list)
    not_applied: list[dict[str, object]] = field(default_factory=list)
    text_encoders: list[dict[str, object]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    plan: list[dict[str, object]] = field(default_factory=list)
    dry_run: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        d = dict(self.__dict__)
        if not self.dry_run:
            d.pop("plan")
        return d


# =============================================================================================
# Inputs and coverage
# =============================================================================================

@dataclass
class _Input:
    path: str
    weight: float
    model: LoraModel
    sha256: str | None = None
    applied: int = 0
    skipped: int = 0


@dataclass
class _Use:
    """One patch of one input, applied with that input's weight to a native window of rows."""

    patch: Patch
    weight: float
    input: int
    window: tuple[int, int]
    pending: int = 0                    # tasks still to compute (factor cache freed at 0)
    _cache: dict[str, torch.Tensor] | None = None

    @property
    def dora_axis(self) -> str | None:
        d = self.patch.dora
        if d is None:
            return None
        return "in" if d.dim() == 2 and d.shape[0] == 1 and self.window[1] - self.window[0] != 1 else "out"

    def factors(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._cache is None:
            c: dict[str, torch.Tensor] = {}
            a = self.patch.adapter
            # plain LoRA, or a conv LoRA whose up is 1×1: ΔW (flattened to out × in·k·k) = up @ down
            if isinstance(a, LoRA) and a.mid is None and a.up[0].numel() == a.down.shape[0]:
                c["up"] = a.up.reshape(a.up.shape[0], -1).to(device, torch.float32)
                c["down"] = a.down.reshape(a.down.shape[0], -1).to(device, torch.float32)
            if self.patch.bias is not None:
                c["bias"] = self.patch.bias.reshape(-1).to(device, torch.float32)
            if self.patch.dora is not None:
                c["dora"] = self.patch.dora.to(device, torch.float32)
            self._cache = c
        return self._cache

    def done(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self._cache = None


def _as_weighted(item: object) -> WeightedInput:
    if isinstance(item, WeightedInput):
        return item
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return WeightedInput(os.fspath(item[0]), float(item[1]))
    if isinstance(item, (str, os.PathLike)):
        text = os.fspath(item)
        return WeightedInput(text, 1.0) if os.path.exists(text) else parse_weighted(text)
    raise UsageError(f"bad LoRA input {item!r}; use 'path[:weight]' or (path, weight).")


class _ShapeOnlyFile(WeightFile):
    """A view of a LoRA file that reads only scalars (alphas); larger tensors are shape-only (meta)."""

    def __init__(self, inner: WeightFile) -> None:
        self.inner, self.path, self.metadata, self.infos = inner, inner.path, inner.metadata, inner.infos

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        info = self.infos[name]
        if info.numel <= 1:
            return self.inner.get(name)
        return torch.empty(info.shape, dtype=torch_dtype(info.dtype), device="meta")


def _read_lora(path: str, base_desc: str, *, allow_pickle: bool, shape_only: bool) -> LoraModel:
    try:
        with open_weights(path, allow_pickle=allow_pickle) as f:
            parsed = parse(_ShapeOnlyFile(f) if shape_only else f)
            model = load(parsed)
            if not shape_only:
                require_finite_model(model)
            return model
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(f"{exc.message} It cannot be baked into {base_desc}.", path=exc.path,
                                           hint=exc.hint) from None


def _check_architectures(loras: list[_Input], base: BaseModel, base_desc: str) -> None:
    """A LoRA of another architecture than the base's is refused before any work: none of its modules can apply."""
    for inp in loras:
        if inp.model.arch.name != base.arch.spec.name:
            raise UnsupportedArchitectureError(
                f"this is a {inp.model.arch.spec.label} LoRA ({inp.model.format}, {len(inp.model.patches)} modules); "
                f"it cannot be baked into {base_desc}, a {base.arch.spec.label} model.", path=inp.path,
                hint=f"bake it into a {inp.model.arch.spec.label} base model.")


def _labels(base: BaseModel) -> dict[str, str]:
    return {v.name: v.label for v in base.arch.spec.variants}


def _base_desc(base: BaseModel) -> str:
    spec = base.arch.spec
    if not spec.variants:
        return f"the base ({spec.label})"
    return f"the base ({_labels(base).get(base.variant, base.variant)})"


def flagged_components() -> dict[str, ComponentSpec]:
    """Components with their own command-line flags (``--clip-l FILE --clip-l-out OUT``), from the layouts'
    :attr:`~lorakit.layouts.ComponentSpec.flag`; any component can be given as ``--component NAME=FILE:OUT``."""
    out: dict[str, ComponentSpec] = {}
    for n in available():
        for c in resolve(n).components.values():
            if c.flag:
                out.setdefault(c.name, c)
    return out


def component_flags() -> dict[str, str]:
    """component -> its command-line flag (see :func:`flagged_components`)."""
    return {name: c.flag for name, c in flagged_components().items()}


def _flag(component: str) -> str:
    """How the command line names a separate file for a component."""
    flag = component_flags().get(component)
    return f"--{flag}" if flag else f"--component {component}=FILE"


def _flag_hint(component: str) -> str:
    flag = component_flags().get(component)
    return f"--{flag} FILE --{flag}-out OUT" if flag else f"--component {component}=FILE:OUT"


def _missing_reason(base: BaseModel, component: str, module: str) -> str:
    comp = base.arch.spec.components[component]
    m = NameIndex(comp, "native", flat=False).match(module)
    params = base.arch.params.get(component, {})
    if m is not None:
        if m.spec.requires and not params.get(m.spec.requires, 1):
            return f"the base has no {m.spec.requires} layers"
        if m.spec.repeat and m.index is not None and m.index >= params.get(m.spec.repeat, 0):
            return f"block {m.index} is beyond the base's {params.get(m.spec.repeat, 0)} {m.spec.repeat} blocks"
    return "the base has no such module"


def _fit(patch: Patch, shape: Sequence[int], what: str,
         transpose: bool = False) -> tuple[tuple[int, int] | None, str | None]:
    """The patch's native row window if it fits a module whose ΔW has ``shape`` (out × in[× kernel]), else a
    reason. Convolution deltas are compared by their flattened size (a 1×1 conv takes a Linear LoRA)."""
    out, inp = shape[0], math.prod(shape[1:])
    window = patch.rows or (0, out)
    if window[0] < 0 or window[1] > out:
        return None, f"rows {window[0]}:{window[1]} outside the {what}'s {out} rows"
    rows = window[1] - window[0]
    a = patch.adapter
    if a is not None:
        if a.out_features != rows:
            return None, f"out-features {a.out_features} vs {rows} rows in the {what}"
        a_in = math.prod(a.weight_shape[1:])
        if a_in != inp:
            return None, f"in-features {a_in} vs {inp} in the {what}"
    if patch.bias is not None and patch.bias.numel() != rows:
        return None, f"bias of {patch.bias.numel()} values vs {rows} rows in the {what}"
    d = patch.dora
    if d is not None and transpose:
        return None, f"a DoRA magnitude on the {what}, which the base stores transposed, is not supported"
    if d is not None and d.numel() not in (rows, inp):
        return None, f"DoRA magnitude of {d.numel()} values fits neither {rows} rows nor {inp} columns"
    return window, None


def _fit_loose(patch: Patch, shape: tuple[int, ...] | None) -> tuple[tuple[int, int] | None, str | None]:
    """The row window (all of it) of a loose-parameter patch if it fits the base tensor's shape, else a reason."""
    if shape is None:
        return None, "the base has no such parameter"
    a = patch.adapter
    if a is None or patch.bias is not None or patch.dora is not None or patch.rows is not None:
        return None, "a loose parameter takes a plain diff only (no bias, DoRA or row window)"
    if tuple(a.weight_shape) != tuple(shape):
        return None, f"diff of shape {list(a.weight_shape)} vs the base parameter's {list(shape)}"
    return (0, shape[0] if shape else 1), None


def _value(expr: str, params: dict[str, int]) -> int | None:
    try:
        return evaluate(expr, params)
    except KeyError:
        return None


def _lora_cause(bases: list[BaseModel], model: LoraModel) -> str:
    base = bases[0]
    spec = base.arch.spec
    if model.arch.name != spec.name:
        return f"this LoRA is for {model.arch.spec.label}; the base is {spec.label}"
    labels = _labels(base)
    parts = []
    lv, bv = model.arch.variant, base.variant
    if lv in labels and lv != bv:
        parts.append(f"this LoRA is for {labels[lv]}; the base is {labels.get(bv, bv)}")
    for name, b in ((n, b) for b in bases for n in b.components()):
        comp = spec.components[name]
        lp, bp = model.arch.params.get(name, {}), b.arch.params.get(name, {})
        derived = {k for k, expr in comp.fallbacks.items() if k in lp and _value(expr, lp) == lp[k]}
        diff = [f"{k} {lp[k]} vs {bp[k]}" for k in sorted(lp) if k in bp and k not in comp.flags
                and k not in comp.counts and k not in derived and lp[k] != bp[k]]
        if diff:
            where = "" if name == base.component else f" of the {comp.label}"
            parts.append(f"sizes{where} differ from the base (LoRA vs base: " + ", ".join(diff) + ")")
    return "; ".join(parts)


# =============================================================================================
# Where tensors sit; text-encoder files: find native modules by suffix
# =============================================================================================

@dataclass(frozen=True)
class _Place:
    """Where a file tensor sits: native module, parameter, native row window, swapped halves; with ``transpose``
    the tensor is the native weight transposed (its rows are the native columns; ``rows`` = all native rows)."""

    module: str
    param: str
    rows: tuple[int, int]
    swap: bool = False
    component: str = ""
    transpose: bool = False

    def native_row(self, j: int) -> int:
        length = self.rows[1] - self.rows[0]
        if self.swap:
            j = (j + length // 2) % length
        return self.rows[0] + j


def _base_places(bm: BaseModel) -> dict[str, _Place]:
    """The place of every tensor of the base that belongs to a component."""
    places: dict[str, _Place] = {}
    for k, s in bm.slots.items():
        if s.module is None:
            # loose parameters (q/k norm scales): the place's "module" is the parameter's native name
            places[k] = _Place(s.param, LOOSE, (0, (bm.file.shape(k) or (1,))[0]), component=s.component)
            continue
        shape = bm.module_shape(s.component, s.module)
        out = shape[0] if shape else (bm.file.shape(k) or (1,))[0]
        places[k] = _Place(s.module, s.param, s.rows or (0, out), s.swap, s.component, s.transpose)
    return places


_Places = tuple[dict[str, _Place], dict[str, tuple[int, ...]]]


def _te_places(file: WeightFile, component: str, base: BaseModel) -> _Places:
    """Map a separate component file's tensors to native modules: native names by suffix (prefix-agnostic), or
    the component's other namings under a shared prefix when those place more tensors; the shapes are ΔW's (a
    transposed tensor's reversed)."""
    comp = base.arch.spec.components[component]
    found = _native_places(file, component, base)
    if any(n != "native" for n in comp.namings):
        cbm = open_component(file, base.arch.spec, component)
        if cbm is not None and len(cbm.slots) > len(found[0] if found else ()):
            shapes = {s.module: cbm.module_shape(component, s.module) for s in cbm.slots.values()
                      if s.module is not None}
            return _base_places(cbm), {m: sh for m, sh in shapes.items() if sh is not None}
    if found:
        return found
    raise InputFileError(f"no {comp.label} tensor found among {len(file)} tensors (e.g. {file.keys()[:3]}).",
                         path=file.path, hint=f"pass a {comp.label} text-encoder file (HF names).")


def _native_places(file: WeightFile, component: str, base: BaseModel) -> _Places | None:
    comp = base.arch.spec.components[component]
    index = NameIndex(comp, "native", flat=False)
    heads = sorted({s.native.split(".", 1)[0] + "." for s in comp.modules})
    for extra in ("", *heads):           # second pass: files that drop a leading container (text_model.)
        places: dict[str, _Place] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        seen: dict[tuple[str, str], str] = {}
        for key in file.keys():
            parts = key.split(".")
            for i in range(len(parts) - (1 if extra else 0)):     # a head never takes a bare leaf
                found = match_tensor(index, extra + ".".join(parts[i:]))
                if found is None:
                    continue
                m, leaf, transpose = found
                shape = tuple(file.shape(key))
                if leaf == "weight" and len(shape) >= 2:
                    shapes[m.native] = shape[::-1] if transpose else shape
                if (m.native, leaf) in seen:
                    raise InputFileError(f"tensors {seen[(m.native, leaf)]!r} and {key!r} both look like "
                                         f"{m.native}.{leaf}.", path=file.path,
                                         hint=f"pass a file holding one {comp.label} encoder.")
                seen[(m.native, leaf)] = key
                rows = (0, (shape[1] if transpose else shape[0]) if shape else 1)
                places[key] = _Place(m.native, leaf, rows, component=component, transpose=transpose)
                break
        if places:
            return places, shapes
    return None


# =============================================================================================
# Outputs: single file or sharded folder mirroring an input
# =============================================================================================

def _publish_folder(tmpdir: str | None, path: str) -> None:
    """Rename a completed temporary output folder into place (replacing only an empty folder: checked before any
    work) and make the rename durable."""
    assert tmpdir is not None
    try:
        if os.path.isdir(path):
            os.rmdir(path)
        os.rename(tmpdir, path)
    except OSError as exc:
        raise OutputError(f"cannot publish the output folder ({exc.strerror}).", path=path) from None
    fsync_dir(os.path.dirname(os.path.abspath(path)))


class _Output:
    """Writers for one output that mirrors one input file (same names, same shard assignment)."""

    def __init__(self, src: WeightFile, path: str, codes: dict[str, str], metadata: dict[str, str],
                 inputs: Sequence[str]) -> None:
        self.src, self.path, self.codes = src, path, codes
        self.writers: dict[str, SafetensorsWriter] = {}
        self.tmpdir: str | None = None
        self.extra_files: list[str] = []
        try:
            if isinstance(src, ShardedFile):
                parent = os.path.dirname(os.path.abspath(path))
                clean_stale_temps(parent)
                self.tmpdir = create_temp_dir(parent, os.path.basename(os.path.normpath(path)))
                mask = os.umask(0o022)
                os.umask(mask)
                os.chmod(self.tmpdir, 0o777 & ~mask)     # made 0700; outputs get normal permissions
                for shard in src.shard_names:
                    shard_src = src.shards[shard]
                    meta = {**carry_over(shard_src.metadata), **metadata}
                    entries = [(k, codes[k], i.shape) for k, i in shard_src.infos.items()]
                    shard_out = os.path.join(self.tmpdir, check_shard_name(shard, src.path))
                    self.writers[shard] = SafetensorsWriter(shard_out, entries, meta, inputs=inputs)
            else:
                entries = [(k, codes[k], i.shape) for k, i in src.infos.items()]
                meta = {**carry_over(src.metadata), **metadata}
                self.writers[""] = SafetensorsWriter(path, entries, meta, inputs=inputs)
        except BaseException:
            self.abort()
            raise

    def writer(self, key: str) -> SafetensorsWriter:
        if self.tmpdir is None:
            return self.writers[""]
        return self.writers[self.src.shard_of[key]]  # type: ignore[attr-defined]

    @property
    def size(self) -> int:
        return sum(w.size for w in self.writers.values())

    def commit(self) -> None:
        for w in self.writers.values():
            w.commit()
        if self.tmpdir is None:
            return
        src: ShardedFile = self.src  # type: ignore[assignment]
        index = read_index(src.path)
        meta = dict(index.get("metadata") or {})
        if "total_size" in meta:
            meta["total_size"] = sum(w.size - len(w.header) for w in self.writers.values())
        index["metadata"] = meta
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        if len(text.encode("utf-8")) > MAX_HEADER_BYTES:   # never write an index the reader would refuse
            raise OutputError(f"the output's index would be over the {MAX_HEADER_BYTES}-byte limit lorakit reads.",
                              path=self.path, hint="shorten the input index (e.g. its metadata).")
        with open(os.path.join(self.tmpdir, os.path.basename(src.path)), "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        for name in sorted(os.listdir(src.folder)):
            full = os.path.join(src.folder, name)
            if (name.startswith(".") or not os.path.isfile(full) or name in src.shard_names
                    or name == os.path.basename(src.path) or name.endswith((".safetensors", ".sft", ".index.json"))):
                continue
            shutil.copy2(full, os.path.join(self.tmpdir, name))
            self.extra_files.append(name)
        _publish_folder(self.tmpdir, self.path)
        self.tmpdir = None

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


def _check_output(path: str, src: WeightFile | None, inputs: Sequence[str]) -> None:
    """``src`` None: the output mirrors a diffusers pipeline folder."""
    if src is None or isinstance(src, ShardedFile):
        if path.endswith((".safetensors", ".sft")):
            what = "a diffusers pipeline folder" if src is None else "a sharded folder"
            raise OutputError(f"the base is {what}, so the output is a folder too.", path=path,
                              hint="give a folder name (it is created; an existing one must be empty).")
        real = os.path.realpath(path)
        for inp in (f for given in inputs for f in input_files(given)):
            r = os.path.realpath(inp)
            if real == r or real == os.path.dirname(r) or r.startswith(real + os.sep) or real.startswith(r + os.sep):
                raise OutputError(f"output folder overlaps input {inp!r}; lorakit never overwrites its inputs.",
                                  path=path, hint="choose another -o folder.")
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise OutputError("output folder already exists and is not empty.", path=path,
                              hint="remove it or choose another -o folder.")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError("output's parent folder does not exist or is not writable.", path=path)
    else:
        check_output_path(path, inputs)


# =============================================================================================
# Diffusers pipeline folders
# =============================================================================================

class _PipelineOutput:
    """A baked copy of a diffusers pipeline folder: the baked component subfolders are written inside a temporary
    folder next to the output, every other file is copied, and the folder is published by one rename."""

    def __init__(self, src: str, path: str) -> None:
        self.src, self.path = src, path
        parent = os.path.dirname(os.path.abspath(path))
        clean_stale_temps(parent)
        self.tmpdir: str | None = create_temp_dir(parent, os.path.basename(os.path.normpath(path)))
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(self.tmpdir, 0o777 & ~mask)
        self.written: dict[str, str] = {}        # subfolder -> weight file written there ("" = a sharded folder)

    def part(self, folder: str, file: WeightFile) -> str:
        """Where the baked copy of subfolder ``folder`` (holding ``file``) is written."""
        assert self.tmpdir is not None
        if isinstance(file, ShardedFile):
            self.written[folder] = ""
            return os.path.join(self.tmpdir, folder)
        os.makedirs(os.path.join(self.tmpdir, folder), exist_ok=True)
        self.written[folder] = os.path.basename(file.path)
        return os.path.join(self.tmpdir, folder, os.path.basename(file.path))

    def commit(self) -> None:
        """Copy what was not baked, then publish (after the parts' own commits)."""
        assert self.tmpdir is not None
        for name in sorted(os.listdir(self.src)):
            src, dst = os.path.join(self.src, name), os.path.join(self.tmpdir, name)
            if name in self.written:
                if self.written[name]:          # a single-file subfolder: its configs next to the baked file
                    for extra in sorted(os.listdir(src)):
                        if extra != self.written[name] and os.path.isfile(os.path.join(src, extra)):
                            shutil.copy2(os.path.join(src, extra), os.path.join(dst, extra))
            elif os.path.isdir(src):
                shutil.copytree(src, dst)     # links followed: an HF-cache snapshot links into its blobs
            else:
                shutil.copy2(src, dst)
        _publish_folder(self.tmpdir, self.path)
        self.tmpdir = None

    def abort(self) -> None:
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


# =============================================================================================
# Tasks
# =============================================================================================

@dataclass
class _Task:
    key: str
    info: TensorInfo
    out: _Output
    out_code: str
    place: _Place | None = None
    additive: list[_Use] = field(default_factory=list)
    doras: list[_Use] = field(default_factory=list)
    whole: bool = False
    where: str = ""                     # the pipeline subfolder of the tensor's file (plans name it)

    @property
    def compute(self) -> bool:
        return self.info.nbytes > 0 and (bool(self.additive or self.doras) or self.out_code != self.info.dtype)

    @property
    def changed(self) -> bool:
        return bool(self.additive or self.doras)

    @property
    def rows(self) -> int:
        return self.info.shape[0] if self.info.shape else 1

    @property
    def row_elems(self) -> int:
        return math.prod(self.info.shape[1:]) if len(self.info.shape) > 1 else 1

    def chunks(self, chunk_bytes: int) -> Iterator[tuple[int, int]]:
        n = self.rows
        if self.whole or not self.info.shape:
            yield 0, n
            return
        per_row = self.row_elems * max(itemsize(self.info.dtype), itemsize(self.out_code))
        step = max(1, chunk_bytes // max(1, per_row))
        cuts = {0, n}
        if self.place is not None and self.place.swap:
            cuts.add(n // 2)
        bounds = sorted(cuts)
        for lo, hi in zip(bounds, bounds[1:]):
            for j in range(lo, hi, step):
                yield j, min(hi, j + step)


def _plan_tasks(file: WeightFile, out: _Output | None, places: dict[str, _Place],
                uses: dict[str, dict[str, list[_Use]]], codes: dict[str, str]) -> list[_Task]:
    """One task per tensor of ``file`` (file order); ``uses``: component -> native module -> patches."""
    tasks = []
    for info in sorted(file.infos.values(), key=lambda i: (i.file, i.start)):
        place = places.get(info.name)
        task = _Task(info.name, info, out, codes[info.name], place)  # type: ignore[arg-type]
        if out is not None:
            assert out.writer(info.name).plan[info.name][0] == task.out_code
        if place is not None:
            lo, hi = place.rows
            for u in uses.get(place.component, {}).get(place.module, ()):
                if u.window[1] <= lo or u.window[0] >= hi:
                    continue
                if place.param == "bias":
                    if u.patch.bias is not None:
                        task.additive.append(u)
                elif place.param == LOOSE:
                    if u.patch.adapter is not None:
                        task.additive.append(u)
                elif place.param == "weight" and len(info.shape) >= 2:
                    if u.patch.dora is not None:
                        task.doras.append(u)
                        if u.dora_axis == "in":
                            if not (lo <= u.window[0] and u.window[1] <= hi):
                                raise MergeError(
                                    f"{u.patch.source}: an input-axis DoRA magnitude needs the column norms of "
                                    f"rows {u.window[0]}:{u.window[1]} of {place.module}, which this base splits "
                                    "across several tensors.",
                                    hint="bake into a base with fused (BFL) layout, or convert the LoRA.")
                            task.whole = True
                    elif u.patch.adapter is not None:
                        task.additive.append(u)
        for u in {id(u): u for u in (*task.additive, *task.doras)}.values():
            u.pending += 1
        tasks.append(task)
    return tasks


# =============================================================================================
# Compute
# =============================================================================================

def _delta_rows(u: _Use, a: int, b: int, device: torch.device) -> torch.Tensor:
    """Rows a:b (relative to the patch window) of the patch's dense ΔW (strength 1), fp32."""
    adapter = u.patch.adapter
    assert adapter is not None
    try:
        d = adapter.row_slice(a, b).dense()
    except NotExact:
        if isinstance(adapter, LoKr):
            # rows of kron(w1, w2) come in blocks of k = rows of w2: densify only the blocks that cover [a, b)
            k = int((adapter.w2 if adapter.w2 is not None else adapter.w2a).shape[0])  # type: ignore[union-attr]
            a0, b0 = a // k * k, -(-b // k) * k
            d = adapter.row_slice(a0, b0).dense()[a - a0:b - a0]
        else:
            d = adapter.dense()[a:b]
    return d.reshape(b - a, -1).to(device, torch.float32)


def _add_delta(dst: torch.Tensor, u: _Use, a: int, b: int, device: torch.device) -> None:
    f = u.factors(device)
    adapter = u.patch.adapter
    flat = dst.view(dst.shape[0], -1)
    if "up" in f:
        flat.addmm_(f["up"][a:b], f["down"], alpha=adapter.scale * u.weight)  # type: ignore[union-attr]
    else:
        flat.add_(_delta_rows(u, a, b, device), alpha=u.weight)


def _apply(work: torch.Tensor, task: _Task, n0: int, device: torch.device,
           scratch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Add every patch's rows that land in native rows [n0, n0 + len(work)) to ``work`` (fp32, holds W0).

    DoRA patches are evaluated against the base weight W0 (PEFT's forward semantics): each contributes
    ``m ⊙ (W0 + s·ΔW)/‖W0 + s·ΔW‖ − W0``; additive patches contribute ``w·ΔW``; the sum is order-free.
    """
    n1 = n0 + work.shape[0]
    acc = None
    if task.doras:
        acc_buf, tmp_buf = scratch(work.numel())
        acc = acc_buf[:work.numel()].view_as(work).zero_()
        for u in task.doras:
            lo, hi = max(n0, u.window[0]), min(n1, u.window[1])
            if lo >= hi:
                continue
            w0, a, b = work[lo - n0:hi - n0], lo - u.window[0], hi - u.window[0]
            t = tmp_buf[:w0.numel()].view_as(w0)
            t.copy_(w0)
            if u.patch.adapter is not None:
                _add_delta(t, u, a, b, device)
            m = u.factors(device)["dora"]
            flat = t.view(t.shape[0], -1)
            if u.dora_axis == "in" and m.numel() != flat.shape[1]:
                # one magnitude per input channel of a conv (LyCORIS wd_on_output=False): the norm over the output
                # rows and the kernel positions of each channel
                flat = t.view(t.shape[0], m.numel(), -1)
                norm = torch.linalg.vector_norm(flat, dim=(0, 2), keepdim=True)
                mag = m.reshape(1, -1, 1)
            elif u.dora_axis == "in":
                norm = torch.linalg.vector_norm(flat, dim=0, keepdim=True)
                mag = m.reshape(1, -1)
            else:
                norm = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
                mag = m.reshape(-1)[a:b].reshape(-1, 1)
            flat.mul_(mag / norm.clamp_min_(torch.finfo(torch.float32).tiny))
            t.sub_(w0)
            acc[lo - n0:hi - n0].add_(t)
    bias = task.place.param == "bias"  # type: ignore[union-attr]
    # replacement values (BFL control LoRAs' norm scales) first: they take the place of W0, whatever the
    # strength, as flux/util.py's load_state_dict does; additive patches then add to them
    for u in sorted(task.additive, key=lambda u: not u.patch.replace):
        lo, hi = max(n0, u.window[0]), min(n1, u.window[1])
        if lo >= hi:
            continue
        dst, a, b = work[lo - n0:hi - n0], lo - u.window[0], hi - u.window[0]
        if u.patch.replace:
            dst.view(dst.shape[0], -1).copy_(_delta_rows(u, a, b, device))
        elif bias:
            dst.add_(u.factors(device)["bias"][a:b], alpha=u.weight)
        else:
            _add_delta(dst, u, a, b, device)
    if acc is not None:
        work.add_(acc)


def _apply_transposed(work: torch.Tensor, task: _Task, c0: int, device: torch.device) -> None:
    """Add ``Σ w·ΔWᵀ`` to rows of a tensor the base stores transposed (``work`` = native columns
    [c0, c0 + len(work)) of every native row; additive patches only, see :func:`_fit`)."""
    c1 = c0 + work.shape[0]
    for u in task.additive:
        lo, hi = u.window
        f = u.factors(device)
        if "up" in f:
            d = f["down"][:, c0:c1].t() @ f["up"].t()
            work[:, lo:hi].add_(d, alpha=u.patch.adapter.scale * u.weight)  # type: ignore[union-attr]
        else:
            d = _delta_rows(u, 0, hi - lo, device)[:, c0:c1].t()
            work[:, lo:hi].add_(d, alpha=u.weight)


class _Compute:
    def __init__(self, device: torch.device, chunk_bytes: int) -> None:
        self.device = device
        elems = WORK_ELEMENTS if device.type == "cpu" else chunk_bytes // 2
        self.work = torch.empty(elems, dtype=torch.float32, device=device)
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None

    def scratch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two fp32 buffers of at least ``n`` elements (DoRA only), reused across blocks."""
        if self._scratch is None or self._scratch[0].numel() < n:
            self._scratch = (torch.empty(n, dtype=torch.float32, device=self.device),
                             torch.empty(n, dtype=torch.float32, device=self.device))
        return self._scratch

    def run(self, task: _Task, j0: int, j1: int, src: torch.Tensor, out: torch.Tensor) -> None:
        lim = _fp8_limit(out.dtype)
        if not task.changed:
            out.copy_(src if lim is None else src.float().clamp_(-lim, lim))
            return
        rows = j1 - j0
        per = task.row_elems
        if task.whole or self.work.numel() < per:
            block = rows
            work_buf = torch.empty(rows * per, dtype=torch.float32, device=self.device) \
                if self.work.numel() < rows * per else self.work
        else:
            block = max(1, self.work.numel() // per)
            work_buf = self.work
        for b0 in range(0, rows, block):
            b1 = min(rows, b0 + block)
            w = work_buf[: (b1 - b0) * per].view(b1 - b0, *src.shape[1:])
            w.copy_(src[b0:b1])
            if task.place.transpose:  # type: ignore[union-attr]
                _apply_transposed(w, task, j0 + b0, self.device)
            else:
                _apply(w, task, task.place.native_row(j0 + b0), self.device, self.scratch)  # type: ignore[union-attr]
            if not all_finite(w):      # checked before the fp8 clamp, which would hide an overflow
                raise _overflow(task, src[b0:b1], torch.float32)
            if lim is not None:
                w.clamp_(-lim, lim)
            out[b0:b1].copy_(w)
            if lim is None and out.dtype != torch.float32 and not all_finite(out[b0:b1]):
                raise _overflow(task, src[b0:b1], out.dtype)


def _overflow(task: _Task, src: torch.Tensor, dtype: torch.dtype) -> NonFiniteError:
    """The error for a baked tensor that is not finite: the base's own NaN/Inf, or W + Σ w·ΔW overflowing."""
    spelled = str(dtype).replace("torch.", "")
    if not all_finite(src):
        return NonFiniteError(f"base tensor {task.key!r} already holds NaN or Inf values; nothing was written.",
                              path=task.info.file, hint="use an intact copy of the base model.")
    names = ", ".join(sorted({os.path.basename(u.patch.source or str(u.patch.target)) for u in
                              (*task.additive, *task.doras)})[:3])
    return NonFiniteError(f"baking {task.key!r} overflows {spelled} (W + strength·ΔW of {names} is beyond "
                          f"±{torch.finfo(dtype).max:.3g}); nothing was written.", path=task.info.file,
                          hint="lower the LoRA strength (PATH:WEIGHT), or write a wider --dtype (fp32/bf16).")


def _check_strengths(loras: list[_Input]) -> None:
    """strength × α/r must be a float32 number: ΔW is accumulated in fp32 (torch refuses larger factors)."""
    big = torch.finfo(torch.float32).max
    for inp in loras:
        for p in inp.model.patches:
            scale = p.adapter.scale if p.adapter is not None else 1.0
            if not abs(inp.weight) <= big or not abs(inp.weight * scale) <= big:
                raise NonFiniteError(f"strength {inp.weight:g} × scale {scale:g} of {p.source or p.target} is beyond "
                                     f"the float32 range (±{big:.3g}) baking computes in; nothing was written.",
                                     path=inp.path, hint="give a strength of ordinary size, e.g. PATH:0.8.")


def _check_zero_ups(loras: list[_Input]) -> None:
    """Refuse a LoRA whose every module has an all-zero up matrix (doctor: WILL NOT APPLY)."""
    for inp in loras:
        patches = inp.model.patches
        if patches and all(isinstance(p.adapter, LoRA) and not bool(p.adapter.up.ne(0).any()) for p in patches):
            raise CoverageError(f"nothing to bake: every one of the {len(patches)} modules has an all-zero up "
                                "matrix, so the LoRA changes nothing (saved before training started?)",
                                [os.path.basename(inp.path)], path=inp.path,
                                hint="use a trained checkpoint, or pass --allow-zero-lora to write the base anyway.")


def _fp8_limit(dtype: torch.dtype) -> float | None:
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return float(torch.finfo(dtype).max)
    return None


# =============================================================================================
# Pipeline: reader thread → compute (main thread) → writer thread
# =============================================================================================

class _Stop(Exception):
    pass


class _Progress:
    """Byte counts from the pipeline's threads, forwarded to the caller's progress callback."""

    def __init__(self, total: int, callback: Progress | None) -> None:
        self.total, self.callback = max(1, total), callback
        self.done = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        if self.callback is None:
            return
        with self.lock:
            self.done += n
            self.callback(min(self.done, self.total), self.total, "")

    def close(self) -> None:
        if self.callback is not None:
            self.callback(self.total, self.total, "")


class _Pipeline:
    def __init__(self, tasks: list[_Task], device: torch.device, chunk_bytes: int, progress: _Progress) -> None:
        self.tasks, self.device, self.chunk_bytes, self.progress = tasks, device, chunk_bytes, progress
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.q_read: queue.Queue = queue.Queue(maxsize=POOL)
        self.q_write: queue.Queue = queue.Queue(maxsize=POOL)
        need = [t for t in tasks if t.compute]
        self.buf_size = min(chunk_bytes, max((_chunk_bytes(t, *next(t.chunks(chunk_bytes))) for t in need), default=0))
        self.rpool: queue.Queue = queue.Queue()
        self.wpool: queue.Queue = queue.Queue()
        for _ in range(POOL if need else 0):
            self.rpool.put(torch.empty(self.buf_size, dtype=torch.uint8))
            self.wpool.put(torch.empty(self.buf_size, dtype=torch.uint8))
        self.fds: dict[str, int] = {}
        self.written: collections.deque[tuple[int, int, int]] = collections.deque()
        self.remaining = {id(t): sum(1 for _ in t.chunks(chunk_bytes)) for t in need}

    # -- helpers ---------------------------------------------------------------------------
    def _get(self, q: queue.Queue):
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue

    def _put(self, q: queue.Queue, item: object) -> None:
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _buffer(self, pool: queue.Queue, nbytes: int) -> tuple[torch.Tensor, bool]:
        """A pooled buffer, or a one-off one for a chunk larger than the pool's (whole-tensor DoRA)."""
        if nbytes > self.buf_size:
            return torch.empty(nbytes, dtype=torch.uint8), False
        return self._get(pool), True

    def _fd(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self.fds[path] = fd
        return fd

    def _writeback(self, fd: int, offset: int, n: int) -> None:
        """Start writing a range back to disk now and drop it from the cache a few ranges later.

        Streams the output to disk while the bake runs (instead of piling up dirty pages that throttle
        the writer and make the final fsync long) and leaves the page cache to the rest of the system.
        """
        if not hasattr(os, "posix_fadvise") or n <= 0:
            return
        try:
            os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)     # dirty pages: starts writeback
            self.written.append((fd, offset, n))
            while len(self.written) > WRITEBACK_LAG:
                old = self.written.popleft()
                os.posix_fadvise(*old, os.POSIX_FADV_DONTNEED)           # clean by now: dropped
        except OSError:
            pass

    def _thread(self, fn: Callable[[], None]) -> threading.Thread:
        def body() -> None:
            try:
                fn()
            except _Stop:
                pass
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.errors.append(exc)
                self.stop.set()
        t = threading.Thread(target=body, daemon=True)
        t.start()
        return t

    # -- stages ----------------------------------------------------------------------------
    def _reader(self) -> None:
        ahead: dict[int, int] = {}      # fd -> end of the range already announced to the kernel
        for task in self.tasks:
            if not task.compute:
                self._put(self.q_read, (task, 0, 0, None, False))
                continue
            isz, per = itemsize(task.info.dtype), task.row_elems
            for j0, j1 in task.chunks(self.chunk_bytes):
                n = (j1 - j0) * per * isz
                buf, pooled = self._buffer(self.rpool, n)
                fd, offset = self._fd(task.info.file), task.info.start + j0 * per * isz
                read_ahead(fd, offset, n, ahead)
                pread_into(fd, buf, n, offset, task.info)
                self._put(self.q_read, (task, j0, j1, buf, pooled))
        self._put(self.q_read, None)

    def _writer(self) -> None:
        while True:
            item = self._get(self.q_write)
            if item is None:
                return
            task, j0, j1, buf, pooled = item
            w = task.out.writer(task.key)
            dst = w.offsets[task.key][0]
            if SLOW_WRITE_HOOK:   # test hook (as in SafetensorsWriter.write): makes kill-mid-bake tests deterministic
                time.sleep(SLOW_WRITE_HOOK)
            if buf is None:
                copy_range(self._fd(task.info.file), w.fd, task.info.nbytes, task.info.start, dst, w.path,
                            src_path=task.info.file)
                self._writeback(w.fd, dst, task.info.nbytes)
                w.written.add(task.key)
                self.progress.add(task.info.nbytes)
                continue
            osz, per = itemsize(task.out_code), task.row_elems
            n = (j1 - j0) * per * osz
            pwrite_from(w.fd, buf, n, dst + j0 * per * osz, w.path)
            self._writeback(w.fd, dst + j0 * per * osz, n)
            if pooled:
                self.wpool.put(buf)
            self.remaining[id(task)] -= 1
            if self.remaining[id(task)] == 0:
                w.written.add(task.key)
            self.progress.add((j1 - j0) * per * itemsize(task.info.dtype))

    def run(self) -> None:
        compute = _Compute(self.device, self.chunk_bytes)
        threads = [self._thread(self._reader), self._thread(self._writer)]
        try:
            while True:
                item = self._get(self.q_read)
                if item is None:
                    self._put(self.q_write, None)
                    break
                task, j0, j1, buf, pooled = item
                if buf is None:
                    self._put(self.q_write, item)
                    continue
                src_dt, out_dt = torch_dtype(task.info.dtype), torch_dtype(task.out_code)
                shape = (j1 - j0, *task.info.shape[1:]) if task.info.shape else ()
                n_in = math.prod(shape) * itemsize(task.info.dtype)
                n_out = math.prod(shape) * itemsize(task.out_code)
                obuf, opooled = self._buffer(self.wpool, n_out)
                src = buf[:n_in].view(src_dt).view(shape)
                dst = obuf[:n_out].view(out_dt).view(shape)
                if task.info.shape:
                    compute.run(task, j0, j1, src, dst)
                else:
                    dst.copy_(src)
                if pooled:
                    self.rpool.put(buf)
                if j1 == task.rows or not task.info.shape:
                    for u in {id(u): u for u in (*task.additive, *task.doras)}.values():
                        u.done()
                self._put(self.q_write, (task, j0, j1, obuf, opooled))
            for t in threads:
                while t.is_alive():
                    t.join(0.1)
        except BaseException as exc:
            self.stop.set()
            for t in threads:
                t.join()
            if isinstance(exc, _Stop) and self.errors:   # a worker failed first: report its error
                raise self.errors[0] from None
            raise
        finally:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()
        if self.errors:
            raise self.errors[0]


def _chunk_bytes(task: _Task, j0: int, j1: int) -> int:
    per = task.row_elems * max(itemsize(task.info.dtype), itemsize(task.out_code))
    return (j1 - j0) * per


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


# =============================================================================================
# The operation
# =============================================================================================

_Path = str | os.PathLike[str]
# component -> (file, output), or just the file (a dry run needs no output)
ComponentFiles = Mapping[str, tuple[_Path, _Path | None] | _Path]


def _component_paths(components: ComponentFiles | None, aliases: dict[str, tuple[_Path | None, _Path | None]],
                     dry_run: bool) -> dict[str, tuple[str, str | None]]:
    """component -> (file, output) from ``components=`` and the ``clip_l=``/``t5=`` aliases; checks pairs."""
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


def _check_components(bm: BaseModel, paths: dict[str, tuple[str, str | None]]) -> None:
    """Separate component files must name components of the base's architecture that the base lacks."""
    spec = bm.arch.spec
    for c in paths:
        if c not in spec.components:
            raise UsageError(f"{spec.label} has no component {c!r}.",
                             hint="components: " + ", ".join(spec.components) + ".")
        if c in bm.parts:
            raise UsageError(f"the base already holds the {spec.components[c].label} ({c}); its LoRA modules are "
                             "baked into the base output.", hint=f"drop {_flag(c)}.")


@_whole_bake_threads
def bake(base: str | os.PathLike[str], inputs: Sequence[object], output: str | os.PathLike[str] | None, *,
         dtype: torch.dtype | str | None = None, device: str = "cpu", allow_partial: bool = False,
         dry_run: bool = False, clip_l: str | os.PathLike[str] | None = None,
         clip_l_out: str | os.PathLike[str] | None = None, t5: str | os.PathLike[str] | None = None,
         t5_out: str | os.PathLike[str] | None = None, components: ComponentFiles | None = None,
         flagged: Mapping[str, tuple[_Path | None, _Path | None]] | None = None,
         allow_pickle: bool = False, progress: Progress | bool | None = None,
         chunk_bytes: int = DEFAULT_CHUNK_BYTES, threads: int | None = None,
         allow_zero_lora: bool = False) -> BakeReport:
    """Bake LoRAs (``path[:weight]`` strings, ``(path, weight)`` pairs or WeightedInput) into ``base``.

    Every component the base holds (the denoiser; in single-file checkpoints also text encoders) gets its
    LoRA modules; tensors of no component (a VAE) are copied untouched. ``base`` may be a diffusers pipeline
    folder (``model_index.json``): the subfolders its architecture names (:attr:`Container.folder`) are baked,
    every other file is copied, and ``output`` is a new folder published in one rename. Components held in
    separate files are given as ``components={name: (file, output)}`` (``clip_l=``/``clip_l_out=`` and
    ``t5=``/``t5_out=`` are aliases for FLUX.1's text encoders; ``flagged={name: (file, output)}`` the same with
    the messages of the command-line flags); LoRA modules of a component neither the base
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
    """
    t_start = time.perf_counter()
    out_dtype = parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    dev = _device(device)
    weighted = [_as_weighted(i) for i in inputs]
    if not weighted:
        raise UsageError("no LoRA given.", hint="pass BASE then one or more LoRA[:WEIGHT].")
    base_path = os.fspath(base)
    out_path = os.fspath(output) if output is not None else None
    # clip_l=/t5= are the Python API's names for FLUX.1's flagged text encoders (kept from before components were
    # generic); ``flagged`` is the same for any component with a layout flag (what the CLI's --clip-l … give)
    te_paths = _component_paths(components, {"clip_l": (clip_l, clip_l_out), "t5": (t5, t5_out), **(flagged or {})},
                                 dry_run)
    if out_path is None and not dry_run:
        raise UsageError("no output path given.", hint="pass -o OUT (or --dry-run).")
    all_inputs = [base_path, *(w.path for w in weighted), *(f for f, _ in te_paths.values())]

    opened: list[WeightFile] = []
    outputs: list[_Output | _PipelineOutput] = []
    pipeline = is_pipeline(base_path)
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
            refuse_scaled_fp8(bfile)
            bases = [("", open_base(bfile))]
        bm = bases[0][1]
        for _fo, b in bases:
            _check_components(b, te_paths)
        te_files: dict[str, WeightFile] = {}
        for c, (te_path, _o) in te_paths.items():
            te_files[c] = open_weights(te_path)
            opened.append(te_files[c])
        if not dry_run:
            assert out_path is not None     # checked above: only a dry run goes without an output path
            _check_output(out_path, None if pipeline else bm.file, all_inputs)
            outs = [os.path.realpath(out_path)]
            for c, (_f, te_out) in te_paths.items():
                assert te_out is not None   # _component_paths requires an output unless dry_run
                _check_output(te_out, te_files[c], all_inputs)
                outs.append(os.path.realpath(te_out))
            if len(set(outs)) != len(outs):
                raise OutputError("two outputs have the same path.", path=out_path,
                                  hint="give -o, --clip-l-out, --t5-out and each --component output different "
                                       "paths.")
        desc = _base_desc(bm)
        loras = [_Input(w.path, w.weight, _read_lora(w.path, desc, allow_pickle=allow_pickle, shape_only=dry_run))
                 for w in weighted]
        _check_architectures(loras, bm, desc)
        _check_strengths(loras)
        if not dry_run and not allow_zero_lora:
            _check_zero_ups(loras)

        layout = bm.layout + ("+prefix " + repr(bm.prefix) if bm.prefix else "")
        if pipeline:
            layout = "diffusers pipeline (" + ", ".join(f"{fo}: {b.layout}" for fo, b in bases) + ")"
        report = BakeReport(base_path, out_path, layout, bm.variant, short_name(out_dtype) if out_dtype else "keep",
                            str(dev), dry_run=dry_run)
        uses, te_places = _coverage([b for _fo, b in bases], loras, te_files, allow_partial, report)

        convert = _converter(out_dtype)
        meta = _output_metadata(bm, loras, report, dry_run)
        tasks: list[_Task] = []
        baked = [(fo, b) for fo, b in bases if any(uses.get(c) for c in b.parts)]
        pipe_out = (_PipelineOutput(base_path, out_path)  # type: ignore[arg-type]
                    if pipeline and baked and not dry_run else None)
        for folder, b in baked:
            main = bm.component
            codes = {k: (convert(k, i.dtype) if k in b.slots and b.slots[k].component == main else i.dtype)
                     for k, i in b.file.infos.items()}
            where = pipe_out.part(folder, b.file) if pipe_out is not None else out_path
            out = None if dry_run else _Output(b.file, where, codes, meta, all_inputs)  # type: ignore[arg-type]
            if out is not None:
                outputs.append(out)
            part_tasks = _plan_tasks(b.file, out, _base_places(b), uses, codes)
            for t in part_tasks:
                t.where = folder
            tasks += part_tasks
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
            out = None if dry_run else _Output(te_file, te_out, codes, meta_te, all_inputs)  # type: ignore[arg-type]
            if out is not None:
                outputs.append(out)
            te_tasks = _plan_tasks(te_file, out, te_places[c], {c: uses[c]}, codes)
            tasks += te_tasks
            report.text_encoders.append({"component": c, "file": te_file.path, "output": te_out,
                                         "changed": sum(t.changed for t in te_tasks)})
        report.tensors = len(tasks)
        report.changed = sum(t.changed for t in tasks)
        report.converted = sum(1 for t in tasks if t.compute and not t.changed)
        report.copied = len(tasks) - report.changed - report.converted
        report.bytes_in = sum(t.info.nbytes for t in tasks)
        report.bytes_out = sum(o.size for o in outputs if isinstance(o, _Output)) if outputs else sum(
            t.info.numel * itemsize(t.out_code) for t in tasks)
        if dry_run:
            report.plan = _describe(tasks, loras)
            report.seconds = time.perf_counter() - t_start
            return report
        callback = ProgressBar("bake", unit="bytes") if progress is True else (progress or None)
        prog = _Progress(report.bytes_in, callback)
        saved_threads = torch.get_num_threads()
        torch.set_num_threads(threads or _default_threads())
        try:
            _Pipeline(tasks, dev, chunk_bytes, prog).run()
        finally:
            torch.set_num_threads(saved_threads)
            prog.close()
        for o in outputs:
            o.commit()
        outputs.clear()
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


def _device(name: str) -> torch.device:
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"unknown device {name!r}.", hint="use cpu or cuda.")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA device.", hint="use --device cpu.")
    return torch.device(name)


def _converter(out_dtype: torch.dtype | None) -> Callable[[str, str], str]:
    if out_dtype is None:
        return lambda _k, code: code
    target = dtype_code(out_dtype)
    return lambda _k, code: target if is_float(code) else code


def _coverage(bases: list[BaseModel], loras: list[_Input], te_files: dict[str, WeightFile], allow_partial: bool,
              report: BakeReport) -> tuple[dict[str, dict[str, list[_Use]]], dict[str, dict[str, _Place]]]:
    """Check every LoRA module against the components the base files hold (the main one first; several for a
    pipeline folder) and the separate component files; refuse before any write. Modules of the main component
    are named bare in the report, others as ``component:module``."""
    bm = bases[0]
    spec = bm.arch.spec
    main = bm.component
    holder = {c: b for b in bases for c in b.parts}
    mods = {c: b.arch.module_map(c) for c, b in holder.items()}
    transposed = {(s.component, s.module) for b in bases for s in b.slots.values() if s.transpose}
    loose = {c: {s.param: tuple(b.file.shape(s.key)) for s in b.slots.values() if s.module is None
                 and s.component == c} for c, b in holder.items()}
    te_places: dict[str, dict[str, _Place]] = {}
    te_shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for c, f in te_files.items():
        te_places[c], te_shapes[c] = _te_places(f, c, bm)
    uses: dict[str, dict[str, list[_Use]]] = {c: {} for c in (*spec.components, *holder)}
    unmatched: list[str] = []
    causes: list[str] = []
    for idx, inp in enumerate(loras):
        name = os.path.basename(inp.path)
        bad: list[tuple[str, str, str]] = []          # (component, module label, reason)
        unused_te: dict[str, int] = {}
        foreign = inp.model.arch.name != spec.name
        for p in inp.model.patches:
            comp, module = p.target.component, p.target.module
            label = module if comp == main else f"{comp}:{module}"
            if foreign:
                bad.append((comp, label, f"a {inp.model.arch.spec.label} module; the base is {spec.label}"))
                continue
            if comp in holder and (p.target.loose or (module not in mods[comp] and module in loose[comp])):
                window, why = _fit_loose(p, loose[comp].get(module))
            elif comp in holder:
                shape = holder[comp].module_shape(comp, module)
                if shape is None:
                    bad.append((comp, label, _missing_reason(holder[comp], comp, module)))
                    continue
                window, why = _fit(p, shape, "base module" if comp == main else f"{comp} module",
                                   (comp, module) in transposed)
            elif comp in te_files:
                shape = te_shapes[comp].get(module)
                if shape is None:
                    bad.append((comp, label, f"not in {os.path.basename(te_files[comp].path)}"))
                    continue
                is_t = any(pl.transpose and pl.module == module for pl in te_places[comp].values())
                window, why = _fit(p, shape, f"{comp} module", is_t)
            else:
                unused_te[comp] = unused_te.get(comp, 0) + 1
                continue
            if why is not None:
                bad.append((comp, label, why))
                continue
            if inp.weight == 0 and p.dora is None:
                continue
            uses[comp].setdefault(module, []).append(_Use(p, inp.weight, idx, window))  # type: ignore[arg-type]
            inp.applied += 1
        replaced = sum(1 for p in inp.model.patches if p.replace)
        if replaced and inp.weight not in (0, 1):
            report.warnings.append(f"{name}: {replaced} norm scale(s) are replacement values (BFL control LoRA), "
                                   f"set to the file's values whatever the strength ({inp.weight:g}), as BFL's "
                                   "and diffusers' loaders do.")
        for k in inp.model.unknown_keys:
            bad.append(("", f"key {k!r}", "not understood"))
        inp.skipped = len(bad)
        if bad:
            cause = _lora_cause(bases, inp.model)
            if cause:
                causes.append(f"{name}: {cause}")
            unmatched += [f"{name}: {label}: {why}" for _c, label, why in bad]
            report.skipped += [{"input": inp.path, "module": label, "reason": why, "component": c}
                               for c, label, why in bad]
        for comp, n in unused_te.items():
            report.not_applied.append({"input": inp.path, "component": comp, "modules": n})
            where = spec.components[comp].label if comp in spec.components else comp
            report.warnings.append(f"{name}: {n} {comp} modules not applied: the base holds no {where} (pass "
                                   f"{_flag_hint(comp)} to bake them into a text encoder)."
                                   if comp not in component_flags() else
                                   f"{name}: {n} {comp} modules not applied (pass {_flag_hint(comp)} "
                                   "to bake them into a text encoder).")
        report.inputs.append({"path": inp.path, "weight": inp.weight, "format": inp.model.format,
                              "variant": inp.model.arch.variant, "modules": len(inp.model.patches),
                              "applied": inp.applied, "skipped": inp.skipped})
        if inp.weight == 0 and not inp.applied:
            report.warnings.append(f"{name}: weight 0, contributes nothing.")
        mv = inp.model.arch.variant
        if mv in _labels(bm) and mv != bm.variant and not bad:
            report.warnings.append(f"{name}: made for {_labels(bm)[mv]}, baked into {_base_desc(bm)}.")
    for comp in holder:
        for module, us in uses[comp].items():
            setters = [u for u in us if u.patch.replace]
            if len(setters) > 1:
                raise MergeError(f"{module}: {len(setters)} inputs replace this norm scale "
                                 f"({', '.join(os.path.basename(loras[u.input].path) for u in setters)}); "
                                 "a parameter takes one replacement value.",
                                 hint="bake one BFL control LoRA at a time.")
    for c in te_files:
        if not uses[c] and not any(p.target.component == c for i in loras for p in i.model.patches):
            flag = _flag(c)
            drop = f"{flag} and {flag}-out" if c in component_flags() else flag + ":OUT"
            raise UsageError(f"{flag} given, but no LoRA has {c} modules.", hint=f"drop {drop}.")
    if unmatched and not allow_partial:
        lead = "; ".join(causes) + ". " if causes else ""
        raise CoverageError(f"{lead}Nothing was written: these LoRA modules do not fit {_base_desc(bm)}",
                            unmatched, path=bm.file.path,
                            hint="use a base of the LoRA's model, or pass --allow-partial to bake the rest "
                                 "and report what was skipped.")
    if unmatched:
        report.warnings += [f"skipped (--allow-partial): {u}" for u in unmatched[:20]]
        if len(unmatched) > 20:
            report.warnings.append(f"… and {len(unmatched) - 20} more skipped")
    if not any(uses[c] for c in uses):
        if all(i.weight == 0 for i in loras):
            raise CoverageError("nothing to bake: every LoRA weight is 0, so the output would equal the base",
                                [os.path.basename(i.path) for i in loras], path=bm.file.path,
                                hint="give non-zero weights (path:0.8).")
        raise CoverageError("nothing to bake: no LoRA module applies to this base (or the given text encoders)",
                            [os.path.basename(i.path) for i in loras], path=bm.file.path,
                            hint="check that the LoRA is for this model; text-encoder modules need --clip-l/--t5 "
                                 "with their -out paths (or --component NAME=FILE:OUT).")
    return uses, te_places


def _output_metadata(bm: BaseModel, loras: list[_Input], report: BakeReport, dry_run: bool) -> dict[str, str]:
    records = []
    for i in loras:
        sha = None if dry_run or not os.path.isfile(i.path) else file_sha256(i.path)
        records.append(InputRecord(i.path, sha, weight=i.weight, format=i.model.format))
    if isinstance(bm.file, ShardedFile):
        name = os.path.basename(os.path.abspath(bm.file.folder))
        size = sum(os.path.getsize(os.path.join(bm.file.folder, s)) for s in bm.file.shard_names)
    else:
        name, size = os.path.basename(bm.file.path), os.path.getsize(bm.file.path)
    dora = any(p.dora is not None for i in loras for p in i.model.patches)
    meta = {PROVENANCE_KEY: provenance("bake", records,
                                       base={"file": name, "bytes": size,
                                             "layout": bm.layout, "variant": bm.variant},
                                       dtype=report.dtype,
                                       dora=DORA_RULE if dora else None,
                                       skipped=len(report.skipped) or None)}
    spec = bm.arch.spec
    meta["modelspec.architecture"] = spec.stamp.architecture(bm.variant) or spec.stamp.modelspec or spec.name
    meta.setdefault("modelspec.sai_model_spec", "1.0.1")
    return meta


def _describe(tasks: list[_Task], loras: list[_Input]) -> list[dict[str, object]]:
    plan = []
    for t in tasks:
        entry: dict[str, object] = {"tensor": f"{t.where}/{t.key}" if t.where else t.key, "dtype": t.info.dtype,
                                    "out_dtype": t.out_code,
                                    "action": "bake" if t.changed else ("convert" if t.compute else "copy")}
        if t.changed and t.place is not None:
            lo, hi = t.place.rows
            changes = []
            for kind, group in (("add", t.additive), ("dora", t.doras)):
                for u in group:
                    a, b = max(lo, u.window[0]), min(hi, u.window[1])
                    changes.append({"input": os.path.basename(loras[u.input].path), "module": u.patch.source,
                                    "native": t.place.module if t.place.param == LOOSE
                                    else f"{t.place.module}.{t.place.param}", "native_rows": [a, b],
                                    "tensor_rows": _tensor_rows(t.place, a, b), "weight": u.weight, "kind": kind})
            entry["changes"] = changes
        plan.append(entry)
    return plan


def _tensor_rows(place: _Place, a: int, b: int) -> list[int] | str:
    if place.transpose:
        return f"columns {a}:{b} (stored transposed)"
    lo, hi = place.rows
    if not place.swap:
        return [a - lo, b - lo]
    n, half = hi - lo, (hi - lo) // 2
    j0 = (a - lo + half) % n
    if j0 + (b - a) > n:
        return "all, halves swapped" if (a, b) == (lo, hi) else "halves swapped"
    return [j0, j0 + (b - a)]


def format_plan(report: BakeReport) -> Iterable[str]:
    """Human-readable lines of a dry-run plan."""
    copied = 0
    for e in report.plan:
        if e["action"] == "copy":
            copied += 1
            continue
        conv = f" {e['dtype']}→{e['out_dtype']}" if e["dtype"] != e["out_dtype"] else ""
        if e["action"] == "convert":
            yield f"{e['tensor']}: convert{conv}"
            continue
        yield f"{e['tensor']}{conv} ←"
        changes = cast("list[dict[str, Any]]", e["changes"])     # what _describe lists for a baked tensor
        for c in changes:
            r, tr = c["native_rows"], c["tensor_rows"]
            where = tr if isinstance(tr, str) else f"{tr[0]}:{tr[1]}"
            yield (f"    {c['kind']} {c['input']}:{c['module']} ×{c['weight']:g}  {c['native']} rows {r[0]}:{r[1]}"
                   f" → tensor rows {where}")
    yield f"{copied} tensors copied unchanged"


__all__ = ["bake", "BakeReport", "format_plan", "LorakitError"]
