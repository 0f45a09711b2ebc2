"""Per-block multipliers (``--blocks``) for FLUX.1 LoRAs.

A multiplier scales a module's whole delta once: ``ΔW ← m·ΔW`` (never once per factor, so never
squared). Three spellings are accepted, all resolved against the layout instance of the inputs — the
vector lengths are derived from its block counts, never written down here:

1. a plain comma list, ``nD`` = double-block count, ``nS`` = single-block count:

   ========================  =====================================================================
   length                    meaning
   ========================  =====================================================================
   ``nD + nS``               double blocks, then single blocks (everything else keeps 1)
   ``1 + nD + nS``           BASE (every module outside the blocks, text encoders included), blocks
   ``nD + nS + 2``           blocks, then embedders (IN), final layer (OUT)
   ``nD + nS + 3``           blocks, IN, OUT, then text encoders (CLIP-L and T5 together)
   ``3 + nD + nS + 1``       the LoRA-Block-Weight FLUX vector: CLIP, T5, IN, D00…, S00…, OUT
   ========================  =====================================================================

   (for FLUX.1-dev: 57, 58, 59, 60 and 61 values).
2. named selectors ``SELECTOR=VALUE,…`` over native (BFL) module names, e.g.
   ``double_blocks.0-5=0.5,single_blocks=1.2,txt_in=0``. A selector matches a module when its dotted
   segments match the first segments of the module name; a segment may be a block range ``A-B`` or
   ``*``. A bare component name (``transformer``, ``clip_l``, ``t5``) selects the whole component.
   When several selectors match a module, the last one wins.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .errors import UsageError
from .layouts import NameIndex
from .model import ArchInstance, Target

# Slots of the non-block parts, by layout group / component (FLUX.1 data; LBW labels).
GROUP_SLOTS = {"embedders": "IN", "final_layer": "OUT"}
COMPONENT_SLOTS = {"clip_l": "CLIP", "t5": "T5"}
BLOCK_COMPONENT = "transformer"
_INDEXES: dict[int, NameIndex] = {}


@dataclass
class BlockWeights:
    """Resolved ``--blocks`` spec: a multiplier for every target."""

    spec: str
    kind: str                                   # "vector" | "lbw" | "selectors"
    _fn: Callable[[Target], float] = field(repr=False)
    labels: list[str] = field(default_factory=list)

    def multiplier(self, target: Target) -> float:
        return self._fn(target)

    def to_json(self) -> dict[str, object]:
        return {"spec": self.spec, "kind": self.kind}


def block_counts(arch: ArchInstance) -> list[tuple[str, int]]:
    """(count name, value) of the block component, in layout order (FLUX.1: double, single)."""
    comp = arch.spec.components[BLOCK_COMPONENT]
    params = dict(arch.params.get(BLOCK_COMPONENT) or {})
    out = []
    for name in comp.counts:
        value = params.get(name)
        if value is None:
            value = next((int(p.params[name]) for p in comp.presets if name in p.params), 0)
        out.append((name, int(value)))
    return out


def _slot_of(arch: ArchInstance, target: Target) -> tuple[str, int | None]:
    """("double", 3) for a block module, ("IN"/"OUT"/"CLIP"/"T5", None) otherwise."""
    if target.component != BLOCK_COMPONENT:
        return COMPONENT_SLOTS.get(target.component, target.component), None
    comp = arch.spec.components[BLOCK_COMPONENT]
    index = _INDEXES.get(id(comp))
    if index is None:
        index = _INDEXES[id(comp)] = NameIndex(comp, "native", flat=False)
    m = index.match(target.module)
    if m is None:   # a loose parameter (q/k norm scale) takes its block's multiplier
        from .layouts.base import ParamIndex
        m = ParamIndex(comp, "native", flat=False).match(target.module)  # type: ignore[assignment]
    if m is None:
        raise UsageError(f"{target} is not a module of the {arch.name} layout.")
    if m.spec.repeat is not None:
        return m.spec.repeat, m.index
    return GROUP_SLOTS.get(m.spec.group, m.spec.group), None


def _vector_layouts(counts: list[tuple[str, int]]) -> dict[int, tuple[str, list[str]]]:
    """length -> (description, slot labels) for every accepted plain vector."""
    blocks = [f"{name}:{i}" for name, n in counts for i in range(n)]
    nb = len(blocks)
    desc = "+".join(f"{n} {name}" for name, n in counts)
    return {
        nb: (f"{desc} (blocks only)", blocks),
        1 + nb: (f"BASE + {desc}", ["BASE", *blocks]),
        nb + 2: (f"{desc} + IN + OUT", [*blocks, "IN", "OUT"]),
        nb + 3: (f"{desc} + IN + OUT + TE", [*blocks, "IN", "OUT", "TE"]),
        3 + nb + 1: (f"LoRA Block Weight: CLIP, T5, IN, {desc}, OUT", ["CLIP", "T5", "IN", *blocks, "OUT"]),
    }


def parse_blocks(spec: str, arch: ArchInstance) -> BlockWeights:
    """Parse a ``--blocks`` spec (multiplier list, LoRA-Block-Weight vector or selectors) for ``arch``."""
    text = spec.strip()
    if not text:
        raise UsageError("empty --blocks spec.", hint="give a comma list of multipliers or SELECTOR=VALUE pairs.")
    items = [t.strip() for t in re.split(r"[,\s]+", text) if t.strip()] if "=" not in text else \
        [t.strip() for t in text.split(",") if t.strip()]
    if any("=" in t for t in items):
        return _parse_selectors(text, items, arch)
    values = [_number(t, spec) for t in items]
    counts = block_counts(arch)
    layouts = _vector_layouts(counts)
    if len(values) not in layouts:
        accepted = "; ".join(f"{n} = {d}" for n, (d, _) in sorted(layouts.items()))
        raise UsageError(f"--blocks has {len(values)} values; for this model the accepted lengths are: {accepted}.",
                         hint="or use named selectors such as double_blocks.0-5=0.5,single_blocks=1.2.")
    desc, labels = layouts[len(values)]
    table = dict(zip(labels, values))
    lbw = labels[0] == "CLIP"

    def fn(target: Target) -> float:
        slot, index = _slot_of(arch, target)
        if index is not None:
            return table.get(f"{slot}:{index}", 1.0)
        if slot in ("CLIP", "T5"):
            key = slot if lbw else "TE"
        else:
            key = slot
        if key in table:
            return table[key]
        return table.get("BASE", 1.0)

    return BlockWeights(spec, "lbw" if lbw else "vector", fn, labels)


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
    text: str
    component: str | None
    segments: tuple[str, ...]

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
    return [(comp, m.name) for comp in arch.spec.components if comp in arch.params or comp == BLOCK_COMPONENT
            for m in arch.modules(comp)]


def _parse_selectors(spec: str, items: list[str], arch: ArchInstance) -> BlockWeights:
    modules = _all_modules(arch)
    components = set(arch.spec.components)
    prefixes: set[str] = set(components)
    for _, name in modules:
        parts = name.split(".")
        prefixes.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    rules: list[tuple[Selector, float]] = []
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--blocks item {item!r} is not SELECTOR=VALUE.",
                             hint="e.g. double_blocks.0-5=0.5,single_blocks=1.2,txt_in=0.")
        sel = _selector(name, components)
        _check_selector(sel, modules, prefixes)
        rules.append((sel, _number(value.strip(), spec)))

    def fn(target: Target) -> float:
        value = 1.0
        for sel, v in rules:
            if sel.matches(target.component, target.module):
                value = v
        return value

    return BlockWeights(spec, "selectors", fn, [s.text for s, _ in rules])


def _selector(name: str, components: set[str]) -> Selector:
    comp, sep, rest = name.partition(":")
    if sep and comp in components:
        return Selector(name, comp, tuple(rest.split(".")) if rest else ())
    if name in components:
        return Selector(name, name, ())
    for seg in name.split("."):
        m = _RANGE.match(seg)
        if m and int(m.group(1)) > int(m.group(2)):
            raise UsageError(f"--blocks selector {name!r} has an empty range {seg!r}.")
    return Selector(name, None, tuple(name.split(".")))


def _check_selector(sel: Selector, modules: list[tuple[str, str]], prefixes: set[str]) -> None:
    if not sel.segments:
        return
    for concrete in sel.expansions():
        if not any(Selector(sel.text, sel.component, concrete).matches(c, m) for c, m in modules):
            missing = ".".join(concrete)
            near = difflib.get_close_matches(missing, sorted(prefixes), n=1, cutoff=0.5)
            raise UsageError(f"--blocks selector {sel.text!r}: no module {missing!r} in this model.",
                             hint=f"did you mean {near[0]!r}?" if near else
                             "selectors are native (BFL) module names such as double_blocks.0-5 or txt_in.")
