"""Solve an architecture's sizes, counts, flags and variant from what a file shows."""

from __future__ import annotations


from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lorakit.errors import UnsupportedArchitectureError
from lorakit.io.header import loads_json
from lorakit.layouts import Alias, ArchSpec, ComponentSpec, ModuleSpec, ParamSpec, available, evaluate, resolve, solve, symbols
from lorakit.lora.model import ArchInstance


@dataclass(frozen=True)
class Observation:
    """One module seen in a file: which spec/alias it is, its block index and its (out, in) shape."""

    component: str
    spec: ModuleSpec
    alias: Alias
    index: int | None
    out: int | None
    inp: int | None


@dataclass(frozen=True)
class ParamObservation:
    """One loose parameter (e.g. a q/k norm scale) seen in a file: its spec, block index and shape."""

    component: str
    spec: ParamSpec
    index: int | None
    shape: tuple[int, ...] | None


def infer_instance(arch: ArchSpec, observations: Iterable[Observation | ParamObservation], metadata: Mapping[str, str] | None = None,
                   *, complete: bool = False, path: str | None = None) -> ArchInstance:
    """Solve sizes per component; ``complete`` means the file holds every module (a base model), so
    absent optional modules set their flags to 0."""
    by_comp: dict[str, list[Observation | ParamObservation]] = {}
    for ob in observations:
        by_comp.setdefault(ob.component, []).append(ob)
    params: dict[str, dict[str, int]] = {}
    presets: dict[str, str] = {}
    for comp_name, obs in by_comp.items():
        comp = arch.components[comp_name]
        equations: list[tuple[str, int]] = []
        for ob in obs:
            if isinstance(ob, ParamObservation):
                if ob.shape is not None and len(ob.shape) == len(ob.spec.shape):
                    equations.extend(zip(ob.spec.shape, ob.shape))
                continue
            if ob.out is not None:
                equations.append((ob.alias.rows[1] if ob.alias.rows else ob.spec.out, ob.out))
            if ob.inp is not None:
                equations.append((ob.spec.inp, ob.inp))
        p = solve(equations, {})
        sized_out = size_refusal(comp, p)
        if sized_out is not None:
            label, other = sized_out
            if other is not None and other in available():
                raise UnsupportedArchitectureError(
                    f"this file is {label}, not {arch.label} (its module names fit both, its sizes are "
                    f"{resolve(other).label}'s).", path=path,
                    hint=f"read it as {resolve(other).label} (--arch {other}; without --arch lorakit picks it when "
                         f"its keys fit a {resolve(other).label} format as well).")
            raise UnsupportedArchitectureError(
                f"this file is {label}, which lorakit recognises but does not support yet (its module names "
                f"fit {arch.label}, its sizes do not).", path=path,
                hint=f"lorakit supports {', '.join(resolve(n).label for n in available())} so far.")
        for flag in comp.flags:
            present = any(ob.spec.requires == flag for ob in obs)
            if present:
                p[flag] = 1
            elif complete:
                p[flag] = 0
        for count in comp.counts:
            seen = [ob.index for ob in obs if ob.spec.repeat == count and ob.index is not None]
            if seen:
                p[count] = max(seen) + 1
            elif complete:
                p[count] = 0
        for preset in comp.presets:
            shared = [k for k in preset.params if k in p and k not in comp.counts]
            if shared and all(p[k] == preset.params[k] for k in shared if k not in preset.varies):
                for k, v in preset.params.items():
                    if k not in comp.counts:
                        p.setdefault(k, v)
                    elif not complete:
                        p[k] = max(v, p.get(k, 0))
                presets[comp_name] = preset.name
                break
        for k, expr in comp.fallbacks.items():
            if k not in p and symbols(expr) <= set(p):
                p[k] = evaluate(expr, p)
        params[comp_name] = p
    variant = _variant(arch, params, metadata or {})
    refused = next((v for v in arch.variants if v.name == variant and not v.supported), None)
    if refused is not None:
        raise UnsupportedArchitectureError(
            f"this file's metadata names {refused.label}, which lorakit recognises but does not support yet (its "
            f"module names fit {arch.label}).", path=path,
            hint=f"lorakit supports {', '.join(resolve(n).label for n in available())} so far; if the metadata is "
                 "wrong, correct it (lorakit meta --set / --delete) and read the file again.")
    return ArchInstance(arch, params, variant, presets)


def size_refusal(comp: ComponentSpec, sizes: Mapping[str, int]) -> tuple[str, str | None] | None:
    """(label, architecture or None) when the solved ``sizes`` are another architecture's (the component's
    ``refusals``: an unsupported one; ``deferrals``: a registered one whose module names it shares)."""
    for expr, value, label in comp.refusals:
        if symbols(expr) <= set(sizes) and evaluate(expr, sizes) == value:
            return label, None
    for expr, value, label, other in comp.deferrals:
        if symbols(expr) <= set(sizes) and evaluate(expr, sizes) == value:
            return label, other
    return None


def _variant(arch: ArchSpec, params: Mapping[str, Mapping[str, int]], metadata: Mapping[str, str]) -> str:
    merged: dict[str, int] = {}
    for p in params.values():
        merged.update(p)
    hint = " ".join(metadata.get(k, "") for k in ("modelspec.architecture", "ss_base_model_version")).lower()
    named = (hint + " " + _base_model_names(metadata)).lower()
    structural = next((v for v in arch.variants if not v.named_by and all(c in params for c in v.components) and
                       all(k in merged and merged[k] == val for k, val in v.when.items())), None)
    for v in arch.variants:
        # a variant only metadata can name (Kontext): its parameters must not be contradicted, and the shapes
        # must not have found a variant it does not refine (a Fill or Control LoRA stays Fill or Control)
        if v.named_by and any(w in named for w in v.named_by) and \
                all(merged.get(k, val) == val for k, val in v.when.items()) and \
                (structural is None or dict(structural.when).items() <= dict(v.when).items()):
            return v.name
    if structural is not None:
        return structural.name
    for v in arch.variants:
        if not v.named_by and v.name in hint:
            return v.name
    return arch.default_variant


def _base_model_names(metadata: Mapping[str, str]) -> str:
    """The base-model names a LoRA's metadata carries besides the architecture fields: sd-scripts'
    ``ss_sd_model_name`` (the base file's name) and PEFT's ``base_model_name_or_path`` inside diffusers'
    ``lora_adapter_metadata`` (read as text; a malformed value is reported by the readers that parse it)."""
    parts = [metadata.get("ss_sd_model_name", ""), metadata.get("lorakit.expert", "")]
    raw = metadata.get("lora_adapter_metadata", "")
    if raw and len(raw) < 1 << 20:
        try:
            cfg = loads_json(raw)
        except ValueError:
            cfg = None
        if isinstance(cfg, dict):
            parts += [str(v) for k, v in cfg.items() if str(k).endswith("base_model_name_or_path") and
                      isinstance(v, str)]
    return " ".join(parts)
