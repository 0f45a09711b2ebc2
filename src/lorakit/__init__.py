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

from lorakit.errors import LorakitError

# Every operation is imported on first use: ``import lorakit`` (and the header-only commands) never import torch.
_LAZY = {
    "convert": ("ops.conversion", "convert"),
    "ConvertReport": ("ops.conversion", "ConvertReport"),
    "inspect": ("ops.inspection", "inspect_lora"),
    "read_lora": ("formats", "read_lora"),
    "open_weights": ("io", "open_weights"),
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


__all__ = ["__version__", "LorakitError", *_LAZY]
