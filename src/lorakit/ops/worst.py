"""The worst module of a report (largest error), shared by the reports of extract, resize and merge."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

ROUNDING_FLOOR = 1e-6   # a factor rounding error below this is not worth naming


def worst(items: Iterable[T], key: Callable[[T], float], above: float | None = None) -> T | None:
    """The item with the largest ``key``; None if there is none, or if ``above`` is given and it is not exceeded."""
    m = max(items, key=key, default=None)
    return None if m is None or (above is not None and not key(m) > above) else m
