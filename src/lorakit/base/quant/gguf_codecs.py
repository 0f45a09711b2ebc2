"""GGUF tensor types as codecs, through ``gguf-py`` (the optional ``gguf`` extra).

Members: ``data``, the tensor's stored bytes as a uint8 tensor of gguf-py's byte shape (numpy order, the last
axis in bytes). Decoding is ``gguf.quants.dequantize``; encoding is ``gguf.quants.quantize`` (round to nearest,
deterministic) for the types gguf-py can write. The K-quants and other read-only types are refused for writing
with the choices that work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lorakit.base.quant.codecs import Codec
from lorakit.errors import UnsupportedDtypeError

#: the types gguf-py quantizes (and lorakit writes)
WRITABLE = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")


def gguf_module() -> Any:
    """The ``gguf`` package (gguf-py), or an UnsupportedDtypeError naming the extra to install."""
    try:
        import gguf
    except ImportError:
        raise UnsupportedDtypeError("reading or writing GGUF needs the 'gguf' package (gguf-py).",
                                    hint="pip install 'lorakit[gguf]'.") from None
    return gguf


@dataclass
class GGUFCodec(Codec):
    qtype_name: str = "Q8_0"

    def __post_init__(self) -> None:
        self.name, self.label, self.roles = f"gguf_{self.qtype_name}", f"GGUF {self.qtype_name}", ("data",)
        if self.qtype_name not in WRITABLE:
            self.write_refusal = (f"GGUF {self.qtype_name} cannot be written (gguf-py has no quantizer for it, and "
                                  "a K-quant's importance-weighted choices cannot be redone exactly)")

    @classmethod
    def for_type(cls, name: str) -> "GGUFCodec | None":
        gguf = gguf_module()
        if name not in gguf.GGMLQuantizationType.__members__:
            return None
        return cls(qtype_name=name)

    @property
    def qtype(self) -> Any:
        return gguf_module().GGMLQuantizationType[self.qtype_name]

    def decode(self, members: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        gguf = gguf_module()
        raw = members["data"].numpy()
        try:
            values = gguf.quants.dequantize(raw, self.qtype)
        except NotImplementedError:
            raise UnsupportedDtypeError(f"gguf-py cannot dequantize GGUF {self.qtype_name}.",
                                        hint="convert the base to a type gguf-py reads (Q8_0, Q4_K, F16, …).") from None
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)

    def noise(self, members: Mapping[str, torch.Tensor], values: torch.Tensor) -> float:
        """Blockwise estimate: each block's value range over the levels its bits allow (float types: their eps)."""
        gguf = gguf_module()
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        flat = values.detach().to(torch.float32).reshape(-1)
        if block == 1:      # F32 / F16 / BF16: spacing relative to each value
            eps = {"F32": 2.0 ** -23, "F16": 2.0 ** -10, "BF16": 2.0 ** -7}.get(self.qtype_name, 0.0)
            step = torch.exp2(torch.floor(torch.log2(flat.abs().clamp(min=1e-30)))) * eps
            return float((step.double() ** 2).sum() / 12.0) ** 0.5
        bits = max(1, (8 * size) // block)
        blocks = flat[: flat.numel() // block * block].reshape(-1, block)
        step = (blocks.amax(dim=1) - blocks.amin(dim=1)) / (2 ** bits - 1)
        return float((step.double() ** 2).sum() * block / 12.0) ** 0.5

    def encode(self, values: torch.Tensor, members: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        gguf = gguf_module()
        stored = tuple(members["data"].shape)
        if self.write_refusal is not None:
            raise UnsupportedDtypeError(self.write_refusal + ".", hint=REQUANT_HINT)
        logical = gguf.quants.quant_shape_from_byte_shape(stored, self.qtype)
        arr = values.detach().to(torch.float32).contiguous().numpy().reshape(logical)
        q = np.ascontiguousarray(gguf.quants.quantize(arr, self.qtype))
        out = torch.from_numpy(q.view(np.uint8).copy()).reshape(stored)
        return {"data": out}


REQUANT_HINT = ("re-encode the quantized tensors as another type with --requant q8_0 (or q5_0, q5_1, q4_0, q4_1), "
                "or write bf16 (--dtype bf16).")
