"""Header metadata: what lorakit writes, what it carries over, and the hashes users search by."""

from __future__ import annotations

from typing import TYPE_CHECKING

import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


from lorakit.dtypes import dtype_code
from lorakit.io.header import build_header, serialisation_order
from lorakit.io.writer import tensor_bytes
from lorakit.layouts.base import ArchSpec

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch

PROVENANCE_KEY = "lorakit.provenance"
STALE_PREFIXES = ("sshs_",)
STALE_KEYS = ("modelspec.hash_sha256", "lora_adapter_metadata", PROVENANCE_KEY)


def version() -> str:
    """lorakit's installed version (the source tree's when not installed)."""
    try:
        from importlib.metadata import version as _v
        return _v("lorakit")
    except Exception:  # pragma: no cover - running from a source tree
        from lorakit import __version__
        return __version__


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class InputRecord:
    path: str
    sha256: str | None = None
    weight: float | None = None
    format: str | None = None
    size: int | None = None         # bytes on disk (recorded instead of a hash for multi-GB base models)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"file": os.path.basename(self.path)}
        if self.sha256:
            out["sha256"] = self.sha256
        if self.size is not None:
            out["size"] = self.size
        if self.weight is not None:
            out["weight"] = self.weight
        if self.format:
            out["format"] = self.format
        return out


_RECORD_COMMAND = True


def record_command_line(enabled: bool) -> None:
    """Whether provenance records this process's ``lorakit …`` command line. A long-running host of the library
    (``lorakit ui``) turns it off: its own command line did not produce the files it writes."""
    global _RECORD_COMMAND
    _RECORD_COMMAND = enabled


def command_line() -> str | None:
    """The ``lorakit …`` command that runs now (None from Python, other programs, or when recording is off)."""
    if not _RECORD_COMMAND or not os.path.basename(sys.argv[0]).startswith("lorakit"):
        return None
    return " ".join(["lorakit", *sys.argv[1:]])


def provenance(operation: str, inputs: Iterable[InputRecord], **details: object) -> str:
    """The JSON provenance record lorakit stores in every file it writes."""
    record: dict[str, object] = {
        "tool": "lorakit",
        "version": version(),
        "operation": operation,
        "command": command_line(),
        "inputs": [i.to_json() for i in inputs],
    }
    record.update({k: v for k, v in details.items() if v is not None})
    return json.dumps({k: v for k, v in record.items() if v is not None}, sort_keys=True)


def carry_over(metadata: Mapping[str, str]) -> dict[str, str]:
    """Input metadata minus what becomes stale when tensors change (hashes, format configs, old provenance)."""
    return {k: v for k, v in metadata.items() if not k.startswith(STALE_PREFIXES) and k not in STALE_KEYS}


def summarize_values(values: Iterable[float | int]) -> str:
    """One value as text, or "Dynamic" when the values differ (kohya's convention)."""
    vals = sorted(set(values))
    if not vals:
        return ""
    if len(vals) > 1:
        return "Dynamic"
    v = vals[0]
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def network_metadata(ranks: Mapping[str, int], alphas: Mapping[str, float], *, fmt: str, arch: ArchSpec,
                     variant: str) -> dict[str, str]:
    """kohya ``ss_*`` and ModelSpec keys that describe the tensors actually written (labels: the architecture's
    :class:`~lorakit.layouts.base.Stamp`)."""
    out: dict[str, str] = {}
    if ranks:
        out["ss_network_dim"] = summarize_values(ranks.values())
        out["ss_network_alpha"] = summarize_values(alphas.values())
    stamp = arch.stamp
    if stamp.ss_version:
        out["ss_network_module"] = stamp.kohya_module
        out["ss_base_model_version"] = stamp.version(variant)
    if stamp.modelspec:
        out["modelspec.architecture"] = f"{stamp.architecture(variant) or stamp.modelspec}/lora"
    if stamp.implementation:
        out["modelspec.implementation"] = stamp.implementation
    if stamp.resolution:
        out["modelspec.resolution"] = stamp.resolution
    out.setdefault("modelspec.sai_model_spec", "1.0.1")
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env and env.isdigit():   # a date only when asked for: outputs are otherwise byte-reproducible
        out["modelspec.date"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(env)))
    return out


def diffusers_adapter_metadata(ranks: Mapping[str, int], *, has_dora: bool, has_bias: bool) -> str:
    """A ``lora_adapter_metadata`` that states scale 1 everywhere (α already folded into the factors)."""
    by_comp: dict[str, dict[str, int]] = {}
    for stem, r in ranks.items():
        comp, _, module = stem.partition(".")
        by_comp.setdefault(comp, {})[module] = r
    meta: dict[str, object] = {}
    for comp, mods in sorted(by_comp.items()):
        common = Counter(mods.values()).most_common(1)[0][0]
        pattern = {f"^{m}": r for m, r in sorted(mods.items()) if r != common}
        meta.update({
            f"{comp}.r": common,
            f"{comp}.lora_alpha": common,
            f"{comp}.rank_pattern": pattern,
            f"{comp}.alpha_pattern": dict(pattern),
            f"{comp}.target_modules": sorted(mods),
            f"{comp}.peft_type": "LORA",
            f"{comp}.use_dora": has_dora,
            f"{comp}.lora_bias": has_bias,
            f"{comp}.use_rslora": False,
        })
    return json.dumps(meta, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Hashes (kohya sd-scripts definitions, computed on the tensors exactly as written)
# ---------------------------------------------------------------------------------------------

LEGACY_START, LEGACY_END = 0x100000, 0x110000


def sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``sshs_model_hash`` (SHA-256 of the data section) and ``sshs_legacy_hash`` (first 8 hex of the
    SHA-256 of bytes [1 MiB, 1 MiB + 64 KiB) of the serialisation with only ``ss_*`` metadata)."""
    entries = [(k, dtype_code(v.dtype, name=k), tuple(v.shape)) for k, v in tensors.items()]
    ss_meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    header, _ = build_header(entries, ss_meta)
    model = hashlib.sha256()
    window = bytearray()
    pos = 0

    def feed(chunk: memoryview | bytes) -> None:
        nonlocal pos
        n = len(chunk)
        lo, hi = max(LEGACY_START, pos), min(LEGACY_END, pos + n)
        if lo < hi:
            window.extend(bytes(chunk[lo - pos:hi - pos]))
        pos += n

    feed(header)
    for name, _, _ in serialisation_order(entries):
        data = tensor_bytes(tensors[name])
        model.update(data)
        feed(data)
    return model.hexdigest(), hashlib.sha256(bytes(window)).hexdigest()[:8]


def with_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``metadata`` with sshs_model_hash and sshs_legacy_hash of ``tensors`` added."""
    model_hash, legacy = sshs_hashes(tensors, metadata)
    out = dict(metadata)
    out["sshs_model_hash"] = model_hash
    out["sshs_legacy_hash"] = legacy
    out["modelspec.hash_sha256"] = "0x" + model_hash
    return out
