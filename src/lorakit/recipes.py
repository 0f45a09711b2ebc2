"""YAML recipes: the same options as the command line, in a file that can be rerun and shared.

A recipe is a mapping whose keys are the command's long option names (dashes or underscores), plus
``inputs``: a list of paths or ``{path: …, weight: …}`` mappings. Command-line values given explicitly
win over the recipe.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import RecipeError


@dataclass(frozen=True)
class WeightedInput:
    path: str
    weight: float = 1.0


def parse_weighted(spec: str) -> WeightedInput:
    """``path[:weight]`` — a trailing ``:number`` is a weight (Windows drive letters are left alone)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and not (len(head) == 1 and head.isalpha()):
        try:
            return WeightedInput(head, float(tail))
        except ValueError:
            pass
    return WeightedInput(spec, 1.0)


def load_recipe(path: str | os.PathLike[str], allowed: Iterable[str]) -> dict[str, Any]:
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise RecipeError("recipe file not found.", path=p) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe is not valid YAML ({str(exc).splitlines()[0]}).", path=p) from None
    if not isinstance(data, Mapping):
        raise RecipeError("recipe must be a mapping of option names to values.", path=p)
    allowed_set = {a.replace("-", "_") for a in allowed} | {"inputs"}
    out: dict[str, Any] = {}
    for key, value in data.items():
        norm = str(key).replace("-", "_")
        if norm not in allowed_set:
            raise RecipeError(f"unknown recipe key {key!r}.", path=p,
                              hint="allowed keys: " + ", ".join(sorted(allowed_set)) + ".")
        out[norm] = value
    if "inputs" in out:
        out["inputs"] = _inputs(out["inputs"], base=os.path.dirname(os.path.abspath(p)), path=p)
    return out


def _inputs(value: Any, *, base: str, path: str) -> list[WeightedInput]:
    if not isinstance(value, list) or not value:
        raise RecipeError("'inputs' must be a non-empty list.", path=path)
    out = []
    for item in value:
        if isinstance(item, str):
            w = parse_weighted(item)
        elif isinstance(item, Mapping) and "path" in item:
            try:
                w = WeightedInput(str(item["path"]), float(item.get("weight", 1.0)))
            except (TypeError, ValueError):
                raise RecipeError(f"bad weight in input {item!r}.", path=path) from None
        else:
            raise RecipeError(f"bad input entry {item!r}; use a path or {{path: …, weight: …}}.", path=path)
        resolved = w.path if os.path.isabs(w.path) else os.path.join(base, w.path)
        out.append(WeightedInput(resolved, w.weight))
    return out
