"""The registry of quantization schemes a base tensor can be stored in.

A :class:`Codec` turns the stored tensors of one logical weight (its *members*: the codes, a scale) into fp32
values and back. Decoding follows the format's own definition; encoding is deterministic (round to nearest
even, no stochastic rounding) and writes members with the same dtypes and shapes as the source's, so a
requantized file loads wherever the source did.

Scale policy of the scaled-fp8 codecs (per tensor, decided from the source tensor): a source whose codes reach
the fp8 maximum was scaled by its absolute maximum (ComfyUI's ``TensorCoreFP8Layout.quantize``:
``scale = amax / finfo.max``), so the baked tensor gets a recomputed ``amax`` scale the same way; any other
source scale is kept as it is, and a baked value beyond what that scale can hold is an error, never clipped
silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from lorakit.errors import NonFiniteError, UnsupportedDtypeError


class Codec:
    """One quantization scheme: ``decode`` stored members → fp32, ``encode`` fp32 → new members."""

    name: str = ""
    label: str = ""
    roles: tuple[str, ...] = ("weight",)
    #: None when the scheme can be written; else why not and what to do instead
    write_refusal: str | None = None

    def decode(self, members: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, values: torch.Tensor, members: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """New members for fp32 ``values`` (logical shape), given the source's members (dtypes, shapes, scale)."""
        raise NotImplementedError

    def policy(self, members: Mapping[str, torch.Tensor]) -> str:
        """How ``encode`` treats this tensor's scales, in words (for reports)."""
        return "no scales"

    def noise(self, members: Mapping[str, torch.Tensor], values: torch.Tensor) -> float:
        """Estimated norm of the rounding noise the scheme put into ``values`` (uniform rounding:
        ``sqrt(Σ step² / 12)`` over the local grid spacing); 0.0 when unknown."""
        return 0.0


_CODECS: dict[str, Codec] = {}
_FAMILIES: dict[str, Callable[[str], Codec | None]] = {}


def register(c: Codec) -> Codec:
    """Add a codec to the registry (by its name)."""
    _CODECS[c.name] = c
    return c


def register_family(prefix: str, factory: Callable[[str], Codec | None]) -> None:
    """Codecs named ``prefix + something`` made on first use (GGUF's types need the optional ``gguf`` package)."""
    _FAMILIES[prefix] = factory


def codec(name: str) -> Codec:
    """The codec of a scheme name (``fp8_e4m3fn_scaled``, ``gguf_Q8_0``, …); UnsupportedDtypeError if unknown."""
    found = _CODECS.get(name)
    if found is None:
        for prefix, factory in _FAMILIES.items():
            if name.startswith(prefix):
                made = factory(name[len(prefix):])
                if made is not None:
                    found = register(made)
                break
    if found is None:
        raise UnsupportedDtypeError(f"unknown quantization scheme {name!r}.",
                                    hint="lorakit reads " + ", ".join(sorted(_CODECS)) + ".")
    return found


def codecs() -> list[str]:
    """The names of the codecs registered so far (GGUF types appear once used)."""
    return sorted(_CODECS)


FP8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an fp8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def half_ulp(dtype: torch.dtype) -> float:
    """Half the spacing of fp8 values at the format's maximum: values up to ``max + half_ulp`` round to max."""
    lim = fp8_max(dtype)
    return 2.0 ** math.floor(math.log2(lim)) * float(torch.finfo(dtype).eps) / 2


def to_fp8(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round fp32 values to fp8 (nearest even), saturating at the format's maximum (torch's cast alone would
    give NaN for e4m3fn)."""
    lim = fp8_max(dtype)
    return values.clamp(-lim, lim).to(dtype)


def fp8_spacing(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fp8 grid spacing at each code (normal: 2^(exponent - mantissa bits); subnormals: the smallest)."""
    fi = torch.finfo(dtype)
    mag = codes.to(torch.float32).abs()
    exp = torch.floor(torch.log2(torch.clamp(mag, min=float(fi.smallest_normal))))
    return torch.exp2(exp) * float(fi.eps)


def uniform_noise(step: torch.Tensor) -> float:
    """``sqrt(Σ step² / 12)``: the expected norm of rounding to grids of spacing ``step``."""
    return float((step.double() ** 2).sum() / 12.0) ** 0.5


@dataclass
class PlainFP8(Codec):
    """fp8 codes with no scale (``e4m3fn`` or ``e5m2``): value = code."""

    dtype: torch.dtype = torch.float8_e4m3fn

    def __post_init__(self) -> None:
        short = str(self.dtype).replace("torch.float8_", "")
        self.name, self.label = f"fp8_{short}", f"fp8 {short}"

    def decode(self, members: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return members["weight"].to(torch.float32).reshape(shape)

    def encode(self, values: torch.Tensor, members: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"weight": to_fp8(values, self.dtype).reshape(members["weight"].shape)}

    def noise(self, members: Mapping[str, torch.Tensor], values: torch.Tensor) -> float:
        return uniform_noise(fp8_spacing(members["weight"], self.dtype))


def scale_view(scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A stored scale as fp32, shaped to broadcast over a weight: one per tensor, or one per output row."""
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return s.reshape(())
    if shape and s.numel() == shape[0]:
        return s.reshape(shape[0], *([1] * (len(shape) - 1)))
    raise UnsupportedDtypeError(f"a scale of shape {list(scale.shape)} for a weight of shape {list(shape)} is "
                                "neither per tensor nor per output row.",
                                hint="lorakit reads per-tensor and per-row fp8 scales only.")


def amax_scaled(members: Mapping[str, torch.Tensor], dtype: torch.dtype) -> bool:
    """Whether the source scale is ``amax / finfo.max``: its codes reach the fp8 maximum (per scale). Compared on
    the code bytes (sign bit cleared), without decoding."""
    codes = members["weight"]
    scale = members["scale"]
    if codes.numel() == 0:
        return False
    top = int(torch.tensor(fp8_max(dtype), dtype=dtype).view(torch.uint8))
    mag = codes.reshape(codes.shape[0] if scale.numel() != 1 else 1, -1).view(torch.uint8) & 0x7F
    return bool((mag.amax(dim=1) == top).all())


@dataclass
class ScaledFP8(Codec):
    """fp8 codes times a float scale (ComfyUI's ``TensorCoreFP8Layout``: ``value = code.to(dtype) * scale``)."""

    dtype: torch.dtype = torch.float8_e4m3fn

    def __post_init__(self) -> None:
        short = str(self.dtype).replace("torch.float8_", "")
        self.name, self.label = f"fp8_{short}_scaled", f"scaled fp8 {short}"
        self.roles = ("weight", "scale")

    def decode(self, members: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return members["weight"].to(torch.float32).reshape(shape).mul_(scale_view(members["scale"], shape))

    def noise(self, members: Mapping[str, torch.Tensor], values: torch.Tensor) -> float:
        shape = tuple(values.shape)
        codes = members["weight"].reshape(shape)
        return uniform_noise(fp8_spacing(codes, self.dtype) * scale_view(members["scale"], shape).abs())

    def policy(self, members: Mapping[str, torch.Tensor]) -> str:
        return "amax scale recomputed" if amax_scaled(members, self.dtype) else "source scale kept"

    def encode(self, values: torch.Tensor, members: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shape = tuple(values.shape)
        src_scale = members["scale"]
        lim = fp8_max(self.dtype)
        amax_policy = amax_scaled(members, self.dtype)
        if amax_policy:
            if src_scale.numel() == 1:
                lo, hi = torch.aminmax(values)
                amax = torch.maximum(lo.abs(), hi.abs())
            else:
                lo, hi = torch.aminmax(values.reshape(shape[0], -1), dim=1)
                amax = torch.maximum(lo.abs(), hi.abs())
            scale = amax / lim
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))     # an all-zero tensor keeps codes 0
            stored_scale = scale.to(src_scale.dtype).reshape(src_scale.shape)
        else:
            stored_scale = src_scale
        s = scale_view(stored_scale, shape)
        scaled = values * (1.0 / s)
        peak = 0.0
        if amax_policy:     # within the range by construction; only a non-finite input can break it
            if not bool(torch.isfinite(stored_scale).all()):
                peak = math.inf
        elif scaled.numel():
            lo, hi = torch.aminmax(scaled)
            peak = max(-float(lo), float(hi))
        if not math.isfinite(peak) or (not amax_policy and peak > lim + half_ulp(self.dtype)):
            raise NonFiniteError(f"a baked value needs {peak:.4g} in units of the kept scale, beyond the "
                                 f"{self.label} maximum {lim:g}; nothing was written.",
                                 hint="lower the LoRA strength, or write bf16 (--dtype bf16).")
        scaled.clamp_(-lim, lim)
        return {"weight": scaled.to(self.dtype).reshape(members["weight"].shape), "scale": stored_scale}


for _dt in FP8.values():
    register(PlainFP8(dtype=_dt))
    register(ScaledFP8(dtype=_dt))


def _gguf_family(qtype: str) -> Codec | None:
    from lorakit.base.quant.gguf_codecs import GGUFCodec
    return GGUFCodec.for_type(qtype)


register_family("gguf_", _gguf_family)
