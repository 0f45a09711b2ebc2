"""The one internal form of a LoRA: patches on native (BFL-named) target weights.

A :class:`Patch` is an adapter applied to rows ``[start, stop)`` of one target weight (all rows when
``rows`` is None), with an optional dense bias delta and DoRA magnitude. Split-format files become
several patches on one fused weight; fused files become one patch. Writers fuse or split as their
format needs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypedDict

from lorakit.lora.adapters import Adapter
from lorakit.layouts import ArchSpec, ConcreteModule, expand

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from lorakit.lazy import torch

if TYPE_CHECKING:
    from typing_extensions import Unpack     # typing has it from 3.11; the package supports 3.10


@dataclass(frozen=True)
class Target:
    """What a patch changes: a Linear module's weight (``module`` = its native name), or with ``loose`` a
    loose parameter such as a q/k norm scale (``module`` = the parameter's full native name, e.g.
    ``double_blocks.0.img_attn.norm.query_norm.scale``; its patch is a :class:`~lorakit.lora.adapters.Full`
    diff of the parameter's shape). Names never collide, so ``loose`` does not take part in equality."""

    component: str
    module: str
    loose: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        return f"{self.component}:{self.module}"


class PatchChanges(TypedDict, total=False):
    """Fields :meth:`Patch.with_adapter` may change besides the adapter."""

    target: Target
    rows: tuple[int, int] | None
    bias: Tensor | None
    dora: Tensor | None
    source: str
    replace: bool


@dataclass
class Patch:
    target: Target
    adapter: Adapter | None
    rows: tuple[int, int] | None = None
    bias: Tensor | None = None          # dense bias delta for the covered rows (strength 1)
    dora: Tensor | None = None          # DoRA magnitude: (rows,) per output row, or (1, in) per input column
    source: str = ""                    # module name in the input file
    # the adapter's tensor is the loose parameter's new value, not a difference (BFL control LoRAs' norm
    # scales, which flux/util.py load_state_dict()s over the base's): bake sets it; it has no ΔW
    replace: bool = False

    @property
    def out_rows(self) -> int:
        if self.adapter is not None:
            return self.adapter.out_features
        assert self.bias is not None
        return int(self.bias.shape[0])

    def dense(self) -> Tensor:
        assert self.adapter is not None
        return self.adapter.dense()

    def with_adapter(self, adapter: Adapter | None, **changes: Unpack[PatchChanges]) -> "Patch":
        return replace(self, adapter=adapter, **changes)


@dataclass
class ArchInstance:
    """An architecture with the sizes, counts and flags solved for one file."""

    spec: ArchSpec
    params: dict[str, dict[str, int]]       # component -> solved parameters
    variant: str = "any"
    preset: dict[str, str] = field(default_factory=dict)   # component -> preset name, when sizes match one
    _maps: dict[tuple[object, ...], dict[str, ConcreteModule]] = field(default_factory=dict, repr=False,
                                                                         compare=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def modules(self, component: str) -> Iterator[ConcreteModule]:
        params = self.params.get(component)
        if params is None:
            return iter(())
        return expand(self.spec.components[component], params)

    def module_map(self, component: str) -> dict[str, ConcreteModule]:
        """Native module name -> concrete module (cached per component and sizes: SD UNets have ~800 modules)."""
        params = self.params.get(component)
        key = (component, tuple(sorted(params.items())) if params is not None else None)
        cached = self._maps.get(key)
        if cached is None:
            cached = self._maps[key] = {m.name: m for m in self.modules(component)}
        return cached


@dataclass
class LoraModel:
    arch: ArchInstance
    patches: list[Patch]
    format: str
    metadata: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    unknown_keys: list[str] = field(default_factory=list)

    def by_target(self) -> dict[Target, list[Patch]]:
        groups: dict[Target, list[Patch]] = defaultdict(list)
        for p in self.patches:
            groups[p.target].append(p)
        return dict(groups)

    def components(self) -> list[str]:
        return sorted({p.target.component for p in self.patches})

    @property
    def dtype(self) -> torch.dtype | None:
        for p in self.patches:
            if p.adapter is not None:
                return p.adapter.dtype
        return None

    def loose_targets(self) -> list[Target]:
        """Targets that are loose parameters (q/k norm scales), in patch order."""
        return list(dict.fromkeys(p.target for p in self.patches if p.target.loose))

    def replacements(self) -> list[Patch]:
        """Patches whose tensor replaces a loose parameter's value (not a ΔW), in patch order."""
        return [p for p in self.patches if p.replace]

    def adapter_kinds(self) -> list[str]:
        kinds = {p.adapter.kind for p in self.patches if p.adapter is not None}
        if any(p.dora is not None for p in self.patches):
            kinds.add("dora")
        if any(p.bias is not None and p.adapter is None for p in self.patches):
            kinds.add("full")
        return sorted(kinds)


def dense_deltas(model: LoraModel, shapes: Mapping[Target, tuple[int, ...]] | None = None) -> dict[Target, Tensor]:
    """Full-size fp32 ΔW per target weight (row patches placed into their windows; strength 1).

    DoRA magnitudes are ignored here: a DoRA delta needs the base weight. Replacement values
    (:attr:`Patch.replace`) are not deltas and are left out (their ΔW depends on the base).
    """
    out: dict[Target, Tensor] = {}
    for target, patches in model.by_target().items():
        patches = [p for p in patches if not p.replace]
        if all(p.adapter is None for p in patches):
            continue    # bias-only target (diff_b): no weight delta
        shape = shapes.get(target) if shapes else None
        if shape is None:
            shape = target_shape(model, target, patches)
        total = torch.zeros(shape, dtype=torch.float32)
        for p in patches:
            if p.adapter is None:
                continue
            d = p.dense()
            if p.rows is None:
                total += d.reshape(shape)
            else:
                total[p.rows[0]:p.rows[1]] += d.reshape(p.rows[1] - p.rows[0], *shape[1:])
        out[target] = total
    return out


def target_shape(model: LoraModel, target: Target, patches: list[Patch]) -> tuple[int, ...]:
    """The full weight shape of a target: the layout's rows with the patches' trailing dims."""
    mod = model.arch.module_map(target.component).get(target.module)
    first = next(p.adapter for p in patches if p.adapter is not None)
    tail = first.weight_shape[1:]
    if mod is not None:
        return (mod.out, *tail)
    full = [p for p in patches if p.rows is None]
    if full:
        return full[0].adapter.weight_shape  # type: ignore[union-attr]
    return (max(p.rows[1] for p in patches if p.rows), *tail)
