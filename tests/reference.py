"""Where the tests find the reference shape lists of real checkpoints (header-only JSON files)."""

from __future__ import annotations

import os
from pathlib import Path


def reference_shapes() -> Path:
    """The ``shapes/`` folder: $LORAKIT_REFERENCE/shapes, else ../shared/reference/shapes beside the checkout (as CI
    lays it out). Tests that need a file skip when it is absent."""
    env = os.environ.get("LORAKIT_REFERENCE")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "reference")
    return next((c for c in candidates if (c / "shapes").is_dir()), candidates[-1]) / "shapes"
