"""Per-block multipliers (``--blocks``), addressed through each architecture's block scheme.

A multiplier scales a module's whole delta once: ``ΔW ← m·ΔW`` (never once per factor, so never squared). The
architecture's :class:`~lorakit.layouts.block_schemes.BlockScheme` gives every module a *slot chain* (slot ids
from the most specific to the most general, e.g. ``("IN", "BASE")``; see that module). Three spellings:

1. a plain comma list. Its length selects one of the scheme's vectors (lengths of vectors that span repeated
   blocks are derived from the layout's block counts, never written down); the error for a wrong length lists the
   accepted ones. A module takes the value of the first slot of its chain that the vector lists, else the
   vector's "unlisted" value (1 for FLUX.1's lists; 0 for the LoRA-Block-Weight SD lists, as LBW's ``to26``
   does); a module in no slot at all (SD's time/label embeddings and ``conv_out``) keeps 1.
2. a preset name of the scheme (``OUTALL``, ``ALL0.5``; case-insensitive), a vector with its values.
3. selectors ``SELECTOR=VALUE,…``. A selector is a component name (``unet``, ``clip_l``), a slot id of the scheme
   (``IN04``, ``M00``, ``BASE``, ``D05``; case-insensitive; it selects every module whose chain holds it), or a
   native module name: its dotted segments match the first segments of the module name; a segment may be a block
   range ``A-B`` or ``*`` (``double_blocks.0-5``, ``input_blocks.4``). When several selectors match a module, the
   last one wins; modules no selector matches keep 1.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from lorakit.errors import UsageError
from lorakit.layouts import NameIndex, available, resolve
from lorakit.layouts.base import ComponentSpec, ModuleSpec, ParamIndex, ParamSpec
from lorakit.layouts.block_schemes import BlockScheme, Run, Vector
from lorakit.lora.model import ArchInstance, Target

_NO_SCHEME = BlockScheme()
_INDEXES: dict[int, tuple[NameIndex, ParamIndex]] = {}


@dataclass
class BlockWeights:
    """Resolved ``--blocks`` spec: a multiplier for every target."""

    spec: str
    kind: str                                   # "vector" | "lbw" | "preset" | "selectors"
    _fn: Callable[[Target], float] = field(repr=False)
    labels: list[str] = field(default_factory=list)

    def multiplier(self, target: Target) -> float:
        return self._fn(target)

    def to_json(self) -> dict[str, object]:
        return {"spec": self.spec, "kind": self.kind}


def scheme_of(arch: ArchInstance) -> BlockScheme:
    """The architecture's block scheme (an empty one, selectors only, when it declares none)."""
    return arch.spec.blocks or _NO_SCHEME


def block_counts(arch: ArchInstance) -> list[tuple[str, int]]:
    """(count name, value) of the denoiser's block counts, in layout order (FLUX.1: double, single)."""
    comp = arch.spec.denoiser
    params = dict(arch.params.get(comp.name) or {})
    out = []
    for name in comp.counts:
        value = params.get(name)
        if value is None:
            value = next((int(p.params[name]) for p in comp.presets if name in p.params), 0)
        out.append((name, int(value)))
    return out


def vector_slots(vector: Vector, counts: dict[str, int]) -> list[str]:
    """The slot ids of ``vector``, its runs expanded with the block counts."""
    return [s for part in vector.parts
            for s in (part.ids(counts.get(part.count, 0)) if isinstance(part, Run) else (part,))]


def accepted_vectors(arch: ArchInstance) -> dict[int, tuple[Vector, list[str]]]:
    """length -> (vector, slot ids) for every plain list the architecture accepts."""
    counts = dict(block_counts(arch))
    out: dict[int, tuple[Vector, list[str]]] = {}
    for vector in scheme_of(arch).vectors:
        slots = vector_slots(vector, counts)
        if len(slots) in out:
            raise AssertionError(f"{arch.name}: block vectors {out[len(slots)][0].name!r} and {vector.name!r} "
                                 f"both have {len(slots)} values")
        out[len(slots)] = (vector, slots)
    return out


def slot_ids(arch: ArchInstance) -> list[str]:
    """Every slot id some module of the architecture can have, in scheme order."""
    scheme, counts = scheme_of(arch), dict(block_counts(arch))
    ids = [i for run in scheme.runs for i in run.ids(counts.get(run.count, 0))]
    ids += [s for chain in scheme.groups.values() for s in chain]
    ids += [s for c in arch.spec.components.values() if c.role != "denoiser"
            for s in scheme.roles.get(c.role, scheme.unplaced)]
    ids += list(scheme.unplaced)
    return list(dict.fromkeys(ids))


def _indexes(comp: ComponentSpec) -> tuple[NameIndex, ParamIndex]:
    got = _INDEXES.get(id(comp))
    if got is None:
        got = _INDEXES[id(comp)] = (NameIndex.of(comp, "native", flat=False), ParamIndex.of(comp, "native", flat=False))
    return got


def slot_chain(arch: ArchInstance, target: Target) -> tuple[str, ...]:
    """The slot ids of ``target``, most specific first (empty: the module is in no block)."""
    scheme = scheme_of(arch)
    comp = arch.spec.components.get(target.component)
    if comp is None:
        raise UsageError(f"{target} is not a module of the {arch.name} layout.")
    if comp.role != "denoiser":
        return scheme.roles.get(comp.role, scheme.unplaced)
    names, params = _indexes(comp)
    m = names.match(target.module) or params.match(target.module)   # a loose parameter takes its block's slot
    if m is None:
        raise UsageError(f"{target} is not a module of the {arch.name} layout.")
    spec: ModuleSpec | ParamSpec = m.spec
    run = next((r for r in scheme.runs if r.count == spec.repeat), None)
    if run is not None and m.index is not None:
        return (run.id(m.index),)
    return scheme.groups.get(spec.group, scheme.unplaced)


def _chains(arch: ArchInstance) -> Callable[[Target], tuple[str, ...]]:
    cache: dict[Target, tuple[str, ...]] = {}

    def chain(target: Target) -> tuple[str, ...]:
        got = cache.get(target)
        if got is None:
            got = cache[target] = slot_chain(arch, target)
        return got
    return chain


def _vector_weights(spec: str, kind: str, arch: ArchInstance, vector: Vector, slots: list[str],
                    values: list[float]) -> BlockWeights:
    table = dict(zip(slots, values))
    chain = _chains(arch)

    def fn(target: Target) -> float:
        slots_of = chain(target)
        for slot in slots_of:
            if slot in table:
                return table[slot]
        return vector.unlisted if slots_of else 1.0

    return BlockWeights(spec, kind, fn, slots)


def _continues(first: re.Match[str] | None, last: re.Match[str] | None, nxt: re.Match[str] | None) -> bool:
    """Whether id ``nxt`` extends the run ``first``…``last``: same prefix, number one higher."""
    return bool(first and last and nxt and nxt.group(1) == first.group(1)
                and int(nxt.group(2)) == int(last.group(2)) + 1)


def compact(ids: list[str]) -> str:
    """``D00, D01, …, D18`` written ``D00…D18`` (runs of three or more consecutive numbered ids)."""
    parsed = [re.fullmatch(r"(\D*)(\d+)", i) for i in ids]
    out: list[str] = []
    k = 0
    while k < len(ids):
        j = k
        while j + 1 < len(ids) and _continues(parsed[k], parsed[j], parsed[j + 1]):
            j += 1
        out.append(f"{ids[k]}…{ids[j]}" if j - k >= 2 else ", ".join(ids[k:j + 1]))
        k = j + 1
    return ", ".join(out)


def parse_blocks(spec: str, arch: ArchInstance) -> BlockWeights:
    """Parse a ``--blocks`` spec (multiplier list, preset name or selectors) for ``arch``."""
    text = spec.strip()
    if not text:
        raise UsageError("empty --blocks spec.", hint="give a comma list of multipliers or SELECTOR=VALUE pairs.")
    items = [t.strip() for t in re.split(r"[,\s]+", text) if t.strip()] if "=" not in text else \
        [t.strip() for t in text.split(",") if t.strip()]
    if any("=" in t for t in items):
        return _parse_selectors(text, items, arch)
    scheme = scheme_of(arch)
    if len(items) == 1 and scheme.presets and not _is_number(items[0]):
        return _preset(text, items[0], arch)
    values = [_number(t, spec) for t in items]
    layouts = accepted_vectors(arch)
    if len(values) not in layouts:
        accepted = "; ".join(f"{n} = {v.name}: {compact(slots)}" for n, (v, slots) in sorted(layouts.items()))
        raise UsageError(f"--blocks has {len(values)} values; for this {arch.spec.label} model the accepted lengths "
                         f"are: {accepted or 'none (it takes selectors only)'}.", hint=_usage_hint(scheme))
    vector, slots = layouts[len(values)]
    return _vector_weights(spec, vector.kind, arch, vector, slots, values)


def _usage_hint(scheme: BlockScheme) -> str:
    ways = []
    if scheme.presets:
        ways.append(f"a preset ({', '.join(p.name for p in scheme.presets)})")
    ways.append(f"named selectors such as {scheme.example}" if scheme.example else "named selectors")
    return "or use " + " or ".join(ways) + "."


def _preset(spec: str, name: str, arch: ArchInstance) -> BlockWeights:
    scheme = scheme_of(arch)
    by_name = {p.name.upper(): p for p in scheme.presets}
    preset = by_name.get(name.upper())
    if preset is None:
        near = difflib.get_close_matches(name.upper(), list(by_name), n=1, cutoff=0.5)
        raise UsageError(f"--blocks {name!r} is neither a number nor a {arch.spec.label} preset.",
                         hint=(f"did you mean {by_name[near[0]].name!r}? " if near else "") +
                         f"presets: {', '.join(p.name for p in scheme.presets)}.")
    slots = vector_slots(preset.vector, dict(block_counts(arch)))
    return _vector_weights(spec, "preset", arch, preset.vector, slots, list(preset.values))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--blocks value {text!r} is not a number (in {spec!r}).",
                         hint="write numbers separated by commas, or SELECTOR=VALUE pairs.") from None
    if not math.isfinite(value):
        raise UsageError(f"--blocks value {text!r} is not finite.")
    return value


# ---------------------------------------------------------------------------------------------
# Named selectors
# ---------------------------------------------------------------------------------------------

_RANGE = re.compile(r"(\d+)-(\d+)\Z")


@dataclass(frozen=True)
class Selector:
    """A component (``segments`` empty), a native-name prefix, or (``slot``) a slot id of the block scheme."""

    text: str
    component: str | None
    segments: tuple[str, ...]
    slot: str | None = None

    def matches(self, component: str, module: str) -> bool:
        if self.component is not None and component != self.component:
            return False
        parts = module.split(".")
        if len(parts) < len(self.segments):
            return False
        return all(_segment_ok(sel, part) for sel, part in zip(self.segments, parts))

    def expansions(self) -> Iterator[tuple[str, ...]]:
        """Concrete segment tuples with every range expanded (``*`` kept)."""
        def rec(i: int, acc: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
            if i == len(self.segments):
                yield acc
                return
            m = _RANGE.match(self.segments[i])
            options = [str(k) for k in range(int(m.group(1)), int(m.group(2)) + 1)] if m else [self.segments[i]]
            for o in options:
                yield from rec(i + 1, acc + (o,))
        return rec(0, ())


def _segment_ok(sel: str, part: str) -> bool:
    if sel == "*" or sel == part:
        return True
    m = _RANGE.match(sel)
    return bool(m and part.isdigit() and int(m.group(1)) <= int(part) <= int(m.group(2)))


def _all_modules(arch: ArchInstance) -> list[tuple[str, str]]:
    denoiser = arch.spec.denoiser.name
    return [(comp, m.name) for comp in arch.spec.components if comp in arch.params or comp == denoiser
            for m in arch.modules(comp)]


def _parse_selectors(spec: str, items: list[str], arch: ArchInstance) -> BlockWeights:
    modules = _all_modules(arch)
    components = set(arch.spec.components)
    slots = {s.upper(): s for s in slot_ids(arch)}
    prefixes: set[str] = set(components) | set(slots.values())
    for _, name in modules:
        parts = name.split(".")
        prefixes.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    rules: list[tuple[Selector, float]] = []
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--blocks item {item!r} is not SELECTOR=VALUE.",
                             hint=f"e.g. {scheme_of(arch).example or 'COMPONENT=0'}.")
        sel = _selector(name, components, slots)
        _check_selector(sel, modules, prefixes, arch)
        rules.append((sel, _number(value.strip(), spec)))
    chain = _chains(arch)

    def fn(target: Target) -> float:
        value = 1.0
        for sel, v in rules:
            if sel.slot is not None:
                if sel.slot in chain(target):
                    value = v
            elif sel.matches(target.component, target.module):
                value = v
        return value

    return BlockWeights(spec, "selectors", fn, [s.text for s, _ in rules])


def _selector(name: str, components: set[str], slots: dict[str, str]) -> Selector:
    comp, sep, rest = name.partition(":")
    if sep and comp in components:
        return Selector(name, comp, tuple(rest.split(".")) if rest else ())
    if name in components:
        return Selector(name, name, ())
    if name.upper() in slots:
        return Selector(name, None, (), slot=slots[name.upper()])
    for seg in name.split("."):
        m = _RANGE.match(seg)
        if m and int(m.group(1)) > int(m.group(2)):
            raise UsageError(f"--blocks selector {name!r} has an empty range {seg!r}.")
    return Selector(name, None, tuple(name.split(".")))


def _check_selector(sel: Selector, modules: list[tuple[str, str]], prefixes: set[str], arch: ArchInstance) -> None:
    if not sel.segments:
        return
    for concrete in sel.expansions():
        if not any(Selector(sel.text, sel.component, concrete).matches(c, m) for c, m in modules):
            missing = ".".join(concrete)
            near = difflib.get_close_matches(missing, sorted(prefixes), n=1, cutoff=0.5)
            ids = compact(slot_ids(arch))
            example = scheme_of(arch).example
            raise UsageError(f"--blocks selector {sel.text!r}: no block or module {missing!r} in this model.",
                             hint=(f"did you mean {near[0]!r}? " if near else "") +
                             "selectors are component names, block ids" + (f" ({ids})" if ids else "") +
                             " or native module names" + (f", e.g. {example}" if example else "") + ".")


def _help() -> str:
    labels: dict[int, list[str]] = {}
    schemes: dict[int, BlockScheme] = {}
    for arch in map(resolve, available()):
        if arch.blocks is not None:
            labels.setdefault(id(arch.blocks), []).append(arch.label)
            schemes[id(arch.blocks)] = arch.blocks
    per_arch = "; ".join(f"{' and '.join(labels[k])}: {s.summary}" for k, s in schemes.items())
    return ("per-block multipliers, applied once to each module's delta. " + per_arch + ". Selectors "
            "(SELECTOR=VALUE,…) name a block id, a component or a native module-name prefix (a segment may be a "
            "range A-B or *); the last matching selector wins and modules none matches keep 1. A list that starts "
            "with a negative value is written --blocks=-1,…")


BLOCKS_HELP = _help()
