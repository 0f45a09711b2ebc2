"""How much of a baked delta survives requantization.

For one tensor with source values ``W`` (the dequantized base: already on the quantization grid, so
``Q(W) = W``), intended delta ``ΔW`` and written values ``Q(W + ΔW)`` (dequantized back):

- **retention** ``‖Q(W + ΔW) − Q(W)‖ / ‖ΔW‖``: 1 when the delta arrives intact, 0 when it rounds away;
- **error** ``‖Q(W + ΔW) − (W + ΔW)‖ / ‖ΔW‖``: the rounding the write adds, relative to the delta.

Per block (the tensor name up to its first block index, e.g. ``blocks.3``) the norms are pooled; a block whose
retention is below :data:`WARN_RETENTION` is named in a warning with the fixes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

WARN_RETENTION = 0.5
WARN_ERROR = 0.5         # rounding noise at least half the delta's norm: the delta arrives, buried in noise
FIX_HINT = "write a wider format (--dtype bf16) or a finer quant type (GGUF Q8_0 rather than Q4_x/Q5_x)"


@dataclass(frozen=True)
class Retained:
    tensor: str
    scheme: str
    policy: str
    delta_norm: float        # ‖ΔW‖
    kept_norm: float         # ‖Q(W+ΔW) − W‖
    error_norm: float        # ‖Q(W+ΔW) − (W+ΔW)‖

    @property
    def retention(self) -> float:
        return self.kept_norm / self.delta_norm if self.delta_norm > 0 else 1.0

    @property
    def error(self) -> float:
        return self.error_norm / self.delta_norm if self.delta_norm > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "retention": self.retention, "error": self.error}


CHUNK = 1 << 22      # elements per step: the differences never need more than a few tens of MB


def measure(tensor: str, scheme: str, policy: str, source: torch.Tensor, intended: torch.Tensor,
            written: torch.Tensor) -> Retained:
    """Norms of one tensor's delta before and after requantization (see the module docstring): fp32 differences
    in chunks, dot products accumulated by BLAS per chunk and summed in double precision."""
    s, i, w = (t.reshape(-1) for t in (source, intended, written))
    dd = kk = ee = 0.0
    for a in range(0, s.numel(), CHUNK):
        sc = s[a:a + CHUNK].to(torch.float32)
        d = i[a:a + CHUNK].to(torch.float32) - sc
        k = w[a:a + CHUNK].to(torch.float32) - sc
        dd += float(torch.dot(d, d))
        kk += float(torch.dot(k, k))
        k.sub_(d)
        ee += float(torch.dot(k, k))
    return Retained(tensor, scheme, policy, math.sqrt(dd), math.sqrt(kk), math.sqrt(ee))


def block_of(tensor: str) -> str:
    """The tensor name up to and including its first numeric component (``a.b.3.c`` → ``a.b.3``), else its module."""
    parts = tensor.split(".")
    for j, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:j + 1])
    return ".".join(parts[:-1]) or tensor


@dataclass(frozen=True)
class BlockRetention:
    block: str
    tensors: int
    retention: float
    error: float

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def by_block(items: Iterable[Retained]) -> list[BlockRetention]:
    """Retention and error per block, the norms pooled over the block's tensors."""
    pooled: dict[str, list[float]] = {}
    for r in items:
        acc = pooled.setdefault(block_of(r.tensor), [0, 0.0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += r.delta_norm ** 2
        acc[2] += r.kept_norm ** 2
        acc[3] += r.error_norm ** 2
    out = []
    for block, (n, d, k, e) in pooled.items():
        out.append(BlockRetention(block, int(n), math.sqrt(k / d) if d > 0 else 1.0, math.sqrt(e / d) if d > 0 else 0.0))
    return out


def overall(items: Iterable[Retained]) -> float:
    """The retention of all tensors together (pooled norms)."""
    d = k = 0.0
    for r in items:
        d += r.delta_norm ** 2
        k += r.kept_norm ** 2
    return math.sqrt(k / d) if d > 0 else 1.0


def warnings_for(items: list[Retained], threshold: float = WARN_RETENTION, noise: float = WARN_ERROR) -> list[str]:
    """Warnings for blocks under the retention floor or whose rounding noise reaches ``noise`` × the delta."""
    blocks = by_block(items)
    out = []
    low = [b for b in blocks if b.retention < threshold]
    if low:
        worst = min(low, key=lambda b: b.retention)
        out.append(f"only {worst.retention:.0%} of the LoRA's delta survives requantization in {worst.block} "
                   f"({len(low)} of {len(blocks)} blocks under {threshold:.0%}); {FIX_HINT}.")
    noisy = [b for b in blocks if b.error >= noise and b not in low]
    if noisy:
        worst = max(noisy, key=lambda b: b.error)
        out.append(f"requantization adds rounding noise of {worst.error:.0%} of the LoRA's delta in {worst.block} "
                   f"({len(noisy)} of {len(blocks)} blocks at {noise:.0%} or more): much of the delta is below the "
                   f"quantization step; {FIX_HINT}.")
    return out
