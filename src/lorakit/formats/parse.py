"""Detect a LoRA's format by scoring every registered format, then read it into the internal model.

Detection works on key names and shapes only (header data); metadata only breaks ties. Reading is
split in two: :func:`parse` builds a header-level plan (no tensor data), :func:`load` reads the
tensors and builds :class:`~lorakit.lora.model.LoraModel` patches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace


from lorakit.lora.adapter_kinds import INCOMPLETE, get_kind, kind_of
from lorakit.lora.adapters import Adapter, LoHa, LoKr, LoRA
from lorakit.lora.transforms import swap_parts
from lorakit.layouts.infer import Observation, ParamObservation, infer_instance, size_refusal
from lorakit.dtypes import FLOAT_CODES
from lorakit.errors import (AmbiguousFormatError, FormatError, KeyMappingError, NonFiniteError, NotALoraError,
                      ShapeMismatchError, UnknownFormatError, UnsupportedArchitectureError, UnsupportedDtypeError,
                      UsageError)
from lorakit.io import WeightFile, open_weights
from lorakit.io.header import loads_json
from lorakit.layouts import Alias, ArchSpec, NameIndex, NameMatch, available, evaluate, recognize, resolve, solve, symbols
from lorakit.layouts.base import ParamIndex, ParamMatch
from lorakit.lora.model import ArchInstance, LoraModel, Patch, Target
from lorakit.layouts.base import Rule
from lorakit.lora.experts import EXPERT_KEY, expert_tag, file_expert
from lorakit.formats.spec import FormatSpec, SplitKey, formats, get_format, split_key

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch


@dataclass(frozen=True)
class KeyParse:
    key: str
    rule: Rule
    naming: str
    match: NameMatch | ParamMatch
    split: SplitKey
    file_module: str      # module name as written (prefix included)
    marked: bool          # a PEFT marker (container or adapter name) was present


@dataclass
class ModuleEntry:
    """All keys of one module of the file, with the layout match they resolved to."""

    file_module: str
    component: str
    naming: str
    match: NameMatch | ParamMatch                           # ParamMatch: a loose parameter (norm scale)
    keys: dict[str, str] = field(default_factory=dict)      # role -> key
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def family(self) -> str:
        """The registered adapter kind its roles identify (:func:`lorakit.lora.adapter_kinds.kind_of`)."""
        kind = kind_of(self.keys)
        return kind.name if kind is not None else INCOMPLETE

    def observed_shape(self) -> tuple[int | None, int | None]:
        """(out, in channels) of the weight this module's tensors describe, from the header (None if unknown). A
        flattened conv delta ``(out, in·k·k)`` of a module with a kernel counts ``in`` channels."""
        s = self.shapes
        if self.family == "set":
            return (s["set"][0], _prod(s["set"][1:])) if s.get("set") else (None, None)
        if self.family == "bias":
            return (s["diff_b"][0], None) if s.get("diff_b") else (None, None)
        try:
            shape = _composed_shape(self)
        except (KeyError, IndexError, ValueError):
            return None, None
        if len(shape) < 2:
            return shape[0], None
        kernel = self.match.spec.kernel if not self.match.loose else ()   # type: ignore[union-attr]
        if len(shape) == 2 and kernel:
            k = _prod([evaluate(x, {}, -1) for x in kernel])
            return shape[0], shape[1] // k if k > 0 and shape[1] % k == 0 else None
        return shape[0], shape[1]

    @property
    def target(self) -> str:
        return self.match.native


def _prod(dims: Sequence[int]) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def _complete(entry: ModuleEntry) -> bool:
    """Whether the module's roles hold everything its kind needs (``AdapterKind.requires``)."""
    kind = kind_of(entry.keys)
    return kind is not None and kind.complete(entry.keys)


# ---------------------------------------------------------------------------------------------
# Per-format key acceptance
# ---------------------------------------------------------------------------------------------

MEMO_KEYS = 200_000     # parses remembered per matcher (bounded memory for a library of many key spellings)


class FormatMatcher:
    """Accepts the keys one format spells for one architecture (its rules are the architecture's data)."""

    def __init__(self, fmt: FormatSpec, arch: ArchSpec) -> None:
        self.fmt = fmt
        self.arch = arch
        self.rules = arch.rules_for(fmt.name)
        self.indexes: dict[tuple[str, str, bool], NameIndex] = {}
        self.loose: dict[tuple[str, str, bool], ParamIndex] = {}
        self._memo: dict[str, KeyParse | None] = {}
        for rule in self.rules:
            comp = arch.components.get(rule.component)
            if comp is None:
                continue
            for naming in rule.namings:
                if naming == "native" or naming in comp.namings:
                    self.indexes[(rule.component, naming, rule.flat)] = NameIndex.of(comp, naming, flat=rule.flat)
                    params = ParamIndex.of(comp, naming, flat=rule.flat)
                    if params:
                        self.loose[(rule.component, naming, rule.flat)] = params

    def accept(self, key: str) -> KeyParse | None:
        """The parse of ``key`` in this format, or None. Memoised (a parse is frozen and depends on the key
        alone): the files of a library repeat the same key names."""
        try:
            return self._memo[key]
        except KeyError:
            pass
        got = self._accept(key)
        if len(self._memo) < MEMO_KEYS:
            self._memo[key] = got
        return got

    def _accept(self, key: str) -> KeyParse | None:
        fmt = self.fmt
        body, marked = (fmt.rewrite(key) if fmt.rewrites else key), False
        for c in fmt.containers:
            if body.startswith(c):
                body, marked = body[len(c):], marked or c == "base_model.model."
                break
        split = split_key(body, xlabs=fmt.xlabs_suffixes)
        if split is None:
            if not fmt.replacements:
                return None
            # BFL control LoRAs: the key is a loose parameter's own name, its tensor the parameter's new value
            split = SplitKey(body, "set", "set")
        outer_marked = marked or split.adapter_name is not None
        for rule in self.rules:
            if not split.module.startswith(rule.prefix):
                continue
            name, marked = split.module[len(rule.prefix):], outer_marked
            for inner in fmt.inner:
                if name.startswith(inner):
                    name, marked = name[len(inner):], True
            if (fmt.marker == "required" and not marked) or (fmt.marker == "forbidden" and marked):
                continue
            if fmt.strip_trailing_underscore and rule.flat and name.endswith("_"):
                name = name[:-1]
            for naming in rule.namings:
                index = self.indexes.get((rule.component, naming, rule.flat))
                if index is None:
                    continue
                if split.family not in ("norm", "set"):
                    m = index.match(name)
                    if m is not None:
                        return KeyParse(key, rule, naming, m, split, split.module, marked)
                loose = self._loose(rule, naming, name, split)
                if loose is not None:
                    return KeyParse(key, rule, naming, loose[0], loose[1], split.module, marked)
        return None

    def _loose(self, rule: Rule, naming: str, name: str, split: SplitKey) -> tuple[ParamMatch, SplitKey] | None:
        """A diff on a loose parameter: ``<full parameter name>.diff`` (ComfyUI's key for every non-``.weight``
        parameter, and lorakit's own spelling in every format), ``<owning module>.diff`` (AI-Toolkit's full
        modules, toolkit/lora_special.py FullModule: ``diff`` is the whole-module weight difference, saved as
        ``transformer.transformer_blocks.0.attn.norm_q.diff``) or LyCORIS ``<owning module>.w_norm``. All
        become role ``diff`` of the parameter. ``b_norm`` is not accepted: the layout's loose parameters
        have no bias, so such a key stays "not understood". In a format with ``replacements`` (BFL), the
        parameter's bare name is role ``set``: its tensor is the parameter's new value, not a difference."""
        index = self.loose.get((rule.component, naming, rule.flat))
        if index is None:
            return None
        if split.role == "set":
            m = index.match(name)
            return (m, SplitKey(split.module, "set", "set", split.adapter_name)) if m is not None else None
        sep = "_" if rule.flat else "."
        if split.role == "diff":
            m = index.match(name) or index.match(name + sep + "weight") or index.match(name, stem=True)
        elif split.role == "diff_b":
            # ComfyUI's ``<module>.diff_b`` on a module whose bias is a loose parameter (a LayerNorm's)
            m = index.match(name + sep + "bias")
        elif split.role == "w_norm":
            m = index.match(name, stem=True)
        else:
            return None
        if m is None:
            return None
        return m, SplitKey(split.module, "full", "diff", split.adapter_name)


@dataclass
class Detection:
    format: FormatSpec
    parses: dict[str, KeyParse]
    score: float
    runner_up: tuple[str, float] | None
    arch: ArchSpec | None = None
    also_fits: list[str] = field(default_factory=list)    # other architectures whose modules the keys name equally


def _meaning(p: KeyParse) -> tuple[object, ...]:
    return (p.rule.component, p.match.native, p.match.alias, p.split.role)


@dataclass
class _Candidate:
    arch: ArchSpec
    fmt: FormatSpec
    parses: dict[str, KeyParse]
    inconsistent: int = 0         # factor keys whose shapes contradict this reading's sizes
    deferred: bool = False        # the sizes are another registered architecture's (ComponentSpec.deferrals)

    @property
    def name(self) -> str:
        return self.fmt.name

    def meaning(self) -> dict[str, tuple[object, ...]]:
        return {k: _meaning(p) for k, p in self.parses.items()}


def _contradictions(arch: ArchSpec, parses: Mapping[str, KeyParse], shapes: Mapping[str, tuple[int, ...]]
                    ) -> tuple[int, bool]:
    """How many LoRA factor keys contradict the sizes the other keys and the architecture's fixed sizes imply
    (header arithmetic only): an SDXL cross-attention ``to_k`` (2,048 inputs) is not an SD1.5 one (768); and
    whether the sizes solved are another registered architecture's (a component's deferrals: FLUX.2's hidden size
    read as FLUX.1). LoHa/LoKr/full modules count by the shape their factors compose into."""
    by_comp: dict[str, list[tuple[str, int]]] = {}
    others: dict[tuple[str, str], ModuleEntry] = {}
    for key, p in parses.items():
        shape = shapes.get(key) or ()
        if isinstance(p.match, ParamMatch):
            continue
        spec, alias = p.match.spec, p.match.alias
        eq = by_comp.setdefault(p.rule.component, [])
        if p.split.family in ("loha", "lokr", "full"):
            e = others.setdefault((p.rule.component, p.file_module),
                                  ModuleEntry(p.file_module, p.rule.component, p.naming, p.match))
            e.keys[p.split.role], e.shapes[p.split.role] = key, tuple(shape)
            continue
        if p.split.family != "lora" or len(shape) < 2:
            continue
        if p.split.role == "up":
            eq.append((alias.rows[1] if alias.rows else spec.out, shape[0]))
        elif p.split.role == "down":
            eq.append((spec.inp, shape[1]))
    composed: dict[str, list[tuple[str, int]]] = {}
    for e in others.values():
        if not _complete(e):
            continue
        out, inp = e.observed_shape()
        m = e.match
        eq = composed.setdefault(e.component, [])
        if out is not None:
            eq.append((m.alias.rows[1] if m.alias.rows else m.spec.out, out))   # type: ignore[union-attr]
        if inp is not None:
            eq.append((m.spec.inp, inp))   # type: ignore[union-attr]
    bad, deferred = 0, False
    for comp_name in set(by_comp) | set(composed):
        comp = arch.components[comp_name]
        equations, extra = by_comp.get(comp_name, []), composed.get(comp_name, [])
        sizes = solve(equations + extra, comp.fixed)
        bad += sum(1 for expr, value in equations if symbols(expr) <= set(sizes) and evaluate(expr, sizes) != value)
        sized_out = size_refusal(comp, sizes)
        deferred = deferred or (sized_out is not None and sized_out[1] is not None)
    return bad + _beyond_counts(arch, parses), deferred


def _beyond_counts(arch: ArchSpec, parses: Mapping[str, KeyParse]) -> int:
    """How many keys name a block index that no published size of the architecture has (index ≥ the largest
    preset's count): block 40 of a 60-block model is not a block of a 19-block one whose names it shares."""
    limits: dict[tuple[str, str], int | None] = {}
    bad = 0
    for p in parses.values():
        repeat, index = p.match.spec.repeat, p.match.index
        if repeat is None or index is None:
            continue
        key = (p.rule.component, repeat)
        if key not in limits:
            presets = arch.components[p.rule.component].presets
            counts = [pr.params[repeat] for pr in presets if repeat in pr.params]
            limits[key] = max(counts) if counts and len(counts) == len(presets) else None
        limit = limits[key]
        if limit is not None and index >= limit:
            bad += 1
    return bad


def _canonical(c: _Candidate) -> int:
    """How many of the candidate's keys use the spelling its architecture's writer of that format uses."""
    return sum(1 for p in c.parses.values() if p.rule == c.arch.write_rule(c.fmt.name, p.rule.component))


def _named_arch(candidates: Sequence[_Candidate], metadata: Mapping[str, str]) -> ArchSpec | None:
    """The one architecture among ``candidates`` the file's metadata names, if exactly one is named."""
    text = " ".join(str(metadata.get(k, "")) for k in ("ss_base_model_version", "modelspec.architecture",
                                                       "ss_sd_model_name")).lower()
    words = {c.arch.name: [w for w in c.arch.named_by if w in text] for c in candidates}
    archs = {c.arch.name: c.arch for c in candidates}
    # an architecture named only by a word inside another one's ("flux" in "flux.2-dev") is not named
    named = [n for n, ws in words.items() if ws and not all(
        any(w != o and w in o for m, os_ in words.items() if m != n for o in os_) for w in ws)]
    return archs[named[0]] if len(named) == 1 else None


_MATCHERS: dict[tuple[str, str], FormatMatcher] = {}


def matcher_for(fmt: FormatSpec, arch: ArchSpec) -> FormatMatcher:
    """The (cached) matcher of one format for one architecture: building its name indexes costs far more than
    reading a small LoRA's header, so a library scan builds each once. A re-registered spec gets a new one."""
    got = _MATCHERS.get((fmt.name, arch.name))
    if got is None or got.fmt is not fmt or got.arch is not arch:
        got = _MATCHERS[(fmt.name, arch.name)] = FormatMatcher(fmt, arch)
    return got


def detect(keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], *,
           arch: ArchSpec | None = None, path: str | None = None, force: str | None = None) -> Detection:
    """Score every registered (architecture × format) pair against the keys and shapes and return the best
    (with confidence); ``arch`` restricts the search to one architecture, ``force`` to one format."""
    total = len(keys)
    if total == 0:
        raise NotALoraError("file holds no tensors (an empty LoRA).", path=path)
    results: list[_Candidate] = []
    for a in ([arch] if arch is not None else [resolve(n) for n in available()]):
        for fmt in formats():
            if force and fmt.name != force:
                continue
            matcher = matcher_for(fmt, a)
            if not matcher.rules:
                continue
            parses = {k: p for k in keys if (p := matcher.accept(k)) is not None}
            if fmt.rewrites and not any(fmt.rewrite(k) != k for k in parses):
                parses = {}       # a format told apart by its spellings: without one, the plain reading is it
            if fmt.replacements and all(p.split.role == "set" for p in parses.values()):
                # bare parameter names alone are a base model's norm scales, not a LoRA: BFL's control LoRAs
                # carry them next to LoRA factors
                parses = {}
            # each key whose shape contradicts the reading's sizes counts against it: names that fit with the shapes
            # of another architecture lose to that architecture (an SD1.5 reading of an SDXL cross-attention), and a
            # file whose best reading still contradicts itself is reported by parse() as a shape mismatch
            bad, deferred = _contradictions(a, parses, shapes) if parses else (0, False)
            results.append(_Candidate(a, fmt, parses, bad, deferred))
    if not results:
        raise UnknownFormatError(path, list(keys), None, total=total)
    # among equally good readings, one whose sizes are not another registered architecture's (a Klein LoRA's BFL
    # names fit FLUX.1 too; its MLP width does not). A reading refused as an unsupported architecture (SD3) keeps
    # its place: it names what the file is
    results.sort(key=lambda r: (not r.parses, r.inconsistent - len(r.parses), r.deferred, r.inconsistent))
    best = results[0]
    if not best.parses:
        _explain_unknown(keys, shapes, path)
    tied = [r for r in results[1:] if len(r.parses) == len(best.parses) and r.inconsistent == best.inconsistent
            and (best.deferred or not r.deferred)]
    also: list[str] = []
    if tied:
        other_archs = [r for r in tied if r.arch.name != best.arch.name]
        if other_archs:
            named = _named_arch([best, *other_archs], metadata)
            if named is not None:
                best = next(r for r in [best, *tied] if r.arch.name == named.name)
            else:
                # the architecture whose writers spell these keys (``lora_te_`` CLIP-L is SD1's spelling; FLUX.1
                # and SDXL write ``lora_te1_``), then registration order
                firsts: dict[str, _Candidate] = {}
                for r in [best, *tied]:          # the best-ranked reading of each architecture, in registration order
                    firsts.setdefault(r.arch.name, r)
                best = max(firsts.values(), key=_canonical)
            also = list(dict.fromkeys(r.arch.label for r in [best, *tied] if r.arch.name != best.arch.name))
        same_arch = [r for r in [best, *tied] if r.arch.name == best.arch.name and r is not best]
        ref = best.meaning()
        differing = [r.name for r in same_arch if r.meaning() != ref]
        if differing:
            hinted = _tie_break_by_metadata([best.name, *differing], metadata)
            if hinted is None:
                raise AmbiguousFormatError(path, [best.name, *differing])
            best = next(r for r in [best, *same_arch] if r.name == hinted)
    unknown = [k for k in keys if k not in best.parses]
    if unknown and not any(best.arch.components[p.rule.component].role == "denoiser" for p in best.parses.values()):
        # only text-encoder keys were understood (many architectures share CLIP-L): name the architecture
        _refuse_recognized(unknown, shapes, path, total)
    runner = next(((r.name, len(r.parses) / total) for r in results
                   if r.parses and r.name != best.name and r.arch.name == best.arch.name), None)
    return Detection(best.fmt, best.parses, len(best.parses) / total, runner, best.arch, also)


def _tie_break_by_metadata(names: list[str], metadata: Mapping[str, str]) -> str | None:
    if any(k.startswith("ss_") for k in metadata) and "kohya" in names:
        return "kohya"
    if "lora_adapter_metadata" in metadata and "diffusers" in names:
        return "diffusers"
    return None


def _refuse_recognized(keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]], path: str | None,
                       total: int) -> None:
    """Raise UnsupportedArchitectureError when ``keys`` carry the signature of an architecture lorakit names."""
    found = recognize(keys, shapes, exclude=available())
    if found is not None:
        rec, hits = found
        supported = ", ".join(resolve(n).label for n in available())
        raise UnsupportedArchitectureError(
            f"this looks like a {rec.label} file ({len(hits)} of {total} keys match, e.g. {hits[0]!r}); "
            f"lorakit supports {supported} so far.", path=path, hint=rec.hint or "use a tool for that architecture.")


def _explain_unknown(keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]], path: str | None) -> None:
    _refuse_recognized(keys, shapes, path, len(keys))
    if not any(split_key(k) or split_key(k, xlabs=True) for k in keys):
        plain = sum(1 for k in keys if k.endswith((".weight", ".bias", ".scale")))
        if plain >= 0.9 * len(keys):
            raise NotALoraError(f"this is not a LoRA: its {len(keys)} tensors are plain weights (a base model?).",
                                path=path, hint="pass a LoRA file here; base models go to `bake`/`extract`.")
    unknown = list(keys)
    nearest = _nearest_format(keys)
    raise UnknownFormatError(path, unknown, nearest, total=len(keys))


def _nearest_format(keys: Sequence[str]) -> str | None:
    counts: Counter[str] = Counter()
    for fmt in formats():
        for rule in {r for n in available() for r in resolve(n).rules_for(fmt.name)}:
            if rule.prefix:
                counts[fmt.name] += sum(1 for k in keys if k.startswith(rule.prefix) or
                                        any(k.startswith(c + rule.prefix) for c in fmt.containers))
    best = counts.most_common(1)
    return best[0][0] if best and best[0][1] else None


# ---------------------------------------------------------------------------------------------
# Header-level plan
# ---------------------------------------------------------------------------------------------

@dataclass
class ParsedLora:
    path: str | None
    file: WeightFile
    detection: Detection
    entries: list[ModuleEntry]
    unknown_keys: list[str]
    arch: ArchInstance
    metadata: dict[str, str]
    peft_config: dict[str, object] | None = None

    @property
    def format(self) -> str:
        return self.detection.format.name


def parse(file: WeightFile, *, arch_name: str | None = None, force_format: str | None = None,
          expert: str | None = None) -> ParsedLora:
    """Detect ``file``'s format and architecture (or read it as ``arch_name``) and map its keys to modules
    (reads no factor data). A single-expert file of an architecture with paired experts is read as the expert its
    name or metadata tags (or ``expert``: a component name or tag), see :mod:`lorakit.lora.experts`."""
    keys = file.keys()
    shapes = {k: file.shape(k) for k in keys}
    det = detect(keys, shapes, file.metadata, arch=resolve(arch_name) if arch_name else None, path=file.path,
                 force=force_format)
    arch = det.arch
    assert arch is not None
    metadata = dict(file.metadata)
    det = _assign_expert(det, arch, file.path, metadata, expert)
    entries: dict[tuple[str, str, str], ModuleEntry] = {}
    unknown = [k for k in keys if k not in det.parses]
    for key, p in det.parses.items():
        # a module's weight and bias may be two loose parameters (``norm3.diff`` / ``norm3.diff_b``)
        e = entries.setdefault((p.rule.component, p.file_module, p.match.native if p.match.loose else ""),
                               ModuleEntry(p.file_module, p.rule.component, p.naming, p.match))
        role = p.split.role
        if role in e.keys:
            raise KeyMappingError(f"module {p.file_module!r} has two keys for role {role!r}", [e.keys[role], key],
                                  path=file.path)
        e.keys[role] = key
        e.shapes[role] = shapes[key]
    good: list[ModuleEntry] = []
    for e in entries.values():
        if _complete(e):
            good.append(e)
        else:
            unknown.extend(e.keys.values())
    for e in good:
        _check_entry_dtypes(e, file)
        _check_entry_shapes(e, file.path)
    _check_duplicates(good, file.path)
    observations: list[Observation | ParamObservation] = [
        ParamObservation(e.component, e.match.spec, e.match.index, e.shapes.get("diff", e.shapes.get("set", ())))
        if isinstance(e.match, ParamMatch)
        else Observation(e.component, e.match.spec, e.match.alias, e.match.index, *e.observed_shape())
        for e in good]
    instance = infer_instance(arch, observations, metadata, path=file.path)
    for e in good:
        params = instance.params.get(e.component, {})
        if isinstance(e.match, ParamMatch):
            _check_loose_shape(e, params, file.path)
            continue
        try:
            rows = row_window(e.match.alias, params)
        except KeyError as exc:
            raise FormatError(f"module {e.file_module!r} addresses rows of a fused weight, but the file's shapes do "
                              f"not determine the size {exc.args[0]!r}.", path=file.path,
                              hint="the factor shapes are inconsistent; re-export the LoRA.") from None
        want = (rows[1] - rows[0] if rows else evaluate(e.match.spec.out, params, -1),
                evaluate(e.match.spec.inp, params, -1))
        got = e.observed_shape()
        kernel = tuple(evaluate(k, params, -1) for k in e.match.spec.kernel)
        composed = _composed_shape(e) if e.family in ("lora", "loha", "lokr", "full") else None
        if any(g is not None and w >= 0 and g != w for g, w in zip(got, want)) or (
                composed is not None and not fits(composed, (want[0], want[1], *kernel))):
            shown_want: tuple[int, ...] = want
            shown_got: tuple[int | None, ...] = got
            if composed is not None and kernel != tuple(composed[2:]):
                shown_want, shown_got = (*want, *kernel), composed
            # an unknown dimension is shown as None, which ShapeMismatchError's Iterable[int] does not admit
            raise ShapeMismatchError(e.file_module, shown_want, shown_got, path=file.path,  # type: ignore[arg-type]
                                     hint="this module's (out, in) contradicts the sizes the other modules imply "
                                          f"({', '.join(f'{k}={v}' for k, v in sorted(params.items()))}); "
                                          "the file is corrupt or mixes two models.")
    return ParsedLora(file.path, file, det, good, sorted(unknown), instance, metadata, _peft_config(file.path))


def _assign_expert(det: Detection, arch: ArchSpec, path: str | None, metadata: dict[str, str],
                   explicit: str | None) -> Detection:
    """A single-expert file (every key read by an unpaired rule of the first expert) moved to the expert it is
    tagged for; the tag is recorded in ``metadata`` (:data:`~lorakit.lora.experts.EXPERT_KEY`). A file holding
    several experts keeps its reading (``explicit`` is then refused)."""
    if not arch.experts:
        if explicit:
            raise UsageError(f"{arch.label} has no paired experts.", path=path, hint="drop --expert.")
        return det
    single = all(not p.rule.paired and p.rule.component in (arch.experts[0], *(
        c for c in arch.components if c not in arch.experts)) for p in det.parses.values())
    if not single:
        if explicit:
            raise UsageError("--expert: this file holds several experts already.", path=path,
                             hint="drop --expert (or split it with --split-experts).")
        return det
    which = file_expert(arch, path, metadata, explicit)
    if which is None:
        return det
    metadata[EXPERT_KEY] = expert_tag(arch, which)
    if which == arch.experts[0]:
        return det
    moved = {k: replace(p, rule=replace(p.rule, component=which)) if p.rule.component == arch.experts[0] else p
             for k, p in det.parses.items()}
    return replace(det, parses=moved)


def _check_loose_shape(entry: ModuleEntry, params: Mapping[str, int], path: str | None) -> None:
    assert isinstance(entry.match, ParamMatch)      # called for loose-parameter entries only
    want = tuple(evaluate(x, params, -1) for x in entry.match.spec.shape)
    got = tuple(entry.shapes.get("diff", entry.shapes.get("set", ())))
    if len(got) != len(want) or any(w >= 0 and g != w for g, w in zip(got, want)):
        raise ShapeMismatchError(entry.file_module, want, got, path=path,
                                 hint=f"this diff does not have the shape of the parameter {entry.match.native!r} "
                                      f"({', '.join(f'{k}={v}' for k, v in sorted(params.items()))}); the file is "
                                      "corrupt or mixes two models.")


def _composed_shape(entry: ModuleEntry) -> tuple[int, ...]:
    """The shape of the weight the factors compose into: ``(out, in)`` for a Linear weight, ``(out, in, *kernel)``
    for a convolution (LoRA downs of shape ``(r, in, k, k)``, Tucker cores ``lora_mid``/``hada_t*``/``lokr_t2``,
    4-D ``lokr_w2``). LoHa/LoKr without a core compose a flattened ``(out, in·k·k)`` conv delta. ValueError
    when they do not compose. Pure shape arithmetic: no tensor is built."""
    s = entry.shapes
    fam = entry.family

    def dims(role: str, low: int, high: int) -> tuple[int, ...]:
        shape = tuple(s[role])
        if not low <= len(shape) <= high or 0 in shape:
            raise ValueError(f"{role} has shape {list(shape)}")
        return shape

    def rank_ok(a: str, ra: int, b: str, rb: int) -> None:
        if ra != rb or ra == 0:
            raise ValueError(f"{a} {list(s[a])} and {b} {list(s[b])} disagree on the rank (or it is 0)")

    if fam == "lora":
        up, down = dims("up", 2, 5), dims("down", 2, 5)
        if any(d != 1 for d in up[2:]):
            raise ValueError(f"up has shape {list(up)}; its trailing dimensions must be 1")
        if "mid" in s:
            mid = dims("mid", 3, 5)
            rank_ok("up", up[1], "mid", mid[0])
            rank_ok("mid", mid[1], "down", down[0])
            return (up[0], down[1], *mid[2:])
        rank_ok("up", up[1], "down", down[0])
        return (up[0], *down[1:])
    if fam == "loha":
        a1, b1, a2, b2 = (dims(r, 2, 2) for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        if "hada_t1" in s or "hada_t2" in s:
            t1, t2 = dims("hada_t1", 3, 5), dims("hada_t2", 3, 5)
            rank_ok("hada_t1", t1[0], "hada_w1_b", b1[0])
            rank_ok("hada_t2", t2[0], "hada_w2_b", b2[0])
            one, two = (a1[1], b1[1], *t1[2:]), (a2[1], b2[1], *t2[2:])
        else:
            rank_ok("hada_w1_a", a1[1], "hada_w1_b", b1[0])
            rank_ok("hada_w2_a", a2[1], "hada_w2_b", b2[0])
            one, two = (a1[0], b1[1]), (a2[0], b2[1])
        if one != two:
            raise ValueError(f"the two Hadamard factors give {list(one)} and {list(two)}")
        return one
    if fam == "lokr":
        if "lokr_w1" in s:
            w1 = dims("lokr_w1", 2, 2)
        else:
            w1a, w1b = dims("lokr_w1_a", 2, 2), dims("lokr_w1_b", 2, 2)
            rank_ok("lokr_w1_a", w1a[1], "lokr_w1_b", w1b[0])
            w1 = (w1a[0], w1b[1])
        if "lokr_w2" in s:
            w2 = dims("lokr_w2", 2, 5)
        elif "lokr_t2" in s:
            t2, w2a, w2b = dims("lokr_t2", 3, 5), dims("lokr_w2_a", 2, 2), dims("lokr_w2_b", 2, 2)
            # LyCORIS rebuild_tucker: lokr_t2 (r, r, k, k), lokr_w2_a (r, out2), lokr_w2_b (r, in2)
            rank_ok("lokr_t2", t2[0], "lokr_w2_a", w2a[0])
            rank_ok("lokr_t2", t2[1], "lokr_w2_b", w2b[0])
            w2 = (w2a[1], w2b[1], *t2[2:])
        else:
            w2a, w2b = dims("lokr_w2_a", 2, 2), dims("lokr_w2_b", 2, 2)
            rank_ok("lokr_w2_a", w2a[1], "lokr_w2_b", w2b[0])
            w2 = (w2a[0], w2b[1])
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    if fam == "full":
        return dims("diff", 1, 5)
    raise ValueError(f"no adapter factors ({fam})")


def fits(got: Sequence[int], want: Sequence[int]) -> bool:
    """Whether a composed ΔW shape fits a module's weight shape (unknown sizes ``< 0`` fit anything): equal, or
    equal after flattening the input dimensions (a LoHa/LoKr conv delta ``(out, in·k·k)``; a 1×1 conv written
    as a Linear LoRA and the reverse)."""
    def same(a: Sequence[int], b: Sequence[int]) -> bool:
        return len(a) == len(b) and all(w < 0 or g == w for g, w in zip(a, b))

    if same(got, want):
        return True
    if any(w < 0 for w in want[1:]):
        return len(got) >= 2 and (want[0] < 0 or got[0] == want[0]) and (want[1] < 0 or got[1] == want[1])
    return bool(got) and (want[0] < 0 or got[0] == want[0]) and _prod(got[1:]) == _prod(want[1:])


def dora_axis_of_shape(shape: Sequence[int], out_rows: int, in_cols: int, *, peft: bool = False,
                       in_channels: int | None = None) -> str | None:
    """Which axis a stored DoRA magnitude of ``shape`` normalizes: "out" for ``(out,)`` / ``(out, 1[, 1, 1])``
    (PEFT, kohya/LyCORIS ``wd_on_output``), "in" for ``(1, in[, k, k])`` (LyCORIS with ``wd_on_output=False``;
    ``in_cols`` = the product of the input dimensions), None when it is neither. A ``(1, 1)`` magnitude of a
    one-row weight counts as output-axis."""
    shape = tuple(shape)
    if shape == (out_rows,) or (len(shape) >= 2 and shape[0] == out_rows and all(d == 1 for d in shape[1:])):
        return "out"
    if peft and len(shape) >= 3 and shape[:2] == (1, out_rows) and all(d == 1 for d in shape[2:]):
        return "out"     # PEFT DoraConv2dLayer: (1, out, 1, 1), one magnitude per output channel
    if len(shape) >= 2 and shape[0] == 1 and _prod(shape[1:]) == in_cols:
        return "in"
    if in_channels is not None and len(shape) >= 2 and shape[:2] == (1, in_channels) and \
            all(d == 1 for d in shape[2:]):
        return "in"      # LyCORIS wd_on_output=False on a k×k conv: one magnitude per input channel
    return None


def _peft_dora(entry: ModuleEntry) -> bool:
    """Whether the module's DoRA magnitude is PEFT's ``lora_magnitude_vector`` (always one value per output row or
    channel), not a kohya/LyCORIS ``dora_scale`` (whose axis the shape tells)."""
    return "lora_magnitude_vector" in entry.keys.get("dora", "")


def _check_entry_shapes(entry: ModuleEntry, path: str | None) -> None:
    """Factor shapes must compose into one Linear weight (ranks agree and are > 0; biases and DoRA
    magnitudes match its rows). Header data only."""
    shapes = entry.shapes
    problem = None
    if isinstance(entry.match, ParamMatch):
        rank = len(entry.match.spec.shape)
        role = "set" if "set" in shapes else "diff"
        if {"set", "diff"} <= set(shapes):
            problem = ("the file holds both a replacement value (the bare parameter name) and a diff for this "
                       "parameter (two spellings of one change)")
        elif set(shapes) != {role} or len(shapes[role]) != rank or 0 in shapes[role]:
            problem = (f"a loose parameter takes one diff (or one replacement value) of {rank} dimension(s), got "
                       + ", ".join(f"{r} {list(v)}" for r, v in sorted(shapes.items())))
        if problem is not None:
            raise FormatError(f"module {entry.file_module!r}: {problem}.", path=path,
                              hint="the file is corrupt or was written by a broken exporter; re-export it.")
        return
    if "alpha" in shapes and len(shapes["alpha"]) and _prod(shapes["alpha"]) != 1:
        n = _prod(shapes["alpha"])     # shape [0] holds no α at all: never read it as α = rank
        problem = f"alpha holds {n} values instead of one" if n else \
            f"alpha tensor has shape {list(shapes['alpha'])} and holds no value"
    out_rows = None
    if problem is None and entry.family in ("lora", "loha", "lokr", "full"):
        try:
            composed = _composed_shape(entry)
            out_rows, in_cols = composed[0], _prod(composed[1:])
            in_ch = composed[1] if len(composed) > 2 else None
            if "dora" in shapes and dora_axis_of_shape(shapes["dora"], out_rows, in_cols, peft=_peft_dora(entry),
                                                       in_channels=in_ch) is None:
                raise ValueError(f"DoRA magnitude of shape {list(shapes['dora'])} is neither an output-axis "
                                 f"magnitude ([{out_rows}] or [{out_rows}, 1]) nor an input-axis one ([1, {in_cols}])")
        except ValueError as exc:
            problem = f"the factor shapes do not compose ({exc})"
    elif problem is None and "dora" in shapes:
        problem = "a DoRA magnitude without weight factors"
    for role in ("bias", "diff_b"):
        if problem is None and role in shapes:
            shape = shapes[role]
            if len(shape) != 1 or (out_rows is not None and shape[0] != out_rows):
                problem = f"{role} has shape {list(shape)}, expected [{out_rows if out_rows is not None else 'rows'}]"
    if problem is not None:
        detail = ", ".join(f"{r} {list(v)}" for r, v in sorted(shapes.items()))
        raise FormatError(f"module {entry.file_module!r}: {problem} ({detail}).", path=path,
                          hint="the file is corrupt or was written by a broken exporter; re-export it.")


_INT_CODES = frozenset({"U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"})


def _check_entry_dtypes(entry: ModuleEntry, file: WeightFile) -> None:
    """Factors, DoRA magnitudes, biases and diffs must be floating point; α may also be an integer scalar
    (read as a float). Integer or bool factors would be silently turned into other numbers by any
    computation, so they are refused here, from the header."""
    for role, key in sorted(entry.keys.items()):
        code = file.infos[key].dtype
        if code in FLOAT_CODES or (role == "alpha" and code in _INT_CODES):
            continue
        what = "an alpha" if role == "alpha" else f"a LoRA {role} tensor"
        allowed = "a float or integer scalar" if role == "alpha" else "floating point (F16, BF16, F32, F64, F8)"
        raise UnsupportedDtypeError(f"tensor {key!r} ({what}) has dtype {code}; it must be {allowed}.",
                                    path=file.path, hint="the file is corrupt or was written by a broken exporter; "
                                                         "re-export it with float tensors.")


def _check_duplicates(entries: list[ModuleEntry], path: str | None) -> None:
    seen: dict[tuple[object, ...], ModuleEntry] = {}
    for e in entries:
        if e.family == "bias":
            continue
        # a replacement value and a diff of one loose parameter are two spellings of one change
        key = (e.component, e.match.native, e.match.alias.rows, "full" if e.family == "set" else e.family)
        other = seen.get(key)
        if other is not None:
            raise KeyMappingError(
                f"module {e.match.native!r} appears twice, as {other.file_module!r} and {e.file_module!r} "
                f"(two spellings of one module)", [other.file_module, e.file_module], path=path,
                hint="keep one spelling; lorakit will not guess which one is meant.")
        seen[key] = e


def _peft_config(path: str | None) -> dict[str, object] | None:
    if not path or os.path.isdir(path):
        return None
    cfg = os.path.join(os.path.dirname(path), "adapter_config.json")
    if os.path.basename(path).startswith("adapter_model") and os.path.isfile(cfg):
        try:
            with open(cfg, encoding="utf-8") as fh:
                data = loads_json(fh.read())
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None
    return None


# ---------------------------------------------------------------------------------------------
# Alphas
# ---------------------------------------------------------------------------------------------

def _config_number(value: object, key: str, source: str, path: str | None) -> float:
    """A config α as a finite, non-zero float; FormatError / NonFiniteError naming ``source``'s ``key``."""
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None:
        raise FormatError(f"{source} key {key!r} holds {value!r}, not a number.", path=path,
                          hint="fix the value (lorakit meta --set) or remove the key; lorakit will not guess α.")
    if not math.isfinite(number):
        raise NonFiniteError(f"{source} key {key!r} holds a non-finite alpha ({value!r}).", path=path,
                             hint="the file's metadata is corrupt; set a finite alpha (lorakit meta --set).")
    if number == 0:
        raise FormatError(f"{source} key {key!r} is 0: alpha 0 gives a zero LoRA (scale α/r = 0).", path=path,
                          hint="set the alpha the LoRA was trained with (lorakit meta --set), or remove the key "
                               "for α = rank.")
    return number


def _pattern_value(patterns: object, module: str, key: str, source: str, path: str | None) -> float | None:
    if not isinstance(patterns, Mapping):
        raise FormatError(f"{source} key {key!r} holds {patterns!r}; an alpha_pattern is a JSON object "
                          "{{module pattern: alpha}}.", path=path,
                          hint="fix the value (lorakit meta --set) or remove the key.")
    for pat, val in patterns.items():
        try:
            hit = re.match(rf"^(?:.*\.)?(?:{pat})$", module)
        except (re.error, TypeError):
            raise FormatError(f"{source} key {key!r}: {pat!r} is not a valid module pattern.", path=path,
                              hint="fix the value (lorakit meta --set) or remove the key.") from None
        if hit:
            return _config_number(val, f"{key}[{pat!r}]", source, path)
    return None


def config_alpha(parsed: ParsedLora, entry: ModuleEntry, rank: int) -> float | None:
    """α from ``lora_adapter_metadata`` / ``adapter_config.json`` / a bare ``alpha`` entry, if any."""
    module = entry.match.alias.template.format(i=entry.match.index) if entry.match.index is not None \
        else entry.match.alias.template
    path = parsed.path
    configs: list[tuple[Mapping[str, object], str, str]] = []    # (config, key prefix, source)
    raw = parsed.metadata.get("lora_adapter_metadata")
    if raw:
        try:
            meta = loads_json(raw)
        except ValueError:
            raise FormatError(f"metadata key 'lora_adapter_metadata' is not JSON ({raw[:60]!r}).", path=path,
                              hint="fix or remove it (lorakit meta --delete lora_adapter_metadata).") from None
        if not isinstance(meta, dict):
            raise FormatError(f"metadata key 'lora_adapter_metadata' holds {raw[:60]!r}, not a JSON object.",
                              path=path, hint="fix or remove it (lorakit meta --delete lora_adapter_metadata).")
        rule = parsed.arch.spec.write_rule("diffusers", entry.component)   # diffusers scopes its config by prefix
        comp = rule.prefix if rule is not None and rule.prefix else entry.component + "."
        scoped = {k[len(comp):]: v for k, v in meta.items() if k.startswith(comp)}
        configs.append((scoped, comp, "lora_adapter_metadata") if scoped else (meta, "", "lora_adapter_metadata"))
    if parsed.peft_config:
        configs.append((parsed.peft_config, "", "adapter_config.json"))
    for cfg, prefix, source in configs:
        alpha = None
        if cfg.get("alpha_pattern") is not None:
            alpha = _pattern_value(cfg["alpha_pattern"], module, prefix + "alpha_pattern", source, path)
        if alpha is None and cfg.get("lora_alpha") is not None:
            alpha = _config_number(cfg["lora_alpha"], prefix + "lora_alpha", source, path)
        if alpha is not None:
            if cfg.get("use_rslora"):
                alpha = alpha * rank ** 0.5   # rsLoRA: scale α/√r == (α√r)/r
            return alpha
    bare = parsed.metadata.get("alpha")
    if bare is not None:
        return _config_number(bare, "alpha", "metadata", path)
    return None


# ---------------------------------------------------------------------------------------------
# Loading tensors into patches
# ---------------------------------------------------------------------------------------------

def _build_adapter(entry: ModuleEntry, t: Mapping[str, torch.Tensor], alpha: float | None) -> Adapter | None:
    """The module's adapter, built by its registered kind (None: no weight delta, e.g. a bias diff only)."""
    fam = entry.family
    return get_kind(fam).build(t, alpha) if fam != INCOMPLETE else None


def row_window(alias: Alias, params: Mapping[str, int]) -> tuple[int, int] | None:
    """The ``(start, stop)`` rows of the native weight an alias addresses (None: all rows)."""
    if alias.rows is None:
        return None
    start = evaluate(alias.rows[0], params)
    return start, start + evaluate(alias.rows[1], params)


def entry_alpha(parsed: ParsedLora, entry: ModuleEntry, alpha: torch.Tensor | float | None) -> float | None:
    """The alpha of one parsed module from its alpha tensor (or that tensor's first value, as
    :meth:`WeightFile.first_value` reads it) or the format's default."""
    if alpha is not None:
        if isinstance(alpha, float):
            value = alpha
        else:
            value = float(alpha.double().reshape(-1)[0]) if alpha.numel() else 0.0
        if value == math.inf and entry.family == "lokr" and {"lokr_w1", "lokr_w2"} <= set(entry.keys):
            # AI-Toolkit's default LoKr (toolkit/config_modules.py lokr_full_rank: alpha 9999999999, saved in
            # fp16 as +inf) has both Kronecker factors full; LyCORIS (LokrModule) and ComfyUI then ignore α and
            # use scale 1, and so does lorakit. Any other non-finite α is refused below.
            return None
        if not math.isfinite(value):
            raise NonFiniteError(f"alpha tensor {entry.keys.get('alpha', entry.file_module)!r} holds {value}.",
                                 path=parsed.path, hint="the file is corrupt or diverged in training; "
                                 "`lorakit doctor` reports it. lorakit will not compute with it.")
        # sd-scripts (LoRAModule) and LyCORIS read a stored α of 0 as α = rank: the file was trained at scale 1
        return value if value != 0 else None
    rank = None
    if entry.family == "lora":
        rank = entry.shapes["down"][0]
    elif entry.family == "loha":
        rank = entry.shapes["hada_w1_b"][0]
    if rank is None or parsed.format in ("xlabs",):
        return None
    return config_alpha(parsed, entry, rank)


def _with_kernel(adapter: Adapter | None, entry: ModuleEntry) -> Adapter | None:
    """LoHa/LoKr without a Tucker core store a convolution's factors flattened (``(·, in·k·k)``): give the adapter
    the conv weight's shape from the layout's kernel, so its ΔW (and its plain LoRA) is ``(out, in, k, k)``."""
    if not isinstance(adapter, (LoHa, LoKr)) or entry.match.loose or len(adapter.weight_shape) != 2:
        return adapter
    kernel = tuple(evaluate(k, {}, -1) for k in entry.match.spec.kernel)  # type: ignore[union-attr]
    if not kernel or min(kernel) < 1:
        return adapter
    out, flat_in = adapter.weight_shape
    k = _prod(kernel)
    if flat_in % k:
        return adapter
    return replace(adapter, shape=(out, flat_in // k, *kernel))


def load_entry(parsed: ParsedLora, entry: ModuleEntry) -> Patch:
    """Read one parsed module's tensors and build its patch."""
    t = {role: parsed.file.get(key) for role, key in entry.keys.items()}
    alpha = entry_alpha(parsed, entry, t.get("alpha"))
    adapter = _build_adapter(entry, t, alpha)
    params = parsed.arch.params[entry.component]
    bias = t.get("diff_b")
    if "bias" in t and isinstance(adapter, LoRA):
        lb = t["bias"].float() * adapter.scale
        bias = lb if bias is None else bias.float() + lb
    dora = t.get("dora")
    if dora is not None:
        # the axis is explicit in the shape: output-axis magnitudes become (out,), input-axis ones stay (1, in)
        composed = _composed_shape(entry)
        axis = dora_axis_of_shape(dora.shape, composed[0], _prod(composed[1:]), peft=_peft_dora(entry),
                                  in_channels=composed[1] if len(composed) > 2 else None)
        dora = dora.reshape(-1) if axis == "out" else dora.reshape(1, -1)
    adapter = _with_kernel(adapter, entry)
    alias = entry.match.alias
    if alias.swap_halves:
        adapter, bias, dora = swap_parts(adapter, bias, dora, densify=True)
    patch = Patch(Target(entry.component, entry.match.native, loose=entry.match.loose), adapter, row_window(alias, params),
                  bias=bias, dora=dora, source=entry.file_module, replace=entry.family == "set")
    return patch


def load(parsed: ParsedLora) -> LoraModel:
    """Read every parsed module's tensors into a :class:`LoraModel`."""
    patches = [load_entry(parsed, e) for e in parsed.entries]
    return LoraModel(parsed.arch, patches, parsed.format, dict(parsed.metadata), parsed.path,
                     list(parsed.unknown_keys))


def read_lora(path: str | os.PathLike[str], *, allow_pickle: bool = False, force_format: str | None = None,
              allow_partial: bool = True, arch: str | None = None, expert: str | None = None) -> LoraModel:
    """Open, detect and load a LoRA file in one call (``arch``: read it as this architecture; ``expert``: a
    single-expert file's expert, see :func:`parse`)."""
    with open_weights(path, allow_pickle=allow_pickle) as f:
        parsed = parse(f, force_format=force_format, arch_name=arch, expert=expert)
        if parsed.unknown_keys and not allow_partial:
            raise KeyMappingError("keys not understood", parsed.unknown_keys, path=os.fspath(path),
                                  hint="pass --allow-partial to proceed without them.")
        return load(parsed)
