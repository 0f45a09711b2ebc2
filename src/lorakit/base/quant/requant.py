"""Bake output in the base's own quantized format, streamed tensor by tensor.

For every tensor the bake changes: dequantize → ``update`` adds the deltas in fp32 → requantize with the same
scheme (scale policy: :mod:`lorakit.base.quant.codecs`) → write the new members in the source's dtypes and
shapes, measuring what survived (:mod:`lorakit.base.quant.retention`). Every other stored tensor (untouched
weights, scales of untouched layers, input scales, markers) is copied byte for byte; the header metadata (the
safetensors ``__metadata__`` with ``_quantization_metadata``, or every GGUF key-value field) is the source's.
Writers are registered per view type.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lorakit.base.quant.codecs import Codec, codec
from lorakit.base.quant.gguf_codecs import REQUANT_HINT, WRITABLE, gguf_module
from lorakit.base.quant.gguf_file import GGUFFile
from lorakit.base.quant.retention import Retained, measure
from lorakit.base.quant.view import QEntry, QuantizedFile
from lorakit.dtypes import torch_dtype
from lorakit.errors import OutputError, UnsupportedDtypeError, UsageError
from lorakit.io import SafetensorsFile, SafetensorsWriter, check_output_path
from lorakit.io.ranges import copy_range
from lorakit.io.tempfiles import clean_stale_temps, create_temp_file
from lorakit.io.writer import fsync_dir

#: ``update(name, values)``: add the deltas of logical tensor ``name`` to its fp32 values in place
Update = Callable[[str, torch.Tensor], None]


@dataclass
class QuantBake:
    """What a quantized write did: the output, the tensors requantized and what survived of each delta."""

    path: str
    convention: str
    changed: list[str] = field(default_factory=list)
    copied: int = 0
    retained: list[Retained] = field(default_factory=list)
    requantized_as: dict[str, str] = field(default_factory=dict)    # tensor -> new scheme (--requant)


def _ordered(view: QuantizedFile, targets: Iterable[str]) -> list[str]:
    want = set(targets)
    unknown = sorted(want - set(view.infos))
    if unknown:
        raise UsageError(f"internal error: bake targets not in the base: {unknown[:3]}")
    return sorted(want, key=lambda k: (view.infos[k].file, view.infos[k].start, k))


def _requant_codec(name: str | None) -> Codec | None:
    if name is None:
        return None
    qt = name.strip().upper()
    if qt not in WRITABLE:
        raise UsageError(f"--requant {name!r} is not a type lorakit writes.",
                         hint="use one of " + ", ".join(t.lower() for t in WRITABLE) + ".")
    return codec(f"gguf_{qt}")


def write_safetensors(view: QuantizedFile, output: str, targets: Sequence[str], update: Update, *,
                      metadata: dict[str, str] | None, inputs: Sequence[str], requant: str | None,
                      dtype: torch.dtype | None = None, device: torch.device | None = None) -> QuantBake:
    """The source's layout: quantized tensors requantized with their schemes, the rest as stored; with ``dtype``
    a plain file instead (:func:`write_widened`). ``device``: where the tensors are decoded, baked and encoded."""
    if dtype is not None:
        return write_widened(view, output, targets, update, metadata=metadata, inputs=inputs, dtype=dtype,
                             device=device)
    raw = view.raw
    if not isinstance(raw, SafetensorsFile):
        raise UsageError("baking into a quantized sharded folder is not supported.", path=view.path,
                         hint="bake into a single-file quantized checkpoint.")
    if requant is not None:
        raise UsageError("--requant applies to GGUF bases; a safetensors fp8 base keeps its schemes.")
    order = _ordered(view, targets)
    for name in order:      # refuse before anything is written
        e = view.entries.get(name)
        if e is not None and e.scheme.write_refusal is not None:
            raise UnsupportedDtypeError(e.scheme.write_refusal + ".", path=view.path)
    result = QuantBake("", view.convention)
    entries = [(k, i.dtype, i.shape) for k, i in raw.infos.items()]
    done: set[str] = set()
    with SafetensorsWriter(output, entries, raw.metadata if metadata is None else metadata, inputs=inputs) as w:
        for name in order:
            e = view.entries.get(name)
            if e is None:       # a plain (bf16/fp16/fp32) tensor of a mixed-precision file
                source = view.get(name).to(device, torch.float32)
                values = source.clone()
                update(name, values)
                out = values.to(torch_dtype(raw.infos[name].dtype))
                w.write(name, out.cpu())
                result.retained.append(measure(name, raw.infos[name].dtype, "cast", source, values, out))
                done.add(name)
            else:
                members = {role: t.to(device) for role, t in view.members(e).items()}
                source = e.scheme.decode(members, e.shape)
                values = source.clone()
                update(name, values)
                new = e.scheme.encode(values, members)
                for role, key in e.members.items():
                    w.write(key, new[role].cpu())
                    done.add(key)
                result.retained.append(measure(name, e.codec, e.scheme.policy(members), source, values,
                                               e.scheme.decode(new, e.shape)))
            result.changed.append(name)
        fd = os.open(raw.path, os.O_RDONLY)
        try:
            for k, info in sorted(raw.infos.items(), key=lambda kv: kv[1].start):
                if k in done:
                    continue
                copy_range(fd, w.fd, info.nbytes, info.start, w.offsets[k][0], w.path, src_path=raw.path)
                w.written.add(k)
                result.copied += 1
        finally:
            os.close(fd)
    result.path = w.path
    return result


def write_widened(view: QuantizedFile, output: str, targets: Sequence[str], update: Update, *,
                  metadata: dict[str, str] | None, inputs: Sequence[str], dtype: torch.dtype,
                  device: torch.device | None = None) -> QuantBake:
    """A plain safetensors file: every quantized tensor dequantized to ``dtype`` (the baked ones with their
    deltas), the quantization's scales, markers and header entry dropped, other tensors as stored."""
    from lorakit.base.quant.comfy_fp8 import QUANT_METADATA
    from lorakit.dtypes import dtype_code
    order = set(_ordered(view, targets))
    code = dtype_code(dtype)
    plan = [(k, code if k in view.entries else i.dtype, i.shape) for k, i in view.infos.items()]
    meta = dict(view.metadata if metadata is None else metadata)
    meta.pop(QUANT_METADATA, None)
    result = QuantBake("", view.convention + f" → {code}")
    with SafetensorsWriter(output, plan, meta, inputs=inputs) as w:
        for k, out_code, _shape in plan:
            e = view.entries.get(k)
            if k not in order and e is None:
                w.write(k, view.get(k))
                result.copied += 1
                continue
            source = view.get(k).to(device, torch.float32)
            values = source
            if k in order:
                values = source.clone()
                update(k, values)
                result.changed.append(k)
            out = values.to(torch_dtype(out_code))
            w.write(k, out.cpu())
            if k in order:
                result.retained.append(measure(k, out_code, "cast", source, values, out))
    result.path = w.path
    return result


def _field_value(field: object) -> tuple[object, object, object]:
    gguf = gguf_module()
    types = field.types  # type: ignore[attr-defined]
    main = types[0]
    sub = types[-1] if main == gguf.GGUFValueType.ARRAY else None
    return field.contents(), main, sub  # type: ignore[attr-defined]


GGUF_WIDE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_gguf(view: QuantizedFile, output: str, targets: Sequence[str], update: Update, *,
               metadata: dict[str, str] | None, inputs: Sequence[str], requant: str | None,
               dtype: torch.dtype | None = None, device: torch.device | None = None) -> QuantBake:
    """``requant``: the type for baked tensors whose own type cannot be written; ``dtype`` (fp32/fp16/bf16): every
    baked tensor written as that float type instead of being requantized. gguf-py's codecs run on the CPU
    (``device`` is not used)."""
    assert isinstance(view, GGUFFile)
    gguf = gguf_module()
    order = _ordered(view, targets)
    out_codec = gguf_choices(view, order, requant, dtype)
    target = check_output_path(output, inputs)
    folder = os.path.dirname(os.path.abspath(target))
    clean_stale_temps(folder)
    fd, tmp = create_temp_file(folder, os.path.basename(target))
    os.close(fd)
    result = QuantBake("", view.convention)
    writer = None
    try:
        writer = gguf.GGUFWriter(tmp, arch=view.architecture or "")
        align = view.reader.alignment
        writer.data_alignment = align
        for name, fld in view.reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":
                continue        # the reader's view of the file header; the architecture the writer adds itself
            value, main, sub = _field_value(fld)
            writer.add_key_value(name, value, main, sub_type=sub)
        for key, text in (metadata or {}).items():      # the bake's own provenance, as GGUF strings
            if key.startswith("lorakit.") and key not in view.reader.fields:
                writer.add_string(key, text)
        planned: dict[str, tuple[Codec, tuple[int, ...]]] = {}
        for t in view.reader.tensors:
            stored = tuple(int(d) for d in reversed(t.shape.tolist()))
            c = out_codec.get(t.name, view.entries[t.name].scheme)
            qtype = gguf.GGMLQuantizationType[c.name[len("gguf_"):]]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            n = int(np.prod(stored)) if stored else 1
            if stored and stored[-1] % block:
                raise UnsupportedDtypeError(f"tensor {t.name!r} (rows of {stored[-1]}) cannot be stored as "
                                            f"{c.label}, whose blocks hold {block} values.", path=view.path,
                                            hint="choose --requant q8_0 only for tensors with rows divisible by 32, "
                                                 "or write bf16 (--dtype bf16).")
            writer.add_tensor_info(t.name, stored, np.dtype(np.float32), n * size // block, raw_dtype=qtype)
            planned[t.name] = (c, stored)
            if c is not view.entries[t.name].scheme:
                result.requantized_as[t.name] = c.name
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        baked = set(order)
        for t in view.reader.tensors:
            e: QEntry = view.entries[t.name]
            if t.name in baked:
                source = view.get(t.name).to(torch.float32)
                values = source.clone()
                update(t.name, values)
                c, stored = planned[t.name]
                new = encode_as(view, e, c, values)
                data = new["data"]
                result.retained.append(measure(t.name, c.name, "blockwise scales recomputed", source, values,
                                               c.decode(new, e.shape)))
                result.changed.append(t.name)
            else:
                data = view.member(t.name)
                result.copied += 1
            writer.write_tensor_data(np.ascontiguousarray(data.numpy()))
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(folder)
    except BaseException:
        if writer is not None:
            writer.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    result.path = target
    return result


def gguf_choices(view: GGUFFile, order: Sequence[str], requant: str | None,
                 dtype: torch.dtype | None) -> dict[str, Codec]:
    """The type each baked tensor of a GGUF base is written as: its own, ``dtype``'s float type for every one,
    or ``requant``'s for those whose type cannot be written (refused, with the choices, when none is given)."""
    alt = _requant_codec(requant)
    wide = None
    if dtype is not None:
        if dtype not in GGUF_WIDE:
            raise UsageError(f"a GGUF base cannot be written as {dtype}.", hint="use --dtype bf16, fp16 or fp32.")
        wide = codec("gguf_" + GGUF_WIDE[dtype])
    out: dict[str, Codec] = {}
    for name in order:      # refuse before anything is written
        c = view.entries[name].scheme
        if wide is not None:
            c = wide
        elif c.write_refusal is not None:
            if alt is None:
                raise UnsupportedDtypeError(
                    f"tensor {name!r} is {c.label}, and {c.write_refusal}; nothing was written.", path=view.path,
                    hint=REQUANT_HINT)
            c = alt
        out[name] = c
    return out


def encode_as(view: QuantizedFile, e: QEntry, c: Codec, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """``values`` encoded with codec ``c``: the entry's own (its members give dtypes, shapes and scales) or
    another GGUF type (members of that type's byte shape)."""
    if c is e.scheme:
        return c.encode(values, {r: t.to(values.device) for r, t in view.members(e).items()})
    assert isinstance(view, GGUFFile)
    gguf = gguf_module()
    stored = tuple(int(d) for d in reversed(view.tensors[e.name].shape.tolist()))
    byte_shape = gguf.quants.quant_shape_to_byte_shape(stored, gguf.GGMLQuantizationType[c.name[len("gguf_"):]])
    return c.encode(values, {"data": torch.empty(byte_shape, dtype=torch.uint8)})


def measure_baked(view: QuantizedFile, targets: Iterable[str], update: Update, *, requant: str | None = None,
                  dtype: torch.dtype | None = None, device: torch.device | None = None) -> QuantBake:
    """What :func:`write_baked` would keep of each delta, computed the same way, with nothing written."""
    order = _ordered(view, targets)
    gguf_out = gguf_choices(view, order, requant, dtype) if isinstance(view, GGUFFile) else {}
    result = QuantBake("", view.convention)
    on = None if gguf_out else device       # gguf-py's codecs run on the CPU
    for name in order:
        e = view.entries.get(name)
        source = view.get(name).to(on, torch.float32)
        values = source.clone()
        update(name, values)
        result.changed.append(name)
        if e is None or (dtype is not None and not gguf_out):
            out = values.to(dtype if dtype is not None else torch_dtype(view.infos[name].dtype))
            result.retained.append(measure(name, str(out.dtype), "cast", source, values, out))
            continue
        c = gguf_out.get(name, e.scheme)
        new = encode_as(view, e, c, values)
        policy = e.scheme.policy(view.members(e)) if c is e.scheme and not gguf_out else "blockwise scales recomputed"
        result.retained.append(measure(name, c.name, policy, source, values, c.decode(new, e.shape)))
        if c is not e.scheme:
            result.requantized_as[name] = c.name
    return result


Writer = Callable[..., QuantBake]
#: (view type, writer), most specific first
WRITERS: list[tuple[type, Writer]] = [(GGUFFile, write_gguf), (QuantizedFile, write_safetensors)]


def write_baked(view: QuantizedFile, output: str | os.PathLike[str], targets: Iterable[str], update: Update, *,
                metadata: dict[str, str] | None = None, inputs: Sequence[str] = (),
                requant: str | None = None, dtype: torch.dtype | None = None,
                device: torch.device | None = None) -> QuantBake:
    """Write ``view`` with ``update`` applied to ``targets`` (logical names) in the view's own format (``dtype``:
    wider float storage instead of requantizing, see the writers)."""
    for kind, fn in WRITERS:
        if isinstance(view, kind):
            return fn(view, os.fspath(output), list(targets), update, metadata=metadata, inputs=inputs,
                      requant=requant, dtype=dtype, device=device)
    raise OutputError(f"no writer for {type(view).__name__}.", path=view.path)
