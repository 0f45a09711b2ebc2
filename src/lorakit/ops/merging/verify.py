"""Checking a written merge against the contributions it was built from."""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
from collections.abc import Sequence


from lorakit.lora.linalg import gram_fro_norm
from lorakit.lora.model import ArchInstance, LoraModel, Target
from lorakit.ops.blocks import BlockWeights
from lorakit.ops.merging.contributions import Contribution, dense_sum, target_shape
from lorakit.ops.merging.methods import dense_merge, stacked_factors
from lorakit.ops.merging.plan import MergeOptions, scaled_bias
from lorakit.ops.merging.registry import get_merge_method

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from lorakit.lazy import torch


def verify_merge(written: LoraModel, expected: dict[Target, list[Contribution]], arch: ArchInstance,
                 options: MergeOptions, weights: Sequence[float], blocks: BlockWeights | None) -> dict[str, object]:
    """Relative Frobenius error per module of the written file against the exact target.

    concat/svd: the target is ``Σ coef·ΔW_i``; the error comes from one stacked factorisation
    ``[B_out | −c·B_i]·[A_out; A_i]`` and small Gram matrices (fp64), without densifying.
    ties/dare: the target is the module's dense ties/dare result before truncation.
    """
    got = written.by_target()
    dense = get_merge_method(options.method).combine is not None
    errors: dict[str, float] = {}
    for target in sorted(set(expected) | set(got), key=str):
        contribs = expected.get(target, [])
        mine = [Contribution(-1, 1.0, p.rows, p.adapter, p.bias) for p in got.get(target, [])]
        shape = target_shape(arch, target, contribs + mine)
        ref_bias = scaled_bias(contribs, shape[0])
        out_bias = scaled_bias(mine, shape[0])
        bias_diff = _norm2(_sub(out_bias, ref_bias))
        bias_ref = _norm2(ref_bias)
        if dense and not target.loose:
            ref = dense_merge(target, contribs, shape, options, weights,
                              blocks.multiplier(target) if blocks else 1.0) if contribs else None
            ref = ref if ref is not None else torch.zeros(shape)
            out = dense_sum(mine, shape)
            num, den = float((out - ref).double().square().sum()), float(ref.double().square().sum())
        else:
            negated = [Contribution(c.input, -c.coef, c.rows, c.adapter, c.bias) for c in contribs]
            both = stacked_factors(mine + negated, shape[0], torch.float64)
            only_ref = stacked_factors(contribs, shape[0], torch.float64)
            if both is not None and (only_ref is not None or all(c.adapter is None for c in contribs)):
                num = gram_fro_norm(*both) ** 2
                den = gram_fro_norm(*only_ref) ** 2 if only_ref is not None else 0.0
            else:
                ref = dense_sum(contribs, shape).double()
                num = float((dense_sum(mine, shape).double() - ref).square().sum())
                den = float(ref.square().sum())
        num += bias_diff
        den += bias_ref
        errors[str(target)] = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
    worst = max(errors.items(), key=lambda kv: kv[1]) if errors else ("-", 0.0)
    return {"reference": "dense ties/dare result" if dense else "exact weighted sum",
            "max_relative_error": worst[1], "worst_module": worst[0], "modules": errors}


def _sub(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return -b if b is not None else None
    return a - b if b is not None else a


def _norm2(t: Tensor | None) -> float:
    return float(t.double().square().sum()) if t is not None else 0.0
