"""Architecture layouts, declared as data and registered by name."""

from __future__ import annotations

import difflib

from lorakit.errors import UnsupportedArchitectureError
from lorakit.layouts.base import (Alias, ArchSpec, ComponentSpec, ConcreteModule, ConcreteParam, ModuleSpec, NameIndex, NameMatch,
                   ParamSpec, Preset, Variant, evaluate, expand, expand_params, flatten, solve, symbols)
from lorakit.layouts.flux1 import FLUX1
from lorakit.layouts.flux2 import FLUX2
from lorakit.layouts.qwen_image import QWEN_IMAGE
from lorakit.layouts.z_image import Z_IMAGE
from lorakit.layouts.sd1 import SD1
from lorakit.layouts.sd2 import SD2
from lorakit.layouts.sdxl import SDXL
from lorakit.layouts.wan import WAN
from lorakit.layouts.recognizers import RECOGNIZERS, Recognizer, recognize

_ARCHS: dict[str, ArchSpec] = {}


def register(arch: ArchSpec) -> ArchSpec:
    """Add an architecture to the registry (ValueError if its name is taken)."""
    if arch.name in _ARCHS:
        raise ValueError(f"architecture {arch.name!r} registered twice")
    _ARCHS[arch.name] = arch
    return arch


def resolve(name: str) -> ArchSpec:
    """The registered architecture named ``name`` (with a did-you-mean hint if unknown)."""
    try:
        return _ARCHS[name]
    except KeyError:
        near = difflib.get_close_matches(name, list(_ARCHS), n=1)
        raise UnsupportedArchitectureError(f"unknown architecture {name!r}.",
                                           hint=f"did you mean {near[0]!r}?" if near else None) from None


def available() -> list[str]:
    """The names of the registered architectures."""
    return list(_ARCHS)


for _arch in (FLUX1, SDXL, SD1, SD2, QWEN_IMAGE, Z_IMAGE, FLUX2, WAN):
    register(_arch)

__all__ = ["Alias", "ArchSpec", "ComponentSpec", "ConcreteModule", "ConcreteParam", "ModuleSpec", "NameIndex",
           "NameMatch", "ParamSpec", "Preset", "Variant", "evaluate", "expand", "expand_params", "flatten", "solve", "symbols",
           "register", "resolve", "available", "RECOGNIZERS", "Recognizer", "recognize", "FLUX1", "FLUX2", "SD1", "SD2",
           "SDXL", "QWEN_IMAGE", "Z_IMAGE", "WAN"]
