"""Paired experts (:attr:`lorakit.layouts.ArchSpec.experts`, e.g. Wan 2.2 A14B's high-noise and low-noise
transformers): which expert a single-expert file is for, splitting a model that holds several into one model per
expert, and joining single-expert models into one.

A single-expert file spells its keys like the first expert's (nothing in a key says which expert it is for);
its expert is told, in this order, by the caller, by lorakit's metadata key :data:`EXPERT_KEY`, or by a component's
``expert_tags`` in the file name (AI-Toolkit's ``_high_noise`` / ``_low_noise`` files, ComfyUI's
``wan2.2_t2v_low_noise_14B_fp16.safetensors``). Nothing else is guessed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace

from lorakit.errors import UsageError
from lorakit.layouts import ArchSpec
from lorakit.lora.model import LoraModel

EXPERT_KEY = "lorakit.expert"      # metadata: the expert tag of a single-expert file (e.g. "low_noise")


def resolve_expert(arch: ArchSpec, name: str) -> str:
    """The expert component ``name`` means: a component name (``transformer_2``) or one of its tags
    (``low_noise``). UsageError naming the choices otherwise."""
    if name in arch.experts:
        return name
    found = arch.expert_of(name)
    if found is None or not any(name.lower() == t for t in arch.components[found].expert_tags):
        choices = ", ".join(f"{c} ({arch.components[c].expert_tags[0]})" for c in arch.experts) or "none"
        raise UsageError(f"unknown expert {name!r} for {arch.label}.", hint=f"experts: {choices}.")
    return found


def file_expert(arch: ArchSpec, path: str | None, metadata: Mapping[str, str], explicit: str | None = None
                ) -> str | None:
    """The expert a single-expert file of ``arch`` is for (None: not told, or ``arch`` has no experts)."""
    if not arch.experts:
        return None
    if explicit:
        return resolve_expert(arch, explicit)
    tag = metadata.get(EXPERT_KEY)
    if tag:
        return resolve_expert(arch, tag)
    if path:
        return arch.expert_of(os.path.basename(os.path.normpath(os.fspath(path))))
    return None


def expert_tag(arch: ArchSpec, component: str) -> str:
    """The tag a split file of ``component`` is named and labelled with (its first ``expert_tags`` entry)."""
    tags = arch.components[component].expert_tags
    return tags[0] if tags else component


def experts_in(model: LoraModel) -> list[str]:
    """The expert components ``model`` has patches on, in architecture order."""
    have = {p.target.component for p in model.patches}
    return [c for c in model.arch.spec.experts if c in have]


def split_by_expert(model: LoraModel) -> dict[str, LoraModel]:
    """One model per expert ``model`` holds (patches on other components go with the first expert's). UsageError
    when the architecture has no experts."""
    arch = model.arch.spec
    if not arch.experts:
        raise UsageError(f"{arch.label} has no paired experts to split.", path=model.path,
                         hint="drop --split-experts.")
    present = experts_in(model) or [arch.experts[0]]
    out: dict[str, LoraModel] = {}
    for comp in present:
        mine = [p for p in model.patches if p.target.component == comp or
                (comp == present[0] and p.target.component not in arch.experts)]
        out[comp] = replace(model, patches=mine, metadata={**model.metadata, EXPERT_KEY: expert_tag(arch, comp)})
    return out


def split_paths(arch: ArchSpec, output: str, components: Sequence[str]) -> dict[str, str]:
    """``out.safetensors`` -> ``out_high_noise.safetensors``, ``out_low_noise.safetensors`` (AI-Toolkit's names)."""
    stem, ext = os.path.splitext(output)
    return {c: f"{stem}_{expert_tag(arch, c)}{ext or '.safetensors'}" for c in components}


def join_experts(models: Sequence[LoraModel]) -> LoraModel:
    """One model holding the patches of single-expert models of distinct experts of one architecture."""
    first = models[0]
    arch = first.arch.spec
    seen: dict[str, str] = {}
    for m in models:
        if m.arch.spec.name != arch.name:
            raise UsageError(f"cannot join a {m.arch.spec.label} LoRA with a {arch.label} LoRA.", path=m.path)
        for comp in experts_in(m):
            if comp in seen:
                raise UsageError(f"two files are for the same expert ({comp}): {seen[comp]} and {m.path}.",
                                 path=m.path, hint="give one file per expert (name them *_high_noise / *_low_noise "
                                                   "or pass --expert).")
            seen[comp] = str(m.path)
    params = {c: p for m in models for c, p in m.arch.params.items()}
    instance = replace(first.arch, params=params, _maps={})
    meta = {k: v for k, v in first.metadata.items() if k != EXPERT_KEY}
    patches = [p for m in models for p in m.patches]
    return replace(first, arch=instance, patches=patches, metadata=meta,
                   unknown_keys=[k for m in models for k in m.unknown_keys])

