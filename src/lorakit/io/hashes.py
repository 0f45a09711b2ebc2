"""File hashes users search by, computed on the bytes actually on disk (streamed, bounded memory).

- ``sha256``: SHA-256 of the whole file; ``autov2`` = its first 10 hex (AUTOMATIC1111 / Civitai AutoV2).
- ``autov3``: SHA-256 of the safetensors data section (everything after the header), first 12 hex (Civitai).
- ``sshs_model_hash`` / ``sshs_legacy_hash``: kohya sd-scripts' definitions (reference ``metadata.md`` §3.1),
  i.e. of ``safetensors.torch.save(tensors, ss_only_metadata)`` — reproduced by streaming the tensors in
  the serialiser's order, never by holding the file in memory.
- ``legacy_model_hash``: old A1111 ``model_hash`` (8 hex of SHA-256 of file bytes [1 MiB, 1 MiB + 64 KiB)).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

from lorakit.errors import InputFileError, UsageError
from lorakit.io import SafetensorsFile, WeightFile, open_weights
from lorakit.io.header import build_header, serialisation_order
from lorakit.ops.metadata import LEGACY_END, LEGACY_START

CHUNK = 1 << 20
STORED_HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


class _Window:
    """SHA-256 of the whole stream plus a byte window [lo, hi) of it."""

    def __init__(self, lo: int = LEGACY_START, hi: int = LEGACY_END) -> None:
        self.lo, self.hi, self.pos = lo, hi, 0
        self.window = bytearray()

    def feed(self, chunk: bytes | memoryview) -> None:
        n = len(chunk)
        a, b = max(self.lo, self.pos), min(self.hi, self.pos + n)
        if a < b:
            self.window.extend(bytes(chunk[a - self.pos:b - self.pos]))
        self.pos += n

    def hexdigest(self) -> str:
        return hashlib.sha256(bytes(self.window)).hexdigest()


def file_digests(path: str | os.PathLike[str]) -> dict[str, str]:
    """Whole-file SHA-256, AutoV2, AutoV3 (data section) and the old A1111 window hash, in one pass."""
    p = os.fspath(path)
    whole, data = hashlib.sha256(), hashlib.sha256()
    window = _Window()
    try:
        fh = open(p, "rb")
    except FileNotFoundError:
        raise InputFileError("file not found.", path=p) from None
    except IsADirectoryError:
        raise UsageError("file hashes need a single file, not a folder.", path=p) from None
    except OSError as exc:
        raise InputFileError(f"cannot open ({exc.strerror}).", path=p) from None
    with fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        data_start = 8 + n
        pos = 0
        block = head
        while block:
            whole.update(block)
            window.feed(block)
            end = pos + len(block)
            if end > data_start:
                data.update(block[max(0, data_start - pos):])
            pos = end
            block = fh.read(CHUNK)
    sha = whole.hexdigest()
    return {"sha256": sha, "autov2": sha[:10].upper(), "autov3": data.hexdigest()[:12].upper(),
            "data_sha256": data.hexdigest(), "legacy_model_hash": window.hexdigest()[:8]}


def sshs_hashes_of(file: WeightFile, metadata: Mapping[str, str] | None = None) -> tuple[str, str]:
    """sd-scripts' ``sshs_model_hash`` and ``sshs_legacy_hash`` of the tensors in ``file`` as stored
    (their on-disk dtype), with ``metadata`` (default: the file's) reduced to its ``ss_*`` keys."""
    meta = file.metadata if metadata is None else metadata
    entries = [(i.name, i.dtype, i.shape) for i in file.infos.values()]
    ss_meta = {k: v for k, v in meta.items() if k.startswith("ss_")}
    header, _ = build_header(entries, ss_meta)
    model = hashlib.sha256()
    window = _Window()
    window.feed(header)
    for name, _, _ in serialisation_order(entries):
        data = file.raw_bytes(name)
        model.update(data)
        window.feed(data)
    return model.hexdigest(), window.hexdigest()[:8]


def hash_report(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> dict[str, Any]:
    """Every hash of one file, plus whether the hashes stored in its header are current."""
    p = os.fspath(path)
    out: dict[str, Any] = {}
    with open_weights(p, allow_pickle=allow_pickle) as f:
        if isinstance(f, SafetensorsFile):
            out.update(file_digests(p))
        model_hash, legacy = sshs_hashes_of(f)
        out["sshs_model_hash"] = model_hash
        out["sshs_legacy_hash"] = legacy
        stored = {k: f.metadata[k] for k in STORED_HASH_KEYS if k in f.metadata}
    expected = {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy,
                "modelspec.hash_sha256": "0x" + model_hash}
    out["stored"] = {k: {"value": v, "current": v.lower() == expected[k]} for k, v in stored.items()}
    return out


def stale_hash_keys(report: Mapping[str, Any]) -> list[str]:
    """The stored hash keys of a hash report that no longer match the file."""
    return [k for k, v in report.get("stored", {}).items() if not v["current"]]
