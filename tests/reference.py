"""Where the tests find the reference shape lists of real checkpoints (header-only JSON files)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def reference_shapes() -> Path:
    """The ``shapes/`` folder: $LORAKIT_REFERENCE/shapes, else ../shared/reference/shapes beside the checkout (as CI
    lays it out). Tests that need a file skip when it is absent."""
    env = os.environ.get("LORAKIT_REFERENCE")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "reference")
    return next((c for c in candidates if (c / "shapes").is_dir()), candidates[-1]) / "shapes"


def header_only(path: Path, entries: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None) -> str:
    """A valid safetensors file whose (zero) data section is a hole: header bytes only on disk."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in sorted(entries):
        n = 2
        for d in entries[name]:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(entries[name]), "data_offsets": [offset, offset + n]}
        offset += n
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    with open(path, "wb") as fh:
        fh.write(len(body).to_bytes(8, "little") + body)
        fh.truncate(8 + len(body) + offset)
    return str(path)
