"""Low-rank linear algebra: exact SVD of factored sums, randomized SVD, dynamic rank rules.

All maths in fp32 (fp64 where asked). Dense matrices are avoided where factors suffice: the SVD of
``U_s·D_s`` comes from thin QRs of both factors and the SVD of an ``R × R`` core (``math.md`` §4.1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
from dataclasses import dataclass


from lorakit.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from lorakit.lazy import torch

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


@dataclass
class LowRank:
    """``ΔW ≈ up @ down`` with singular values ``s`` (descending) and the energy bookkeeping."""

    up: Tensor      # out × k   (U·Σ)
    down: Tensor    # k × in    (Vᵀ)
    s: Tensor       # all singular values available (descending), not only the kept ones
    rank: int

    @property
    def retained_energy(self) -> float:
        total = float(self.s.square().sum())
        return float(self.s[: self.rank].square().sum()) / total if total > 0 else 1.0

    @property
    def relative_error(self) -> float:
        """Frobenius error of the truncation relative to the full matrix (exact when ``s`` is complete)."""
        return math.sqrt(max(0.0, 1.0 - self.retained_energy))


def factored_svd(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact thin SVD of ``up @ down`` (``out × R`` times ``R × in``) without forming it.

    Returns ``(U, S, Vh)`` with ``U`` out × R, ``S`` R, ``Vh`` R × in.
    """
    qu, ru = torch.linalg.qr(up, mode="reduced")
    qd, rd = torch.linalg.qr(down.T, mode="reduced")
    core = ru @ rd.T
    um, s, vmh = torch.linalg.svd(core, full_matrices=False)
    return qu @ um, s, (qd @ vmh.T).T


def truncate(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> LowRank:
    """The rank-``rank`` factors of an SVD (``up = U_k·S_k``, ``down = Vh_k``)."""
    k = max(1, min(rank, s.numel()))
    return LowRank(up=u[:, :k] * s[:k], down=vh[:k], s=s, rank=k)


def dynamic_rank(s: Tensor, method: str, param: float, *, cap: int | None = None,
                 total_energy: float | None = None) -> int:
    """Rank chosen from singular values (clean definitions of sd-scripts' resize rules).

    - ``sv_ratio``: count of ``s_i > s_0 / param``;
    - ``sv_fro``: smallest k with ``Σ_{i<k} s_i² ≥ param² · Σ s_i²`` (keeps a fraction ``param`` of the norm);
    - ``sv_cumulative``: smallest k with ``Σ_{i<k} s_i ≥ param · Σ s_i``.
    Always at least 1 and at most ``cap``. When ``s`` holds only the leading values of a larger matrix
    (randomized SVD), pass ``total_energy = ‖D‖_F²`` so that ``sv_fro`` measures against the whole matrix;
    ``sv_cumulative`` then measures against the values given.
    """
    s = s.double()
    n = s.numel()
    if n == 0 or float(s[0]) <= 1e-12:
        return 1
    if method == "sv_ratio":
        if param <= 0:
            raise UsageError(f"sv_ratio needs a positive ratio, got {param}.")
        k = int((s > s[0] / param).sum())
    elif method == "sv_fro":
        total = float(s.square().sum()) if total_energy is None else max(float(total_energy), float(s.square().sum()))
        energy = torch.cumsum(s.square(), 0) / total
        k = int(torch.searchsorted(energy, torch.tensor(param * param, dtype=energy.dtype) - 1e-12)) + 1
    elif method == "sv_cumulative":
        mass = torch.cumsum(s, 0) / s.sum()
        k = int(torch.searchsorted(mass, torch.tensor(param, dtype=mass.dtype) - 1e-12)) + 1
    else:
        raise UsageError(f"unknown dynamic method {method!r}.", hint="use " + ", ".join(DYNAMIC_METHODS) + ".")
    k = max(1, min(k, n))
    return min(k, cap) if cap else k


def check_ranks(rank: int | None, conv_rank: int | None, dynamic: tuple[str, float] | None) -> None:
    """``--rank``/``--conv-rank`` at least 1 and a valid ``--dynamic`` rule (extract and resize share these checks)."""
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}.")
    if conv_rank is not None and conv_rank < 1:
        raise UsageError(f"--conv-rank must be at least 1, got {conv_rank}.")
    if dynamic is not None:
        parse_dynamic(f"{dynamic[0]}:{dynamic[1]}")


def parse_dynamic(text: str) -> tuple[str, float]:
    """``"sv_fro:0.9"`` → ``("sv_fro", 0.9)``."""
    method, sep, value = text.partition(":")
    if not sep or method not in DYNAMIC_METHODS:
        raise UsageError(f"bad --dynamic {text!r}.", hint="write METHOD:PARAM with METHOD one of "
                         + ", ".join(DYNAMIC_METHODS) + ", e.g. sv_fro:0.9.")
    try:
        p = float(value)
    except ValueError:
        raise UsageError(f"bad --dynamic parameter {value!r}.", hint="give a number, e.g. sv_ratio:8.") from None
    check_dynamic(method, p)
    return method, p


def check_dynamic(method: str, param: float) -> None:
    """The ranges every command shares: ``sv_fro``/``sv_cumulative`` take a fraction in (0, 1]; ``sv_ratio``
    a finite ratio > 1 (a ratio <= 1 keeps no singular value below the largest, i.e. always rank 1)."""
    if method in ("sv_fro", "sv_cumulative"):
        if not 0 < param <= 1:
            raise UsageError(f"--dynamic {method} needs a fraction in (0, 1], got {param}.",
                             hint=f"e.g. {method}:0.9 (the fraction of the {'norm' if method == 'sv_fro' else 'sum'} "
                                  "of singular values kept); for a fixed rank use --rank N.")
    elif method == "sv_ratio":
        if not (1 < param < math.inf):
            raise UsageError(f"--dynamic sv_ratio needs a finite ratio > 1, got {param}.",
                             hint="sv_ratio:R keeps the singular values above s_0/R, e.g. sv_ratio:8; "
                                  "for rank 1 use --rank 1.")
    else:
        raise UsageError(f"unknown dynamic method {method!r}.", hint="use " + ", ".join(DYNAMIC_METHODS) + ".")


def randomized_svd(d: Tensor, rank: int, *, oversample: int = 16, niter: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD of a dense matrix by randomized range finding, in the tall orientation.

    Deterministic for a given seed (the test matrix is drawn on the CPU, so the same seed gives the same
    sketch on any device). Power iterations are re-orthonormalised on the short side only: ``y = A·z``
    with orthonormal ``z`` is no worse conditioned than ``A`` on the sketch, so one tall QR at the end
    suffices (measured as accurate as orthonormalising both sides, with two fewer tall QRs).
    Returns ``(U, S, Vh)`` with ``min(rank + oversample, m, n)`` columns; ``U·diag(S)·Vh`` is the
    orthogonal projection of ``d`` onto the found range, so ``‖d‖² − ΣS²`` is its exact squared error.
    """
    wide = d.shape[0] < d.shape[1]
    a = d.T if wide else d
    m, n = a.shape
    q = min(rank + oversample, n, m)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, dtype=torch.float32).to(device=a.device, dtype=a.dtype)
    y = a @ omega
    for _ in range(niter):
        z, _ = torch.linalg.qr(a.T @ y, mode="reduced")     # n × q: cheap
        y = a @ z
    qm, _ = torch.linalg.qr(y, mode="reduced")                # the one QR of a tall m × q panel
    b = qm.T @ a
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = qm @ ub
    if wide:
        return vh.T, s, u.T
    return u, s, vh


def exact_svd(d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD in the tall orientation (transposing wide matrices is ~3× faster)."""
    if d.shape[0] < d.shape[1]:
        u, s, vh = torch.linalg.svd(d.T, full_matrices=False)
        return vh.T, s, u.T
    return torch.linalg.svd(d, full_matrices=False)


def gram_fro_norm(up: Tensor, down: Tensor) -> float:
    """‖up @ down‖_F via small Gram matrices: trace((upᵀup)(down downᵀ))."""
    g = (up.T @ up) * (down @ down.T)
    v = float(g.sum())
    if not math.isfinite(v):   # overflowed or NaN factors: an infinite norm, never a clamped 0
        return math.inf
    return math.sqrt(max(0.0, v))
