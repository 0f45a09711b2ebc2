"""The bake's hook for quantized bases (ComfyUI scaled fp8 in both conventions, mixed precision, GGUF).

The base is read through its dequantized view (:mod:`lorakit.base.quant`), tasks are planned on the view's
logical tensors exactly as for a plain base, and the tasks' arithmetic (:class:`~lorakit.ops.baking.compute.
Compute`: W0 + Σ w·ΔW and DoRA, in fp32) runs on each whole dequantized tensor; the output is then written in the
base's own format by :func:`lorakit.base.quant.requant.write_baked` (requantized with the source's scheme and
scale policy, untouched tensors copied byte for byte), and the report gets the delta retention per block.
Plain fp8 checkpoints (no scales) are not claimed: the streaming pipeline bakes them as it bakes any dtype.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from lorakit.base.quant import QuantizedFile, dequantized
from lorakit.base.quant.requant import measure_baked, write_baked
from lorakit.base.quant.retention import by_block, overall, warnings_for
from lorakit.io import WeightFile
from lorakit.ops.baking.compute import Compute
from lorakit.ops.baking.report import BakeReport
from lorakit.ops.baking.tasks import Task
from lorakit.ops.metadata import carry_over

#: conventions the streaming pipeline bakes itself (their stored values are their values)
PIPELINE_CONVENTIONS = {"plain fp8"}


def quantized_base(file: WeightFile) -> QuantizedFile | None:
    """The dequantized view of ``file`` when baking it needs requantization; None for a plain base."""
    view = dequantized(file)
    if isinstance(view, QuantizedFile) and view.convention not in PIPELINE_CONVENTIONS:
        return view
    return None


def bake_quantized(view: QuantizedFile, output: str | None, tasks: Sequence[Task], report: BakeReport,
                   metadata: dict[str, str], *, device: torch.device, chunk_bytes: int, inputs: Sequence[str],
                   dtype: torch.dtype | None = None, requant: str | None = None,
                   progress: Callable[[int, int, str], None] | None = None) -> None:
    """Write the bake of ``tasks`` (planned on ``view``) in the base's format, or with ``output`` None only measure
    what would survive of each delta (doctor's prediction); fills ``report``."""
    compute = Compute(device, chunk_bytes)
    changed = {t.key: t for t in tasks if t.changed}
    total = os.path.getsize(view.path)
    done = [0]

    def update(name: str, values: torch.Tensor) -> None:
        task = changed[name]
        work = values.reshape(1) if values.dim() == 0 else values
        dev = work.to(device)
        compute.run(task, 0, task.rows, dev, dev)
        if dev is not work:
            work.copy_(dev.to(work.device))
        for u in {id(u): u for u in (*task.additive, *task.doras)}.values():
            u.done()
        done[0] += 1
        if progress is not None:    # bytes of the base, in proportion to the tensors baked
            progress(total * done[0] // max(1, len(changed)), total, name)

    meta = {**carry_over(view.metadata), **metadata}
    if output is None:
        result = measure_baked(view, list(changed), update, requant=requant, dtype=dtype, device=device)
    else:
        result = write_baked(view, output, list(changed), update, metadata=meta, inputs=inputs, requant=requant,
                             dtype=dtype, device=device)
        report.output = result.path
        report.bytes_out = os.path.getsize(result.path)
    report.bytes_in = os.path.getsize(view.path)
    report.quantized = {
        "convention": view.describe(),
        "requantized": len(result.retained),
        "copied": result.copied,
        "retention": overall(result.retained),
        "blocks": [b.to_json() for b in by_block(result.retained)],
        "tensors": [r.to_json() for r in result.retained],
        "requantized_as": result.requantized_as,
        "policy": sorted({r.policy for r in result.retained}),
    }
    report.warnings += warnings_for(result.retained)
