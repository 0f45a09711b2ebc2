"""The ``--device`` option: cpu or cuda (``cuda:N``), checked before any work."""

from __future__ import annotations

from typing import TYPE_CHECKING


from lorakit.errors import UsageError

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch


def parse_device(device: str) -> torch.device:
    """The torch device named ``device``; UsageError for an unknown name or a CUDA device torch cannot see."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}.", hint="use cpu or cuda.") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {device!r}.", hint="use cpu or cuda.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available to torch.",
                         hint="use --device cpu (the default).")
    return dev
