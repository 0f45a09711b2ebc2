"""Reading and checking the LoRAs given to a bake, and the command-line flags of separate component files."""

from __future__ import annotations

from typing import TYPE_CHECKING

import os
from dataclasses import dataclass


from lorakit.base.checkpoint import BaseModel
from lorakit.dtypes import torch_dtype
from lorakit.errors import CoverageError, NonFiniteError, UnsupportedArchitectureError, UsageError
from lorakit.formats import load, parse
from lorakit.io import WeightFile, open_weights
from lorakit.layouts import ComponentSpec, available, resolve
from lorakit.lora.adapters import LoRA
from lorakit.lora.checks import require_finite_model
from lorakit.lora.model import LoraModel
from lorakit.ops.recipes import WeightedInput, parse_weighted

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch


@dataclass
class BakeInput:
    path: str
    weight: float
    model: LoraModel
    sha256: str | None = None
    applied: int = 0
    skipped: int = 0


def as_weighted(item: object) -> WeightedInput:
    """A LoRA input as given to bake (``path[:weight]``, ``(path, weight)`` or WeightedInput)."""
    if isinstance(item, WeightedInput):
        return item
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return WeightedInput(os.fspath(item[0]), float(item[1]))
    if isinstance(item, (str, os.PathLike)):
        text = os.fspath(item)
        return WeightedInput(text, 1.0) if os.path.exists(text) else parse_weighted(text)
    raise UsageError(f"bad LoRA input {item!r}; use 'path[:weight]' or (path, weight).")


class _ShapeOnlyFile(WeightFile):
    """A view of a LoRA file that reads only scalars (alphas); larger tensors are shape-only (meta)."""

    def __init__(self, inner: WeightFile) -> None:
        self.inner, self.path, self.metadata, self.infos = inner, inner.path, inner.metadata, inner.infos

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        info = self.infos[name]
        if info.numel <= 1:
            return self.inner.get(name)
        return torch.empty(info.shape, dtype=torch_dtype(info.dtype), device="meta")


def read_lora(path: str, base_desc: str, *, allow_pickle: bool, shape_only: bool,
              base: BaseModel | None = None) -> LoraModel:
    """Read one LoRA for a bake (``shape_only``: alphas read, larger tensors shape-only, for a dry run); when its keys
    fit the base's architecture equally well (a FLUX.2 Klein 4B double-block attention LoRA is also a FLUX.1 one),
    read as the base's architecture (as ``doctor --base`` does)."""
    try:
        with open_weights(path, allow_pickle=allow_pickle) as f:
            view = _ShapeOnlyFile(f) if shape_only else f
            parsed = parse(view)
            if base is not None and parsed.arch.name != base.arch.name and \
                    base.arch.spec.label in parsed.detection.also_fits:
                parsed = parse(view, arch_name=base.arch.name)
            model = load(parsed)
            if not shape_only:
                require_finite_model(model)
            return model
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(f"{exc.message} It cannot be baked into {base_desc}.", path=exc.path,
                                           hint=exc.hint) from None


def check_architectures(loras: list[BakeInput], base: BaseModel, base_desc: str) -> None:
    """A LoRA of another architecture than the base's is refused before any work: none of its modules can apply."""
    for inp in loras:
        if inp.model.arch.name != base.arch.spec.name:
            raise UnsupportedArchitectureError(
                f"this is a {inp.model.arch.spec.label} LoRA ({inp.model.format}, {len(inp.model.patches)} modules); "
                f"it cannot be baked into {base_desc}, a {base.arch.spec.label} model.", path=inp.path,
                hint=f"bake it into a {inp.model.arch.spec.label} base model.")


def variant_labels(base: BaseModel) -> dict[str, str]:
    """Variant name -> label of the base's architecture."""
    return {v.name: v.label for v in base.arch.spec.variants}


def base_desc(base: BaseModel) -> str:
    """How messages name the base (``the base (FLUX.1-dev …)``)."""
    spec = base.arch.spec
    if not spec.variants:
        return f"the base ({spec.label})"
    return f"the base ({variant_labels(base).get(base.variant, base.variant)})"


def flagged_components() -> dict[str, ComponentSpec]:
    """Components with their own command-line flags (``--clip-l FILE --clip-l-out OUT``), from the layouts'
    :attr:`~lorakit.layouts.ComponentSpec.flag`; any component can be given as ``--component NAME=FILE:OUT``."""
    out: dict[str, ComponentSpec] = {}
    for n in available():
        for c in resolve(n).components.values():
            if c.flag:
                out.setdefault(c.name, c)
    return out


def component_flags() -> dict[str, str]:
    """component -> its command-line flag (see :func:`flagged_components`)."""
    return {name: c.flag for name, c in flagged_components().items()}


def flag_of(component: str) -> str:
    """How the command line names a separate file for a component."""
    flag = component_flags().get(component)
    return f"--{flag}" if flag else f"--component {component}=FILE"


def flag_hint(component: str) -> str:
    """The command-line options that give a component's separate file and its output."""
    flag = component_flags().get(component)
    return f"--{flag} FILE --{flag}-out OUT" if flag else f"--component {component}=FILE:OUT"


def check_strengths(loras: list[BakeInput]) -> None:
    """strength × α/r must be a float32 number: ΔW is accumulated in fp32 (torch refuses larger factors)."""
    big = torch.finfo(torch.float32).max
    for inp in loras:
        for p in inp.model.patches:
            scale = p.adapter.scale if p.adapter is not None else 1.0
            if not abs(inp.weight) <= big or not abs(inp.weight * scale) <= big:
                raise NonFiniteError(f"strength {inp.weight:g} × scale {scale:g} of {p.source or p.target} is beyond "
                                     f"the float32 range (±{big:.3g}) baking computes in; nothing was written.",
                                     path=inp.path, hint="give a strength of ordinary size, e.g. PATH:0.8.")


def check_zero_ups(loras: list[BakeInput]) -> None:
    """Refuse a LoRA whose every module has an all-zero up matrix (doctor: WILL NOT APPLY)."""
    for inp in loras:
        patches = inp.model.patches
        if patches and all(isinstance(p.adapter, LoRA) and not bool(p.adapter.up.ne(0).any()) for p in patches):
            raise CoverageError(f"nothing to bake: every one of the {len(patches)} modules has an all-zero up "
                                "matrix, so the LoRA changes nothing (saved before training started?)",
                                [os.path.basename(inp.path)], path=inp.path,
                                hint="use a trained checkpoint, or pass --allow-zero-lora to write the base anyway.")
