"""lorakit: make any LoRA work with any tool.

Library first; the ``lorakit`` command is a thin layer over these functions::

    import lorakit
    report = lorakit.inspect("my_lora.safetensors")
    lorakit.convert("ai_toolkit.safetensors", "kohya.safetensors", to="kohya")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from lorakit.ops.conversion import ConvertReport, convert
from lorakit.errors import LorakitError
from lorakit.formats import read_lora
from lorakit.ops.inspection import inspect_lora as inspect
from lorakit.io import open_weights

# Later capabilities live in their own modules and are imported on first use.
_LAZY = {
    "merge": ("ops.merging", "merge"),
    "bake": ("ops.baking", "bake"),
    "extract": ("ops.extraction", "extract"),
    "resize": ("ops.resizing", "resize"),
    "doctor": ("ops.diagnose", "doctor"),
    "diff": ("ops.diffing", "diff"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


__all__ = ["__version__", "convert", "ConvertReport", "inspect", "read_lora", "open_weights", "LorakitError",
           *_LAZY]
