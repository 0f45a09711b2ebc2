"""The built-in merge methods: concat (exact), svd (exact top-k from stacked factors), ties / dare_linear /
dare_ties (dense, then truncated)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
from collections.abc import Callable, Iterable, Sequence


from lorakit.errors import MergeError, NonFiniteError
from lorakit.formats.emit import is_pow2
from lorakit.lora.adapters import Full, LoRA
from lorakit.lora.checks import all_finite, require_dense_fits
from lorakit.lora.linalg import dynamic_rank, exact_svd, factored_svd, truncate
from lorakit.lora.model import Patch, Target
from lorakit.ops.merging.contributions import Contribution, dense_sum, factor_form, module_seed, rank_of
from lorakit.ops.merging.dense import combine_dense, dare_pruned, magnitude_prune, sign_elected, weighted_stack
from lorakit.ops.merging.plan import MergeOptions, scaled_bias
from lorakit.ops.merging.registry import (DenseCombine, MergeMethod, get_merge_method, merge_method,
                                          register_merge_method)
from lorakit.ops.merging.report import ModuleStat

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from lorakit.lazy import torch


def _fold(up: Tensor, down: Tensor, c: float) -> tuple[Tensor, Tensor]:
    """Fold the coefficient into the factors: all on up when |c| is a power of two (exact), else √|c| each."""
    if c == 1:
        return up, down
    if is_pow2(c):
        return up * c, down
    root = math.sqrt(abs(c))
    return up * root, down * (root if c > 0 else -root)


@merge_method("concat", exact=True, options=("kohya_ratios",),
              help="exact: every input's factors stacked along the rank (ranks add up)")
def _concat(target: Target, contribs: list[Contribution], shape: tuple[int, ...], options: MergeOptions,
            weights: Sequence[float] = (), multiplier: float = 1.0) -> tuple[list[Patch], ModuleStat]:
    forms = [factor_form(c.adapter) if c.adapter is not None else None for c in contribs]
    dense_needed = any(c.adapter is not None and f is None for c, f in zip(contribs, forms))
    if dense_needed:
        if not options.allow_full:
            kinds = sorted({c.adapter.kind for c, f in zip(contribs, forms) if c.adapter is not None and f is None})
            raise MergeError(f"{target}: {'/'.join(kinds)} modules cannot be concatenated exactly as LoRA factors "
                             "and this output format cannot hold a full diff.",
                             hint="use --method svd (reports the truncation error), or --to kohya / comfy.")
        total = dense_sum(contribs, shape)
        bias = scaled_bias(contribs, shape[0])
        return [Patch(target, Full(alpha=None, diff=total), None, bias=bias)], \
            ModuleStat(str(target), 0)
    patches = []
    rank = 0
    for c, f in zip(contribs, forms):
        if c.adapter is None:
            patches.append(Patch(target, None, c.rows, bias=c.coef * c.bias.float()))  # type: ignore[union-attr]
            continue
        up, down, scale = f  # type: ignore[misc]
        up, down = _fold(up, down, c.coef * scale)
        r = int(down.shape[0])
        rank += r
        down = down.reshape(r, *shape[1:])                          # conv: (r, in, k, k)
        up = up.reshape(up.shape[0], r, *([1] * (len(shape) - 2)))  # conv: (out, r, 1, 1)
        lora = LoRA(alpha=float(r), down=down.contiguous(), up=up.contiguous())
        bias = c.coef * c.bias.float() if c.bias is not None else None
        patches.append(Patch(target, lora, c.rows, bias=bias))
    return patches, ModuleStat(str(target), rank)


def stacked_factors(contribs: Sequence[Contribution], out_rows: int,
                    dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor] | None:
    """``(U_s, D_s)`` with ``U_s @ D_s = Σ coef·ΔW`` (rows placed), or None if a module must be densified;
    in ``dtype`` (default float32)."""
    dtype = dtype or torch.float32
    ups, downs = [], []
    for c in contribs:
        if c.adapter is None:
            continue
        f = factor_form(c.adapter)
        if f is None:
            return None
        up, down, scale = f
        block = torch.zeros((out_rows, up.shape[1]), dtype=dtype)
        s, e = c.rows if c.rows else (0, out_rows)
        block[s:e] = up.to(dtype) * (c.coef * scale)
        ups.append(block)
        downs.append(down.to(dtype))
    if not ups:
        return None
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def _input_rank(contribs: Sequence[Contribution], shape: tuple[int, ...]) -> int:
    per_input: dict[int, int] = {}
    for c in contribs:
        per_input[c.input] = per_input.get(c.input, 0) + rank_of(c.adapter, shape)
    return max(per_input.values()) if per_input else 1


def _choose_rank(s: Tensor, contribs: Sequence[Contribution], shape: tuple[int, ...], options: MergeOptions) -> int:
    if options.dynamic is not None:
        return dynamic_rank(s, options.dynamic[0], options.dynamic[1], cap=options.rank)
    k = options.rank if options.rank is not None else _input_rank(contribs, shape)
    return max(1, min(k, s.numel()))


def _lowrank_patch(target: Target, u: Tensor, s: Tensor, vh: Tensor, k: int, shape: tuple[int, ...],
                   bias: Tensor | None) -> Patch:
    """Rank-k factors ``U·√Σ`` and ``√Σ·Vᵀ`` (balanced: better range in low-precision outputs), α = k."""
    root = s[:k].clamp(min=0).sqrt()
    up = (u[:, :k] * root).reshape(shape[0], k, *([1] * (len(shape) - 2)))
    down = (vh[:k] * root[:, None]).reshape(k, *shape[1:])
    return Patch(target, LoRA(alpha=float(k), down=down.contiguous(), up=up.contiguous()), None, bias=bias)


@merge_method("svd", options=("rank",),
              help="the exact best rank-N approximation of the weighted sum, from the factors (no dense matrices)")
def _svd(target: Target, contribs: list[Contribution], shape: tuple[int, ...], options: MergeOptions,
         weights: Sequence[float] = (), multiplier: float = 1.0) -> tuple[list[Patch], ModuleStat]:
    bias = scaled_bias(contribs, shape[0])
    if all(c.adapter is None for c in contribs):
        return [Patch(target, None, None, bias=bias)], ModuleStat(str(target), 0)
    stacked = stacked_factors(contribs, shape[0])     # conv: the flattened (out, in·k·k) view
    if stacked is not None:
        _require_finite_sum(target, *stacked)
        u, s, vh = factored_svd(*stacked)
    else:
        require_dense_fits(str(target), shape, 4, path=None,
                           fix="merge with --method concat (exact, keeps the factors) instead.")
        dense = dense_sum(contribs, shape)
        _require_finite_sum(target, dense)
        u, s, vh = exact_svd(dense.flatten(1))
    return _truncated(target, u, s, vh, contribs, shape, options, bias)


def _truncated(target: Target, u: Tensor, s: Tensor, vh: Tensor, contribs: Sequence[Contribution],
               shape: tuple[int, ...], options: MergeOptions, bias: Tensor | None) -> tuple[list[Patch], ModuleStat]:
    """The merged module at the rank the options choose from the singular values, with its statistics."""
    k = _choose_rank(s, contribs, shape, options)
    lr = truncate(u, s, vh, k)
    return [_lowrank_patch(target, u, s, vh, lr.rank, shape, bias)], \
        ModuleStat(str(target), lr.rank, lr.retained_energy, lr.relative_error)


def _require_finite_sum(target: Target, *tensors: Tensor) -> None:
    """The weighted sum an SVD is about to factor must be finite (large weights overflow float32)."""
    if not all(all_finite(t) for t in tensors):
        raise NonFiniteError(f"module {str(target)!r}: the weighted sum of the inputs overflows float32 (weights × "
                             "ΔW beyond ±3.4e38), so it cannot be re-factored; nothing was written.",
                             hint="lower the merge weights (PATH:WEIGHT).")


def input_deltas(contribs: Sequence[Contribution], shape: tuple[int, ...]) -> tuple[list[int], list[Tensor]]:
    """Dense strength-1 delta of each input present on the target (PEFT's ``get_delta_weight``)."""
    order: list[int] = []
    dense: dict[int, Tensor] = {}
    for c in contribs:
        if c.adapter is None:
            continue
        if c.input not in dense:
            order.append(c.input)
            dense[c.input] = torch.zeros(shape, dtype=torch.float32)
        d = c.adapter.dense()
        if c.rows is None:
            dense[c.input] += d.reshape(shape)
        else:
            dense[c.input][c.rows[0]:c.rows[1]] += d.reshape(c.rows[1] - c.rows[0], *shape[1:])
    return order, [dense[i] for i in order]


def dense_merge(target: Target, contribs: Sequence[Contribution], shape: tuple[int, ...], options: MergeOptions,
                weights: Sequence[float], multiplier: float) -> Tensor | None:
    """The dense ties/dare result of one module (block multiplier applied once, at the end)."""
    order, tensors = input_deltas(contribs, shape)
    if not tensors:
        return None
    gen = None
    if get_merge_method(options.method).random:
        gen = torch.Generator(device="cpu").manual_seed(module_seed(options.seed, str(target)))
    assert options.density is not None     # dense methods require --density (checked with the options)
    result = combine_dense(tensors, [weights[i] for i in order], options.method, density=float(options.density),
                           majority_sign=options.majority_sign, generator=gen)
    return result * multiplier if multiplier != 1 else result


def dense_method(target: Target, contribs: list[Contribution], shape: tuple[int, ...], options: MergeOptions,
                 weights: Sequence[float], multiplier: float) -> tuple[list[Patch], ModuleStat]:
    """A dense merge method on one module: combine the dense task tensors, then SVD to the output rank."""
    bias = scaled_bias(contribs, shape[0])
    n = len({c.input for c in contribs if c.adapter is not None})
    require_dense_fits(str(target), shape, 6 * n + 4, path=None,
                       fix=f"--method {options.method} needs each input's dense ΔW; use --method svd (works on the "
                           "factors) or concat (exact), or a machine with more memory.")
    merged = dense_merge(target, contribs, shape, options, weights, multiplier)
    if merged is None:
        return [Patch(target, None, None, bias=bias)], ModuleStat(str(target), 0)
    _require_finite_sum(target, merged)
    u, s, vh = exact_svd(merged.flatten(1))
    return _truncated(target, u, s, vh, contribs, shape, options, bias)


def dense_merge_method(name: str, *, help: str, options: Iterable[str] = (),
                       random: bool = False) -> Callable[[DenseCombine], DenseCombine]:
    """Decorator: register a method defined on the dense task tensors ``T_i = ΔW_i`` of each module
    (``combine(tensors, weights, density=, majority_sign=, generator=)``), truncated by SVD to the output rank.
    It takes ``--density`` (required) and ``--rank``; ``random`` methods get a seeded generator."""
    def deco(fn: DenseCombine) -> DenseCombine:
        register_merge_method(MergeMethod(name, dense_method, help, False, frozenset(options) | {"rank", "density"},
                                          True, random, fn))
        return fn
    return deco


@dense_merge_method("ties", options=("majority_sign",),
                    help="PEFT TIES on each module's dense delta (keep the top --density, elect signs), then SVD")
def _ties(tensors: list[Tensor], weights: Sequence[float], *, density: float, majority_sign: str = "total",
          generator: torch.Generator | None = None) -> Tensor:
    stacked, w = weighted_stack([magnitude_prune(t, density) for t in tensors], weights)
    return sign_elected(stacked, w, majority_sign)


@dense_merge_method("dare_linear", options=("seed",), random=True,
                    help="PEFT DARE (random drop to --density, rescale), weighted sum, then SVD")
def _dare_linear(tensors: list[Tensor], weights: Sequence[float], *, density: float, majority_sign: str = "total",
                 generator: torch.Generator | None = None) -> Tensor:
    stacked, w = weighted_stack(dare_pruned(tensors, density, generator), weights)
    return (stacked * w).sum(dim=0)


@dense_merge_method("dare_ties", options=("seed", "majority_sign"), random=True,
                    help="PEFT DARE pruning with TIES sign election, then SVD")
def _dare_ties(tensors: list[Tensor], weights: Sequence[float], *, density: float, majority_sign: str = "total",
               generator: torch.Generator | None = None) -> Tensor:
    stacked, w = weighted_stack(dare_pruned(tensors, density, generator), weights)
    return sign_elected(stacked, w, majority_sign)
