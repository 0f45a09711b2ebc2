"""Parse and validate safetensors headers without touching tensor data, and build them for writing."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorakit.dtypes import ST_CODES, ST_ORDER, itemsize
from lorakit.errors import HeaderError, UnsupportedDtypeError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the same limit safetensors applies
# More tensors than any FLUX checkpoint or LoRA has (a full FLUX.1 + T5 + CLIP checkpoint has ~2,000; a LyCORIS
# LoRA on every module of all three ~8,000): a header past this is refused before a per-tensor object is built.
MAX_TENSORS = 50_000
MAX_JSON_DEPTH = 64     # a safetensors header is 3 deep; JSON metadata values (tag frequencies, configs) ~4


class JSONDepthError(ValueError):
    """JSON nested deeper than :data:`MAX_JSON_DEPTH` (a ValueError, so "not JSON" handlers treat it alike)."""


def loads_json(text: str | bytes, *, max_depth: int = MAX_JSON_DEPTH,
               object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """``json.loads`` of file content with bounded nesting: deeper than ``max_depth`` is a JSONDepthError
    (never a RecursionError, whatever the depth)."""
    try:
        obj = json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise JSONDepthError(f"JSON nested deeper than {max_depth} levels") from None
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:      # iterative: a value that parsed must also be walkable by code that recurses over it
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > max_depth:
                raise JSONDepthError(f"JSON nested deeper than {max_depth} levels")
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return obj


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: dtype code, shape and absolute byte range in its file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    file: str

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``object_pairs_hook`` that refuses a key given twice (JSON allows it; a file that does is ambiguous)."""
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_header(prefix: bytes, file_size: int, path: str) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Validate a safetensors header.

    ``prefix`` holds the first ``8 + n`` bytes of the file (or fewer when the file is short).
    Returns the tensors (by name, in header order), the ``__metadata__`` map and the data-section start.
    """
    if file_size < 8 or len(prefix) < 8:
        raise HeaderError(f"file is {file_size} bytes, too short to be safetensors (truncated?).", path=path)
    n = int.from_bytes(prefix[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise HeaderError(f"header length {n} exceeds the {MAX_HEADER_BYTES} byte limit (corrupt file?).", path=path)
    if 8 + n > file_size:
        raise HeaderError(f"header length {n} runs past the end of the {file_size}-byte file (truncated or corrupt).",
                          path=path)
    raw = prefix[8:8 + n]
    _check_count(raw.count(b'"data_offsets"'), path)   # C-speed pre-count: refuse before parsing a bomb
    try:
        header = loads_json(raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HeaderError(f"header is not valid JSON ({_clip(str(exc))}).", path=path) from None
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object.", path=path)
    _check_count(len(header) - ("__metadata__" in header), path)
    meta_raw = header.pop("__metadata__", None) or {}
    if not isinstance(meta_raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta_raw.items()):
        raise HeaderError("__metadata__ must map strings to strings.", path=path)
    data_start = 8 + n
    data_len = file_size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        infos[name] = _tensor_info(name, entry, data_start, data_len, path)
    _check_overlaps(infos, path)
    return infos, dict(meta_raw), data_start


def _check_count(count: int, path: str) -> None:
    if count > MAX_TENSORS:
        raise HeaderError(f"header lists {count} tensors, more than the {MAX_TENSORS} any known checkpoint or LoRA "
                          "has (corrupt or hostile file?).", path=path,
                          hint="lorakit refuses it before reading further; check where the file came from.")


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _tensor_info(name: str, entry: object, data_start: int, data_len: int, path: str) -> TensorInfo:
    if not isinstance(entry, dict):
        raise HeaderError(f"entry for tensor {name!r} is not an object.", path=path)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise HeaderError(f"tensor {name!r} has no dtype.", path=path)
    if dtype not in ST_ORDER:
        raise UnsupportedDtypeError(f"tensor {name!r} has unsupported dtype {dtype!r}.", path=path,
                                    hint="lorakit reads " + ", ".join(ST_CODES) + ".")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise HeaderError(f"tensor {name!r} has an invalid shape {shape!r}.", path=path)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise HeaderError(f"tensor {name!r} has invalid data_offsets {offsets!r}.", path=path)
    begin, end = offsets
    expected = math.prod(shape) * itemsize(dtype)
    if end < begin or end - begin != expected:
        raise HeaderError(f"tensor {name!r}: {dtype} {shape} needs {expected} bytes but data_offsets {offsets} "
                          f"give {end - begin}.", path=path)
    if end > data_len:
        raise HeaderError(f"tensor {name!r}: data_offsets {offsets} run past the data section "
                          f"({data_len} bytes; truncated file?).", path=path)
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end, path)


def _check_overlaps(infos: dict[str, TensorInfo], path: str) -> None:
    spans = sorted((i.start, i.end, i.name) for i in infos.values() if i.end > i.start)
    for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise HeaderError(f"tensors {n0!r} and {n1!r} overlap in the data section.", path=path)


def serialisation_order(entries: list[tuple[str, str, tuple[int, ...]]]) -> list[tuple[str, str, tuple[int, ...]]]:
    """The order `safetensors.torch.save` lays tensors out: dtype descending, then name."""
    return sorted(entries, key=lambda e: (-ST_ORDER[e[1]], e[0]))


def build_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes (length prefix included, padded to 8) and each tensor's data-section range."""
    ordered = serialisation_order(entries)
    obj: dict[str, object] = {}
    if metadata is not None:   # like safetensors: an empty dict is written as "__metadata__":{}
        obj["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    ranges: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, code, shape in ordered:
        size = math.prod(shape) * itemsize(code)
        obj[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        ranges[name] = (offset, offset + size)
        offset += size
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body, ranges
