"""Checking every LoRA module against the base before any write: what fits, what does not and why."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from lorakit.base.checkpoint import BaseModel
from lorakit.errors import CoverageError, MergeError, UsageError
from lorakit.io import WeightFile
from lorakit.layouts import NameIndex, evaluate
from lorakit.lora.model import LoraModel, Patch
from lorakit.ops.baking.inputs import BakeInput, base_desc, component_flags, flag_hint, flag_of, variant_labels
from lorakit.ops.baking.places import Place, component_file_places
from lorakit.ops.baking.report import BakeReport
from lorakit.ops.baking.tasks import Use


def _missing_reason(base: BaseModel, component: str, module: str) -> str:
    comp = base.arch.spec.components[component]
    m = NameIndex.of(comp, "native", flat=False).match(module)
    params = base.arch.params.get(component, {})
    if m is not None:
        if m.spec.requires and not params.get(m.spec.requires, 1):
            return f"the base has no {m.spec.requires} layers"
        if m.spec.repeat and m.index is not None and m.index >= params.get(m.spec.repeat, 0):
            return f"block {m.index} is beyond the base's {params.get(m.spec.repeat, 0)} {m.spec.repeat} blocks"
    return "the base has no such module"


def _fit(patch: Patch, shape: Sequence[int], what: str,
         transpose: bool = False) -> tuple[tuple[int, int] | None, str | None]:
    """The patch's native row window if it fits a module whose ΔW has ``shape`` (out × in[× kernel]), else a
    reason. Convolution deltas are compared by their flattened size (a 1×1 conv takes a Linear LoRA)."""
    out, inp = shape[0], math.prod(shape[1:])
    window = patch.rows or (0, out)
    if window[0] < 0 or window[1] > out:
        return None, f"rows {window[0]}:{window[1]} outside the {what}'s {out} rows"
    rows = window[1] - window[0]
    a = patch.adapter
    if a is not None:
        if a.out_features != rows:
            return None, f"out-features {a.out_features} vs {rows} rows in the {what}"
        a_in = math.prod(a.weight_shape[1:])
        if a_in != inp:
            return None, f"in-features {a_in} vs {inp} in the {what}"
    if patch.bias is not None and patch.bias.numel() != rows:
        return None, f"bias of {patch.bias.numel()} values vs {rows} rows in the {what}"
    d = patch.dora
    if d is not None and transpose:
        return None, f"a DoRA magnitude on the {what}, which the base stores transposed, is not supported"
    if d is not None and d.numel() not in (rows, inp):
        return None, f"DoRA magnitude of {d.numel()} values fits neither {rows} rows nor {inp} columns"
    return window, None


def _fit_loose(patch: Patch, shape: tuple[int, ...] | None) -> tuple[tuple[int, int] | None, str | None]:
    """The row window (all of it) of a loose-parameter patch if it fits the base tensor's shape, else a reason."""
    if shape is None:
        return None, "the base has no such parameter"
    a = patch.adapter
    if a is None or patch.bias is not None or patch.dora is not None or patch.rows is not None:
        return None, "a loose parameter takes a plain diff only (no bias, DoRA or row window)"
    if tuple(a.weight_shape) != tuple(shape):
        return None, f"diff of shape {list(a.weight_shape)} vs the base parameter's {list(shape)}"
    return (0, shape[0] if shape else 1), None


def _value(expr: str, params: dict[str, int]) -> int | None:
    try:
        return evaluate(expr, params)
    except KeyError:
        return None


def _lora_cause(bases: list[BaseModel], model: LoraModel) -> str:
    base = bases[0]
    spec = base.arch.spec
    if model.arch.name != spec.name:
        return f"this LoRA is for {model.arch.spec.label}; the base is {spec.label}"
    labels = variant_labels(base)
    parts = []
    lv, bv = model.arch.variant, base.variant
    if lv in labels and lv != bv:
        parts.append(f"this LoRA is for {labels[lv]}; the base is {labels.get(bv, bv)}")
    for name, b in ((n, b) for b in bases for n in b.components()):
        comp = spec.components[name]
        lp, bp = model.arch.params.get(name, {}), b.arch.params.get(name, {})
        derived = {k for k, expr in comp.fallbacks.items() if k in lp and _value(expr, lp) == lp[k]}
        diff = [f"{k} {lp[k]} vs {bp[k]}" for k in sorted(lp) if k in bp and k not in comp.flags
                and k not in comp.counts and k not in derived and lp[k] != bp[k]]
        if diff:
            where = "" if name == base.component else f" of the {comp.label}"
            parts.append(f"sizes{where} differ from the base (LoRA vs base: " + ", ".join(diff) + ")")
    return "; ".join(parts)


def coverage(bases: list[BaseModel], loras: list[BakeInput], te_files: dict[str, WeightFile], allow_partial: bool,
             report: BakeReport) -> tuple[dict[str, dict[str, list[Use]]], dict[str, dict[str, Place]]]:
    """Check every LoRA module against the components the base files hold (the main one first; several for a
    pipeline folder) and the separate component files; refuse before any write. Modules of the main component
    are named bare in the report, others as ``component:module``."""
    bm = bases[0]
    spec = bm.arch.spec
    main = bm.component
    holder = {c: b for b in bases for c in b.parts}
    mods = {c: b.arch.module_map(c) for c, b in holder.items()}
    transposed = {(s.component, s.module) for b in bases for s in b.slots.values() if s.transpose}
    loose = {c: {s.param: tuple(b.file.shape(s.key)) for s in b.slots.values() if s.module is None
                 and s.component == c} for c, b in holder.items()}
    te_places: dict[str, dict[str, Place]] = {}
    te_shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for c, f in te_files.items():
        te_places[c], te_shapes[c] = component_file_places(f, c, bm)
    uses: dict[str, dict[str, list[Use]]] = {c: {} for c in (*spec.components, *holder)}
    unmatched: list[str] = []
    causes: list[str] = []
    for idx, inp in enumerate(loras):
        name = os.path.basename(inp.path)
        bad: list[tuple[str, str, str]] = []          # (component, module label, reason)
        unused_te: dict[str, int] = {}
        foreign = inp.model.arch.name != spec.name
        for p in inp.model.patches:
            comp, module = p.target.component, p.target.module
            label = module if comp == main else f"{comp}:{module}"
            if foreign:
                bad.append((comp, label, f"a {inp.model.arch.spec.label} module; the base is {spec.label}"))
                continue
            if comp in holder and (p.target.loose or (module not in mods[comp] and module in loose[comp])):
                window, why = _fit_loose(p, loose[comp].get(module))
            elif comp in holder:
                shape = holder[comp].module_shape(comp, module)
                if shape is None:
                    bad.append((comp, label, _missing_reason(holder[comp], comp, module)))
                    continue
                window, why = _fit(p, shape, "base module" if comp == main else f"{comp} module",
                                   (comp, module) in transposed)
            elif comp in te_files:
                shape = te_shapes[comp].get(module)
                if shape is None:
                    bad.append((comp, label, f"not in {os.path.basename(te_files[comp].path)}"))
                    continue
                is_t = any(pl.transpose and pl.module == module for pl in te_places[comp].values())
                window, why = _fit(p, shape, f"{comp} module", is_t)
            else:
                unused_te[comp] = unused_te.get(comp, 0) + 1
                continue
            if why is not None:
                bad.append((comp, label, why))
                continue
            if inp.weight == 0 and p.dora is None:
                continue
            uses[comp].setdefault(module, []).append(Use(p, inp.weight, idx, window))  # type: ignore[arg-type]
            inp.applied += 1
        replaced = sum(1 for p in inp.model.patches if p.replace)
        if replaced and inp.weight not in (0, 1):
            report.warnings.append(f"{name}: {replaced} norm scale(s) are replacement values (BFL control LoRA), "
                                   f"set to the file's values whatever the strength ({inp.weight:g}), as BFL's "
                                   "and diffusers' loaders do.")
        for k in inp.model.unknown_keys:
            bad.append(("", f"key {k!r}", "not understood"))
        inp.skipped = len(bad)
        if bad:
            cause = _lora_cause(bases, inp.model)
            if cause:
                causes.append(f"{name}: {cause}")
            unmatched += [f"{name}: {label}: {why}" for _c, label, why in bad]
            report.skipped += [{"input": inp.path, "module": label, "reason": why, "component": c}
                               for c, label, why in bad]
        for comp, n in unused_te.items():
            report.not_applied.append({"input": inp.path, "component": comp, "modules": n})
            where = spec.components[comp].label if comp in spec.components else comp
            report.warnings.append(f"{name}: {n} {comp} modules not applied: the base holds no {where} (pass "
                                   f"{flag_hint(comp)} to bake them into a text encoder)."
                                   if comp not in component_flags() else
                                   f"{name}: {n} {comp} modules not applied (pass {flag_hint(comp)} "
                                   "to bake them into a text encoder).")
        report.inputs.append({"path": inp.path, "weight": inp.weight, "format": inp.model.format,
                              "variant": inp.model.arch.variant, "modules": len(inp.model.patches),
                              "applied": inp.applied, "skipped": inp.skipped})
        if inp.weight == 0 and not inp.applied:
            report.warnings.append(f"{name}: weight 0, contributes nothing.")
        mv = inp.model.arch.variant
        if mv in variant_labels(bm) and mv != bm.variant and not bad:
            report.warnings.append(f"{name}: made for {variant_labels(bm)[mv]}, baked into {base_desc(bm)}.")
    for comp in holder:
        for module, us in uses[comp].items():
            setters = [u for u in us if u.patch.replace]
            if len(setters) > 1:
                raise MergeError(f"{module}: {len(setters)} inputs replace this norm scale "
                                 f"({', '.join(os.path.basename(loras[u.input].path) for u in setters)}); "
                                 "a parameter takes one replacement value.",
                                 hint="bake one BFL control LoRA at a time.")
    for c in te_files:
        if not uses[c] and not any(p.target.component == c for i in loras for p in i.model.patches):
            flag = flag_of(c)
            drop = f"{flag} and {flag}-out" if c in component_flags() else flag + ":OUT"
            raise UsageError(f"{flag} given, but no LoRA has {c} modules.", hint=f"drop {drop}.")
    if unmatched and not allow_partial:
        lead = "; ".join(causes) + ". " if causes else ""
        raise CoverageError(f"{lead}Nothing was written: these LoRA modules do not fit {base_desc(bm)}",
                            unmatched, path=bm.file.path,
                            hint="use a base of the LoRA's model, or pass --allow-partial to bake the rest "
                                 "and report what was skipped.")
    if unmatched:
        report.warnings += [f"skipped (--allow-partial): {u}" for u in unmatched[:20]]
        if len(unmatched) > 20:
            report.warnings.append(f"… and {len(unmatched) - 20} more skipped")
    if not any(uses[c] for c in uses):
        if all(i.weight == 0 for i in loras):
            raise CoverageError("nothing to bake: every LoRA weight is 0, so the output would equal the base",
                                [os.path.basename(i.path) for i in loras], path=bm.file.path,
                                hint="give non-zero weights (path:0.8).")
        flags = "/".join(f"--{c.flag}" for c in spec.components.values() if c.flag)
        raise CoverageError("nothing to bake: no LoRA module applies to this base (or the given text encoders)",
                            [os.path.basename(i.path) for i in loras], path=bm.file.path,
                            hint="check that the LoRA is for this model; modules of components the base does not "
                                 "hold need their files" + (f" ({flags} with their -out paths" if flags else " (")
                                 + " or --component NAME=FILE:OUT).")
    return uses, te_places
