"""Where each tensor of a base file sits: native module, parameter, row window, swapped halves, transposed."""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.base.checkpoint import BaseModel, match_tensor, open_component
from lorakit.errors import InputFileError
from lorakit.io import WeightFile
from lorakit.layouts import NameIndex


LOOSE = "loose"                       # Place.param of a loose parameter (its native name is the place's module)


@dataclass(frozen=True)
class Place:
    """Where a file tensor sits: native module, parameter, native row window, swapped halves; with ``transpose``
    the tensor is the native weight transposed (its rows are the native columns; ``rows`` = all native rows)."""

    module: str
    param: str
    rows: tuple[int, int]
    swap: bool = False
    component: str = ""
    transpose: bool = False

    def native_row(self, j: int) -> int:
        length = self.rows[1] - self.rows[0]
        if self.swap:
            j = (j + length // 2) % length
        return self.rows[0] + j


def base_places(bm: BaseModel) -> dict[str, Place]:
    """The place of every tensor of the base that belongs to a component."""
    places: dict[str, Place] = {}
    for k, s in bm.slots.items():
        if s.module is None:
            # loose parameters (q/k norm scales): the place's "module" is the parameter's native name
            places[k] = Place(s.param, LOOSE, (0, (bm.file.shape(k) or (1,))[0]), component=s.component)
            continue
        shape = bm.module_shape(s.component, s.module)
        out = shape[0] if shape else (bm.file.shape(k) or (1,))[0]
        places[k] = Place(s.module, s.param, s.rows or (0, out), s.swap, s.component, s.transpose)
    return places


_Places = tuple[dict[str, Place], dict[str, tuple[int, ...]]]


def component_file_places(file: WeightFile, component: str, base: BaseModel) -> _Places:
    """Map a separate component file's tensors to native modules: native names by suffix (prefix-agnostic), or
    the component's other namings under a shared prefix when those place more tensors; the shapes are ΔW's (a
    transposed tensor's reversed)."""
    comp = base.arch.spec.components[component]
    found = _native_places(file, component, base)
    if any(n != "native" for n in comp.namings):
        cbm = open_component(file, base.arch.spec, component)
        if cbm is not None and len(cbm.slots) > len(found[0] if found else ()):
            shapes = {s.module: cbm.module_shape(component, s.module) for s in cbm.slots.values()
                      if s.module is not None}
            return base_places(cbm), {m: sh for m, sh in shapes.items() if sh is not None}
    if found:
        return found
    raise InputFileError(f"no {comp.label} tensor found among {len(file)} tensors (e.g. {file.keys()[:3]}).",
                         path=file.path, hint=f"pass a {comp.label} text-encoder file (HF names).")


def _native_places(file: WeightFile, component: str, base: BaseModel) -> _Places | None:
    comp = base.arch.spec.components[component]
    index = NameIndex.of(comp, "native", flat=False)
    heads = sorted({s.native.split(".", 1)[0] + "." for s in comp.modules})
    for extra in ("", *heads):           # second pass: files that drop a leading container (text_model.)
        places: dict[str, Place] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        seen: dict[tuple[str, str], str] = {}
        for key in file.keys():
            parts = key.split(".")
            for i in range(len(parts) - (1 if extra else 0)):     # a head never takes a bare leaf
                found = match_tensor(index, extra + ".".join(parts[i:]))
                if found is None:
                    continue
                m, leaf, transpose = found
                shape = tuple(file.shape(key))
                if leaf == "weight" and len(shape) >= 2:
                    shapes[m.native] = shape[::-1] if transpose else shape
                if (m.native, leaf) in seen:
                    raise InputFileError(f"tensors {seen[(m.native, leaf)]!r} and {key!r} both look like "
                                         f"{m.native}.{leaf}.", path=file.path,
                                         hint=f"pass a file holding one {comp.label} encoder.")
                seen[(m.native, leaf)] = key
                rows = (0, (shape[1] if transpose else shape[0]) if shape else 1)
                places[key] = Place(m.native, leaf, rows, component=component, transpose=transpose)
                break
        if places:
            return places, shapes
    return None
