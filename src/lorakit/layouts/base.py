"""Data model of architecture layouts.

An architecture is a set of components, each with a role (the denoiser, text encoders 1-3); a component
lists its weight modules (Linear, or convolutions with a kernel) and loose parameters as templates over
a block index or as enumerated names, with shapes written as linear expressions over named sizes
(``"3*H+M"``). Each module has aliases per naming scheme (single-file, diffusers, XLabs, …), optionally
addressing a row window of a fused native weight or swapping its halves. How each LoRA format names
the components of an architecture is data of the architecture too (:attr:`ArchSpec.rules`): kohya's
``lora_te2_`` is T5 for FLUX.1 and OpenCLIP-G for SDXL. Concrete sizes are never written in code: they
are solved from the shapes a file shows, or taken from a preset.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from lorakit.layouts.block_schemes import BlockScheme

Expr = str


# ----------------------------------------------------------------------------------------------
# Linear size expressions
# ----------------------------------------------------------------------------------------------

def _terms(expr: Expr) -> list[tuple[int, str | None]]:
    out: list[tuple[int, str | None]] = []
    for raw in expr.replace(" ", "").replace("-", "+-").split("+"):
        if not raw:
            continue
        sign = -1 if raw.startswith("-") else 1
        raw = raw.lstrip("-")
        if "*" in raw:
            coef, sym = raw.split("*", 1)
            out.append((sign * int(coef), sym))
        elif raw.isdigit():
            out.append((sign * int(raw), None))
        else:
            out.append((sign, raw))
    return out


def symbols(expr: Expr) -> set[str]:
    """The symbols a size expression uses."""
    return {s for _, s in _terms(expr) if s is not None}


def evaluate(expr: Expr, params: Mapping[str, int], default: int | None = None) -> int:
    """Value of ``expr``; ``default`` (if given) when a size it needs is unknown."""
    total = 0
    for coef, sym in _terms(expr):
        if sym is not None and sym not in params:
            if default is None:
                raise KeyError(sym)
            return default
        total += coef * (params[sym] if sym is not None else 1)
    return total


def solve(equations: Iterable[tuple[Expr, int]], known: Mapping[str, int]) -> dict[str, int]:
    """Fill in unknown sizes from ``expr == value`` equations with one unknown each (to a fixpoint)."""
    params = dict(known)
    pending = list(equations)
    progress = True
    while progress and pending:
        progress = False
        rest = []
        for expr, value in pending:
            terms = _terms(expr)
            unknown = {s for _, s in terms if s is not None and s not in params}
            if len(unknown) == 1:
                sym = unknown.pop()
                coef = sum(c for c, s in terms if s == sym)
                other = sum(c * (params[s] if s is not None else 1) for c, s in terms if s != sym)
                if coef and (value - other) % coef == 0 and (value - other) // coef > 0:
                    params[sym] = (value - other) // coef
                    progress = True
                    continue
            if unknown:
                rest.append((expr, value))
        pending = rest
    return params


# ----------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Alias:
    """A module's name in another naming scheme; ``rows`` = (start, size) inside the native weight."""

    template: str
    rows: tuple[Expr, Expr] | None = None
    swap_halves: bool = False


@dataclass(frozen=True)
class ModuleSpec:
    """One weight module, possibly repeated per block: weight ``out × in`` (Linear) or ``out × in × *kernel``
    (a convolution), plus an optional bias.

    ``weight``/``bias_param`` are the names of its tensors under the module's name (``"weight"`` gives
    ``<module>.weight``; OpenCLIP's fused attention is module ``…attn`` with ``in_proj_weight``; an empty name
    means the tensor is the module name itself). ``transpose``: the checkpoint stores the weight as
    ``in × out`` (OpenCLIP's ``text_projection``, applied as ``x @ P``); ΔW is transposed on the way in and out.
    """

    native: str
    out: Expr
    inp: Expr
    group: str
    aliases: Mapping[str, tuple[Alias, ...]] = field(default_factory=dict)
    repeat: str | None = None          # name of the count parameter for ``{i}``
    bias: bool = True
    requires: str | None = None        # a flag parameter that must be 1 for the module to exist
    kernel: tuple[Expr, ...] = ()      # trailing weight dimensions: ("3", "3") for a 3×3 convolution
    weight: str = "weight"
    bias_param: str = "bias"
    transpose: bool = False

    def names(self, naming: str) -> tuple[Alias, ...]:
        if naming == "native":
            return (Alias(self.native),)
        return self.aliases.get(naming, ())

    def tensor_name(self, module: str, param: str) -> str:
        """The checkpoint key of one of this module's tensors (``param`` = the weight's or bias's name)."""
        return f"{module}.{param}" if param else module


@dataclass(frozen=True)
class ParamSpec:
    """A loose tensor (e.g. a q/k norm scale) with its full name per naming scheme."""

    native: str
    shape: tuple[Expr, ...]
    group: str
    aliases: Mapping[str, str] = field(default_factory=dict)
    repeat: str | None = None
    requires: str | None = None
    # LoRA files address it through its owning module, as ComfyUI does for a module's parameters:
    # ``<module>.diff`` for ``<module>.weight``, ``<module>.diff_b`` for ``<module>.bias`` (a LayerNorm's)
    module_keyed: bool = False


@dataclass(frozen=True)
class Variant:
    """A named variant recognised when every listed parameter has the given value. A variant with
    ``named_by`` is key-identical to another one: it is recognised only when the file's metadata names it
    (one of those words appears in a base-model field) and its parameters hold. ``supported=False``: another
    architecture with this one's keys (named by metadata only), refused by name until it is added.
    ``components``: the variant also needs these components to be present (Wan 2.2 A14B: the second expert)."""

    name: str
    label: str
    when: Mapping[str, int]
    named_by: tuple[str, ...] = ()
    supported: bool = True
    components: tuple[str, ...] = ()


@dataclass(frozen=True)
class Preset:
    """A published model size: the parameters its checkpoints have."""

    name: str
    params: Mapping[str, int]
    varies: tuple[str, ...] = ()     # sizes that variants of the same model change (e.g. input channels)


ROLES = ("denoiser", "te1", "te2", "te3")


@dataclass(frozen=True)
class Container:
    """Where a base checkpoint holds one component: its key prefix and the namings its module names may use
    (tried in order). ``folder``: the component's subfolder in a diffusers pipeline folder (``unet``,
    ``text_encoder_2``), whose files hold its names without a prefix."""

    component: str
    prefix: str
    namings: tuple[str, ...] = ("native",)
    folder: str = ""


@dataclass(frozen=True)
class Rule:
    """How one LoRA format names one component: keys starting with ``prefix`` hold module names of the
    ``namings`` (the first one is what a writer uses), dotted or kohya-flattened (``flat``). A ``paired`` rule
    names one of an architecture's paired experts inside a file that holds both (AI-Toolkit's combined Wan 2.2
    ``diffusion_model.transformer_1.``): readers accept it always, writers use it only for such files."""

    prefix: str
    component: str
    namings: tuple[str, ...]
    flat: bool
    paired: bool = False


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    label: str
    modules: tuple[ModuleSpec, ...]
    params: tuple[ParamSpec, ...] = ()
    namings: tuple[str, ...] = ("native",)
    group_labels: Mapping[str, str] = field(default_factory=dict)
    presets: tuple[Preset, ...] = ()
    flags: tuple[str, ...] = ()        # parameters that are 0/1 switches
    counts: tuple[str, ...] = ()       # parameters that are block counts
    fallbacks: Mapping[str, Expr] = field(default_factory=dict)   # sizes derived when a file does not show them
    refusals: tuple[tuple[Expr, int, str], ...] = ()   # (expr, value, label): sizes of an unsupported architecture
    # (expr, value, label, architecture): sizes of another registered architecture whose module names this one
    # shares; detection prefers that architecture's reading, and a file read as this one anyway is refused
    deferrals: tuple[tuple[Expr, int, str, str], ...] = ()
    role: str = "denoiser"
    fixed: Mapping[str, int] = field(default_factory=dict)   # sizes every checkpoint of this component has
    # flag -> (reason, fix) when a LoRA has modules that need the flag and a base lacks them (``doctor``)
    flag_reasons: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    flag: str = ""         # a command-line alias for a separate file of this component (``--clip-l FILE``)
    flag_aliases: tuple[str, str] = ("", "")   # other spellings of the file and output flags (sd-scripts')
    # one of paired experts (:attr:`ArchSpec.experts`): words in a single-expert file's name or metadata that say
    # the file is for this expert (``low_noise``); the first one is what split outputs are named with
    expert_tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Portability:
    """A loader-compatibility note for this architecture's LoRAs in one format; ``layout``: only on a base of that
    layout, ``groups``: only when the LoRA has modules of these groups, ``namings``: only when some module is spelled
    in one of these namings with a name the native naming does not share (``doctor`` prints it with the fix)."""

    format: str
    note: str
    fix: str
    layout: str | None = None
    groups: tuple[str, ...] = ()
    namings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stamp:
    """How files of an architecture are labelled in metadata: sd-scripts' ``ss_network_module`` and
    ``ss_base_model_version``, the ModelSpec ``modelspec.architecture`` (``<arch>`` for a checkpoint, ``<arch>/lora``
    for a LoRA), per variant where they differ (``variants``: variant → (ss_base_model_version, modelspec arch))."""

    kohya_module: str = "networks.lora"
    ss_version: str = ""
    modelspec: str = ""
    implementation: str = ""
    resolution: str = ""
    variants: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    def version(self, variant: str) -> str:
        return self.variants.get(variant, (self.ss_version, ""))[0]

    def architecture(self, variant: str) -> str | None:
        """The ModelSpec architecture of ``variant``; None when the variant is not known well enough to name one."""
        got = self.variants.get(variant)
        return got[1] if got else None


@dataclass(frozen=True)
class ArchSpec:
    """An architecture: its components, how each LoRA format names them (``rules``: format name -> rules,
    first matching prefix wins), its variants, and the metadata words that name it (``named_by``: matched
    against ``ss_base_model_version`` / ``modelspec.architecture``, used to break ties between architectures
    whose keys a file fits equally)."""

    name: str
    label: str
    components: Mapping[str, ComponentSpec]
    variants: tuple[Variant, ...] = ()
    default_variant: str = "any"
    supported: bool = True
    rules: Mapping[str, tuple[Rule, ...]] = field(default_factory=dict)
    containers: tuple[Container, ...] = ()     # base checkpoint layouts, longest prefixes first
    named_by: tuple[str, ...] = ()
    stamp: Stamp = field(default_factory=Stamp)
    blocks: BlockScheme | None = None          # how ``merge --blocks`` addresses it (None: selectors only)
    # diffusers' pipeline loader for this architecture and the components it loads from a diffusers-format LoRA
    # (a component it does not load is dropped from the written file by that consumer; writers warn)
    diffusers_loader: str = "diffusers' load_lora_weights"
    diffusers_loads: tuple[str, ...] | None = None     # None: every component
    # groups of structurally different variants whose LoRAs may be merged together (FLUX.1 dev + schnell)
    mixable_variants: tuple[frozenset[str], ...] = ()
    portability: tuple[Portability, ...] = ()
    native_layout: str = "native"      # how reports name the single-file naming ("bfl", "ldm", "sgm")
    base_layouts: str = ""             # how a refusal names the layouts its bases come in
    # paired experts (Wan 2.2 A14B: high-noise, low-noise): denoiser components with one layout that a file holding
    # one of them spells alike (the first one's unpaired rules); which one such a file is for is told by the
    # components' ``expert_tags`` in its name or metadata. A file holding both uses the ``paired`` rules.
    experts: tuple[str, ...] = ()

    def role(self, role: str) -> ComponentSpec | None:
        """The component with this role (``denoiser``, ``te1`` …), if the architecture has one."""
        return next((c for c in self.components.values() if c.role == role), None)

    @property
    def denoiser(self) -> ComponentSpec:
        comp = self.role("denoiser")
        assert comp is not None, f"architecture {self.name!r} declares no denoiser component"
        return comp

    def rules_for(self, fmt: str) -> tuple[Rule, ...]:
        return self.rules.get(fmt, ())

    def write_rule(self, fmt: str, component: str, *, paired: bool = False) -> Rule | None:
        """The rule a writer of ``fmt`` uses for ``component`` (its first rule for the component; ``paired``: in
        a file holding several experts, the first paired rule). A single-expert file of any expert is spelled
        with the first expert's unpaired rule."""
        if paired:
            return next((r for r in self.rules_for(fmt) if r.component == component and r.paired), None)
        if component in self.experts:
            component = self.experts[0]
        return next((r for r in self.rules_for(fmt) if r.component == component and not r.paired), None)

    def expert_of(self, text: str) -> str | None:
        """The expert component whose tag appears in ``text`` (a file name, metadata), None if none or several."""
        low = text.lower()
        found = {c for c in self.experts if any(t in low for t in self.components[c].expert_tags)}
        return found.pop() if len(found) == 1 else None


# ----------------------------------------------------------------------------------------------
# Concrete instances
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConcreteModule:
    component: str
    name: str            # native module name, e.g. "double_blocks.3.img_attn.qkv"
    out: int
    inp: int
    group: str
    bias: bool
    spec: ModuleSpec
    index: int | None
    kernel: tuple[int, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape as ΔW has it (``out × in × *kernel``; a transposed checkpoint tensor is not)."""
        return (self.out, self.inp, *self.kernel)


@dataclass(frozen=True)
class ConcreteParam:
    component: str
    name: str
    shape: tuple[int, ...]
    group: str
    spec: ParamSpec
    index: int | None


def expand(component: ComponentSpec, params: Mapping[str, int]) -> Iterator[ConcreteModule]:
    """Every module of a component for the given sizes, counts and flags."""
    for spec in component.modules:
        if spec.requires and not params.get(spec.requires, 1):
            continue
        for idx in _indices(spec.repeat, params):
            name = spec.native.format(i=idx) if idx is not None else spec.native
            yield ConcreteModule(component.name, name, evaluate(spec.out, params, -1),
                                 evaluate(spec.inp, params, -1), spec.group, spec.bias, spec, idx,
                                 tuple(evaluate(k, params, -1) for k in spec.kernel))


def expand_params(component: ComponentSpec, params: Mapping[str, int]) -> Iterator[ConcreteParam]:
    """The loose parameters (e.g. norm scales) of a component with these sizes."""
    for spec in component.params:
        if spec.requires and not params.get(spec.requires, 1):
            continue
        for idx in _indices(spec.repeat, params):
            name = spec.native.format(i=idx) if idx is not None else spec.native
            yield ConcreteParam(component.name, name, tuple(evaluate(e, params, -1) for e in spec.shape),
                                spec.group, spec, idx)


def _indices(repeat: str | None, params: Mapping[str, int]) -> Iterable[int | None]:
    return range(params.get(repeat, 0)) if repeat else (None,)


# ----------------------------------------------------------------------------------------------
# Name lookup
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NameMatch:
    spec: ModuleSpec
    alias: Alias
    index: int | None
    loose: ClassVar[bool] = False       # a Linear module (see ParamMatch for loose parameters)

    @property
    def native(self) -> str:
        return self.spec.native.format(i=self.index) if self.index is not None else self.spec.native


def flatten(name: str) -> str:
    """A dotted module name in the underscore spelling of flat formats (kohya)."""
    return name.replace(".", "_")


_P = TypeVar("_P")
_DIGITS = re.compile(r"\d+")


class TemplateTable(Generic[_P]):
    """Name templates (``{i}`` = block index) → payload, with O(1) lookup: a name is looked up as itself, then with
    each of its digit runs in turn replaced by ``{i}`` (no regular expressions: tables for every registered
    architecture are built when a file is detected)."""

    def __init__(self) -> None:
        self._exact: dict[str, _P] = {}
        self._indexed: dict[str, _P] = {}

    def add(self, template: str, payload: _P) -> None:
        if "{i}" in template:
            self._indexed.setdefault(template, payload)
        else:
            self._exact[template] = payload

    def __bool__(self) -> bool:
        return bool(self._exact or self._indexed)

    def lookup(self, name: str) -> tuple[_P, int | None] | None:
        if name in self._exact:
            return self._exact[name], None
        if self._indexed:
            for m in _DIGITS.finditer(name):
                digits = m.group()
                if len(digits) > 1 and digits[0] == "0":      # no leading zeros
                    continue
                hit = self._indexed.get(name[:m.start()] + "{i}" + name[m.end():])
                if hit is not None:
                    return hit, int(digits)
        return None


_INDEXES: dict[tuple[str, int, str, bool], tuple[Any, ComponentSpec]] = {}


def _cached(kind: str, component: ComponentSpec, naming: str, flat: bool, build: Callable[[], Any]) -> Any:
    """One index per (kind, component, naming, flat): components are constants, and an SD UNet has ~800 modules."""
    key = (kind, id(component), naming, flat)
    hit = _INDEXES.get(key)
    if hit is None or hit[1] is not component:
        hit = _INDEXES[key] = (build(), component)      # the component kept with it: its id stays its own
    return hit[0]


class NameIndex:
    """Resolve module names of one naming scheme (dotted or kohya-flattened) to module specs. Build with
    :meth:`of` (cached)."""

    @classmethod
    def of(cls, component: ComponentSpec, naming: str, *, flat: bool) -> "NameIndex":
        index: NameIndex = _cached("modules", component, naming, flat, lambda: cls(component, naming, flat=flat))
        return index

    def __init__(self, component: ComponentSpec, naming: str, *, flat: bool) -> None:
        self.component = component
        self.naming = naming
        self.flat = flat
        self._table: TemplateTable[tuple[ModuleSpec, Alias]] = TemplateTable()
        for spec in component.modules:
            for alias in spec.names(naming):
                self._table.add(flatten(alias.template) if flat else alias.template, (spec, alias))

    def match(self, name: str) -> NameMatch | None:
        hit = self._table.lookup(name)
        if hit is None:
            return None
        (spec, alias), idx = hit
        return NameMatch(spec, alias, idx)

    def name_of(self, spec: ModuleSpec, alias: Alias, index: int | None) -> str:
        text = alias.template.format(i=index) if index is not None else alias.template
        return flatten(text) if self.flat else text


# ----------------------------------------------------------------------------------------------
# Loose-parameter lookup
# ----------------------------------------------------------------------------------------------

def param_name(spec: ParamSpec, naming: str) -> str | None:
    """The parameter's full name template in a naming scheme (None when that scheme has no name for it)."""
    return spec.native if naming == "native" else spec.aliases.get(naming)


def param_stem(name: str) -> str:
    """The module that owns a parameter: its name without the last dotted part (``…query_norm.scale`` ->
    ``…query_norm``), the name LyCORIS ``w_norm``/``b_norm`` keys use."""
    return name.rpartition(".")[0]


@dataclass(frozen=True)
class ParamMatch:
    """A loose parameter resolved from a name; ``alias.template`` is its full name in the naming found."""

    spec: ParamSpec
    alias: Alias
    index: int | None
    loose: ClassVar[bool] = True

    @property
    def native(self) -> str:
        return self.spec.native.format(i=self.index) if self.index is not None else self.spec.native


class ParamIndex:
    """Resolve loose-parameter names of one naming scheme (dotted or kohya-flattened) to parameter specs:
    the full parameter name, or with ``stem=True`` the name of the module that owns the parameter. Build with
    :meth:`of` (cached)."""

    @classmethod
    def of(cls, component: ComponentSpec, naming: str, *, flat: bool) -> "ParamIndex":
        index: ParamIndex = _cached("params", component, naming, flat, lambda: cls(component, naming, flat=flat))
        return index

    def __init__(self, component: ComponentSpec, naming: str, *, flat: bool) -> None:
        self.component = component
        self.naming = naming
        self.flat = flat
        self._tables: dict[bool, TemplateTable[tuple[ParamSpec, Alias]]] = {}
        for stem in (False, True):
            table = self._tables[stem] = TemplateTable()
            for spec in component.params:
                full = param_name(spec, naming)
                if not full:
                    continue
                tmpl = param_stem(full) if stem else full
                table.add(flatten(tmpl) if flat else tmpl, (spec, Alias(full)))

    def __bool__(self) -> bool:
        return bool(self._tables[False])

    def match(self, name: str, *, stem: bool = False) -> ParamMatch | None:
        hit = self._tables[stem].lookup(name)
        if hit is None:
            return None
        (spec, alias), idx = hit
        return ParamMatch(spec, alias, idx)

    def name_of(self, spec: ParamSpec, index: int | None, *, stem: bool = False) -> str | None:
        full = param_name(spec, self.naming)
        if full is None:
            return None
        text = full.format(i=index) if index is not None else full
        text = param_stem(text) if stem else text
        return flatten(text) if self.flat else text
