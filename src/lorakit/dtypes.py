"""Dtype names: safetensors codes, torch dtypes and the spellings users type (sd-scripts' included)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from lorakit.errors import UnsupportedDtypeError, UsageError

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch

# safetensors dtype code -> (torch dtype name, bytes per element). Order = the serialiser's enum order, used
# to sort tensors exactly as `safetensors.torch.save` does (descending dtype, then name). Names, not torch
# objects, so that header-only work never imports torch (see lorakit.lazy).
_CODES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
}
ST_CODES = tuple(_CODES)
ST_ORDER = {code: i for i, code in enumerate(_CODES)}
ITEMSIZES = {code: size for code, (_t, size) in _CODES.items()}

FLOAT_CODES = frozenset({"F8_E5M2", "F8_E4M3", "F16", "BF16", "F32", "F64"})

# user spelling -> torch dtype name
_SPELLINGS: dict[str, str] = {}
for _names, _dt in (
    (("bf16", "bfloat16"), "bfloat16"),
    (("fp16", "float16", "half"), "float16"),
    (("fp32", "float32", "float", "full"), "float32"),
    (("fp64", "float64", "double"), "float64"),
    (("fp8", "float8", "fp8_e4m3fn", "e4m3fn", "float8_e4m3fn", "fp8_e4m3"), "float8_e4m3fn"),
    (("fp8_e5m2", "e5m2", "float8_e5m2"), "float8_e5m2"),
):
    for _n in _names:
        _SPELLINGS[_n] = _dt

_TORCH: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    """``ST_DTYPES`` (code -> (torch dtype, bytes)) and ``TORCH_TO_ST`` (torch dtype -> code), built on first use."""
    if name in ("ST_DTYPES", "TORCH_TO_ST"):
        if not _TORCH:
            _TORCH["ST_DTYPES"] = {c: (getattr(torch, t), size) for c, (t, size) in _CODES.items()}
            _TORCH["TORCH_TO_ST"] = {dt: c for c, (dt, _s) in _TORCH["ST_DTYPES"].items()}
        return _TORCH[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    ST_DTYPES: dict[str, tuple[torch.dtype, int]]
    TORCH_TO_ST: dict[torch.dtype, str]


def parse_dtype(text: str | None) -> torch.dtype | None:
    """Parse a user dtype spelling; ``None``/``keep``/``same`` mean "keep the input's dtype"."""
    if text is None:
        return None
    key = text.strip().lower().replace("torch.", "")
    if key in ("keep", "same", "auto", "none", ""):
        return None
    if key in _SPELLINGS:
        return getattr(torch, _SPELLINGS[key])
    if "fnuz" in key:
        raise UsageError(f"dtype {text!r} (an fnuz fp8 type) cannot be stored in safetensors.",
                         hint="use fp8_e4m3fn or fp8_e5m2.")
    raise UsageError(f"unknown dtype {text!r}.", hint="use one of: keep, " + ", ".join(sorted(_SPELLINGS)))


def dtype_code(dtype: torch.dtype, *, name: str = "tensor") -> str:
    """The safetensors dtype code of a torch dtype (UnsupportedDtypeError if it has none)."""
    try:
        return __getattr__("TORCH_TO_ST")[dtype]
    except KeyError:
        raise UnsupportedDtypeError(f"{name}: dtype {dtype} cannot be stored in safetensors.") from None


def torch_dtype(code: str, *, name: str = "tensor", path: str | None = None) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (UnsupportedDtypeError if unknown)."""
    try:
        return getattr(torch, _CODES[code][0])
    except KeyError:
        raise UnsupportedDtypeError(f"tensor {name!r} has unsupported dtype {code!r}.", path=path,
                                    hint="lorakit reads " + ", ".join(ST_CODES) + ".") from None


def itemsize(code: str) -> int:
    """Bytes per element of a safetensors dtype code."""
    return ITEMSIZES[code]


_STRUCT = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "U64": "<Q", "I32": "<i", "U32": "<I", "I16": "<h",
           "U16": "<H", "I8": "<b", "U8": "<B", "BOOL": "<?"}


def decode_scalar(code: str, raw: bytes) -> float | None:
    """One little-endian element of a safetensors dtype as a float, without torch (None for fp8 codes)."""
    if code == "BF16":
        return float(struct.unpack("<f", b"\x00\x00" + raw[:2])[0])
    fmt = _STRUCT.get(code)
    return float(struct.unpack(fmt, raw[:struct.calcsize(fmt)])[0]) if fmt else None


def is_float(code: str) -> bool:
    """Whether a safetensors dtype code is a floating-point type."""
    return code in FLOAT_CODES


def short_name(dtype: torch.dtype) -> str:
    """The short spelling of a dtype (bf16, fp16, fp32, …), as the CLI accepts it."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
            torch.float8_e4m3fn: "fp8_e4m3fn", torch.float8_e5m2: "fp8_e5m2"}.get(dtype, str(dtype).replace("torch.", ""))


def as_dtype(value: "torch.dtype | str | None") -> torch.dtype | None:
    """A torch dtype, or any spelling :func:`parse_dtype` accepts (the Python API takes the CLI's strings)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        return parse_dtype(value)
    raise UsageError(f"dtype must be a torch dtype or a name such as 'bf16', got {value!r}.")


def cast_error(adapter: object, dtype: torch.dtype | None) -> float:
    """Relative Frobenius error that storing ``adapter``'s tensors as ``dtype`` adds to its delta (float64).

    Plain LoRA factors are measured from the factors alone (:func:`lorakit.formats.emit.fold_error`, the
    measurement extract and resize report); other adapters from their dense delta, one module at a time.
    0.0 when ``dtype`` is None or already the adapter's dtype."""
    from lorakit.lora.adapters import Adapter, LoRA
    from lorakit.formats.emit import fold_error
    if dtype is None or not isinstance(adapter, Adapter) or adapter.dtype == dtype:
        return 0.0
    cast = adapter.to(dtype)
    if isinstance(adapter, LoRA) and adapter.mid is None and isinstance(cast, LoRA):
        return fold_error(adapter, cast)
    want = adapter.dense().double()
    got = cast.dense().double()
    norm = float(want.norm())
    err = float((got - want).norm())
    return (0.0 if err == 0 else float("inf")) if norm == 0 else err / norm


def worst_cast_error(adapters: "list[tuple[str, object]]", dtype: torch.dtype | None,
                     threshold: float = 1e-6) -> tuple[str, float] | None:
    """``(module, error)`` of the adapter that loses most by being stored as ``dtype``; None if none > ``threshold``."""
    if dtype is None:
        return None
    worst: tuple[str, float] | None = None
    for name, a in adapters:
        e = cast_error(a, dtype)
        if e > threshold and (worst is None or e > worst[1]):
            worst = (name, e)
    return worst
