"""``lorakit doctor``: will this LoRA apply, to this base, and if not, why and how to fix it.

Per LoRA: what it is (format, architecture, variant, adapters, ranks/alphas, trainer), tensor health (NaN/Inf,
all-zero ups, extreme α/r, odd dtypes, stale hashes) and, with a base model, coverage: modules that apply,
modules that match nothing grouped by likely cause, and shape mismatches. Coverage is checked for every
component the base holds (an SDXL single file: UNet, CLIP-L and OpenCLIP-G) and for separate text-encoder
files. Every outcome is a verdict — OK (exit 0), PARTIAL (1), WILL NOT APPLY or INVALID (2) — returned, not
raised; only a bad base or text-encoder file raises (there is nothing to diagnose against).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorakit.base.checkpoint import BaseModel, open_component
from lorakit.base.pipeline import open_model
from lorakit.dtypes import FLOAT_CODES
from lorakit.errors import InputFileError, LorakitError, NotALoraError, UnsupportedArchitectureError
from lorakit.formats import parse
from lorakit.formats.parse import FormatMatcher, ModuleEntry, ParsedLora, row_window
from lorakit.formats.spec import formats, split_key
from lorakit.ops.inspection import (deep_checks, entry_kind, entry_rank, entry_scale, metadata_summary, read_alphas,
                         split_qkv_warnings)
from lorakit.io import WeightFile, open_weights
from lorakit.progress import Progress
from lorakit.progress import report as report_progress
from lorakit.layouts import (RECOGNIZERS, ArchSpec, ComponentSpec, ModuleSpec, Variant, available, recognize, resolve,
                      symbols)

OK, PARTIAL, WILL_NOT_APPLY, INVALID = "OK", "PARTIAL", "WILL NOT APPLY", "INVALID"
EXIT = {OK: 0, PARTIAL: 1, WILL_NOT_APPLY: 2, INVALID: 2}
EXTREME_SCALE = 8.0          # α/r above this is almost always a mistake (α written for another rank)
LISTED = 8                   # modules listed per group in reports


# metadata fields and file-name parts that can name a derived model (Pony, Illustrious, Kontext …)
_NAMING_FIELDS = ("modelspec.architecture", "ss_base_model_version", "ss_sd_model_name", "modelspec.title")


@dataclass
class Diagnosis:
    file: str
    verdict: str
    summary: str
    fix: str | None = None
    info: dict[str, Any] | None = None
    coverage: dict[str, Any] | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: dict[str, str] | None = None

    @property
    def exit_code(self) -> int:
        return EXIT[self.verdict]

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["exit_code"] = self.exit_code
        return d


@dataclass
class DoctorReport:
    loras: list[Diagnosis]
    base: dict[str, Any] | None = None
    text_encoders: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return max((d.exit_code for d in self.loras), default=0)

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "text_encoders": self.text_encoders, "exit_code": self.exit_code,
                "loras": [d.to_json() for d in self.loras]}


# ---------------------------------------------------------------------------------------------
# Reference models: the base (every component it holds) and optional text-encoder files
# ---------------------------------------------------------------------------------------------

@dataclass
class TextEncoder:
    path: str
    component: str
    label: str
    shapes: dict[str, tuple[int, ...]]      # native module -> weight shape (ΔW orientation, fused rows assembled)
    params: dict[str, int] = field(default_factory=dict)      # solved sizes (row windows of fused weights)
    loose: dict[str, tuple[int, ...]] = field(default_factory=dict)   # loose parameter -> shape
    arch: str = ""                          # the architecture whose component it is


def module_shapes(base: BaseModel, component: str) -> dict[str, tuple[int, ...]]:
    """Every module's weight shape in a base as its tensors show it, in ΔW orientation (``out × in × *kernel``):
    a transposed tensor reversed, the row windows of a fused weight assembled."""
    out: dict[str, tuple[int, ...]] = {}
    for module, slots in base.by_module(component).items():
        weights = [s for s in slots if s.param == "weight"]
        if not weights:
            continue
        shapes = [tuple(base.file.shape(s.key)) for s in weights]
        shapes = [sh[::-1] if s.transpose else sh for s, sh in zip(weights, shapes)]
        if len(weights) == 1 and weights[0].rows is None:
            out[module] = shapes[0]
        else:
            rows = max((s.rows[1] if s.rows else sh[0]) for s, sh in zip(weights, shapes))
            out[module] = (rows, *shapes[0][1:])
    return out


def loose_shapes(base: BaseModel, component: str) -> dict[str, tuple[int, ...]]:
    """Loose parameters (norm scales) of one component of a base, by native name."""
    return {s.param: tuple(base.file.shape(s.key)) for s in base.slots.values()
            if s.module is None and s.component == component}


def open_text_encoder(path: str | os.PathLike[str], *, allow_pickle: bool = False,
                      arch_name: str | None = None) -> TextEncoder:
    """A text-encoder checkpoint (CLIP-L, OpenCLIP, T5; any container prefix, native or HF names) as the
    text-encoder component of ``arch_name`` (default: any registered architecture) its tensors fit best; the
    sizes an architecture fixes (CLIP-L is 768 wide in SD models) break ties."""
    archs = [resolve(arch_name)] if arch_name else [resolve(n) for n in available()]
    p = os.fspath(path)
    best: tuple[tuple[bool, int], TextEncoder] | None = None
    with open_weights(p, allow_pickle=allow_pickle) as f:
        for arch in archs:
            for name, comp in arch.components.items():
                if comp.role == "denoiser":
                    continue
                try:
                    bm = open_component(f, arch, name)
                except LorakitError:
                    continue
                if bm is None:
                    continue
                params = bm.arch.params.get(name, {})
                score = (all(params.get(k, v) == v for k, v in comp.fixed.items()), len(bm.slots))
                if best is None or score > best[0]:
                    best = (score, TextEncoder(p, name, comp.label, module_shapes(bm, name), dict(params),
                                               loose_shapes(bm, name), arch.name))
    if best is None:
        known = sorted({c.label for a in archs for c in a.components.values() if c.role != "denoiser"})
        raise InputFileError(f"not a text encoder lorakit knows (no {', '.join(known)} module found).", path=p,
                             hint="pass a text-encoder checkpoint; the denoiser goes to --base.")
    return best[1]


@dataclass
class _Ref:
    """What one component of the LoRA is checked against: a component of the base or a text-encoder file."""

    component: str
    label: str
    source: str                              # "base" or "text encoder"
    shapes: Mapping[str, tuple[int, ...]]
    params: Mapping[str, int]
    loose: Mapping[str, tuple[int, ...]]


def _refs(base: BaseModel | None, encoders: Mapping[str, TextEncoder]) -> dict[str, _Ref]:
    refs: dict[str, _Ref] = {}
    if base is not None:
        for c in base.components():
            refs[c] = _Ref(c, base.arch.spec.components[c].label, "base", module_shapes(base, c),
                           base.arch.params.get(c, {}), loose_shapes(base, c))
    for c, te in encoders.items():       # an explicit text-encoder file is what the user asks to check against
        refs[c] = _Ref(c, te.label, "text encoder", te.shapes, te.params, te.loose)
    return refs


def named_variant(spec: ArchSpec, variant: str, params: Mapping[str, Mapping[str, int]], text: str) -> str:
    """``variant``, or the metadata-only variant (Pony, Illustrious, Kontext …) that ``text`` (file name, metadata)
    names, when its sizes hold and it refines ``variant``'s."""
    current = next((v for v in spec.variants if v.name == variant), None)
    if current is not None and current.named_by:
        return variant
    merged: dict[str, int] = {}
    for p in params.values():
        merged.update(p)
    text = text.lower()
    for v in spec.variants:
        if v.named_by and any(w in text for w in v.named_by) and \
                all(merged.get(k, val) == val for k, val in v.when.items()) and \
                (current is None or dict(current.when).items() <= dict(v.when).items()):
            return v.name
    return variant


def _naming_text(f: WeightFile) -> str:
    return " ".join([os.path.basename(os.path.normpath(f.path or "")),
                     *(str(f.metadata.get(k, "")) for k in _NAMING_FIELDS)])


def _variant_of(spec: ArchSpec, name: str) -> Variant | None:
    return next((v for v in spec.variants if v.name == name), None)


def _label(spec: ArchSpec, variant: str) -> str:
    v = _variant_of(spec, variant)
    return v.label if v is not None else spec.label


def _base_variant(base: BaseModel) -> str:
    return named_variant(base.arch.spec, base.variant, base.arch.params, _naming_text(base.file))


def _base_info(base: BaseModel) -> dict[str, Any]:
    spec = base.arch.spec
    variant = _base_variant(base)
    return {"file": base.file.path, "architecture": spec.name, "architecture_label": spec.label,
            "layout": base.layout, "prefix": base.prefix, "variant": variant,
            "variant_label": _label(spec, variant),
            "components": {c: spec.components[c].label for c in base.components()},
            "sizes": dict(sorted(base.arch.params.get(spec.denoiser.name, {}).items())),
            "tensors": len(base.file.keys()), "passthrough": len(base.passthrough)}


# ---------------------------------------------------------------------------------------------
# Causes
# ---------------------------------------------------------------------------------------------

def _foreign(keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]],
             exclude: Iterable[str] = ()) -> tuple[str, int, str] | None:
    """(label, hits, example) of a recognised architecture among ``keys`` (``exclude``: registered architectures,
    whose files the parser reads itself)."""
    found = recognize(keys, shapes, exclude=set(exclude))
    if found is None:
        return None
    rec, hits = found
    return rec.label, len(hits), hits[0]


class _Matchers:
    """Format matchers per architecture (built once per doctor run)."""

    def __init__(self) -> None:
        self._by_arch: dict[str, list[FormatMatcher]] = {}

    def of(self, arch_name: str) -> list[FormatMatcher]:
        if arch_name not in self._by_arch:
            arch = resolve(arch_name)
            self._by_arch[arch_name] = [FormatMatcher(fmt, arch) for fmt in formats()]
        return self._by_arch[arch_name]

    def understood_after_strip(self, key: str, arch_name: str) -> str | None:
        """The leading prefix whose removal makes ``key`` a known LoRA key of the architecture, if any."""
        matchers = self.of(arch_name)
        for sep in (".", "_"):
            parts = key.split(sep)
            for i in range(1, min(len(parts) - 1, 4)):
                rest = sep.join(parts[i:])
                if any(m.accept(rest) is not None for m in matchers):
                    return sep.join(parts[:i]) + sep
        return None


def _unknown_groups(parsed: ParsedLora, matchers: _Matchers) -> list[dict[str, Any]]:
    keys = parsed.unknown_keys
    if not keys:
        return []
    groups: dict[str, dict[str, Any]] = {}
    label = parsed.arch.spec.label

    def add(cause: str, reason: str, fix: str | None, key: str) -> None:
        g = groups.setdefault(cause + reason, {"cause": cause, "reason": reason, "fix": fix, "keys": []})
        g["keys"].append(key)

    complete = {e.file_module for e in parsed.entries}
    shapes = {k: parsed.file.shape(k) for k in keys if k in parsed.file}
    foreign = _foreign(keys, shapes, exclude=available())
    by_module: dict[str, set[str]] = {}
    for k in keys:
        s = split_key(k)
        if s is not None:
            by_module.setdefault(s.module, set()).add(s.role)
    for k in keys:
        s = split_key(k)
        prefix = matchers.understood_after_strip(k, parsed.arch.name)
        if prefix is not None:
            add("prefix", f"keys carry an unexpected prefix {prefix!r}", f"rename the keys without {prefix!r}", k)
        elif foreign is not None and re.search("|".join(r.compiled().pattern for r in RECOGNIZERS
                                                          if r.label == foreign[0]), k):
            add("architecture", f"{foreign[0]} modules (not {label})", "use these with a " + foreign[0] + " model", k)
        elif s is not None and s.module not in complete and s.family in ("lora", "loha", "lokr", "meta", "dora"):
            roles = by_module.get(s.module, set())
            if {"down", "up"} <= roles or any(r.startswith(("hada_", "lokr_")) for r in roles):
                add("unknown", f"complete modules whose names are not {label} module names",
                    "run `lorakit inspect --json` and report the layout", k)
            else:
                missing = "lora_up" if "down" in roles and "up" not in roles else \
                    "lora_down" if "up" in roles and "down" not in roles else "factors"
                add("incomplete", f"modules missing their {missing}", "re-export the LoRA from its trainer", k)
        else:
            add("unknown", "keys lorakit does not understand", "run `lorakit inspect --json` and report the layout", k)
    return [{**g, "count": len(g["keys"]), "keys": g["keys"][:LISTED]} for g in groups.values()]


def _variant_label(spec_variants: Iterable[Variant], sym: str, value: int) -> str | None:
    """The structural variant whose only condition is ``sym == value`` (metadata-only variants never are)."""
    for v in spec_variants:
        if not v.named_by and v.when == {sym: value}:
            return v.label
    return None


def _short(label: str) -> str:
    return label.split(" (")[0]


def _mismatch_cause(parsed: ParsedLora, ref: _Ref, base_label: str, syms: set[str]) -> tuple[str, str, str]:
    """(cause, reason, fix) for a shape mismatch whose differing sizes are ``syms`` (the variant machinery names
    Fill, inpainting … models)."""
    lp = parsed.arch.params.get(ref.component, {})
    bp = ref.params
    variants = parsed.arch.spec.variants
    for sym in sorted(syms):
        if sym not in lp or sym not in bp:
            continue
        lv = _variant_label(variants, sym, lp[sym])
        bv = _variant_label(variants, sym, bp[sym])
        known = [v.label for v in variants if sym in v.when and not v.named_by]
        if lv or bv or known:
            mine = _short(lv) if lv else f"a model whose {sym} is {lp[sym]}"
            theirs = _short(bv) if bv else base_label
            reason = f"the LoRA is for {mine} ({sym} = {lp[sym]}); the base is {_short(theirs)} ({sym} = {bp[sym]})"
            if not lv and known:
                reason += " — other variants: " + "; ".join(known)
            fix = f"use a {_short(lv)} base for this LoRA" if lv else \
                "use the base variant this LoRA was trained on"
            return "variant", reason, fix
    diffs = ", ".join(f"{s}: {lp.get(s)} vs {bp.get(s)}" for s in sorted(syms))
    return ("model size", f"the LoRA was trained on a {ref.label} of another size ({diffs})",
            "use the base model this LoRA was trained for")


def _absent_cause(e: ModuleEntry, ref: _Ref, comp: ComponentSpec) -> tuple[str, str, str]:
    """(cause, reason, fix) for a LoRA module the base's component lacks; flag reasons are layout data."""
    bp = ref.params
    spec = e.match.spec
    if spec.requires and not bp.get(spec.requires, 1):
        reason, fix = comp.flag_reasons.get(spec.requires, (f"the base lacks the {spec.requires!r} modules",
                                                            "use the base this LoRA was trained for"))
        return "variant", reason, fix
    if spec.repeat and e.match.index is not None and e.match.index >= bp.get(spec.repeat, 0):
        return ("model size", f"block index beyond the base's {bp.get(spec.repeat, 0)} {spec.repeat} blocks",
                "use the base model this LoRA was trained for")
    return ("missing in base", f"the base's {ref.label} lacks these modules (pruned or incomplete checkpoint?)",
            "use a complete base checkpoint")


def _coverage(parsed: ParsedLora, base: BaseModel | None, encoders: Mapping[str, TextEncoder],
              unknown: list[dict[str, Any]], base_label: str = "") -> dict[str, Any]:
    unmatched: dict[str, dict[str, Any]] = {}
    mismatches: list[dict[str, Any]] = []
    applies = 0

    def miss(cause: str, reason: str, fix: str | None, module: str) -> None:
        g = unmatched.setdefault(cause + reason, {"cause": cause, "reason": reason, "fix": fix, "modules": []})
        g["modules"].append(module)

    spec = parsed.arch.spec
    den = spec.denoiser
    refs = _refs(base, encoders)
    status: list[str] = []       # per entry: applies / not_applied / unchecked (the --plot blocks)
    for e in parsed.entries:
        status.append("unchecked" if base is None and not encoders else "not_applied")
        label = f"{e.component}:{e.match.native}" + (f" ({e.file_module})" if e.match.alias.rows else "")
        comp = spec.components[e.component]
        ref = refs.get(e.component)
        if ref is None:
            if base is None:
                status[-1] = "unchecked"
            if base is not None and comp.role != "denoiser":
                miss("text encoder", f"{comp.label} modules: no {comp.label} text encoder was given",
                     f"pass --text-encoder with the {comp.label} checkpoint, or load the LoRA on the text "
                     f"encoder too (e.g. ComfyUI LoraLoader's clip input); the {den.label} part is unaffected",
                     label)
            elif base is not None:
                miss("missing in base", f"the base holds no {comp.label}", f"pass a base with the {comp.label}",
                     label)
            continue
        te = ref.source == "text encoder"
        if e.match.loose:   # a loose parameter (q/k norm scale): compare with the base tensor's shape
            shape = ref.loose.get(e.match.native)
            if shape is None:
                miss(*_absent_cause(e, ref, comp), label)
            elif tuple(shape) != tuple(e.shapes["diff"]):
                mismatches.append({"module": label, "lora": list(e.shapes["diff"]), "base": list(shape),
                                   "cause": "model size", "reason": "norm scale of another size",
                                   "fix": "use the base model this LoRA was trained for"})
            else:
                applies += 1
                status[-1] = "applies"
            continue
        shape = ref.shapes.get(e.match.native)
        if shape is None:
            if te:
                miss("missing in text encoder", f"the {ref.label} checkpoint lacks these modules",
                     f"use the {ref.label} the LoRA was trained with", label)
            else:
                miss(*_absent_cause(e, ref, comp), label)
            continue
        out_obs, in_obs = e.observed_shape()
        rows = row_window(e.match.alias, ref.params) if e.match.alias.rows else None
        exp_out = rows[1] - rows[0] if rows else shape[0]
        exp_in = shape[1] if len(shape) > 1 else None
        bad: set[str] = set()
        mspec = e.match.spec
        assert isinstance(mspec, ModuleSpec)      # loose parameters were handled above
        if out_obs is not None and out_obs != exp_out:
            bad |= symbols(e.match.alias.rows[1] if e.match.alias.rows else mspec.out) or {"out"}
        if in_obs is not None and exp_in is not None and in_obs != exp_in:
            bad |= symbols(mspec.inp) or {"in"}
        if not bad:
            applies += 1
            status[-1] = "applies"
            continue
        if te:
            cause, reason, fix = ("model size", f"{ref.label} of another size",
                                  f"use the {ref.label} the LoRA was trained with")
        else:
            cause, reason, fix = _mismatch_cause(parsed, ref, base_label, bad)
        mismatches.append({"module": label, "lora": [out_obs, in_obs], "base": [exp_out, exp_in],
                           "cause": cause, "reason": reason, "fix": fix})
    groups = [{**g, "count": len(g["modules"]), "modules": g["modules"][:LISTED]} for g in unmatched.values()]
    blocks = coverage_blocks(parsed, status)
    for u in unknown:
        groups.append({"cause": u["cause"], "reason": u["reason"], "fix": u["fix"], "count": u["count"],
                       "modules": u["keys"]})
    checked = [c for c in spec.components if c in refs and c in parsed.arch.params]
    return {"applies": applies, "modules": len(parsed.entries), "checked_components": checked,
            "unmatched": groups, "shape_mismatches": mismatches, "blocks": blocks}


def coverage_blocks(parsed: ParsedLora, status: Sequence[str]) -> list[dict[str, Any]]:
    """Per block of the architecture's scheme (``doctor --plot``): how many modules apply, will not apply, or
    were not checked (``status`` per parsed entry)."""
    from lorakit.lora.model import Target
    from lorakit.ops.strength import block_label, block_order
    counts: dict[str, Counter[str]] = {}
    for e, st in zip(parsed.entries, status):
        label = block_label(parsed.arch, Target(e.component, e.match.native, loose=e.match.loose))
        counts.setdefault(label, Counter())[st] += 1
    return [{"block": b, "applies": counts[b]["applies"], "not_applied": counts[b]["not_applied"],
             "unchecked": counts[b]["unchecked"]} for b in block_order(parsed.arch, set(counts))]


# ---------------------------------------------------------------------------------------------
# Checks on the LoRA alone
# ---------------------------------------------------------------------------------------------

def _info(parsed: ParsedLora, alphas: Mapping[str, float | None], ranks: Mapping[str, int | None],
          scales: Mapping[str, float | None]) -> dict[str, Any]:
    meta = metadata_summary(parsed.metadata)
    kinds = sorted({k for e in parsed.entries if (k := entry_kind(e))} |
                   ({"dora"} if any("dora" in e.keys for e in parsed.entries) else set()))
    variants = {v.name: v.label for v in parsed.arch.spec.variants}
    return {"format": parsed.format, "format_label": parsed.detection.format.label,
            "architecture": parsed.arch.name, "variant": parsed.arch.variant,
            "variant_label": variants.get(parsed.arch.variant, parsed.arch.variant),
            "adapters": kinds, "modules": len(parsed.entries),
            "components": sorted({e.component for e in parsed.entries}),
            "ranks": dict(sorted(Counter(r for r in ranks.values() if r is not None).items())),
            "alphas": dict(sorted(Counter(a for a in alphas.values() if a is not None).items())),
            "scales": dict(sorted(Counter(round(s, 6) for s in scales.values() if s is not None).items())),
            "trainer": meta.get("trainer"), "base_model": meta.get("base_model"),
            "unknown_key_count": len(parsed.unknown_keys)}


def _dtype_warnings(f: WeightFile, parsed: ParsedLora) -> tuple[dict[str, Any], list[str]]:
    factor_keys = [k for e in parsed.entries for role, k in e.keys.items() if role != "alpha"]
    codes = Counter(f.infos[k].dtype for k in factor_keys)
    warnings = []
    if "F64" in codes:
        warnings.append(f"{codes['F64']} factor tensors are fp64: twice the size of fp32 for no benefit. "
                        "Fix: `lorakit convert --to kohya --dtype bf16` (or fp32)")
    ints = {c: n for c, n in codes.items() if c not in FLOAT_CODES}
    if ints:
        warnings.append(f"integer/bool factor tensors ({', '.join(f'{c}×{n}' for c, n in sorted(ints.items()))}): "
                        "loaders will cast or refuse them; the file is probably damaged")
    floats = sorted(c for c in codes if c in FLOAT_CODES)
    if len(floats) > 1:
        warnings.append(f"mixed factor dtypes ({', '.join(f'{c}×{codes[c]}' for c in floats)}): some loaders "
                        "cast everything to the first one. Fix: `lorakit convert --dtype DTYPE`")
    return {"factor_dtypes": dict(codes)}, warnings


def _scale_warnings(scales: Mapping[str, float | None], alphas: Mapping[str, float | None],
                    ranks: Mapping[str, int | None]) -> tuple[dict[str, Any], list[str]]:
    extreme = {m: s for m, s in scales.items() if s is not None and (s != s or abs(s) > EXTREME_SCALE)}
    negative = {m: s for m, s in scales.items() if s is not None and s <= 0}
    warnings = []
    if extreme:
        m = next(iter(extreme))
        warnings.append(f"{len(extreme)} modules have an extreme scale α/r (e.g. {m}: α={alphas.get(m)}, "
                        f"rank {ranks.get(m)}, scale {extreme[m]:g} > {EXTREME_SCALE:g}): α was probably written "
                        "for another rank or convention; expect burned-out images")
    if negative:
        m = next(iter(negative))
        warnings.append(f"{len(negative)} modules have a zero or negative α (e.g. {m}: scale {negative[m]:g})")
    return {"extreme_scale_modules": sorted(extreme)[:LISTED], "extreme_scale_count": len(extreme),
            "nonpositive_scale_count": len(negative)}, warnings


def _hash_warnings(f: WeightFile) -> list[str]:
    from lorakit.io.hashes import sshs_hashes_of
    stored = f.metadata.get("sshs_model_hash")
    legacy = f.metadata.get("sshs_legacy_hash")
    if not stored and not legacy:
        return []
    model_hash, legacy_hash = sshs_hashes_of(f)
    stale = [k for k, v, want in (("sshs_model_hash", stored, model_hash), ("sshs_legacy_hash", legacy, legacy_hash))
             if v and v.lower() != want]
    if stale:
        return [f"stored {', '.join(stale)} do not match the tensors (stale copies from another file?); Civitai and "
                f"A1111 will show wrong hashes. Fix: `lorakit meta {f.path} --rehash`"]
    return []


# ---------------------------------------------------------------------------------------------
# The doctor
# ---------------------------------------------------------------------------------------------

def _failed(path: str, exc: LorakitError, verdict: str, base_label: str | None) -> Diagnosis:
    fix = exc.hint
    summary = exc.message
    if isinstance(exc, UnsupportedArchitectureError):
        summary = exc.message + (f" It will not apply to the {base_label} base." if base_label else "")
    elif isinstance(exc, NotALoraError) and fix is None:
        fix = "pass a LoRA file; base models go to --base"
    return Diagnosis(path, verdict, summary, fix, error={"type": type(exc).__name__, "message": str(exc)})


def _parse_for(f: WeightFile, base: BaseModel | None, from_format: str | None) -> ParsedLora:
    """The LoRA read as detected; when its keys fit the base's architecture equally well (an SD1.5 and an SDXL
    reading of diffusers-named resnet keys), read as the base's architecture."""
    parsed = parse(f, force_format=from_format)
    if base is not None and parsed.arch.name != base.arch.name and \
            base.arch.spec.label in parsed.detection.also_fits:
        parsed = parse(f, arch_name=base.arch.name, force_format=from_format)
    return parsed


def _architecture_mismatch(p: str, parsed: ParsedLora, base: BaseModel, base_label: str) -> Diagnosis:
    lora_label = _short(_label(parsed.arch.spec, parsed.arch.variant))
    arch_l, arch_b = parsed.arch.spec.label, base.arch.spec.label
    on = f"the {arch_b} base" + (f" ({base_label})" if base_label and base_label != arch_b else "")
    what = lora_label if lora_label.startswith(arch_l) else f"{arch_l} ({lora_label})"
    return Diagnosis(p, WILL_NOT_APPLY,
                     f"this is a {what} LoRA ({parsed.format}, {len(parsed.entries)} modules in "
                     f"{', '.join(sorted({e.component for e in parsed.entries}))}); it will not apply to {on}: "
                     f"{arch_l} and {arch_b} modules differ in names and sizes.",
                     f"use it with a {arch_l} model, or use a {arch_b} LoRA with this base",
                     error={"type": "ArchitectureError", "message": f"{arch_l} LoRA, {arch_b} base"})


def _variant_notes(parsed: ParsedLora, base: BaseModel | None) -> list[str]:
    """Notes on variants only metadata names (Pony, Illustrious, NoobAI, Kontext): they share their parent's
    layout, so the LoRA applies, but the base it was trained for matters."""
    spec = parsed.arch.spec
    mine = _variant_of(spec, parsed.arch.variant)
    theirs = _variant_of(spec, _base_variant(base)) if base is not None else None
    if mine is not None and mine.named_by:
        name = _short(mine.label)
        if theirs is not None and theirs.named_by and theirs.name != mine.name:
            return [f"trained for {name} (metadata); the base is {_short(theirs.label)}: the same {spec.label} "
                    f"layout, so it applies, but derived models drift apart: expect weaker or different results"]
        if theirs is None or theirs.name != mine.name:
            parent = _short(_label(spec, base.variant)) if base is not None else spec.label
            return [f"trained for {name} (metadata): it fits any {parent}-shaped base, but is meant for {name}; "
                    f"shapes cannot tell a {name} base apart"]
    elif theirs is not None and theirs.named_by and mine is not None:
        return [f"the base is {_short(theirs.label)} (its name/metadata); this LoRA names no derived model and "
                f"was probably trained on {_short(mine.label)}: it applies, results may differ"]
    return []


def diagnose(path: str | os.PathLike[str], base: BaseModel | None = None, *,
             encoders: Mapping[str, TextEncoder] | None = None, allow_pickle: bool = False,
             from_format: str | None = None, matchers: _Matchers | None = None) -> Diagnosis:
    """Diagnose one LoRA (against an already opened base)."""
    p = os.fspath(path)
    encoders = encoders or {}
    matchers = matchers or _Matchers()
    base_label = None
    if base is not None:
        base_label = _short(_label(base.arch.spec, _base_variant(base)))
    try:
        f = open_weights(p, allow_pickle=allow_pickle)
    except LorakitError as exc:
        return _failed(p, exc, INVALID, base_label)
    with f:
        try:
            parsed = _parse_for(f, base, from_format)
        except UnsupportedArchitectureError as exc:
            d = _failed(p, exc, WILL_NOT_APPLY, base_label)
            foreign = _foreign(f.keys(), {k: f.shape(k) for k in f.keys()})
            if foreign is not None:
                d.fix = f"use it with a {foreign[0]} model"
            return d
        except LorakitError as exc:
            return _failed(p, exc, INVALID, base_label)
        if base is not None and parsed.arch.name != base.arch.name:
            return _architecture_mismatch(p, parsed, base, base_label or base.arch.spec.label)
        shapes = {k: f.shape(k) for k in f.keys()}
        foreign = _foreign(parsed.unknown_keys, shapes, exclude=available())
        if foreign and foreign[1] >= max(1, len(f.keys()) // 4):
            label, hits, example = foreign
            target = base.arch.spec.label if base is not None else parsed.arch.spec.label
            return Diagnosis(p, WILL_NOT_APPLY,
                             f"this is a {label} LoRA ({hits} of {len(f.keys())} keys, e.g. {example!r}); "
                             f"it will not apply to a {target} model"
                             + (f" (the base is {base_label})" if base_label else "")
                             + (f"; only {len(parsed.entries)} modules match {parsed.arch.spec.label} names"
                                if parsed.entries else "") + ".",
                             f"use it with a {label} model", error={"type": "UnsupportedArchitectureError",
                                                                     "message": f"{label} LoRA"})
        try:
            alphas = read_alphas(parsed)
            ranks = {e.file_module: entry_rank(e) for e in parsed.entries}
            scales = {m: entry_scale(e, alphas[m], ranks[m]) for m, e in ((e.file_module, e) for e in parsed.entries)}
            deep = deep_checks(parsed)
            hash_warn = _hash_warnings(f)
        except LorakitError as exc:
            return _failed(p, exc, INVALID, base_label)
        info = _info(parsed, alphas, ranks, scales)
        dchecks, dwarn = _dtype_warnings(f, parsed)
        split_warn = split_qkv_warnings(parsed)
        schecks, swarn = _scale_warnings(scales, alphas, ranks)
        unknown = _unknown_groups(parsed, matchers)
        cov = _coverage(parsed, base, encoders, unknown, base_label or "")
    d = Diagnosis(p, OK, "", info=info, coverage=cov)
    d.checks = {"nonfinite_modules": deep["nonfinite_modules"][:LISTED],
                "nonfinite_count": len(deep["nonfinite_modules"]),
                "zero_up_modules": deep["zero_up_modules"][:LISTED], "zero_up_count": len(deep["zero_up_modules"]),
                "delta_norm_max": deep["delta_norm_max"], **dchecks, **schecks}
    d.warnings = dwarn + swarn + hash_warn + split_warn
    for n in parsed.arch.spec.portability:
        if n.format != parsed.format:
            continue
        if n.layout is not None and (base is None or base.layout != n.layout):
            continue
        if n.namings and not any(e.naming in n.namings and e.match.alias.template != e.match.spec.native
                                 for e in parsed.entries):
            continue      # only modules whose name in those namings is not also the native one count
        if not n.groups or any(e.match.spec.group in n.groups for e in parsed.entries):
            d.notes.append(f"{n.note}. Fix: {n.fix}")
    d.notes.extend(_variant_notes(parsed, base))
    _verdict(d, parsed, base, base_label, len(deep["nonfinite_modules"]), len(deep["zero_up_modules"]))
    return d


def _verdict(d: Diagnosis, parsed: ParsedLora, base: BaseModel | None, base_label: str | None, nonfinite: int,
             zero_up: int) -> None:
    cov = d.coverage or {}
    total = len(parsed.entries)
    where = f" to the {base_label} base" if base is not None else ""
    if nonfinite:
        d.verdict = INVALID
        d.summary = f"{nonfinite} of {total} modules hold NaN/Inf values; applying it would turn images to noise."
        d.fix = "use an earlier checkpoint of this training run (merge and bake refuse it)"
        return
    if total and zero_up == total:
        d.verdict = WILL_NOT_APPLY
        d.summary = f"every one of the {total} modules has an all-zero up matrix: the LoRA changes nothing " \
                    "(saved before training started?)."
        d.fix = "use a trained checkpoint"
        return
    mism = cov.get("shape_mismatches", [])
    groups = cov.get("unmatched", [])
    applies = cov.get("applies", 0)
    if mism:
        first = mism[0]
        names = sorted({m["module"].split(" ")[0] for m in mism})
        d.verdict = WILL_NOT_APPLY
        d.summary = (f"{len(mism)} module(s) do not fit the base's shapes ({', '.join(names[:3])}"
                     f"{' …' if len(names) > 3 else ''}: LoRA {first['lora']} vs base {first['base']}); "
                     f"{first['reason']}. Loaders refuse size mismatches.")
        d.fix = first["fix"]
        return
    checked = cov.get("checked_components", [])
    if checked and applies == 0:
        d.verdict = WILL_NOT_APPLY
        reason = groups[0]["reason"] if groups else "no module matches"
        d.summary = f"none of the {total} modules applies{where}: {reason}."
        d.fix = groups[0]["fix"] if groups else None
        return
    problems = [g for g in groups]
    if problems or zero_up:
        parts = [f"{g['reason']} ({g['count']}" + (f", e.g. {g['modules'][0]}" if g["cause"] == "missing in base"
                                                   and g["modules"] else "") + ")" for g in problems]
        if zero_up:
            parts.append(f"{zero_up} modules have all-zero up matrices (untrained; they change nothing)")
        d.verdict = PARTIAL
        head = f"{applies} of {total} modules apply{where}" if checked else f"{total} modules understood"
        d.summary = head + "; " + "; ".join(parts) + "."
        d.fix = problems[0]["fix"] if problems else "retrain or drop the untrained modules"
        return
    d.verdict = OK
    if checked:
        tes = [parsed.arch.spec.components[c].label for c in checked if c != parsed.arch.spec.denoiser.name]
        d.summary = f"all {total} modules apply{where}" + (f" ({', '.join(tes)} checked)" if tes else "") + "."
    else:
        d.summary = f"all {total} modules are well-formed {parsed.arch.spec.label} " \
                    f"{', '.join(d.info['adapters']) if d.info else ''} (no base given: coverage not checked)."


def doctor(loras: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], base: str | os.PathLike[str] | None = None,
           *, text_encoders: Sequence[str | os.PathLike[str]] = (), allow_pickle: bool = False,
           from_format: str | None = None, jobs: int = 1, progress: Progress | None = None) -> DoctorReport:
    """Diagnose LoRAs, optionally against a base model (every component it holds) and text-encoder files.
    Verdicts are returned, not raised; an unreadable base or text encoder raises (LorakitError). ``jobs > 1``
    diagnoses that many LoRAs at a time in worker processes (the batch runner); ``progress(done, total, file)``."""
    if isinstance(loras, (str, os.PathLike)):
        loras = [loras]
    base_model = None
    report = DoctorReport([])
    if base is not None:
        base_model = open_model(base, allow_pickle=allow_pickle)
        report.base = _base_info(base_model)
    encoders: dict[str, TextEncoder] = {}
    try:
        for te_path in text_encoders:
            te = open_text_encoder(te_path, allow_pickle=allow_pickle,
                                   arch_name=base_model.arch.name if base_model is not None else None)
            encoders[te.component] = te
            report.text_encoders.append({"file": te.path, "component": te.component, "label": te.label,
                                         "architecture": te.arch, "modules": len(te.shapes)})
        if jobs > 1:
            report.loras = _diagnose_parallel(loras, base, text_encoders, allow_pickle, from_format, jobs, progress)
            if base is not None and base_model is not None:
                for d, path in zip(report.loras, loras):
                    if d.error is None:
                        predict_retention(d, base, path, base_model.file)
            return report
        matchers = _Matchers()
        for i, path in enumerate(loras, 1):
            report.loras.append(diagnose(path, base_model, encoders=encoders, allow_pickle=allow_pickle,
                                         from_format=from_format, matchers=matchers))
            if base is not None and base_model is not None and report.loras[-1].error is None:
                predict_retention(report.loras[-1], base, path, base_model.file)
            report_progress(progress, i, len(loras), os.fspath(path))
    finally:
        if base_model is not None:
            base_model.file.close()
    return report


def predict_retention(d: Diagnosis, base: str | os.PathLike[str], lora: str | os.PathLike[str],
                      file: WeightFile) -> None:
    """Into ``d``: what baking ``lora`` into a quantized ``base`` would keep of its delta (measured as the bake
    computes it, nothing written), or why that bake would be refused."""
    from lorakit.ops.baking.quantized import quantized_base
    if quantized_base(file) is None:
        return
    from lorakit.ops.baking import bake
    try:
        r = bake(base, [lora], None, retention_only=True, allow_partial=True, allow_zero_lora=True)
    except LorakitError as exc:
        d.warnings.append(f"baking into this quantized base would fail: {exc}")
        return
    q: Any = r.quantized
    if q is None:
        return
    d.checks["retention"] = q
    d.notes.append(f"baking into this {q['convention']} base keeps {q['retention']:.0%} of the delta "
                   f"(‖Q(W+ΔW) − W‖/‖ΔW‖ over {q['requantized']} requantized tensors; {', '.join(q['policy'])})")
    d.warnings += r.warnings


def _diagnose_parallel(loras: Sequence[str | os.PathLike[str]], base: str | os.PathLike[str] | None,
                       text_encoders: Sequence[str | os.PathLike[str]], allow_pickle: bool, from_format: str | None,
                       jobs: int, progress: Progress | None) -> list[Diagnosis]:
    from lorakit.ops.batch import Item, run_batch
    from lorakit.ops.batch_tasks import DoctorTask
    task = DoctorTask(None if base is None else os.fspath(base), tuple(os.fspath(t) for t in text_encoders),
                      allow_pickle, from_format)
    batch = run_batch(task, [Item(os.fspath(p)) for p in loras], jobs=jobs, progress=progress)
    out = []
    for rec in batch.records:
        if isinstance(rec.result, dict):
            out.append(Diagnosis(**{k: v for k, v in rec.result.items() if k != "exit_code"}))
        else:       # the worker failed outside diagnose (it died)
            out.append(Diagnosis(rec.file, INVALID, rec.summary, error=rec.error))
    return out


def format_report(report: DoctorReport) -> str:
    """The human-readable text of a doctor report."""
    lines: list[str] = []
    if report.base:
        b = report.base
        comps = b.get("components") or {}
        lines.append(f"base {b['file']}: {b['variant_label']}, {b['layout']} layout"
                     + (f" (prefix {b['prefix']!r})" if b["prefix"] else "") + f", {b['tensors']} tensors"
                     + (f"; holds {', '.join(comps.values())}" if len(comps) > 1 else ""))
    for te in report.text_encoders:
        lines.append(f"text encoder {te['file']}: {te['label']}, {te['modules']} modules")
    for d in report.loras:
        lines.append("")
        lines.append(d.file)
        if d.info:
            i = d.info
            lines.append(f"  is            {i['format']} {', '.join(i['adapters'])} for {i['architecture']} "
                         f"({i['variant_label']}); {i['modules']} modules in {', '.join(i['components'])}")
            lines.append("  rank/alpha    " + ", ".join(f"{k}×{v}" for k, v in i["ranks"].items())
                         + " / " + (", ".join(f"{k:g}×{v}" for k, v in i["alphas"].items()) or "none (α = rank)"))
            if i.get("trainer"):
                lines.append(f"  trainer       {i['trainer']}" + (f"; base {i['base_model']}" if i.get("base_model")
                                                                  else ""))
        cov = d.coverage
        if cov and cov.get("checked_components"):
            lines.append(f"  coverage      {cov['applies']}/{cov['modules']} modules apply "
                         f"(checked: {', '.join(cov['checked_components'])})")
        if cov:
            for g in cov["unmatched"]:
                lines.append(f"  unmatched     {g['count']} — {g['reason']} (e.g. {', '.join(g['modules'][:3])})")
            for m in cov["shape_mismatches"][:LISTED]:
                lines.append(f"  shape         {m['module']}: LoRA {m['lora']} vs base {m['base']} — {m['reason']}")
        for w in d.warnings:
            lines.append(f"  warning       {w}")
        for n in d.notes:
            lines.append(f"  note          {n}")
        lines.append(f"  VERDICT       {d.verdict}: {d.summary}" + (f" Fix: {d.fix.rstrip('.')}." if d.fix else ""))
    return "\n".join(lines).lstrip("\n")
