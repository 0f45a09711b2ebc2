"""``lorakit inspect``: what a LoRA is, from its header (and, with ``deep``, its tensors)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any, TYPE_CHECKING


from lorakit.lora.adapters import Adapter, LoKr, LoRA
from lorakit.formats import parse
from lorakit.formats.parse import ModuleEntry, ParsedLora, entry_alpha, load_entry
from lorakit.errors import NonFiniteError
from lorakit.io.hashes import STORED_HASH_KEYS
from lorakit.io import open_weights
from lorakit.io.header import loads_json
from lorakit.layouts import expand
from lorakit.layouts.base import ParamMatch

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch

MAX_UNKNOWN_LISTED = 20


def _component_params(parsed: ParsedLora, name: str) -> dict[str, int] | None:
    if name in parsed.arch.params:
        return parsed.arch.params[name]
    comp = parsed.arch.spec.components[name]
    return dict(comp.presets[0].params) if comp.presets else None


_Expanded = tuple[dict[str, str], dict[str, int]]
_EXPANDED: dict[tuple[int, tuple[tuple[str, int], ...]], tuple[object, _Expanded]] = {}
EXPANDED_KEPT = 256


def expanded_names(comp: Any, params: Mapping[str, int]) -> _Expanded:
    """({native module name: group}, {group: module count}) of a component at these sizes, in layout order.
    Cached (treat as read-only): a library's LoRAs share a few sizes, and expanding a published model's text
    encoder costs more than reading a LoRA's header."""
    key = (id(comp), tuple(sorted(params.items())))
    got = _EXPANDED.get(key)
    if got is not None and got[0] is comp:
        return got[1]
    group_of: dict[str, str] = {}
    totals: dict[str, int] = {}
    for m in expand(comp, params):
        group_of[m.name] = m.group
        totals[m.group] = totals.get(m.group, 0) + 1
    if len(_EXPANDED) >= EXPANDED_KEPT:
        _EXPANDED.clear()
    _EXPANDED[key] = (comp, (group_of, totals))
    return group_of, totals


def coverage(parsed: ParsedLora) -> dict[str, Any]:
    """Linear-module coverage per component and group; loose-parameter entries (q/k norm scale diffs) are
    counted apart, as ``loose``."""
    present: dict[str, set[str]] = {}
    loose: Counter[str] = Counter()
    for e in parsed.entries:
        if e.match.loose:
            loose[e.component] += 1
            continue
        present.setdefault(e.component, set()).add(e.match.native)
    out: dict[str, Any] = {}
    # an absent component's size is the published model's (its preset) only when the file's own components are
    # published sizes too; a non-standard model (e.g. lorakit's tiny synthetic one) says nothing about it
    standard = all(c in parsed.arch.preset for c in parsed.arch.params)
    for name, comp in parsed.arch.spec.components.items():
        if name in parsed.arch.spec.experts and name not in parsed.arch.params:
            continue    # a single-expert file is for one expert: the other one is not missing from it
        if name not in parsed.arch.params and not standard:
            out[name] = {"label": comp.label, "present": 0, "total": None, "groups": {},
                         "note": "not in this file; its module count is unknown for a model of non-standard sizes"}
            continue
        params = _component_params(parsed, name)
        if params is None:
            continue
        params = {**{f: 1 for f in comp.flags}, **params}
        group_of, totals = expanded_names(comp, params)
        hit = present.get(name, set())
        groups: dict[str, dict[str, Any]] = {g: {"label": comp.group_labels.get(g, g), "present": 0, "total": n}
                                             for g, n in totals.items()}
        extra = []
        for m_name in hit:
            g_name = group_of.get(m_name)
            if g_name is None:
                extra.append(m_name)
            else:
                groups[g_name]["present"] += 1
        extra.sort()
        out[name] = {"label": comp.label, "present": sum(g["present"] for g in groups.values()) + len(extra),
                     "total": len(group_of), "groups": groups}
        if extra:
            out[name]["beyond_layout"] = extra
        if loose[name]:
            out[name]["loose"] = loose[name]
    return out


def read_alphas(parsed: ParsedLora, nonfinite: list[str] | None = None) -> dict[str, float | None]:
    """α per module. A NaN/Inf α raises NonFiniteError naming its key, unless ``nonfinite`` is given: then the
    module's α is None and the key is appended there (``inspect`` shows the file and flags it)."""
    out: dict[str, float | None] = {}
    for e in parsed.entries:
        key = e.keys.get("alpha")
        value = parsed.file.first_value(key) if key else None
        try:
            out[e.file_module] = entry_alpha(parsed, e, value)
        except NonFiniteError:
            if nonfinite is None:
                raise
            nonfinite.append(key or e.file_module)
            out[e.file_module] = None
    return out


def entry_rank(e: ModuleEntry) -> int | None:
    """The rank of a parsed module (LoRA/LoHa/LoKr inner size), from the header; None for diffs."""
    s = e.shapes
    if e.family == "lora":
        return s["down"][0]
    if e.family == "loha":
        return s["hada_w1_b"][0]
    if e.family == "lokr":
        for role in ("lokr_w2_b", "lokr_w1_b"):
            if role in s:
                return s[role][0]
    return None


def entry_scale(e: ModuleEntry, alpha: float | None, rank: int | None) -> float | None:
    """The effective scale α/r of a parsed module (1 when no α is stored), None when it has no rank."""
    if rank is None:
        return 1.0
    if e.family == "lokr" and not ({"lokr_w2_b", "lokr_w1_b"} & set(e.shapes)):
        return 1.0
    return (alpha if alpha is not None else rank) / rank


def metadata_summary(meta: Mapping[str, str]) -> dict[str, Any]:
    """Trainer, base model, title and training settings found in the metadata."""
    out: dict[str, Any] = {}
    if any(k.startswith("ss_") for k in meta):
        out["trainer"] = "kohya sd-scripts" if "ss_training_started_at" in meta or "ss_output_name" in meta \
            else "kohya-compatible"
    sw = meta.get("software")
    if sw:
        try:
            out["trainer"] = loads_json(sw).get("name", sw)
        except (ValueError, AttributeError):
            out["trainer"] = sw
    base = meta.get("ss_sd_model_name") or meta.get("ss_base_model_version") or meta.get("modelspec.architecture")
    if base:
        out["base_model"] = base
    training = {k[3:]: meta[k] for k in ("ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_max_train_steps",
                                         "ss_steps", "ss_epoch", "ss_num_train_images", "ss_network_dim",
                                         "ss_network_alpha", "ss_optimizer", "ss_network_module", "ss_network_args")
                if k in meta}
    if training:
        out["training"] = training
    triggers = trigger_words(meta)
    if triggers:
        out["trigger_words"] = triggers
    for key in ("modelspec.title", "modelspec.description", "modelspec.author"):
        if key in meta:
            out[key.split(".", 1)[1]] = meta[key]
    out["keys"] = len(meta)
    return out


def trigger_words(meta: Mapping[str, str], limit: int = 10) -> list[str]:
    """Trigger words from modelspec.trigger_phrase and ss_tag_frequency (at most ``limit``)."""
    words: list[str] = []
    phrase = meta.get("modelspec.trigger_phrase")
    if phrase:
        words.extend(w.strip() for w in phrase.split(",") if w.strip())
    raw = meta.get("ss_tag_frequency")
    if raw:
        try:
            freq: Counter[str] = Counter()
            for tags in loads_json(raw).values():
                for tag, n in tags.items():
                    freq[tag.strip()] += int(n)
            words.extend(t for t, _ in freq.most_common(limit) if t)
        except (ValueError, AttributeError, TypeError):
            pass
    for key in ("meta", "ss_meta"):
        if key in meta:
            try:
                tw = loads_json(meta[key]).get("trigger_words")
                if isinstance(tw, list):
                    words.extend(str(w) for w in tw)
                elif isinstance(tw, str):
                    words.extend(w.strip() for w in tw.split(","))
            except (ValueError, AttributeError):
                pass
    seen: list[str] = []
    for w in words:
        if w not in seen:
            seen.append(w)
    return seen[:limit]


def _split_qkv_flag(meta: Mapping[str, str]) -> bool:
    raw = meta.get("ss_network_args")
    if not raw:
        return False
    try:
        args = loads_json(raw)
    except ValueError:
        return False
    value = args.get("split_qkv") if isinstance(args, dict) else None
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def split_qkv_warnings(parsed: ParsedLora) -> list[str]:
    """sd-scripts ``split_qkv`` files (flux.md §6.4): a fused qkv/linear1 whose ``up`` is block-diagonal with n
    equal column groups keeps the per-split α, so most loaders apply it at 1/n of the trained strength. Warned
    about only when ``ss_network_args`` says ``split_qkv``; the numbers are not changed."""
    if not _split_qkv_flag(parsed.metadata):
        return []
    from lorakit.formats.parse import row_window
    hits: dict[int, list[str]] = {}
    for e in parsed.entries:
        if e.family != "lora" or "mid" in e.keys or isinstance(e.match, ParamMatch) or e.match.alias.rows is not None:
            continue
        params = parsed.arch.params.get(e.component, {})
        windows = [w for a in e.match.spec.names("diffusers") if (w := row_window(a, params)) is not None]
        n, rank = len(windows), e.shapes["down"][0]
        if n < 2 or rank % n:
            continue
        up = parsed.file.get(e.keys["up"]).reshape(e.shapes["up"][0], -1)
        g = rank // n
        mask = torch.ones_like(up, dtype=torch.bool)
        for j, (s, t) in enumerate(sorted(windows)):
            mask[s:t, j * g:(j + 1) * g] = False
        if not bool(up[mask].ne(0).any()) and bool(up[~mask].ne(0).any()):
            hits.setdefault(n, []).append(e.file_module)
    return [f"{len(mods)} fused module(s) (e.g. {mods[0]!r}) were trained with split_qkv (block-diagonal up, {n} "
            f"groups): their alpha is per split, so most loaders apply them at 1/{n} strength (sd-scripts#2204); "
            "lorakit keeps the numbers as stored" for n, mods in sorted(hits.items())]


def deep_checks(parsed: ParsedLora) -> dict[str, Any]:
    """Reads every tensor: NaN/Inf modules, all-zero ups, ΔW norms (``inspect --deep`` and ``doctor``)."""
    nonfinite, zero_up, norms = [], [], {}
    for e in parsed.entries:
        try:
            patch = load_entry(parsed, e)
        except NonFiniteError:      # a NaN/Inf α (stored or from the config)
            nonfinite.append(e.file_module)
            continue
        a = patch.adapter
        tensors = list(a._fields().values()) if a is not None else []
        tensors += [t for t in (patch.bias, patch.dora) if t is not None]
        if any(not bool(torch.isfinite(t.float()).all()) for t in tensors):
            nonfinite.append(e.file_module)
            continue
        if isinstance(a, LoRA) and not bool(a.up.ne(0).any()):
            zero_up.append(e.file_module)
        norms[e.file_module] = delta_norm(a) if a is not None else 0.0
    vals = [v for v in norms.values() if math.isfinite(v)]
    return {"nonfinite_modules": nonfinite, "zero_up_modules": zero_up, "delta_norms": norms,
            "delta_norm_max": max(vals, default=0.0), "delta_norm_mean": sum(vals) / len(vals) if vals else 0.0}


def delta_norm(adapter: Adapter) -> float:
    """‖ΔW‖_F without forming ΔW where factors allow (Gram trick for LoRA, product rule for LoKr)."""
    if isinstance(adapter, LoRA) and adapter.mid is None:
        up, down = adapter.up.float().flatten(1), adapter.down.float().flatten(1)
        g = (up.T @ up) * (down @ down.T)
        return float(g.sum().clamp_min(0).sqrt()) * abs(adapter.scale)
    if isinstance(adapter, LoKr):
        return float(adapter.factor1().norm() * adapter.factor2().norm()) * abs(adapter.scale)
    return float(adapter.dense().norm())


def inspect_lora(path: str | os.PathLike[str], *, deep: bool = False, allow_pickle: bool = False,
                 from_format: str | None = None, hashes: bool = False, arch: str | None = None) -> dict[str, Any]:
    """What a LoRA file is: format, architecture, coverage, ranks, alphas, metadata (``deep``: also tensor checks; ``hashes``: also hashes)."""
    p = os.fspath(path)
    with open_weights(p, allow_pickle=allow_pickle) as f:
        parsed = parse(f, force_format=from_format, arch_name=arch)
        bad_alphas: list[str] = []
        alphas = read_alphas(parsed, bad_alphas)
        ranks = {e.file_module: entry_rank(e) for e in parsed.entries}
        scales = {m: entry_scale(e, alphas[m], ranks[m]) for m, e in ((e.file_module, e) for e in parsed.entries)}
        for e in parsed.entries:    # a NaN/Inf α has no scale
            if e.keys.get("alpha", e.file_module) in bad_alphas:
                scales[e.file_module] = None
        dtypes = Counter(f.infos[k].dtype for k in f.keys())
        kinds = sorted({k for e in parsed.entries if (k := entry_kind(e))} |
                       ({"dora"} if any("dora" in e.keys for e in parsed.entries) else set()))
        report: dict[str, Any] = {
            "file": p,
            "size_bytes": os.path.getsize(p) if os.path.isfile(p) else f.total_bytes,
            "format": parsed.format,
            "format_label": parsed.detection.format.label,
            "confidence": round(parsed.detection.score, 4),
            "runner_up": ({"format": parsed.detection.runner_up[0], "score": round(parsed.detection.runner_up[1], 4)}
                          if parsed.detection.runner_up else None),
            "architecture": parsed.arch.name,
            "architecture_label": parsed.arch.spec.label,
            "variant": parsed.arch.variant,
            # architectures whose modules the keys name equally well (a CLIP-L-only LoRA fits several)
            "also_fits": list(parsed.detection.also_fits),
            "adapters": kinds,
            "modules": sum(1 for e in parsed.entries if not e.match.loose),
            "loose_params": sum(1 for e in parsed.entries if e.match.loose),
            # loose parameters whose tensor is the new value, not a diff (BFL control LoRAs' norm scales)
            "norm_replacements": sum(1 for e in parsed.entries if e.family == "set"),
            "components": coverage(parsed),
            "ranks": dict(sorted(Counter(r for r in ranks.values() if r is not None).items())),
            "alphas": dict(sorted(Counter(a for a in alphas.values() if a is not None).items())),
            "scales": dict(sorted(Counter(round(s, 6) for s in scales.values() if s is not None).items())),
            "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
            "dtypes": dict(dtypes),
            "metadata": metadata_summary(parsed.metadata),
            "nonfinite_alpha_keys": bad_alphas,
            "warnings": split_qkv_warnings(parsed),
            "unknown_keys": parsed.unknown_keys[:MAX_UNKNOWN_LISTED],
            "unknown_key_count": len(parsed.unknown_keys),
            "sizes": {c: {k: v for k, v in sorted(p_.items())} for c, p_ in parsed.arch.params.items()},
            # hashes the header claims (not verified here: --hashes recomputes them from the bytes)
            "stored_hashes": {k: parsed.metadata[k] for k in STORED_HASH_KEYS if k in parsed.metadata},
        }
        if deep:
            report["deep"] = deep_checks(parsed)
    if hashes or deep:   # whole-file hashes read every byte: only on request
        from lorakit.io.hashes import hash_report
        report["hashes"] = hash_report(p, allow_pickle=allow_pickle)
    return report


def entry_kind(e: ModuleEntry) -> str | None:
    """How reports name a module's adapter kind (``lora``, ``locon`` for conv factors, ``loha``, ``lokr``, ``full``)."""
    fam = e.family
    if fam == "lora":
        return "locon" if len(e.shapes["down"]) > 2 else "lora"
    if fam in ("loha", "lokr", "full"):
        return fam
    return None


GROUPS_LISTED = 6     # components with more groups (SD UNet blocks) list only the groups a LoRA touches


def format_report(r: Mapping[str, Any]) -> str:
    """The human-readable text of an inspect report."""
    lines = [f"{r['file']}",
             f"  format        {r['format']} — {r['format_label']} (confidence {r['confidence']:.0%}"
             + (f"; runner-up {r['runner_up']['format']} {r['runner_up']['score']:.0%}" if r.get("runner_up") else "")
             + ")",
             f"  architecture  {r.get('architecture_label', r['architecture'])} ({r['architecture']}, variant: "
             f"{r['variant']})" + (f"; the keys fit {', '.join(r['also_fits'])} equally (pass --arch to choose)"
                                    if r.get("also_fits") else ""),
             f"  adapters      {', '.join(r['adapters']) or '-'}; {r['modules']} modules"
             + (f" + {r['loose_params']} norms" if r.get("loose_params") else ""),
             f"  dtype         {r['dtype']}; {r['size_bytes'] / 1e6:.1f} MB"]
    comp_parts = []
    for c in r["components"].values():
        if c["total"] is None:
            comp_parts.append(f"{c['label']} none (count unknown: non-standard model sizes)")
            continue
        touched = [g for g in c["groups"].values() if g["present"]]
        rest = len(c["groups"]) - len(touched)
        groups = ", ".join(f"{g['label']} {g['present']}/{g['total']}" for g in
                           (touched if len(c["groups"]) > GROUPS_LISTED else c["groups"].values()))
        if len(c["groups"]) > GROUPS_LISTED and rest:
            groups += f"{', ' if touched else ''}{rest} other groups untouched"
        comp_parts.append(f"{c['label']} {c['present']}/{c['total']}" + (f" ({groups})" if len(c["groups"]) > 1 else ""))
    lines.append("  coverage      " + "\n                ".join(comp_parts))
    if r.get("loose_params"):
        reps = r.get("norm_replacements", 0)
        diffs = r["loose_params"] - reps
        parts = ([f"{diffs} loose parameter diffs"] if diffs else []) + (
            [f"{reps} replacement values (bake sets the base's norm scale to them)"] if reps else [])
        lines.append(f"  norms         {'; '.join(parts)} (q/k norm scales; not in the module coverage)")
    lines.append(f"  ranks         {_hist(r['ranks'])}")
    lines.append(f"  alphas        {_hist(r['alphas']) or 'none stored (α = rank)'}")
    lines.append(f"  scales α/r    {_hist(r['scales'])}")
    meta = r["metadata"]
    for key in ("trainer", "base_model", "title"):
        if key in meta:
            lines.append(f"  {key.replace('_', ' '):<13} {meta[key]}")
    if meta.get("trigger_words"):
        lines.append(f"  triggers      {', '.join(meta['trigger_words'])}")
    if meta.get("training"):
        lines.append("  training      " + ", ".join(f"{k}={v}" for k, v in meta["training"].items()
                                                   if k != "network_args"))
    for w in r.get("warnings", []):
        lines.append(f"  warning       {w}")
    if r.get("nonfinite_alpha_keys"):
        bad = r["nonfinite_alpha_keys"]
        lines.append(f"  NaN/Inf alpha {len(bad)} keys: {', '.join(bad[:5])} (the LoRA is corrupt)")
    if r["unknown_key_count"]:
        lines.append(f"  NOT UNDERSTOOD {r['unknown_key_count']} keys: {', '.join(r['unknown_keys'][:5])}")
    hashes = r.get("hashes")
    stored = r.get("stored_hashes")
    if stored and not hashes:
        lines.append("  hashes        stored in the header: " + ", ".join(
            f"{k} {v[:14]}…" if len(v) > 16 else f"{k} {v}" for k, v in stored.items())
            + " (not verified; --hashes recomputes them and adds AutoV2/AutoV3)")
    if hashes:
        lines.append("  hashes        " + ", ".join(f"{k} {hashes[k]}" for k in ("autov2", "autov3") if k in hashes)
                     + f", sshs_model_hash {hashes['sshs_model_hash'][:12]}…, sshs_legacy_hash "
                       f"{hashes['sshs_legacy_hash']}")
        if "sha256" in hashes:
            lines.append(f"  sha256        {hashes['sha256']}")
        stale = [k for k, v in hashes.get("stored", {}).items() if not v["current"]]
        if stale:
            lines.append(f"  STALE HASHES  {', '.join(stale)} in the header do not match the tensors "
                         "(fix: lorakit meta FILE --rehash)")
    strength = r.get("strength")
    if strength and strength["blocks"]:
        top = sorted(strength["blocks"], key=lambda b: -b["norm"])[:6]
        lines.append(f"  strength      ‖ΔW‖ total {strength['total']:.4g}; strongest blocks "
                     + ", ".join(f"{b['block']} {b['norm']:.4g}" for b in top))
    deep = r.get("deep")
    if deep:
        lines.append(f"  delta norms   max {deep['delta_norm_max']:.4g}, mean {deep['delta_norm_mean']:.4g}")
        if deep["nonfinite_modules"]:
            lines.append(f"  NaN/Inf       {len(deep['nonfinite_modules'])} modules: {deep['nonfinite_modules'][:5]}")
        if deep["zero_up_modules"]:
            lines.append(f"  all-zero up   {len(deep['zero_up_modules'])} modules (untrained?)")
    return "\n".join(lines)


def _hist(d: Mapping[Any, int]) -> str:
    return ", ".join(f"{k:g}×{v}" if isinstance(k, float) else f"{k}×{v}" for k, v in d.items())
