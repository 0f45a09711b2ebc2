"""How strong a LoRA is per module and per block: ‖ΔW‖_F from the factors, never densifying a plain LoRA.

For ΔW = s·B·A, ‖ΔW‖²_F = s²·Σ((BᵀB) ⊙ (AAᵀ)) — two r×r Gram matrices (``diff``'s inner product of a patch with
itself); split parts of one target (diffusers q/k/v rows of a fused module) are summed with their cross terms on
the overlap. A block's strength is √(Σ ‖ΔW_m‖²) over its modules. Blocks are the architecture's block-scheme slots
(the ids ``--blocks`` takes: an SD UNet's ``IN04``/``M00``/``OUT05``, FLUX.1's ``D00``…/``S00``…, from the layout's
block scheme); a module of another component (a text encoder) is totalled under its component's name, and a
denoiser module in no slot under ``<component>:other``.
"""

from __future__ import annotations

import math
import os
from typing import Any

from lorakit.errors import UsageError
from lorakit.formats import load, parse
from lorakit.io import open_weights
from lorakit.lora.model import ArchInstance, LoraModel, Patch, Target
from lorakit.ops.blocks import slot_chain, slot_ids
from lorakit.ops.diffing import patch_inner


def block_label(arch: ArchInstance, target: Target) -> str:
    """The block a target is totalled under (see the module docstring)."""
    comp = arch.spec.components.get(target.component)
    if comp is None or comp.role != "denoiser":
        return target.component
    try:
        chain = slot_chain(arch, target)
    except UsageError:
        chain = ()
    return chain[0] if chain else f"{target.component}:other"


def block_order(arch: ArchInstance, labels: set[str]) -> list[str]:
    """``labels`` in the scheme's order (slot ids first, then components in architecture order, then the rest)."""
    order = [s for s in slot_ids(arch) if s in labels]
    order += [f"{c}:other" for c in arch.spec.components if f"{c}:other" in labels]
    order += [c for c in arch.spec.components if c in labels]
    return order + sorted(labels - set(order))


def target_norm(patches: list[Patch]) -> float:
    """‖ΔW‖_F of one target's patches together (strength 1)."""
    live = [p for p in patches if p.adapter is not None]
    sq = sum(patch_inner(p, q) for p in live for q in live)
    return math.sqrt(max(sq, 0.0))


def block_part(arch: ArchInstance, target: Target) -> str | None:
    """The module's place inside a repeated block (its native template after the block index, e.g.
    ``img_attn.qkv``) when it is repeated per block of one of the scheme's runs; else None."""
    comp = arch.spec.components.get(target.component)
    scheme = arch.spec.blocks
    if comp is None or comp.role != "denoiser" or scheme is None:
        return None
    mod = arch.module_map(target.component).get(target.module)
    if mod is None or mod.index is None or not any(r.count == mod.spec.repeat for r in scheme.runs):
        return None
    return mod.spec.native.split("{i}", 1)[-1].lstrip(".") or mod.spec.native


def model_strength(model: LoraModel) -> dict[str, Any]:
    """Per-module, per-block and per-component ‖ΔW‖_F of a loaded LoRA, blocks in scheme order; ``cells``: the
    modules of repeated blocks as (block, part inside the block, norm), for a heatmap."""
    modules: dict[str, float] = {}
    cells: list[dict[str, Any]] = []
    blocks: dict[str, float] = {}
    counts: dict[str, int] = {}
    comps: dict[str, float] = {}
    for t, patches in sorted(model.by_target().items(), key=lambda kv: str(kv[0])):
        n = target_norm(patches)
        modules[str(t)] = n
        label = block_label(model.arch, t)
        part = block_part(model.arch, t)
        if part is not None:
            cells.append({"block": label, "part": part, "norm": n})
        blocks[label] = blocks.get(label, 0.0) + n * n
        counts[label] = counts.get(label, 0) + 1
        comps[t.component] = comps.get(t.component, 0.0) + n * n
    order = block_order(model.arch, set(blocks))
    return {"architecture": model.arch.name, "architecture_label": model.arch.spec.label,
            "scheme": "block scheme" if model.arch.spec.blocks else "components",
            "blocks": [{"block": b, "norm": math.sqrt(blocks[b]), "modules": counts[b]} for b in order],
            "components": {c: math.sqrt(v) for c, v in comps.items()},
            "total": math.sqrt(sum(blocks.values())), "modules": modules, "cells": cells}


def block_strength(path: str | os.PathLike[str], *, allow_pickle: bool = False, from_format: str | None = None,
                   arch: str | None = None) -> dict[str, Any]:
    """:func:`model_strength` of a LoRA file (reads its factors: small)."""
    with open_weights(path, allow_pickle=allow_pickle) as f:
        model = load(parse(f, force_format=from_format, arch_name=arch))
    return model_strength(model)
