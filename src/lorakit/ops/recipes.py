"""YAML recipes: the same options as the command line, in a file that can be rerun and shared.

A recipe is a mapping whose keys are the command's long option names (dashes or underscores), plus
``inputs``: a list of paths or ``{path: …, weight: …}`` mappings. Command-line values given explicitly
win over the recipe.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from lorakit.errors import RecipeError, UsageError, brief


@dataclass(frozen=True)
class WeightedInput:
    """A LoRA path with its strength; the weight must be a finite real number (checked here, once for all)."""

    path: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) and not hasattr(w, "__float__"):
            raise UsageError(f"weight of {brief(self.path)} must be a number, got {brief(w)}.",
                             hint="write PATH:WEIGHT with a finite number, e.g. lora.safetensors:0.7.")
        try:
            value = float(w)
        except (TypeError, ValueError):
            raise UsageError(f"weight of {brief(self.path)} must be a number, got {brief(w)}.",
                             hint="write PATH:WEIGHT with a finite number, e.g. lora.safetensors:0.7.") from None
        if not math.isfinite(value):
            raise UsageError(f"weight of {brief(self.path)} is not finite ({brief(w)}).",
                             hint="give a finite strength, e.g. lora.safetensors:0.7.")
        object.__setattr__(self, "weight", value)


def parse_weighted(spec: str) -> WeightedInput:
    """``path[:weight]`` — a trailing ``:number`` is a weight (Windows drive letters are left alone)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and not (len(head) == 1 and head.isalpha()):
        try:
            weight = float(tail)
        except ValueError:
            weight = None
        if weight is not None:
            if not math.isfinite(weight):
                raise UsageError(f"bad strength {tail!r} in {spec!r}: the weight is not finite.",
                                 hint="write PATH:WEIGHT with a number such as 0.8.")
            return WeightedInput(head, weight)
        # `a.safetensors:abc` is a mistyped strength, not a file named that (unless such a file exists)
        if not os.path.exists(spec) and (os.path.exists(head) or head.lower().endswith(_WEIGHT_SUFFIXES)):
            raise UsageError(f"bad strength {tail!r} in {spec!r}: the text after the last ':' must be a number.",
                             hint=f"write {head}:0.8 (or {head} for strength 1).")
    return WeightedInput(spec, 1.0)


_WEIGHT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".json")


@dataclass(frozen=True)
class Opt:
    """The expected type of one recipe value: any of ``types`` (bool, int, float, str, list, dict), and for
    strings optionally one of ``choices``. Booleans must be YAML booleans (true/false), numbers must be YAML
    numbers (an int is accepted where a float is expected; a boolean never is), strings must be strings."""

    types: tuple[type, ...]
    choices: tuple[str, ...] | None = None

    def describe(self) -> str:
        names = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
                 list: "a list", dict: "a mapping"}
        text = " or ".join(names.get(t, t.__name__) for t in self.types)
        return text + (f" (one of {', '.join(self.choices)})" if self.choices else "")

    def check(self, value: Any) -> Any:
        """``value`` converted to the expected type, or ``None`` when it does not fit."""
        for t in self.types:
            if t is bool and isinstance(value, bool):
                return value
            if t is int and isinstance(value, int) and not isinstance(value, bool):
                return value
            if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if t is str and isinstance(value, str):
                return value if self.choices is None or value in self.choices else None
            if t is list and isinstance(value, list):
                return value
            if t is dict and isinstance(value, Mapping):
                return dict(value)
        return None


def opt(*types: type, choices: Iterable[str] | None = None) -> Opt:
    """The expected type(s) of a recipe value (see :class:`Opt`)."""
    return Opt(tuple(types), tuple(choices) if choices is not None else None)


MAX_RECIPE_BYTES = 1 << 20      # recipes are a few lines; a larger file is not one
MAX_RECIPE_NODES = 10_000       # YAML nodes after alias expansion (an alias "bomb" expands exponentially)


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.safe_load`` semantics, except that a key given twice in one mapping is an error (YAML 1.2
    requires unique keys; PyYAML silently keeps the last value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise RecipeError(f"recipe key {brief(key)} is given twice (lines {seen[key]} and {line}).",
                                  path=self.name if isinstance(self.name, str) and self.name[:1] != "<" else None,
                                  hint="keep one of them; lorakit will not guess which value is meant.")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes of the document with every alias expanded (memoised, so a bomb is measured, not expanded);
    -1 for a recursive document (an alias inside its own anchor)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            return -1
        active.add(key)
        total = 1
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
        for child in children:
            n = size(child)
            if n < 0:
                return -1
            total += n
            if total > limit:
                break
        active.discard(key)
        sizes[key] = total
        return total

    return size(root)


def _read_yaml(p: str) -> Any:
    try:
        with open(p, "rb") as fh:
            raw = fh.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError("recipe file not found.", path=p) from None
    except IsADirectoryError:
        raise RecipeError("recipe path is a folder, not a YAML file.", path=p) from None
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe ({exc.strerror or exc}).", path=p) from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe is larger than {MAX_RECIPE_BYTES >> 20} MiB; a recipe is a short YAML file.", path=p)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}).", path=p,
                          hint="save it as UTF-8.") from None
    loader = _RecipeLoader(text)
    loader.name = p
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_size(node, MAX_RECIPE_NODES)
        if n < 0:
            raise RecipeError("recipe refers to itself (a YAML alias inside its own anchor).", path=p)
        if n > MAX_RECIPE_NODES:
            raise RecipeError(f"recipe expands to more than {MAX_RECIPE_NODES} YAML values (aliases "
                              "repeated inside aliases?).", path=p, hint="write the recipe without nested aliases.")
        return loader.construct_document(node)
    finally:
        loader.dispose()


# A recipe schema: option name (underscores) -> expected type. ``inputs`` is always allowed and parsed apart.
RecipeSchema = Mapping[str, "Opt | type"]


def load_recipe(path: str | os.PathLike[str], schema: RecipeSchema) -> dict[str, Any]:
    """Read a recipe and check every key against ``schema`` (name -> :class:`Opt` or a bare type).

    Unknown keys and values of the wrong type are :class:`RecipeError` naming the key, the value and the
    expected type. A ``null`` value counts as not given (the key is left out of the result).
    """
    p = os.fspath(path)
    types = {str(k).replace("-", "_"): (v if isinstance(v, Opt) else opt(v)) for k, v in schema.items()}
    try:
        data = _read_yaml(p)
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe is not valid YAML ({brief(str(exc).splitlines()[0], 200)}).", path=p) from None
    except RecursionError:
        raise RecipeError("recipe is nested too deeply to be a recipe.", path=p) from None
    if not isinstance(data, Mapping):
        raise RecipeError("recipe must be a mapping of option names to values.", path=p)
    allowed_set = set(types) | {"inputs"}
    out: dict[str, Any] = {}
    for key, value in data.items():
        norm = str(key).replace("-", "_")
        if norm not in allowed_set:
            raise RecipeError(f"unknown recipe key {brief(key)}.", path=p,
                              hint="allowed keys: " + ", ".join(sorted(allowed_set)) + ".")
        if value is None:
            continue
        if norm != "inputs":
            checked = types[norm].check(value)
            if checked is None:
                raise RecipeError(f"recipe key {brief(key)} has value {brief(value)} ({type(value).__name__}); expected "
                                  f"{types[norm].describe()}.", path=p,
                                  hint=f"write e.g. {key}: {_example(types[norm])}.")
            value = checked
        out[norm] = value
    if "inputs" in out:
        out["inputs"] = _inputs(out["inputs"], base=os.path.dirname(os.path.abspath(p)), path=p)
    return out


def _inputs(value: Any, *, base: str, path: str) -> list[WeightedInput]:
    if not isinstance(value, list) or not value:
        raise RecipeError("'inputs' must be a non-empty list.", path=path)
    out = []
    for item in value:
        try:
            if isinstance(item, str):
                w = parse_weighted(item)
            elif isinstance(item, Mapping) and isinstance(item.get("path"), str) and set(item) <= {"path", "weight"}:
                w = WeightedInput(item["path"], item.get("weight", 1.0))
            else:
                raise RecipeError(f"bad input entry {brief(item)}; use a path or {{path: …, weight: …}}.", path=path)
        except RecipeError:
            raise
        except UsageError as exc:
            raise RecipeError(f"bad input {brief(item)}: {exc.message}", path=path, hint=exc.hint) from None
        resolved = w.path if os.path.isabs(w.path) else os.path.join(base, w.path)
        out.append(WeightedInput(resolved, w.weight))
    return out


def _example(o: Opt) -> str:
    if o.choices:
        return o.choices[0]
    t = o.types[0]
    return {bool: "true", int: "4", float: "0.5", str: "'…'", list: "[…]", dict: "{…}"}.get(t, "…")


def refuse_recipe_as_output(recipe: str | os.PathLike[str] | None, outputs: Iterable[object]) -> None:
    """A recipe is an input too: refuse any output path (``-o`` or the recipe's own ``output:``) naming it."""
    if recipe is None:
        return
    from lorakit.errors import OutputError
    from lorakit.io.writer import same_file

    for out in outputs:
        if isinstance(out, (str, os.PathLike)) and same_file(out, recipe):
            raise OutputError(f"output path is the recipe {os.fspath(recipe)!r}; lorakit never overwrites its inputs.",
                              path=os.fspath(out), hint="give the recipe's 'output:' (or -o) another path.")
