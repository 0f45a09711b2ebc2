"""Merge inputs: the architecture they share, each input's contribution to a target, factor forms."""

from __future__ import annotations

from typing import TYPE_CHECKING

import hashlib
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


from lorakit.errors import ArchitectureError
from lorakit.lora.adapters import Adapter, LoHa, LoKr, LoRA, NotExact
from lorakit.lora.model import ArchInstance, LoraModel, Target
from lorakit.ops.recipes import WeightedInput, parse_weighted

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from lorakit.lazy import torch


InputSpec = WeightedInput | tuple[str, float] | str | os.PathLike


def weighted_inputs(inputs: Iterable[InputSpec]) -> list[WeightedInput]:
    """Merge inputs (``path[:weight]`` strings, pairs or WeightedInput) as WeightedInput."""
    out = []
    for item in inputs:
        if isinstance(item, WeightedInput):
            w = item
        elif isinstance(item, (tuple, list)):
            path, weight = item
            w = WeightedInput(os.fspath(path), float(weight))
        else:
            w = parse_weighted(os.fspath(item))
        out.append(w)              # WeightedInput checks that the weight is finite
    return out


IDENTITY_KEYS = ("ss_base_model_version", "modelspec.architecture", "modelspec.implementation", "ss_v2")


def merge_arch(models: Sequence[LoraModel]) -> ArchInstance:
    """One layout instance for all inputs; sizes must agree, counts and flags take the largest."""
    first = models[0]
    for m in models[1:]:
        if m.arch.name != first.arch.name:
            raise ArchitectureError(f"inputs are for different architectures: {first.arch.name} ({first.path}) and "
                                    f"{m.arch.name} ({m.path}).", hint="merge LoRAs of one base model only.")
    params: dict[str, dict[str, int]] = {}
    owner: dict[tuple[str, str], str | None] = {}
    for m in models:
        for comp, p in m.arch.params.items():
            spec = first.arch.spec.components[comp]
            merged = params.setdefault(comp, {})
            for k, v in p.items():
                if k in spec.counts or k in spec.flags:
                    merged[k] = max(merged.get(k, 0), v)
                elif k in merged and merged[k] != v:
                    raise ArchitectureError(
                        f"inputs disagree on the {comp} size {k}: {merged[k]} in {owner[(comp, k)]} but {v} in "
                        f"{m.path} (different base models or variants).", hint="merge LoRAs of one base model only.")
                else:
                    merged[k] = v
                    owner.setdefault((comp, k), m.path)
    default = first.arch.spec.default_variant
    arch_spec = first.arch.spec
    variants = sorted({m.arch.variant for m in models} - {default, "any"})
    # variants only metadata names (Pony, Illustrious on SDXL) share their base's tensors: any mix of them merges;
    # structurally different ones only when the architecture declares them mixable (FLUX.1 dev + schnell)
    named_only = {v.name for v in arch_spec.variants if v.named_by}
    structural = [v for v in variants if v not in named_only]
    if len(structural) > 1 and not any(set(structural) <= group for group in arch_spec.mixable_variants):
        raise ArchitectureError(f"inputs are for different {arch_spec.label} variants: {', '.join(variants)}.",
                                hint="merge LoRAs of one base model only.")
    variant = variants[0] if len(variants) == 1 else structural[0] if len(structural) == 1 else default
    preset: dict[str, str] = {}
    for m in models:
        for comp_name, preset_name in m.arch.preset.items():
            preset.setdefault(comp_name, preset_name)
    return ArchInstance(first.arch.spec, params, variant, preset)


def module_seed(seed: int, module: str) -> int:
    """The DARE generator seed of one module: stable across runs, platforms and module order."""
    digest = hashlib.sha256(f"{int(seed)}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def merged_metadata(models: Sequence[LoraModel]) -> dict[str, str]:
    """Keys every input agrees on, plus base-model identity keys from the first input that has them."""
    metas = [m.metadata for m in models]
    out = {k: v for k, v in metas[0].items() if all(meta.get(k) == v for meta in metas[1:])}
    for key in IDENTITY_KEYS:
        for meta in metas:
            if key in meta:
                out.setdefault(key, meta[key])
                break
    titles = [m.metadata.get("modelspec.title") or os.path.splitext(os.path.basename(m.path or "?"))[0]
              for m in models]
    out.pop("modelspec.title", None)
    out["modelspec.merged_from"] = ", ".join(titles)
    return out


@dataclass
class Contribution:
    """One input patch on a target, with the user coefficient (weight × block multiplier)."""

    input: int
    coef: float
    rows: tuple[int, int] | None
    adapter: Adapter | None
    bias: Tensor | None


def target_shape(arch: ArchInstance, target: Target, contribs: Sequence[Contribution]) -> tuple[int, ...]:
    """ΔW's shape of a merge target, from the layout or, where it leaves sizes open, the contributions."""
    mod = arch.module_map(target.component).get(target.module)
    first = next((c.adapter for c in contribs if c.adapter is not None), None)
    tail = tuple(first.weight_shape[1:]) if first is not None else ()
    if mod is not None and mod.out > 0:
        return (mod.out, *tail)
    rows = [c.rows[1] if c.rows else (c.adapter.out_features if c.adapter is not None else
                                      int(c.bias.shape[0]) if c.bias is not None else 0) for c in contribs]
    return (max(rows), *tail)


def factor_form(adapter: Adapter) -> tuple[Tensor, Tensor, float] | None:
    """Exact ``(up, down, scale)`` in fp32 with ``ΔW = scale·up@down``, or None when the module must be
    densified (full diffs, or a rewrite larger than the dense matrix). Convolutions come flattened:
    ``up`` (out, r), ``down`` (r, in·k·k); a Tucker ``mid`` is contracted into ``down`` exactly."""
    if isinstance(adapter, LoRA) and adapter.mid is None:
        if any(int(n) != 1 for n in adapter.up.shape[2:]):
            return None                      # not a LoCon up (out, r, 1, 1): no plain factor form
        return adapter.up.float().flatten(1), adapter.down.float().flatten(1), adapter.scale
    if len(adapter.weight_shape) > 2:       # conv: Tucker mid, LoHa/LoKr with a kernel
        return _conv_factor_form(adapter)
    if isinstance(adapter, LoHa):
        if adapter.t1 is not None or adapter.shape is not None and len(adapter.shape) != 2:
            return None
        a1, a2, b1, b2 = (t.float() for t in (adapter.w1a, adapter.w2a, adapter.w1b, adapter.w2b))
        up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
        down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
        out = _small(up, down)
        return out + (adapter.scale,) if out else None
    if isinstance(adapter, LoKr):
        if adapter.t2 is not None:
            return None
        p, q = _split(adapter.w1, adapter.w1a, adapter.w1b)
        a, b = _split(adapter.w2, adapter.w2a, adapter.w2b)
        if p.dim() != 2 or a.dim() != 2:
            return None
        out = _small(torch.kron(p, a), torch.kron(q, b))
        return out + (adapter.scale,) if out else None
    return None


def _conv_factor_form(adapter: Adapter) -> tuple[Tensor, Tensor, float] | None:
    """A convolution delta's exact plain factors in the flattened view ``(out, r)``, ``(r, in·k·k)`` (the
    adapter's own ``to_lora`` rewrite: Tucker contraction, face-splitting, Kronecker), when smaller than dense."""
    rank = adapter.plain_rank
    shape = adapter.weight_shape
    if rank is None or rank * (shape[0] + math.prod(shape[1:])) > math.prod(shape):
        return None
    try:
        lora = adapter.to_lora()
    except NotExact:
        return None
    return lora.up.float().flatten(1), lora.down.float().flatten(1), lora.scale


def _split(full: Tensor | None, left: Tensor | None, right: Tensor | None) -> tuple[Tensor, Tensor]:
    """A factorisation ``full = P·Q`` with the smaller inner size (identity on one side), exactly."""
    if full is None:
        return left.float(), right.float()  # type: ignore[union-attr]
    f = full.float()
    if f.dim() != 2:
        return f, f
    rows, cols = f.shape
    if rows <= cols:
        return torch.eye(rows), f
    return f, torch.eye(cols)


def _small(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor] | None:
    r, out, inp = up.shape[1], up.shape[0], down.shape[1]
    return (up, down) if r * (out + inp) <= out * inp else None


def rank_of(adapter: Adapter | None, shape: tuple[int, ...]) -> int:
    """The rank an adapter contributes to a stacked-factor merge (0 for none)."""
    if adapter is None:
        return 0
    if isinstance(adapter, LoRA):
        return adapter.rank
    f = factor_form(adapter)
    if f is not None:
        return int(f[0].shape[1])
    return min(shape[0], math.prod(shape[1:])) if len(shape) > 1 else 1


def dense_sum(contribs: Sequence[Contribution], shape: tuple[int, ...]) -> Tensor:
    """``Σ coef·ΔW`` of the contributions as one dense fp32 tensor (row windows placed)."""
    total = torch.zeros(shape, dtype=torch.float32)
    for c in contribs:
        if c.adapter is None:
            continue
        d = c.adapter.dense()
        if c.rows is None:
            total += c.coef * d.reshape(shape)
        else:
            total[c.rows[0]:c.rows[1]] += c.coef * d.reshape(c.rows[1] - c.rows[0], *shape[1:])
    return total
