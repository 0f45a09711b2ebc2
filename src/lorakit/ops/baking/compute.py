"""The arithmetic of a bake: W0 + Σ w·ΔW (and DoRA) on row blocks of a tensor, in fp32."""

from __future__ import annotations

from typing import TYPE_CHECKING

import os
from collections.abc import Callable


from lorakit.errors import NonFiniteError
from lorakit.lora.adapters import LoKr, NotExact
from lorakit.lora.checks import all_finite
from lorakit.ops.baking.tasks import Task, Use

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch


WORK_ELEMENTS = 3 << 20               # fp32 elements per compute block (cache-friendly, ~12 MB)


def _delta_rows(u: Use, a: int, b: int, device: torch.device) -> torch.Tensor:
    """Rows a:b (relative to the patch window) of the patch's dense ΔW (strength 1), fp32."""
    adapter = u.patch.adapter
    assert adapter is not None
    try:
        d = adapter.row_slice(a, b).dense()
    except NotExact:
        if isinstance(adapter, LoKr):
            # rows of kron(w1, w2) come in blocks of k = rows of w2: densify only the blocks that cover [a, b)
            k = int((adapter.w2 if adapter.w2 is not None else adapter.w2a).shape[0])  # type: ignore[union-attr]
            a0, b0 = a // k * k, -(-b // k) * k
            d = adapter.row_slice(a0, b0).dense()[a - a0:b - a0]
        else:
            d = adapter.dense()[a:b]
    return d.reshape(b - a, -1).to(device, torch.float32)


def _add_delta(dst: torch.Tensor, u: Use, a: int, b: int, device: torch.device) -> None:
    f = u.factors(device)
    adapter = u.patch.adapter
    flat = dst.view(dst.shape[0], -1)
    if "up" in f:
        flat.addmm_(f["up"][a:b], f["down"], alpha=adapter.scale * u.weight)  # type: ignore[union-attr]
    else:
        flat.add_(_delta_rows(u, a, b, device), alpha=u.weight)


def _apply(work: torch.Tensor, task: Task, n0: int, device: torch.device,
           scratch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Add every patch's rows that land in native rows [n0, n0 + len(work)) to ``work`` (fp32, holds W0).

    DoRA patches are evaluated against the base weight W0 (PEFT's forward semantics): each contributes
    ``m ⊙ (W0 + s·ΔW)/‖W0 + s·ΔW‖ − W0``; additive patches contribute ``w·ΔW``; the sum is order-free.
    """
    n1 = n0 + work.shape[0]
    acc = None
    if task.doras:
        acc_buf, tmp_buf = scratch(work.numel())
        acc = acc_buf[:work.numel()].view_as(work).zero_()
        for u in task.doras:
            lo, hi = max(n0, u.window[0]), min(n1, u.window[1])
            if lo >= hi:
                continue
            w0, a, b = work[lo - n0:hi - n0], lo - u.window[0], hi - u.window[0]
            t = tmp_buf[:w0.numel()].view_as(w0)
            t.copy_(w0)
            if u.patch.adapter is not None:
                _add_delta(t, u, a, b, device)
            m = u.factors(device)["dora"]
            flat = t.view(t.shape[0], -1)
            if u.dora_axis == "in" and m.numel() != flat.shape[1]:
                # one magnitude per input channel of a conv (LyCORIS wd_on_output=False): the norm over the output
                # rows and the kernel positions of each channel
                flat = t.view(t.shape[0], m.numel(), -1)
                norm = torch.linalg.vector_norm(flat, dim=(0, 2), keepdim=True)
                mag = m.reshape(1, -1, 1)
            elif u.dora_axis == "in":
                norm = torch.linalg.vector_norm(flat, dim=0, keepdim=True)
                mag = m.reshape(1, -1)
            else:
                norm = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
                mag = m.reshape(-1)[a:b].reshape(-1, 1)
            flat.mul_(mag / norm.clamp_min_(torch.finfo(torch.float32).tiny))
            t.sub_(w0)
            acc[lo - n0:hi - n0].add_(t)
    bias = task.place.param == "bias"  # type: ignore[union-attr]
    # replacement values (BFL control LoRAs' norm scales) first: they take the place of W0, whatever the
    # strength, as flux/util.py's load_state_dict does; additive patches then add to them
    for u in sorted(task.additive, key=lambda u: not u.patch.replace):
        lo, hi = max(n0, u.window[0]), min(n1, u.window[1])
        if lo >= hi:
            continue
        dst, a, b = work[lo - n0:hi - n0], lo - u.window[0], hi - u.window[0]
        if u.patch.replace:
            dst.view(dst.shape[0], -1).copy_(_delta_rows(u, a, b, device))
        elif bias:
            dst.add_(u.factors(device)["bias"][a:b], alpha=u.weight)
        else:
            _add_delta(dst, u, a, b, device)
    if acc is not None:
        work.add_(acc)


def _apply_transposed(work: torch.Tensor, task: Task, c0: int, device: torch.device) -> None:
    """Add ``Σ w·ΔWᵀ`` to rows of a tensor the base stores transposed (``work`` = native columns
    [c0, c0 + len(work)) of every native row; additive patches only, see :func:`lorakit.ops.baking.coverage._fit`)."""
    c1 = c0 + work.shape[0]
    for u in task.additive:
        lo, hi = u.window
        f = u.factors(device)
        if "up" in f:
            d = f["down"][:, c0:c1].t() @ f["up"].t()
            work[:, lo:hi].add_(d, alpha=u.patch.adapter.scale * u.weight)  # type: ignore[union-attr]
        else:
            d = _delta_rows(u, 0, hi - lo, device)[:, c0:c1].t()
            work[:, lo:hi].add_(d, alpha=u.weight)


class Compute:
    def __init__(self, device: torch.device, chunk_bytes: int) -> None:
        self.device = device
        elems = WORK_ELEMENTS if device.type == "cpu" else chunk_bytes // 2
        self.work = torch.empty(elems, dtype=torch.float32, device=device)
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None

    def scratch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two fp32 buffers of at least ``n`` elements (DoRA only), reused across blocks."""
        if self._scratch is None or self._scratch[0].numel() < n:
            self._scratch = (torch.empty(n, dtype=torch.float32, device=self.device),
                             torch.empty(n, dtype=torch.float32, device=self.device))
        return self._scratch

    def run(self, task: Task, j0: int, j1: int, src: torch.Tensor, out: torch.Tensor) -> None:
        lim = _fp8_limit(out.dtype)
        if not task.changed:
            out.copy_(src if lim is None else src.float().clamp_(-lim, lim))
            return
        rows = j1 - j0
        per = task.row_elems
        if task.whole or self.work.numel() < per:
            block = rows
            work_buf = torch.empty(rows * per, dtype=torch.float32, device=self.device) \
                if self.work.numel() < rows * per else self.work
        else:
            block = max(1, self.work.numel() // per)
            work_buf = self.work
        for b0 in range(0, rows, block):
            b1 = min(rows, b0 + block)
            w = work_buf[: (b1 - b0) * per].view(b1 - b0, *src.shape[1:])
            w.copy_(src[b0:b1])
            if task.place.transpose:  # type: ignore[union-attr]
                _apply_transposed(w, task, j0 + b0, self.device)
            else:
                _apply(w, task, task.place.native_row(j0 + b0), self.device, self.scratch)  # type: ignore[union-attr]
            if not all_finite(w):      # checked before the fp8 clamp, which would hide an overflow
                raise _overflow(task, src[b0:b1], torch.float32)
            if lim is not None:
                w.clamp_(-lim, lim)
            out[b0:b1].copy_(w)
            if lim is None and out.dtype != torch.float32 and not all_finite(out[b0:b1]):
                raise _overflow(task, src[b0:b1], out.dtype)


def _overflow(task: Task, src: torch.Tensor, dtype: torch.dtype) -> NonFiniteError:
    """The error for a baked tensor that is not finite: the base's own NaN/Inf, or W + Σ w·ΔW overflowing."""
    spelled = str(dtype).replace("torch.", "")
    if not all_finite(src):
        return NonFiniteError(f"base tensor {task.key!r} already holds NaN or Inf values; nothing was written.",
                              path=task.info.file, hint="use an intact copy of the base model.")
    names = ", ".join(sorted({os.path.basename(u.patch.source or str(u.patch.target)) for u in
                              (*task.additive, *task.doras)})[:3])
    return NonFiniteError(f"baking {task.key!r} overflows {spelled} (W + strength·ΔW of {names} is beyond "
                          f"±{torch.finfo(dtype).max:.3g}); nothing was written.", path=task.info.file,
                          hint="lower the LoRA strength (PATH:WEIGHT), or write a wider --dtype (fp32/bf16).")


def _fp8_limit(dtype: torch.dtype) -> float | None:
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return float(torch.finfo(dtype).max)
    return None
