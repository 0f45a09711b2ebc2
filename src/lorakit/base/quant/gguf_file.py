"""GGUF checkpoints (``gguf-py``) as a dequantized view, with ComfyUI-GGUF's conventions: tensor names are the
state dict's own (optionally under ``model.diffusion_model.``), shapes are GGUF's dimensions reversed, and tensors
stored reshaped (5-D and other shapes GGUF cannot hold as they are) carry their real shape in
``comfy.gguf.orig_shape.<name>`` (an int32 array). Tensor bytes are read with ``pread`` (the reader's memory map
only serves the header), so memory stays bounded by the largest tensor."""

from __future__ import annotations

import os
from typing import Any

import torch

from lorakit.base.quant.gguf_codecs import gguf_module
from lorakit.base.quant.view import QEntry, QuantizedFile
from lorakit.errors import HeaderError, InputFileError
from lorakit.io import TensorInfo
from lorakit.io.ranges import pread_into

GGUF_MAGIC = b"GGUF"
ORIG_SHAPE = "comfy.gguf.orig_shape."


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file starting with the GGUF magic."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        return False
    try:
        with open(p, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def field_value(field: Any) -> Any:
    """A GGUF key-value field's Python value (string, number or list)."""
    return field.contents()


def orig_shape(reader: Any, name: str, path: str) -> tuple[int, ...] | None:
    """A tensor's real shape from ComfyUI-GGUF's ``comfy.gguf.orig_shape.<name>`` field, None without one."""
    gguf = gguf_module()
    field = reader.get_field(ORIG_SHAPE + name)
    if field is None:
        return None
    if len(field.types) != 2 or field.types[0] != gguf.GGUFValueType.ARRAY or field.types[1] != gguf.GGUFValueType.INT32:
        raise HeaderError(f"{ORIG_SHAPE + name!r} is not an int32 array.", path=path)
    return tuple(int(v) for v in field.contents())


class GGUFFile(QuantizedFile):
    """A GGUF file's tensors, each a logical tensor of codec ``gguf_<TYPE>``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        gguf = gguf_module()
        p = os.fspath(path)
        try:
            reader = gguf.GGUFReader(p)
        except Exception as exc:    # gguf-py raises many kinds for a corrupt header (struct, numpy, enum errors)
            raise HeaderError(f"not a readable GGUF file ({type(exc).__name__}: {str(exc)[:200]}).", path=p) from None
        self.reader = reader
        self.tensors = {t.name: t for t in reader.tensors}
        meta: dict[str, str] = {}
        for name, field in reader.fields.items():
            if field.types and field.types[0] == gguf.GGUFValueType.STRING:
                meta[name] = str(field_value(field))
        entries: dict[str, QEntry] = {}
        plain: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            stored = tuple(int(d) for d in reversed(t.shape.tolist()))
            shape = orig_shape(reader, t.name, p) or stored
            qname = t.tensor_type.name
            entries[t.name] = QEntry(t.name, shape, f"gguf_{qname}", {"data": t.name})
            plain[t.name] = TensorInfo(t.name, "F32", shape, int(t.data_offset), int(t.data_offset) + int(t.n_bytes), p)
        super().__init__(None, entries, set(), "GGUF", path=p, metadata=meta, plain=plain)
        self.architecture = meta.get("general.architecture")
        self._fd = os.open(p, os.O_RDONLY)

    def byte_shape(self, name: str) -> tuple[int, ...]:
        gguf = gguf_module()
        t = self.tensors[name]
        stored = tuple(int(d) for d in reversed(t.shape.tolist()))
        return tuple(gguf.quants.quant_shape_to_byte_shape(stored, t.tensor_type))

    def member(self, key: str) -> torch.Tensor:
        t = self.tensors[key]
        n = int(t.n_bytes)
        buf = torch.empty(n, dtype=torch.uint8)
        info = self.infos.get(key) or TensorInfo(key, "U8", (n,), int(t.data_offset), int(t.data_offset) + n, self.path)
        if n:
            pread_into(self._fd, buf, n, int(t.data_offset), info)
        return buf.reshape(self.byte_shape(key))

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open a GGUF file as a dequantized view (InputFileError if it is missing)."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise InputFileError("file not found.", path=p)
    return GGUFFile(p)
