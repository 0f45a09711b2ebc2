"""The merge-method registry: ``@merge_method`` (a function per module) and ``@dense_merge_method`` (a
combination of dense task tensors) register a method by name with its options."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING


from lorakit.errors import UsageError

if TYPE_CHECKING:
    from torch import Tensor
    from lorakit.lora.model import Patch, Target
    from lorakit.ops.merging.contributions import Contribution
    from lorakit.ops.merging.plan import MergeOptions
    from lorakit.ops.merging.report import ModuleStat


# The options a method may take ("rank" covers --rank, --conv-rank and --dynamic).
METHOD_OPTIONS = frozenset({"rank", "density", "majority_sign", "seed", "kohya_ratios"})


# (target, contributions, ΔW shape, options, input weights, block multiplier) -> (patches, stat)
ModuleMerge = Callable[["Target", "list[Contribution]", "tuple[int, ...]", "MergeOptions", "Sequence[float]", float],
                       "tuple[list[Patch], ModuleStat]"]


# (task tensors, weights, density=, majority_sign=, generator=) -> merged dense tensor
DenseCombine = Callable[..., "Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: how a module is merged, plus what the CLI and the option checks need to know."""

    name: str
    merge: ModuleMerge
    help: str
    exact: bool = False                   # the output equals the weighted sum (no rank choice, no truncation)
    options: frozenset[str] = frozenset()  # METHOD_OPTIONS this method accepts
    needs_density: bool = False           # --density is required
    random: bool = False                  # draws from a generator seeded by --seed and the module name
    combine: DenseCombine | None = None   # dense methods: the task-tensor combination (``--verify``'s reference)


METHODS: dict[str, MergeMethod] = {}


def register_merge_method(method: MergeMethod) -> MergeMethod:
    """Add a merge method to the registry (ValueError if its name is taken or an option is unknown)."""
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} registered twice")
    unknown = method.options - METHOD_OPTIONS
    if unknown:
        raise ValueError(f"merge method {method.name!r}: unknown option(s) {', '.join(sorted(unknown))}")
    METHODS[method.name] = method
    return method


def unregister_merge_method(name: str) -> None:
    """Remove a registered merge method (tests and plugins that add one temporarily)."""
    del METHODS[name]


def merge_method(name: str, *, help: str, exact: bool = False, options: Iterable[str] = (),
                 needs_density: bool = False, random: bool = False) -> Callable[[ModuleMerge], ModuleMerge]:
    """Decorator: register a module-merge function ``(target, contribs, shape, options, weights, multiplier)``."""
    def deco(fn: ModuleMerge) -> ModuleMerge:
        register_merge_method(MergeMethod(name, fn, help, exact, frozenset(options) | (
            {"density"} if needs_density else set()), needs_density, random))
        return fn
    return deco


def merge_methods() -> tuple[str, ...]:
    """The registered merge method names, in registration order."""
    return tuple(METHODS)


def get_merge_method(name: str) -> MergeMethod:
    """A registered merge method (UsageError naming the known ones otherwise)."""
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown merge method {name!r}.", hint="use one of: " + ", ".join(METHODS) + ".") from None


def methods_with(option: str) -> tuple[str, ...]:
    """The registered methods accepting ``option`` (one of :data:`METHOD_OPTIONS`)."""
    return tuple(m.name for m in METHODS.values() if option in m.options)


def listing(names: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
