"""The quantization noise floor of a difference between two (possibly quantized) models: how much of
``D = W_tuned − W_original`` rounding alone can explain. Each side's rounding noise is estimated by its codec
while the tensor is decoded (:meth:`~lorakit.base.quant.codecs.Codec.noise`); the floor of one module is
``sqrt(Σ noise²) / ‖D‖`` over the tensors of both sides."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lorakit.base.quant.view import QuantizedFile
from lorakit.io import WeightFile

#: a module whose difference is at most this many times its noise floor is flagged as mostly rounding
NOISE_WARN = 0.5


def track_noise(*files: WeightFile) -> None:
    """Have quantized files estimate their rounding noise while they decode (:func:`noise_floor` reads it)."""
    for f in files:
        if isinstance(f, QuantizedFile):
            f.track_noise = True


def noise_floor(d: torch.Tensor, tensors: Sequence[tuple[WeightFile, str]]) -> float:
    """The estimated rounding noise of ``tensors`` (both sides' files and keys) relative to ``‖d‖``; 0 if none."""
    total = 0.0
    for file, key in tensors:
        if isinstance(file, QuantizedFile):
            total += file.noise.get(key, 0.0) ** 2
    if total == 0.0:
        return 0.0
    norm = float(d.double().norm())
    return math.sqrt(total) / norm if norm > 0 else math.inf


def noise_warnings(floors: Sequence[tuple[str, float]], files: Sequence[WeightFile]) -> list[str]:
    """The extract warning about quantized inputs: the largest floor, and the modules where it dominates."""
    quantized = [f for f in files if isinstance(f, QuantizedFile)]
    if not quantized:
        return []
    noisy = [(m, f) for m, f in floors if f >= NOISE_WARN]
    worst = max(floors, key=lambda mf: mf[1], default=("", 0.0))
    text = (f"quantized input ({'; '.join(f.describe() for f in quantized)}): the estimated rounding noise is up to "
            f"{worst[1]:.0%} of a module's difference ({worst[0]})")
    if noisy:
        text += (f"; in {len(noisy)} module(s) it is ≥ {NOISE_WARN:.0%}, so much of what was extracted there is "
                 "quantization rounding, not fine-tuning (extract from the bf16/fp16 originals to avoid it)")
    return [text + "."]
