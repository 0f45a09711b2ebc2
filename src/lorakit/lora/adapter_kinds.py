"""Adapter kinds registered by name: which key roles identify a module's kind, when its keys are complete and
how its tensors become an :class:`~lorakit.lora.adapters.Adapter`.

Roles are the suffix vocabulary of :mod:`lorakit.formats.spec` (``down``/``up``/``mid``, ``hada_*``,
``lokr_*``, ``diff``…). A module's kind is the first registered kind (in registration order) whose
``identified_by`` roles it carries: all of them (``match="all"``) or any (``match="any"``). Besides the
adapter kinds proper there are two non-adapter entries parse.py relies on: ``set`` (a BFL replacement value,
read as a :class:`Full` whose patch replaces) and ``bias`` (a bias diff only, no adapter).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass


from lorakit.lora.adapters import Adapter, Full, LoHa, LoKr, LoRA

if TYPE_CHECKING:
    from torch import Tensor

# (tensors by role, alpha) -> adapter (None: the module carries no weight delta, e.g. a bias diff only)
Builder = Callable[[Mapping[str, "Tensor"], "float | None"], "Adapter | None"]

INCOMPLETE = "incomplete"     # the family of a module whose roles name no registered kind


@dataclass(frozen=True)
class AdapterKind:
    """One adapter kind as data: its identifying roles, what completes it and how it is built."""

    name: str
    identified_by: frozenset[str]
    build: Builder
    match: str = "all"                                    # "all" | "any" of ``identified_by``
    requires: tuple[tuple[frozenset[str], ...], ...] = ()  # every group: one of its role sets present
    factors: bool = True                                  # composes a weight from factors (shape checks)

    def identifies(self, roles: Collection[str]) -> bool:
        have = self.identified_by & set(roles)
        return have == self.identified_by if self.match == "all" else bool(have)

    def complete(self, roles: Collection[str]) -> bool:
        """Whether ``roles`` hold everything the adapter needs (each requirement group has one option present)."""
        present = set(roles)
        return all(any(option <= present for option in group) for group in self.requires)


_KINDS: dict[str, AdapterKind] = {}


def register_kind(kind: AdapterKind) -> AdapterKind:
    """Add an adapter kind (ValueError if its name is taken or it has a bad ``match``). Later kinds are tried
    after the built-in ones, so they cannot take over a module an earlier kind identifies."""
    if kind.name in _KINDS or kind.name == INCOMPLETE:
        raise ValueError(f"adapter kind {kind.name!r} registered twice")
    if kind.match not in ("all", "any"):
        raise ValueError(f"adapter kind {kind.name!r}: match must be 'all' or 'any', got {kind.match!r}")
    _KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove a registered kind (tests and plugins that add one temporarily)."""
    del _KINDS[name]


def kinds() -> tuple[str, ...]:
    """Registered kind names, in the order they are tried."""
    return tuple(_KINDS)


def get_kind(name: str) -> AdapterKind:
    """A registered kind by name (KeyError otherwise)."""
    return _KINDS[name]


def kind_of(roles: Collection[str]) -> AdapterKind | None:
    """The first registered kind the roles identify, or None (an incomplete module)."""
    return next((k for k in _KINDS.values() if k.identifies(roles)), None)


# ---------------------------------------------------------------------------------------------
# Built-in kinds (order matters: a module with ``down`` and ``up`` is a LoRA before anything else)
# ---------------------------------------------------------------------------------------------

_LOHA_ROLES = frozenset(f"hada_{n}" for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2"))
_LOKR_ROLES = frozenset(f"lokr_{n}" for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2"))

register_kind(AdapterKind(
    "lora", frozenset({"down", "up"}),
    lambda t, alpha: LoRA(alpha=alpha, down=t["down"], up=t["up"], mid=t.get("mid"))))
register_kind(AdapterKind(
    "loha", _LOHA_ROLES,
    lambda t, alpha: LoHa(alpha=alpha, w1a=t["hada_w1_a"], w1b=t["hada_w1_b"], w2a=t["hada_w2_a"],
                          w2b=t["hada_w2_b"], t1=t.get("hada_t1"), t2=t.get("hada_t2")),
    match="any", requires=((frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),),)))
register_kind(AdapterKind(
    "lokr", _LOKR_ROLES,
    lambda t, alpha: LoKr(alpha=alpha, w1=t.get("lokr_w1"), w1a=t.get("lokr_w1_a"), w1b=t.get("lokr_w1_b"),
                          w2=t.get("lokr_w2"), w2a=t.get("lokr_w2_a"), w2b=t.get("lokr_w2_b"), t2=t.get("lokr_t2")),
    match="any", requires=((frozenset({"lokr_w1"}), frozenset({"lokr_w1_a", "lokr_w1_b"})),
                           (frozenset({"lokr_w2"}), frozenset({"lokr_w2_a", "lokr_w2_b"})))))
# the parameter's new value (BFL control LoRAs); the patch says ``replace``
register_kind(AdapterKind("set", frozenset({"set"}), lambda t, alpha: Full(alpha=None, diff=t["set"]),
                          factors=False))
register_kind(AdapterKind("full", frozenset({"diff"}), lambda t, alpha: Full(alpha=None, diff=t["diff"])))
register_kind(AdapterKind("bias", frozenset({"diff_b"}), lambda t, alpha: None, factors=False))
