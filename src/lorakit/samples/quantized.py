"""Synthetic quantized bases for the tests and benchmarks: ComfyUI scaled fp8 (both conventions), plain fp8 and
GGUF, written tensor by tensor from a spec list and a seeded value function (any size, bounded memory).

Quantization here follows the formats' published definitions (ComfyUI's ``TensorCoreFP8Layout.quantize``:
``scale = amax / finfo.max``, codes ``(w * (1 / scale)).to(fp8)``; gguf-py's ``quantize``); the tests check
lorakit against their own re-implementation, not against these helpers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from lorakit.dtypes import dtype_code
from lorakit.io import SafetensorsWriter

Spec = tuple[str, tuple[int, ...]]
Value = Callable[[str, tuple[int, ...]], torch.Tensor]
FP8_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def seeded_values(seed: int = 0, std: float = 0.05) -> Value:
    """A value function: each tensor from its own generator seeded by ``seed`` and its name (order-free)."""
    import zlib

    def value(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=gen) * std
    return value


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """The tensors fp8 and GGUF builds quantize: weights of 2-D or larger layers."""
    return name.endswith(".weight") and len(shape) >= 2


def fp8_quantize(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) of ``w`` by ComfyUI's per-tensor amax rule."""
    lim = float(torch.finfo(dtype).max)
    scale = (w.abs().amax() / lim).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (w * (1.0 / scale)).clamp(-lim, lim).to(dtype)
    return codes, scale


def write_comfy_fp8(path: str | os.PathLike[str], specs: Sequence[Spec], value: Value, *,
                    convention: str = "scale_weight", fmt: str = "float8_e4m3fn",
                    keep_bf16: Callable[[str], bool] = lambda name: False,
                    extra_metadata: Mapping[str, str] | None = None) -> str:
    """A ComfyUI fp8 checkpoint. ``convention``: ``"scale_weight"`` (older: ``scaled_fp8`` marker,
    ``.scale_weight`` and ``.scale_input`` tensors), ``"quant_metadata"`` (newer: ``_quantization_metadata``
    header, ``.weight_scale``, ``.input_scale`` and ``.comfy_quant`` tensors; layers ``keep_bf16`` names stay bf16)
    or ``"plain"`` (fp8 codes, no scales)."""
    dtype = FP8_DTYPES[fmt]
    code = dtype_code(dtype)
    entries: list[tuple[str, str, tuple[int, ...]]] = []
    layers: dict[str, dict[str, str]] = {}
    conf_bytes = json.dumps({"format": fmt}).encode()
    for name, shape in specs:
        q = quantizable(name, shape) and not keep_bf16(name)
        entries.append((name, code if q else "BF16", shape))
        if q and convention != "plain":
            stem = name[:-len(".weight")]
            if convention == "scale_weight":
                entries += [(stem + ".scale_weight", "F32", ()), (stem + ".scale_input", "F32", ())]
            else:
                entries += [(stem + ".weight_scale", "F32", ()), (stem + ".input_scale", "F32", ()),
                            (stem + ".comfy_quant", "U8", (len(conf_bytes),))]
                layers[stem] = {"format": fmt}
    meta = {"format": "pt", **(extra_metadata or {})}
    if convention == "scale_weight":
        entries.append(("scaled_fp8", code, (0,)))
    elif convention == "quant_metadata":
        meta["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    with SafetensorsWriter(path, entries, meta) as w:
        for name, shape in specs:
            v = value(name, shape)
            if not (quantizable(name, shape) and not keep_bf16(name)):
                w.write(name, v.to(torch.bfloat16))
                continue
            codes, scale = fp8_quantize(v, dtype)
            if convention == "plain":
                codes = v.clamp(-float(torch.finfo(dtype).max), float(torch.finfo(dtype).max)).to(dtype)
            w.write(name, codes)
            stem = name[:-len(".weight")]
            if convention == "scale_weight":
                w.write(stem + ".scale_weight", scale)
                w.write(stem + ".scale_input", torch.tensor(1.0))
            elif convention == "quant_metadata":
                w.write(stem + ".weight_scale", scale)
                w.write(stem + ".input_scale", torch.tensor(1.0))
                w.write(stem + ".comfy_quant", torch.frombuffer(bytearray(conf_bytes), dtype=torch.uint8))
        if convention == "scale_weight":
            w.write("scaled_fp8", torch.empty(0, dtype=dtype))
    return os.fspath(path)


def write_gguf(path: str | os.PathLike[str], specs: Sequence[Spec], value: Value, *, qtype: str = "Q8_0",
               arch: str = "flux", keep: Mapping[str, str] | None = None) -> str:
    """A ComfyUI-GGUF style file: quantizable tensors whose rows fit the type's blocks as ``qtype``, the rest F32;
    tensors of more than 4 dimensions stored as 2-D with ``comfy.gguf.orig_shape``. ``keep``: tensor -> type
    name written instead (e.g. a K-quant, stored as zero bytes since gguf-py cannot quantize it)."""
    import gguf
    writer = gguf.GGUFWriter(os.fspath(path), arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    plan: list[tuple[str, tuple[int, ...], tuple[int, ...], gguf.GGMLQuantizationType]] = []
    for name, shape in specs:
        stored = (shape[0], int(np.prod(shape[1:]))) if len(shape) > 4 else shape
        if len(shape) > 4:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(shape))
        want = (keep or {}).get(name, qtype if quantizable(name, shape) else "F32")
        qt = gguf.GGMLQuantizationType[want]
        block, size = gguf.GGML_QUANT_SIZES[qt]
        if stored[-1] % block:
            qt = gguf.GGMLQuantizationType.F32
            block, size = 1, 4
        n = int(np.prod(stored))
        writer.add_tensor_info(name, stored, np.dtype(np.float32), n * size // block, raw_dtype=qt)
        plan.append((name, shape, stored, qt))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape, stored, qt in plan:
        arr = value(name, shape).reshape(stored).numpy().astype(np.float32)
        try:
            data = gguf.quants.quantize(arr, qt)
        except NotImplementedError:
            data = np.zeros(gguf.quants.quant_shape_to_byte_shape(stored, qt), dtype=np.uint8)
        writer.write_tensor_data(np.ascontiguousarray(data))
    writer.close()
    return os.fspath(path)
