"""Heavy modules imported on first use.

Header-only work (``--help``, ``inspect`` without ``--deep``, ``doctor`` without a base, reading metadata,
scanning a library) reads a few kilobytes per file; importing torch costs seconds. Modules on that path bind
``torch`` to a :class:`LazyModule` at run time (the real module for type checkers)::

    if TYPE_CHECKING:
        import torch
    else:
        from lorakit.lazy import torch

and torch is imported when one of its attributes is first used.
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class LazyModule(types.ModuleType):
    """A module proxy that imports the real module on first attribute access."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_lazy_target"] = name

    def __getattr__(self, attr: str) -> Any:
        module = self.__dict__.get("_lazy_module")
        if module is None:
            # the module itself is kept, not a copy of its attributes: a patched torch.kron is seen
            module = self.__dict__["_lazy_module"] = importlib.import_module(self.__dict__["_lazy_target"])
        return getattr(module, attr)


torch = LazyModule("torch")
