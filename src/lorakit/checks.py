"""Input checks shared by every command that computes with tensors (merge, bake, extract, resize).

``require_finite`` refuses NaN/Inf with :class:`~lorakit.errors.NonFiniteError`, naming the file and the
tensors; call it on LoRA models (``require_finite_model``) before a computation spreads the NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from .errors import NonFiniteError
from .model import LoraModel


def _finite(t: torch.Tensor) -> bool:
    if not (t.is_floating_point() or t.is_complex()):
        return True
    return bool(torch.isfinite(t).all()) if t.dtype in (torch.float32, torch.float64) else \
        bool(torch.isfinite(t.float()).all())


def nonfinite_names(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors that hold NaN or Inf values."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    return [name for name, t in items if t is not None and not _finite(t)]


def require_finite(tensors: torch.Tensor | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], *,
                   name: str = "tensor", path: str | None = None) -> None:
    """Raise NonFiniteError if any tensor holds NaN or Inf."""
    if isinstance(tensors, torch.Tensor):
        bad = [] if _finite(tensors) else [name]
    else:
        bad = nonfinite_names(tensors)
    if bad:
        shown = ", ".join(repr(b) for b in bad[:5]) + (f" … and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(f"{len(bad)} tensor(s) hold NaN or Inf values ({shown}).", path=path,
                             hint="the input is corrupt or diverged in training; `lorakit doctor` lists the "
                                  "affected modules. lorakit will not compute with it.")


def nonfinite_modules(model: LoraModel) -> list[str]:
    """Source module names of patches whose factors, bias, DoRA magnitude, α or scale hold NaN/Inf."""
    bad = []
    for p in model.patches:
        tensors = list(p.adapter._fields().items()) if p.adapter is not None else []
        tensors += [("bias", p.bias), ("dora", p.dora)]
        scalar_bad = p.adapter is not None and not (
            (p.adapter.alpha is None or math.isfinite(p.adapter.alpha)) and math.isfinite(p.adapter.scale))
        if scalar_bad or nonfinite_names([(k, v) for k, v in tensors if v is not None]):
            bad.append(p.source or str(p.target))
    return bad


def require_finite_model(model: LoraModel) -> None:
    """Raise NonFiniteError if any module of ``model`` holds NaN/Inf factors or alpha."""
    bad = nonfinite_modules(model)
    if bad:
        shown = ", ".join(repr(b) for b in bad[:5]) + (f" … and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(f"{len(bad)} module(s) hold NaN or Inf values (factors or alpha) ({shown}).",
                             path=model.path,
                             hint="the LoRA is corrupt or diverged in training; `lorakit doctor` lists the "
                                  "affected modules. lorakit will not compute with it.")
