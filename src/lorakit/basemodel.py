"""Base checkpoints: detect their layout and map every tensor to its native (BFL) module and rows.

Handles BFL single files, the same under a ``model.diffusion_model.`` (ComfyUI full checkpoint) or
``diffusion_model.`` prefix, and diffusers transformers as single files or sharded folders. Tensors that
are not part of the architecture (VAE, text encoders inside a full checkpoint) are listed as
``passthrough`` and never touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .archinfer import Observation, infer_instance
from .errors import NotALoraError, UnsupportedArchitectureError
from .formats.spec import split_key
from .io import WeightFile
from .layouts import ArchSpec, NameIndex, evaluate, recognize, resolve
from .layouts.base import ParamIndex
from .model import ArchInstance

CONTAINER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "")
COMPONENT = "transformer"


@dataclass(frozen=True)
class Slot:
    """Where one file tensor sits in the native layout."""

    key: str                        # tensor name in the file
    module: str | None              # native module (Linear) name, or None for a loose parameter
    param: str                      # "weight", "bias" or the loose parameter's native name
    rows: tuple[int, int] | None    # row window inside the native tensor (split layouts)
    swap: bool = False              # the file stores the native rows with halves swapped


@dataclass
class BaseModel:
    file: WeightFile
    layout: str                     # "native" (BFL) or "diffusers"
    prefix: str
    arch: ArchInstance
    slots: dict[str, Slot] = field(default_factory=dict)
    passthrough: list[str] = field(default_factory=list)

    @property
    def variant(self) -> str:
        return self.arch.variant

    def by_module(self) -> dict[str, list[Slot]]:
        out: dict[str, list[Slot]] = {}
        for s in self.slots.values():
            if s.module is not None:
                out.setdefault(s.module, []).append(s)
        return out

    def native_shape(self, module: str) -> tuple[int, int] | None:
        m = self.arch.module_map(COMPONENT).get(module)
        return (m.out, m.inp) if m else None


def _candidates(arch: ArchSpec) -> list[tuple[str, NameIndex, ParamIndex]]:
    """(naming, module index, loose-parameter index) for every base naming of the transformer."""
    comp = arch.components[COMPONENT]
    return [(n, NameIndex(comp, n, flat=False), ParamIndex(comp, n, flat=False))
            for n in ("native", *[n for n in comp.namings if n not in ("native", "xlabs")])]


def open_base(file: WeightFile, *, arch_name: str = "flux1") -> BaseModel:
    """Recognise ``file`` as a base model (BFL, ComfyUI or diffusers layout) and map its tensors to native modules."""
    arch = resolve(arch_name)
    keys = file.keys()
    _refuse_non_base(file, keys)
    best: tuple[int, str, str, dict[str, tuple]] | None = None
    for prefix in CONTAINER_PREFIXES:
        scoped = [k for k in keys if k.startswith(prefix)]
        if not scoped:
            continue
        for naming, index, params in _candidates(arch):
            hits: dict[str, tuple] = {}
            for k in scoped:
                body = k[len(prefix):]
                mod, _, leaf = body.rpartition(".")
                if leaf in ("weight", "bias"):
                    m = index.match(mod)
                    if m is not None:
                        hits[k] = ("module", m, leaf)
                        continue
                pm = params.match(body)
                if pm is not None:
                    hits[k] = ("param", (pm.native, pm.index))
            if best is None or len(hits) > best[0]:
                best = (len(hits), prefix, naming, hits)
    if best is None or best[0] == 0:
        _explain(keys, file)
    _, prefix, naming, hits = best  # type: ignore[misc]
    observations = []
    for k, hit in hits.items():
        if hit[0] == "module" and hit[2] == "weight":
            m = hit[1]
            shape = file.shape(k)
            observations.append(Observation(COMPONENT, m.spec, m.alias, m.index, shape[0],
                                            shape[1] if len(shape) > 1 else None))
    instance = infer_instance(arch, observations, file.metadata, complete=True, path=file.path)
    params = instance.params[COMPONENT]
    base = BaseModel(file, naming, prefix, instance)
    for k in keys:
        hit = hits.get(k)
        if hit is None:
            base.passthrough.append(k)
        elif hit[0] == "module":
            m, leaf = hit[1], hit[2]
            rows = None
            if m.alias.rows is not None:
                start = evaluate(m.alias.rows[0], params)
                rows = (start, start + evaluate(m.alias.rows[1], params))
            base.slots[k] = Slot(k, m.native, leaf, rows, m.alias.swap_halves)
        else:
            base.slots[k] = Slot(k, None, hit[1][0], None, False)
    return base


def _refuse_non_base(file: WeightFile, keys: Iterable[str]) -> None:
    keys = list(keys)
    lora_like = sum(1 for k in keys if (s := split_key(k)) is not None and s.family in ("lora", "loha", "lokr")
                    and s.role != "bias")
    if keys and lora_like >= 0.5 * len(keys):
        raise NotALoraError("this is a LoRA, not a base model.", path=file.path,
                            hint="pass the base checkpoint first and the LoRA(s) after it.")


def _explain(keys: list[str], file: WeightFile) -> None:
    found = recognize(keys, {k: file.shape(k) for k in keys})
    if found is not None:
        rec, hits = found
        raise UnsupportedArchitectureError(
                f"this base model looks like {rec.label} ({len(hits)} of {len(keys)} tensors match, e.g. {hits[0]!r}).",
                path=file.path, hint="lorakit bakes and extracts FLUX.1 models so far.")
    raise UnsupportedArchitectureError(
        f"no FLUX.1 tensor found among {len(keys)} tensors (e.g. {keys[:3]}).", path=file.path,
        hint="pass a FLUX.1 transformer in BFL, ComfyUI or diffusers layout.")
