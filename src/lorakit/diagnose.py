"""``lorakit doctor``: will this LoRA apply, to this base, and if not, why and how to fix it.

Per LoRA: what it is (format, variant, adapters, ranks/alphas, trainer), tensor health (NaN/Inf,
all-zero ups, extreme α/r, odd dtypes, stale hashes) and, with a base model, coverage: modules that
apply, modules that match nothing grouped by likely cause, and shape mismatches. Every outcome is a
verdict — OK (exit 0), PARTIAL (1), WILL NOT APPLY or INVALID (2) — returned, not raised; only a bad
base or text-encoder file raises (there is nothing to diagnose against).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .basemodel import BaseModel, open_base
from .dtypes import FLOAT_CODES
from .errors import InputFileError, LorakitError, NotALoraError, UnsupportedArchitectureError
from .formats import parse
from .formats.parse import FormatMatcher, ModuleEntry, ParsedLora, _rows
from .formats.spec import formats, split_key
from .inspection import _deep, _kind, _rank, _read_alphas, _scale, metadata_summary, split_qkv_warnings
from .io import WeightFile, open_weights
from .layouts import RECOGNIZERS, NameIndex, evaluate, recognize, resolve, symbols

OK, PARTIAL, WILL_NOT_APPLY, INVALID = "OK", "PARTIAL", "WILL NOT APPLY", "INVALID"
EXIT = {OK: 0, PARTIAL: 1, WILL_NOT_APPLY: 2, INVALID: 2}
EXTREME_SCALE = 8.0          # α/r above this is almost always a mistake (α written for another rank)
LISTED = 8                   # modules listed per group in reports

# Format-level portability notes: (format, base layout or None for any) -> (note, fix).
PORTABILITY: dict[tuple[str, str | None], tuple[str, str]] = {
    ("lycoris", None): ("ComfyUI does not load SimpleTuner `lycoris_` keys (Comfy-Org/ComfyUI#4476)",
                        "convert with `lorakit convert --to kohya`"),
    ("peft", None): ("ComfyUI does not load FLUX LoRAs with `base_model.model.` keys (Comfy-Org/ComfyUI#4347)",
                     "convert with `lorakit convert --to comfy` (or --to kohya)"),
    ("onetrainer", None): ("Forge and newer loaders mis-read OneTrainer legacy `lora_transformer_` keys",
                           "convert with `lorakit convert --to kohya`"),
    ("diffsynth", None): ("diffusers' loader silently ignores keys without the `transformer.` prefix",
                          "convert with `lorakit convert --to diffusers`"),
    ("kohya", "diffusers"): ("diffusers silently drops kohya FLUX embedder and final-layer keys "
                             "(formats.md §6.1)", "convert with `lorakit convert --to diffusers`"),
}


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
# Reference models: the transformer base and optional text encoders
# ---------------------------------------------------------------------------------------------

@dataclass
class TextEncoder:
    path: str
    component: str
    label: str
    shapes: dict[str, tuple[int, ...]]      # native module -> weight shape


def open_text_encoder(path: str | os.PathLike[str], *, allow_pickle: bool = False,
                      arch_name: str = "flux1") -> TextEncoder:
    """A CLIP-L or T5 checkpoint (any container prefix), matched by native module names."""
    arch = resolve(arch_name)
    p = os.fspath(path)
    with open_weights(p, allow_pickle=allow_pickle) as f:
        best: tuple[int, str, dict[str, tuple[int, ...]]] | None = None
        for name, comp in arch.components.items():
            if comp.role == "denoiser":
                continue
            index = NameIndex(comp, "native", flat=False)
            found: dict[str, tuple[int, ...]] = {}
            for key in f.keys():
                if not key.endswith(".weight"):
                    continue
                parts = key[: -len(".weight")].split(".")
                for i in range(len(parts)):
                    m = index.match(".".join(parts[i:]))
                    if m is not None:
                        found[m.native] = f.shape(key)
                        break
            if found and (best is None or len(found) > best[0]):
                best = (len(found), name, found)
    if best is None:
        raise InputFileError("not a text encoder lorakit knows (no CLIP-L or T5 module found).", path=p,
                             hint="pass the CLIP-L or T5-XXL checkpoint; the transformer goes to --base.")
    comp = arch.components[best[1]]
    return TextEncoder(p, best[1], comp.label, best[2])


def _base_info(base: BaseModel) -> dict[str, Any]:
    variants = {v.name: v.label for v in base.arch.spec.variants}
    return {"file": base.file.path, "layout": base.layout, "prefix": base.prefix, "variant": base.variant,
            "variant_label": variants.get(base.variant, base.variant),
            "sizes": dict(sorted(base.arch.params.get(base.arch.spec.denoiser.name, {}).items())),
            "tensors": len(base.file.keys()), "passthrough": len(base.passthrough)}


# ---------------------------------------------------------------------------------------------
# Causes
# ---------------------------------------------------------------------------------------------

def _foreign(keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, int, str] | None:
    """(label, hits, example) of a recognised non-FLUX.1 architecture among ``keys``."""
    found = recognize(keys, shapes)
    if found is None:
        return None
    rec, hits = found
    return rec.label, len(hits), hits[0]


class _Matchers:
    def __init__(self, arch_name: str = "flux1") -> None:
        arch = resolve(arch_name)
        self.matchers = [FormatMatcher(fmt, arch) for fmt in formats()]

    def understood_after_strip(self, key: str) -> str | None:
        """The leading prefix whose removal makes ``key`` a known LoRA key, if any."""
        for sep in (".", "_"):
            parts = key.split(sep)
            for i in range(1, min(len(parts) - 1, 4)):
                rest = sep.join(parts[i:])
                if any(m.accept(rest) is not None for m in self.matchers):
                    return sep.join(parts[:i]) + sep
        return None


def _unknown_groups(parsed: ParsedLora, matchers: _Matchers) -> list[dict[str, Any]]:
    keys = parsed.unknown_keys
    if not keys:
        return []
    groups: dict[str, dict[str, Any]] = {}

    def add(cause: str, reason: str, fix: str | None, key: str) -> None:
        g = groups.setdefault(cause + reason, {"cause": cause, "reason": reason, "fix": fix, "keys": []})
        g["keys"].append(key)

    complete = {e.file_module for e in parsed.entries}
    shapes = {k: parsed.file.shape(k) for k in keys if k in parsed.file}
    foreign = _foreign(keys, shapes)
    by_module: dict[str, set[str]] = {}
    for k in keys:
        s = split_key(k)
        if s is not None:
            by_module.setdefault(s.module, set()).add(s.role)
    for k in keys:
        s = split_key(k)
        prefix = matchers.understood_after_strip(k)
        if prefix is not None:
            add("prefix", f"keys carry an unexpected prefix {prefix!r}", f"rename the keys without {prefix!r}", k)
        elif foreign is not None and re.search("|".join(r.compiled().pattern for r in RECOGNIZERS
                                                          if r.label == foreign[0]), k):
            add("architecture", f"{foreign[0]} modules (not FLUX.1)", "use these with a " + foreign[0] + " model", k)
        elif s is not None and s.module not in complete and s.family in ("lora", "loha", "lokr", "meta", "dora"):
            roles = by_module.get(s.module, set())
            if {"down", "up"} <= roles or any(r.startswith(("hada_", "lokr_")) for r in roles):
                add("unknown", "complete modules whose names are not FLUX.1 module names",
                    "run `lorakit inspect --json` and report the layout", k)
            else:
                missing = "lora_up" if "down" in roles and "up" not in roles else \
                    "lora_down" if "up" in roles and "down" not in roles else "factors"
                add("incomplete", f"modules missing their {missing}", "re-export the LoRA from its trainer", k)
        else:
            add("unknown", "keys lorakit does not understand", "run `lorakit inspect --json` and report the layout", k)
    return [{**g, "count": len(g["keys"]), "keys": g["keys"][:LISTED]} for g in groups.values()]


def _variant_label(spec_variants: Iterable[Any], sym: str, value: int) -> str | None:
    for v in spec_variants:
        if v.when == {sym: value}:
            return v.label
    return None


def _short(label: str) -> str:
    return label.split(" (")[0]


def _mismatch_cause(parsed: ParsedLora, base: BaseModel, syms: set[str]) -> tuple[str, str, str]:
    """(cause, reason, fix) for a shape mismatch whose differing sizes are ``syms``."""
    den = base.arch.spec.denoiser.name
    lp = parsed.arch.params.get(den, {})
    bp = base.arch.params[den]
    variants = parsed.arch.spec.variants
    for sym in sorted(syms):
        if sym not in lp or sym not in bp:
            continue
        lv = _variant_label(variants, sym, lp[sym])
        bv = _variant_label(variants, sym, bp[sym])
        known = [v.label for v in variants if sym in v.when]
        if lv or bv or known:
            mine = _short(lv) if lv else f"a model whose {sym} is {lp[sym]}"
            theirs = _short(bv) if bv else ({v.name: v.label for v in variants}.get(base.variant, base.variant))
            reason = (f"the LoRA is for {mine} ({sym} = {lp[sym]}); the base is {_short(theirs)} ({sym} = {bp[sym]})")
            if not lv and known:
                reason += " — other variants: " + "; ".join(known)
            fix = f"use a {_short(lv)} base for this LoRA" if lv else \
                "use the base variant this LoRA was trained on"
            return "variant", reason, fix
    diffs = ", ".join(f"{s}: {lp.get(s)} vs {bp.get(s)}" for s in sorted(syms))
    return ("model size", f"the LoRA was trained on a model of another size ({diffs})",
            "use the base model this LoRA was trained for")


def _absent_cause(e: ModuleEntry, base: BaseModel) -> tuple[str, str, str]:
    bp = base.arch.params[base.arch.spec.denoiser.name]
    spec = e.match.spec
    if spec.requires and not bp.get(spec.requires, 1):
        if spec.requires == "modulation":
            return ("variant", "the base has no modulation layers (Chroma): these modules are unused",
                    "expected for a FLUX.1 LoRA on Chroma; the rest applies")
        if spec.requires == "guidance":
            return ("variant", "this LoRA has guidance_in (a FLUX.1-dev LoRA); the base has no guidance embedder "
                    "(schnell)", "use a FLUX.1-dev base, this LoRA has guidance_in")
        return ("variant", f"the base lacks the {spec.requires!r} modules", "use the base this LoRA was trained for")
    if spec.repeat and e.match.index is not None and e.match.index >= bp.get(spec.repeat, 0):
        return ("model size", f"block index beyond the base's {bp.get(spec.repeat, 0)} {spec.repeat} blocks",
                "use the base model this LoRA was trained for")
    return ("missing in base", "the base file lacks these modules (pruned or incomplete checkpoint?)",
            "use a complete base checkpoint")


def _coverage(parsed: ParsedLora, base: BaseModel | None, encoders: Mapping[str, TextEncoder],
              unknown: list[dict[str, Any]]) -> dict[str, Any]:
    unmatched: dict[str, dict[str, Any]] = {}
    mismatches: list[dict[str, Any]] = []
    applies = 0

    def miss(cause: str, reason: str, fix: str | None, module: str) -> None:
        g = unmatched.setdefault(cause + reason, {"cause": cause, "reason": reason, "fix": fix, "modules": []})
        g["modules"].append(module)

    present = set(base.by_module()) if base is not None else set()
    den = parsed.arch.spec.denoiser.name
    bmods = base.arch.module_map(den) if base is not None else {}
    bparams = base.arch.params[den] if base is not None else {}
    labels = {n: c.label for n, c in parsed.arch.spec.components.items()}
    for e in parsed.entries:
        label = f"{e.component}:{e.match.native}" + (f" ({e.file_module})" if e.match.alias.rows else "")
        out_obs, in_obs = e.observed_shape()
        if e.component != den:
            te = encoders.get(e.component)
            if te is None and base is None:
                continue
            if te is None:
                miss("text encoder", f"{labels[e.component]} modules: no {labels[e.component]} text encoder was given",
                     f"pass --text-encoder with the {labels[e.component]} checkpoint, or load the LoRA on the text "
                     f"encoder too (e.g. ComfyUI LoraLoader's clip input); the transformer part is unaffected",
                     label)
                continue
            shape = te.shapes.get(e.match.native)
            if shape is None:
                miss("missing in text encoder", f"the {te.label} checkpoint lacks these modules",
                     f"use the {te.label} the LoRA was trained with", label)
            elif (out_obs is not None and out_obs != shape[0]) or (in_obs is not None and in_obs != shape[1]):
                mismatches.append({"module": label, "lora": [out_obs, in_obs], "base": list(shape),
                                   "cause": "model size", "reason": f"{te.label} of another size",
                                   "fix": f"use the {te.label} the LoRA was trained with"})
            else:
                applies += 1
            continue
        if base is None:
            continue
        if e.match.loose:   # a loose parameter (q/k norm scale): compare with the base tensor's shape
            key = next((s.key for s in base.slots.values() if s.module is None and s.param == e.match.native), None)
            if key is None:
                miss(*_absent_cause(e, base), label)
            elif tuple(base.file.shape(key)) != tuple(e.shapes["diff"]):
                mismatches.append({"module": label, "lora": list(e.shapes["diff"]),
                                   "base": list(base.file.shape(key)), "cause": "model size",
                                   "reason": "norm scale of another size", "fix": "use the base model this LoRA "
                                                                                    "was trained for"})
            else:
                applies += 1
            continue
        mod = bmods.get(e.match.native)
        if mod is None or e.match.native not in present:
            miss(*_absent_cause(e, base), label)
            continue
        rows = _rows(e.match.alias, bparams)
        exp_out = rows[1] - rows[0] if rows else mod.out
        bad = set()
        spec = e.match.spec
        if out_obs is not None and out_obs != exp_out:
            bad |= symbols(e.match.alias.rows[1] if e.match.alias.rows else spec.out)
        if in_obs is not None and in_obs != mod.inp:
            bad |= symbols(spec.inp)
        if bad:
            cause, reason, fix = _mismatch_cause(parsed, base, bad)
            mismatches.append({"module": label, "lora": [out_obs, in_obs], "base": [exp_out, mod.inp],
                               "cause": cause, "reason": reason, "fix": fix})
        else:
            applies += 1
    groups = [{**g, "count": len(g["modules"]), "modules": g["modules"][:LISTED]} for g in unmatched.values()]
    for u in unknown:
        groups.append({"cause": u["cause"], "reason": u["reason"], "fix": u["fix"], "count": u["count"],
                       "modules": u["keys"]})
    checked = [c for c in parsed.arch.params if c == den and base is not None or c in encoders]
    return {"applies": applies, "modules": len(parsed.entries), "checked_components": checked,
            "unmatched": groups, "shape_mismatches": mismatches}


# ---------------------------------------------------------------------------------------------
# Checks on the LoRA alone
# ---------------------------------------------------------------------------------------------

def _info(parsed: ParsedLora, alphas: Mapping[str, float | None], ranks: Mapping[str, int | None],
          scales: Mapping[str, float | None]) -> dict[str, Any]:
    meta = metadata_summary(parsed.metadata)
    kinds = sorted({k for e in parsed.entries if (k := _kind(e))} |
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
    from .hashes import sshs_hashes_of
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


def diagnose(path: str | os.PathLike[str], base: BaseModel | None = None, *,
             encoders: Mapping[str, TextEncoder] | None = None, allow_pickle: bool = False,
             from_format: str | None = None, matchers: _Matchers | None = None) -> Diagnosis:
    """Diagnose one LoRA (against an already opened base)."""
    p = os.fspath(path)
    encoders = encoders or {}
    matchers = matchers or _Matchers()
    base_label = None
    if base is not None:
        base_label = {v.name: _short(v.label) for v in base.arch.spec.variants}.get(base.variant,
                                                                                    base.arch.spec.label)
    try:
        f = open_weights(p, allow_pickle=allow_pickle)
    except LorakitError as exc:
        return _failed(p, exc, INVALID, base_label)
    with f:
        try:
            parsed = parse(f, force_format=from_format)
        except UnsupportedArchitectureError as exc:
            d = _failed(p, exc, WILL_NOT_APPLY, base_label)
            foreign = _foreign(f.keys(), {k: f.shape(k) for k in f.keys()})
            if foreign is not None:
                d.fix = f"use it with a {foreign[0]} model (this is not a FLUX.1 LoRA)"
            return d
        except LorakitError as exc:
            return _failed(p, exc, INVALID, base_label)
        if base is not None and parsed.arch.name != base.arch.name:
            return Diagnosis(p, WILL_NOT_APPLY,
                             f"this is a {parsed.arch.spec.label} LoRA ({parsed.format}, {len(parsed.entries)} modules); "
                             f"it will not apply to the {base.arch.spec.label} base"
                             + (f" ({base_label})" if base_label else "") + ".",
                             f"use it with a {parsed.arch.spec.label} model",
                             error={"type": "ArchitectureError",
                                    "message": f"{parsed.arch.spec.label} LoRA, {base.arch.spec.label} base"})
        shapes = {k: f.shape(k) for k in f.keys()}
        foreign = _foreign(parsed.unknown_keys, shapes)
        if foreign and foreign[1] >= max(1, len(f.keys()) // 4):
            label, hits, example = foreign
            return Diagnosis(p, WILL_NOT_APPLY,
                             f"this is a {label} LoRA ({hits} of {len(f.keys())} keys, e.g. {example!r}); "
                             f"it will not apply to a FLUX.1 model"
                             + (f" (the base is {base_label})" if base_label else "")
                             + (f"; only {len(parsed.entries)} text-encoder-looking modules match by name"
                                if parsed.entries else "") + ".",
                             f"use it with a {label} model", error={"type": "UnsupportedArchitectureError",
                                                                     "message": f"{label} LoRA"})
        try:
            alphas = _read_alphas(parsed)
            ranks = {e.file_module: _rank(e) for e in parsed.entries}
            scales = {m: _scale(e, alphas[m], ranks[m]) for m, e in ((e.file_module, e) for e in parsed.entries)}
            deep = _deep(parsed)
            hash_warn = _hash_warnings(f)
        except LorakitError as exc:
            return _failed(p, exc, INVALID, base_label)
        info = _info(parsed, alphas, ranks, scales)
        dchecks, dwarn = _dtype_warnings(f, parsed)
        split_warn = split_qkv_warnings(parsed)
        schecks, swarn = _scale_warnings(scales, alphas, ranks)
        unknown = _unknown_groups(parsed, matchers)
        cov = _coverage(parsed, base, encoders, unknown)
    d = Diagnosis(p, OK, "", info=info, coverage=cov)
    d.checks = {"nonfinite_modules": deep["nonfinite_modules"][:LISTED],
                "nonfinite_count": len(deep["nonfinite_modules"]),
                "zero_up_modules": deep["zero_up_modules"][:LISTED], "zero_up_count": len(deep["zero_up_modules"]),
                "delta_norm_max": deep["delta_norm_max"], **dchecks, **schecks}
    d.warnings = dwarn + swarn + hash_warn + split_warn
    for (fmt, layout), (note, fix) in PORTABILITY.items():
        if fmt == parsed.format and (layout is None or (base is not None and base.layout == layout)):
            if layout is None or any(e.match.spec.group in ("embedders", "final_layer") for e in parsed.entries):
                d.notes.append(f"{note}. Fix: {fix}")
    hint = " ".join(parsed.metadata.get(k, "") for k in ("modelspec.architecture", "ss_base_model_version",
                                                          "ss_sd_model_name", "modelspec.title")).lower()
    if "kontext" in hint:
        d.notes.append("trained for FLUX.1 Kontext (metadata): it fits any FLUX.1-dev-shaped base, but is meant "
                       "for Kontext image editing; shapes cannot tell a Kontext base apart")
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
        parts = [f"{g['reason']} ({g['count']})" for g in problems]
        if zero_up:
            parts.append(f"{zero_up} modules have all-zero up matrices (untrained; they change nothing)")
        d.verdict = PARTIAL
        head = f"{applies} of {total} modules apply{where}" if checked else f"{total} modules understood"
        d.summary = head + "; " + "; ".join(parts) + "."
        d.fix = problems[0]["fix"] if problems else "retrain or drop the untrained modules"
        return
    d.verdict = OK
    if checked:
        d.summary = f"all {total} modules apply{where}" + (" (text encoders checked)" if
                                                          set(checked) - {parsed.arch.spec.denoiser.name} else "") + "."
    else:
        d.summary = f"all {total} modules are well-formed {parsed.arch.spec.label} " \
                    f"{', '.join(d.info['adapters']) if d.info else ''} (no base given: coverage not checked)."


def doctor(loras: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], base: str | os.PathLike[str] | None = None,
           *, text_encoders: Sequence[str | os.PathLike[str]] = (), allow_pickle: bool = False,
           from_format: str | None = None) -> DoctorReport:
    """Diagnose LoRAs, optionally against a base model and text encoders. Verdicts are returned, not raised;
    an unreadable base or text encoder raises (LorakitError)."""
    if isinstance(loras, (str, os.PathLike)):
        loras = [loras]
    base_model = None
    report = DoctorReport([])
    if base is not None:
        bf = open_weights(base, allow_pickle=allow_pickle)
        try:
            base_model = open_base(bf)
        except BaseException:
            bf.close()
            raise
        report.base = _base_info(base_model)
    encoders: dict[str, TextEncoder] = {}
    try:
        for te_path in text_encoders:
            te = open_text_encoder(te_path, allow_pickle=allow_pickle)
            encoders[te.component] = te
            report.text_encoders.append({"file": te.path, "component": te.component, "label": te.label,
                                         "modules": len(te.shapes)})
        matchers = _Matchers()
        for path in loras:
            report.loras.append(diagnose(path, base_model, encoders=encoders, allow_pickle=allow_pickle,
                                         from_format=from_format, matchers=matchers))
    finally:
        if base_model is not None:
            base_model.file.close()
    return report


def format_report(report: DoctorReport) -> str:
    """The human-readable text of a doctor report."""
    lines: list[str] = []
    if report.base:
        b = report.base
        lines.append(f"base {b['file']}: {b['variant_label']}, {b['layout']} layout"
                     + (f" (prefix {b['prefix']!r})" if b["prefix"] else "") + f", {b['tensors']} tensors")
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
            lines.append(f"  coverage      {cov['applies']}/{cov['modules']} modules apply")
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
