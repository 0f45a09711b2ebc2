"""Base checkpoints: detect their architecture and map every tensor to its component, native module and rows.

Where a checkpoint holds each component is architecture data (:attr:`ArchSpec.containers`: key prefix and
module namings): FLUX.1 transformers in BFL, ComfyUI (``model.diffusion_model.``), ``diffusion_model.``-prefixed
or diffusers layout, single files or sharded folders; single-file checkpoints that hold a denoiser and text
encoders together. Every registered architecture is scored by how many tensors its containers explain; the
best one wins. Tensors of no component (a VAE, text encoders an architecture does not list as containers) are
``passthrough`` and never touched.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from lorakit.layouts.infer import Observation, infer_instance
from lorakit.errors import NotALoraError, UnsupportedArchitectureError
from lorakit.formats.spec import split_key
from lorakit.io import WeightFile
from lorakit.layouts import ArchSpec, NameIndex, NameMatch, available, evaluate, recognize, resolve
from lorakit.layouts.base import Container, ModuleSpec
from lorakit.layouts.base import ParamIndex, ParamMatch
from lorakit.lora.experts import file_expert
from lorakit.lora.model import ArchInstance




@dataclass(frozen=True)
class Slot:
    """Where one file tensor sits in the native layout."""

    key: str                        # tensor name in the file
    module: str | None              # native module name, or None for a loose parameter
    param: str                      # "weight", "bias" or the loose parameter's native name
    rows: tuple[int, int] | None    # row window inside the native tensor (split layouts)
    swap: bool = False              # the file stores the native rows with halves swapped
    component: str = ""             # the component the tensor belongs to
    transpose: bool = False         # the file stores the weight as in × out (ΔW goes in transposed)


@dataclass(frozen=True)
class Part:
    """Where a base holds one component: its key prefix and the naming its module names use."""

    component: str
    prefix: str
    naming: str


@dataclass
class BaseModel:
    file: WeightFile
    layout: str                     # naming of the main component ("native" = BFL for FLUX.1, or "diffusers")
    prefix: str                     # key prefix of the main component
    arch: ArchInstance
    slots: dict[str, Slot] = field(default_factory=dict)
    passthrough: list[str] = field(default_factory=list)
    parts: dict[str, Part] = field(default_factory=dict)    # component -> where the file holds it

    @property
    def variant(self) -> str:
        return self.arch.variant

    @property
    def component(self) -> str:
        """The main component: the denoiser when the file holds it, else the first one found."""
        den = self.arch.spec.role("denoiser")
        if den is not None and den.name in self.parts:
            return den.name
        return next(iter(self.parts))

    def components(self) -> list[str]:
        """The components this file holds, in architecture order."""
        return [c for c in self.arch.spec.components if c in self.parts]

    def by_module(self, component: str | None = None) -> dict[str, list[Slot]]:
        """Module slots of one component (default: the main one), by native module name."""
        comp = component or self.component
        out: dict[str, list[Slot]] = {}
        for s in self.slots.values():
            if s.module is not None and s.component == comp:
                out.setdefault(s.module, []).append(s)
        return out

    def native_shape(self, module: str, component: str | None = None) -> tuple[int, int] | None:
        m = self.arch.module_map(component or self.component).get(module)
        return (m.out, m.inp) if m else None

    def module_shape(self, component: str, module: str) -> tuple[int, ...] | None:
        """ΔW's shape for a module of this base (``out × in × *kernel``); kernel sizes the layout leaves
        open are read from the file's tensor."""
        m = self.arch.module_map(component).get(module)
        if m is None:
            return None
        shape = m.shape
        if all(d > 0 for d in shape):
            return shape
        slot = next((s for s in self.slots.values() if s.component == component and s.module == module
                     and s.param == "weight"), None)
        if slot is None:
            return shape
        file_shape = tuple(self.file.shape(slot.key))
        if slot.transpose:
            file_shape = file_shape[::-1]
        return (m.out, *file_shape[1:]) if m.out > 0 else file_shape


def tensor_names(spec: ModuleSpec, naming: str) -> tuple[str, str, bool]:
    """(weight name, bias name, stored transposed) of a module's tensors in a naming: the spec's own in the native
    naming (OpenCLIP's ``in_proj_weight``, a bare transposed ``text_projection``); the other namings name
    Linear/conv layers the usual way (``<module>.weight``/``.bias``, out × in)."""
    if naming == "native":
        return spec.weight, spec.bias_param, spec.transpose
    return "weight", "bias", False


def match_tensor(index: NameIndex, body: str) -> tuple[NameMatch, str, bool] | None:
    """The module, role (``"weight"``/``"bias"``) and transposition of a tensor name inside a component, using
    the module's tensor names in the index's naming (:func:`tensor_names`)."""
    mod, _, leaf = body.rpartition(".")
    if mod:
        m = index.match(mod)
        if m is not None:
            weight, bias, transpose = tensor_names(m.spec, index.naming)
            if leaf == weight:
                return m, "weight", transpose
            if leaf == bias:
                return m, "bias", False
    m = index.match(body)
    if m is not None:
        weight, _b, transpose = tensor_names(m.spec, index.naming)
        if weight == "":
            return m, "weight", transpose
    return None


_Hit = tuple[str, object, str, bool]    # ("module", NameMatch, role, transposed) or ("param", ParamMatch, "", False)


@dataclass
class _Scan:
    arch: ArchSpec
    parts: dict[str, Part]
    hits: dict[str, tuple[str, _Hit]]   # key -> (component, hit)


def _scan_part(prefix: str, scoped: Sequence[str], index: NameIndex, params: ParamIndex) -> dict[str, _Hit]:
    hits: dict[str, _Hit] = {}
    for k in scoped:
        body = k[len(prefix):]
        found = match_tensor(index, body)
        if found is not None:
            hits[k] = ("module", *found)
            continue
        pm = params.match(body)
        if pm is not None:
            hits[k] = ("param", pm, "", False)
    return hits


def _scan(arch: ArchSpec, keys: Sequence[str], containers: Sequence[Container]) -> _Scan:
    """The best container (prefix, naming) per component of ``arch``; a key belongs to one component at most
    (the one with the longer prefix)."""
    best: dict[str, tuple[int, Part, dict[str, _Hit]]] = {}
    for cont in containers:
        comp = arch.components.get(cont.component)
        if comp is None:
            continue
        scoped = [k for k in keys if k.startswith(cont.prefix)]
        if not scoped:
            continue
        for naming in cont.namings:
            hits = _scan_part(cont.prefix, scoped, NameIndex.of(comp, naming, flat=False),
                              ParamIndex.of(comp, naming, flat=False))
            have = best.get(cont.component)
            if hits and (have is None or len(hits) > have[0]):
                best[cont.component] = (len(hits), Part(cont.component, cont.prefix, naming), hits)
    claimed: dict[str, tuple[str, _Hit]] = {}
    parts: dict[str, Part] = {}
    for _n, part, hits in sorted(best.values(), key=lambda b: -len(b[1].prefix)):
        mine = {k: (part.component, h) for k, h in hits.items() if k not in claimed}
        if mine:
            claimed.update(mine)
            parts[part.component] = part
    return _Scan(arch, {c: parts[c] for c in arch.components if c in parts}, claimed)


def folder_containers(arch: ArchSpec, folder: str) -> tuple[Container, ...]:
    """The containers of the components a diffusers pipeline keeps in subfolder ``folder`` (names without prefix)."""
    found = (Container(c.component, "", c.namings, c.folder) for c in arch.containers if c.folder == folder)
    return tuple(dict.fromkeys(found))


def open_base(file: WeightFile, arch_name: str | None = None, *, folder: str | None = None,
              expert: str | None = None) -> BaseModel:
    """Recognise ``file`` as a base model of a registered architecture (or of ``arch_name``) and map its
    tensors to components and native modules. ``folder``: the file is a diffusers pipeline's subfolder of that
    name (``unet``, ``text_encoder_2``), holding the components the architectures keep there, unprefixed.
    A checkpoint of one of paired experts holds the expert its name or metadata tags (or ``expert``)."""
    archs = [resolve(arch_name)] if arch_name is not None else [resolve(n) for n in available()]
    keys = file.keys()
    _refuse_non_base(file, keys)
    best: _Scan | None = None
    for arch in archs:
        scan = _scan(arch, keys, arch.containers if folder is None else folder_containers(arch, folder))
        if best is None or len(scan.hits) > len(best.hits):
            best = scan
    if best is None or not best.hits:
        _explain(keys, file, archs)
    assert best is not None
    return _build(file, _assign_expert(best, file, expert) if folder is None else best)


def base_expert(file: WeightFile, base: BaseModel) -> str | None:
    """The expert ``file``'s name or metadata tags, when ``base`` (opened from it) is of an architecture with experts."""
    return file_expert(base.arch.spec, file.path, file.metadata)


def _assign_expert(scan: _Scan, file: WeightFile, explicit: str | None = None) -> _Scan:
    """A checkpoint of one expert (its file or folder name or metadata tags it: ``low_noise_model``,
    ``wan2.2_t2v_low_noise_14B_fp16.safetensors``) holds that expert's component, not the first expert's."""
    arch = scan.arch
    if not arch.experts or set(scan.parts) - {arch.experts[0], *(c for c in arch.components if c not in arch.experts)}:
        return scan
    which = file_expert(arch, file.path, file.metadata, explicit)
    if which is None or which == arch.experts[0] or arch.experts[0] not in scan.parts:
        return scan
    src = arch.experts[0]
    parts = {(which if c == src else c): (replace(p, component=which) if c == src else p) for c, p in scan.parts.items()}
    hits = {k: ((which if c == src else c), h) for k, (c, h) in scan.hits.items()}
    return _Scan(arch, {c: parts[c] for c in arch.components if c in parts}, hits)


def open_component(file: WeightFile, arch: ArchSpec, component: str) -> BaseModel | None:
    """``file`` as a separate file of one component of ``arch`` in any of its namings, under the key prefix
    most of its keys share (``text_encoders.clip_g.transformer.``, none); None when no tensor is one of the
    component's."""
    comp = arch.components[component]
    keys = file.keys()
    shared = Counter(k[:i + 1] for k in keys for i, ch in enumerate(k) if ch == ".")
    prefixes = sorted(("", *(p for p, n in shared.items() if 2 * n >= len(keys))), key=len, reverse=True)
    scan = _scan(arch, keys, [Container(component, p, comp.namings) for p in prefixes])
    return _build(file, scan) if scan.hits else None


def _build(file: WeightFile, best: _Scan) -> BaseModel:
    """The base model of a scan: sizes solved per component, then every tensor's slot (or passthrough)."""
    keys = file.keys()
    arch = best.arch
    observations = []
    for k, (comp, hit) in best.hits.items():
        if hit[0] == "module" and hit[2] == "weight":
            m: NameMatch = hit[1]  # type: ignore[assignment]
            shape = tuple(file.shape(k))
            if hit[3]:
                shape = shape[::-1]
            observations.append(Observation(comp, m.spec, m.alias, m.index, shape[0] if shape else None,
                                            shape[1] if len(shape) > 1 else None))
    instance = infer_instance(arch, observations, file.metadata, complete=True, path=file.path)
    main = arch.role("denoiser")
    part = best.parts.get(main.name) if main is not None else None
    part = part or next(iter(best.parts.values()))
    base = BaseModel(file, part.naming, part.prefix, instance, parts=dict(best.parts))
    for k in keys:
        entry = best.hits.get(k)
        if entry is None:
            base.passthrough.append(k)
            continue
        comp, hit = entry
        if hit[0] == "module":
            m = hit[1]  # type: ignore[assignment]
            params = instance.params.get(comp, {})
            rows = None
            if m.alias.rows is not None:
                start = evaluate(m.alias.rows[0], params)
                rows = (start, start + evaluate(m.alias.rows[1], params))
            base.slots[k] = Slot(k, m.native, hit[2], rows, m.alias.swap_halves, comp, hit[3])
        else:
            pm: ParamMatch = hit[1]  # type: ignore[assignment]
            base.slots[k] = Slot(k, None, pm.native, None, False, comp)
    return base


def _refuse_non_base(file: WeightFile, keys: Iterable[str]) -> None:
    keys = list(keys)
    lora_like = sum(1 for k in keys if (s := split_key(k)) is not None and s.family in ("lora", "loha", "lokr")
                    and s.role != "bias")
    if keys and lora_like >= 0.5 * len(keys):
        raise NotALoraError("this is a LoRA, not a base model.", path=file.path,
                            hint="pass the base checkpoint first and the LoRA(s) after it.")


def _explain(keys: list[str], file: WeightFile, archs: Sequence[ArchSpec]) -> None:
    labels = " / ".join(a.label for a in archs)
    found = recognize(keys, {k: file.shape(k) for k in keys}, exclude=available())
    if found is not None:
        rec, hits = found
        raise UnsupportedArchitectureError(
                f"this base model looks like {rec.label} ({len(hits)} of {len(keys)} tensors match, e.g. {hits[0]!r}).",
                path=file.path, hint=f"lorakit bakes and extracts {labels} models so far.")
    wanted = " or ".join(f"{a.denoiser.label}" + (f" {a.base_layouts}" if a.base_layouts else "")
                         for a in archs)
    raise UnsupportedArchitectureError(
        f"no {labels} tensor found among {len(keys)} tensors (e.g. {keys[:3]}).", path=file.path,
        hint=f"pass a {wanted}.")
