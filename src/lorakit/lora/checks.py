"""Input checks shared by every command that computes with tensors (merge, bake, extract, resize).

``require_finite`` refuses NaN/Inf with :class:`~lorakit.errors.NonFiniteError`, naming the file and the
tensors; call it on LoRA models (``require_finite_model``) before a computation spreads the NaN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
from collections.abc import Iterable, Mapping


from lorakit.errors import NonFiniteError
from lorakit.lora.model import LoraModel

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch


def _elementwise_finite(t: torch.Tensor) -> bool:
    if not (t.is_floating_point() or t.is_complex()):
        return True
    return bool(torch.isfinite(t).all()) if t.dtype in (torch.float32, torch.float64) else \
        bool(torch.isfinite(t.float()).all())


def _finite(t: torch.Tensor) -> bool:
    """Every value finite. A finite sum proves it (NaN/Inf always propagate to the sum), which is several times
    cheaper than an element-wise check on low-precision tensors; only a non-finite sum is decided element-wise."""
    return all_finite(t)


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
        tensors: list[tuple[str, torch.Tensor | None]] = (
            list(p.adapter._fields().items()) if p.adapter is not None else [])
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


def all_finite(t: torch.Tensor) -> bool:
    """Every value of ``t`` finite; fast path: a finite sum proves it (NaN/Inf always propagate to the sum)."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    x = t if t.element_size() > 1 else t.float()     # fp8 has no sum/isfinite kernels
    if bool(torch.isfinite(x.sum())):
        return True
    return _elementwise_finite(x)     # the sum of finite values may itself overflow: decide element-wise


def require_finite_output(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], *,
                          path: str | None, cause: str, hint: str) -> None:
    """Refuse to write NaN/Inf: raise NonFiniteError naming the tensors and ``cause`` (call before writing)."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    bad = [name for name, t in items if t is not None and not all_finite(t)]
    if bad:
        shown = ", ".join(repr(b) for b in bad[:3]) + (f" … and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(f"the output would hold NaN or Inf in {len(bad)} tensor(s) ({shown}): {cause}; "
                             "nothing was written.", path=path, hint=hint)


def dtype_range_cause(dtype: torch.dtype | None) -> str:
    """'exceed the <dtype> range …' for the output dtype (fp32 when ``dtype`` is None or not a float)."""
    d = dtype if dtype is not None and dtype.is_floating_point else torch.float32
    return f"exceed the {str(d).replace('torch.', '')} range (largest finite {torch.finfo(d).max:.3g})"


MEMORY_SAFETY_FRACTION = 0.5


def available_memory() -> int | None:
    """Bytes the kernel reports as available (``MemAvailable`` of /proc/meminfo), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def require_dense_fits(module: str, shape: Iterable[int], copies: int, *, path: str | None, fix: str) -> None:
    """Refuse (MemoryBudgetError) to densify a ``shape`` fp32 ΔW ``copies`` times when that exceeds
    :data:`MEMORY_SAFETY_FRACTION` of the available memory."""
    from lorakit.errors import MemoryBudgetError
    dense = math.prod(int(d) for d in shape) * 4
    avail = available_memory()
    if avail is None or dense * copies <= avail * MEMORY_SAFETY_FRACTION:
        return
    dims = "×".join(str(int(d)) for d in shape)
    raise MemoryBudgetError(f"module {module!r}: its dense ΔW ({dims}) takes {dense / 2**30:.3g} GiB in fp32 "
                            f"and this operation needs about {copies} such copies ({dense * copies / 2**30:.3g} GiB), "
                            f"but only {avail / 2**30:.3g} GiB of memory is available.", path=path, hint=fix)
