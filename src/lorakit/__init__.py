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

from .conversion import ConvertReport, convert
from .errors import LorakitError
from .formats import read_lora
from .inspection import inspect_lora as inspect
from .io import open_weights

# Later capabilities live in their own modules and are imported on first use.
_LAZY = {
    "merge": ("merging", "merge"),
    "bake": ("baking", "bake"),
    "extract": ("extraction", "extract"),
    "resize": ("resizing", "resize"),
    "doctor": ("diagnose", "doctor"),
    "diff": ("diffing", "diff"),
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
