"""Extraction options: defaults, their checks, and the options every module's factorisation uses."""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
from collections.abc import Callable
from dataclasses import dataclass


from lorakit.errors import UsageError
from lorakit.formats import WRITABLE
from lorakit.lora.linalg import check_ranks
from lorakit.ops.extraction.pairing import Job

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch


Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ExtractOptions:
    """The decomposition and selection options of one run."""

    cap: int
    conv_rank: int | None
    dyn: tuple[str, float] | None
    exact: bool
    oversample: int
    niter: int
    seed: int
    alpha: float | None
    min_diff: float
    te_min_diff: float
    include_bias: bool
    include_norms: bool
    clamp_quantile: float | None
    dev: torch.device
    out_dtype: torch.dtype

    def rank_cap(self, job: Job) -> int | None:
        """The rank (cap) of a job: ``conv_rank`` for k×k convolutions (None: left out), else ``cap``."""
        return self.conv_rank if job.spatial else self.cap


def validate_options(rank: int | None, dyn: tuple[str, float] | None, conv_rank: int | None, min_diff: float,
                     te_min_diff: float, to: str, alpha: float | None, oversample: int, niter: int,
                     include_norms: bool) -> None:
    """Refuse inconsistent extract options before any file is read (UsageError with the fix)."""
    if rank is None and dyn is None:
        raise UsageError("no rank given.", hint="pass --rank N (e.g. --rank 64) or --dynamic METHOD:PARAM "
                                                "(e.g. --dynamic sv_fro:0.9 --rank 128).")
    check_ranks(rank, conv_rank, dyn)
    if not min_diff >= 0:
        raise UsageError(f"--min-diff must be ≥ 0, got {min_diff}.")
    if not te_min_diff >= 0:
        raise UsageError(f"--te-min-diff must be ≥ 0, got {te_min_diff}.")
    if to not in WRITABLE:
        raise UsageError(f"cannot write format {to!r}.", hint="choose one of: " + ", ".join(WRITABLE) + ".")
    if alpha is not None and not (alpha > 0 and math.isfinite(alpha)):
        raise UsageError(f"--alpha must be a positive number, got {alpha}.")
    if oversample < 0 or niter < 0:
        raise UsageError("--oversample and --niter must be ≥ 0.")
