"""The alias transforms every path shares (read, write, bake, extract, diff): a row window of a fused weight,
swapped output halves (FLUX's final-layer ``[shift; scale]`` vs diffusers' ``[scale; shift]``), a weight the
checkpoint stores transposed (OpenCLIP's ``text_projection``), and the reshape between a 1×1 convolution and a
Linear weight (or a flattened ``(out, in·k·k)`` conv delta). All are exact."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from torch import Tensor
    from lorakit.lora.adapters import Adapter


class NotExact(Exception):
    """The requested restructuring cannot be expressed exactly in this adapter kind."""


def swap_halves(t: Tensor) -> Tensor:
    """``t`` with its first and second halves of rows exchanged (its own inverse)."""
    n = t.shape[0]
    if n % 2:
        raise NotExact(f"cannot swap halves of {n} rows")
    h = n // 2
    return t.roll(h, dims=0) if t.dim() else t


def swap_parts(adapter: "Adapter | None", bias: Tensor | None, dora: Tensor | None, *,
               densify: bool = False) -> tuple["Adapter | None", Tensor | None, Tensor | None]:
    """An adapter with its bias and DoRA magnitude, output halves swapped. An adapter kind that cannot swap
    exactly raises NotExact, or with ``densify`` becomes its exact dense diff. An input-axis magnitude
    ``(1, in)`` is per column: swapping rows leaves it as it is."""
    if adapter is not None:
        try:
            adapter = adapter.swap_halves()
        except NotExact:
            if not densify:
                raise
            from lorakit.lora.adapters import Full
            adapter = Full(alpha=None, diff=swap_halves(adapter.dense()).to(adapter.dtype))
    return adapter, (swap_halves(bias) if bias is not None else None), (
        swap_halves(dora) if dora is not None and dora.dim() == 1 and dora.shape[0] > 1 else dora)


def stored_to_native(t: Tensor, *, swap: bool = False, transpose: bool = False) -> Tensor:
    """A checkpoint tensor in the native (ΔW) orientation: halves swapped back, transposed back."""
    if transpose:
        t = t.transpose(0, 1)
    return swap_halves(t) if swap else t


def native_to_stored(t: Tensor, *, swap: bool = False, transpose: bool = False) -> Tensor:
    """A native-orientation tensor (ΔW) as the checkpoint stores it (inverse of :func:`stored_to_native`)."""
    if swap:
        t = swap_halves(t)
    return t.transpose(0, 1) if transpose else t


def fit_shape(delta: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``delta`` in the weight's ``shape``: the same values, reshaped between a 1×1 convolution and a Linear
    weight or from a flattened ``(out, in·k·k)`` conv delta. ValueError when the sizes differ."""
    shape = tuple(shape)
    if tuple(delta.shape) == shape:
        return delta
    if delta.dim() and delta.shape[0] == shape[0] and delta.numel() == math.prod(shape):
        return delta.reshape(shape)
    raise ValueError(f"a delta of shape {list(delta.shape)} does not fit a weight of shape {list(shape)}")
