"""Pairing the two models' tensors by component, native module and row window, and reading a module's full
native weight from either model's slots."""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
from dataclasses import dataclass


from lorakit.base.checkpoint import BaseModel, Slot
from lorakit.errors import ArchitectureError, ShapeMismatchError
from lorakit.lora.model import Target
from lorakit.lora.transforms import fit_shape, stored_to_native
from lorakit.ops.extraction.report import ExtractReport

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from lorakit.lazy import torch


PAIR_HINT = ("both files must be base models of one architecture (FLUX.1 transformers in BFL, ComfyUI or diffusers "
              "layout; SD1/SD2/SDXL single-file checkpoints or UNet files).")


def layout_label(base: BaseModel) -> str:
    """A model's layout as reports show it (naming, and its key prefix if any)."""
    name = base.arch.spec.native_layout if base.layout == "native" else base.layout
    return name + (f", prefix {base.prefix!r}" if base.prefix else "")


def _label(base: BaseModel, component: str, module: str) -> str:
    """How reports name a module: its native name, prefixed ``component:`` outside the main component."""
    return module if component == base.component else f"{component}:{module}"


def is_text_encoder(base: BaseModel, component: str) -> bool:
    """Whether a component is a text encoder (any role but the denoiser)."""
    return base.arch.spec.components[component].role != "denoiser"


def check_compatible(orig: BaseModel, tune: BaseModel, paths: tuple[str, str]) -> None:
    """Refuse two models that cannot be a base and its fine-tune (architecture, variant, sizes)."""
    where = f"{paths[0]} vs {paths[1]}"
    if orig.arch.name != tune.arch.name:
        raise ArchitectureError(
            f"ORIGINAL is {orig.arch.spec.label} ({orig.variant}) and TUNED is {tune.arch.spec.label} "
            f"({tune.variant}); a difference of two architectures is not a fine-tune.", path=where,
            hint="pass the exact base the tuned model was trained from (same architecture, variant and sizes).")
    spec = tune.arch.spec
    shared = [c for c in spec.components if c in orig.parts and c in tune.parts]
    diffs = []
    for comp in shared:
        po, pt = orig.arch.params.get(comp, {}), tune.arch.params.get(comp, {})
        where_c = f"{spec.components[comp].label} " if len(shared) > 1 else ""
        diffs += [f"{where_c}{k}: {po.get(k)} vs {pt.get(k)}" for k in sorted(set(po) | set(pt))
                  if po.get(k) != pt.get(k)]
    if diffs:
        raise ArchitectureError(
            f"ORIGINAL ({orig.variant}) and TUNED ({tune.variant}) are different {spec.label} models "
            f"({'; '.join(diffs)}); a difference of mismatched models is not a fine-tune.", path=where,
            hint="pass the exact base the tuned model was trained from (same variant and sizes).")


def covered(slots: list[Slot], out_rows: int) -> bool:
    """Whether the slots' row windows tile rows ``0:out_rows`` exactly (no gap, no overlap)."""
    windows = sorted(s.rows or (0, out_rows) for s in slots)
    pos = 0
    for a, b in windows:
        if a != pos:
            return False
        pos = b
    return pos == out_rows


RawSlots = list[tuple[Slot, "Tensor"]]


@dataclass(frozen=True)
class Job:
    """One paired native module: where its tensors are in each model and ΔW's shape."""

    component: str
    module: str
    label: str
    shape: tuple[int, ...]          # out × in × *kernel
    tuned: tuple[Slot, ...]
    original: tuple[Slot, ...]

    @property
    def spatial(self) -> bool:
        """A convolution with a kernel larger than 1×1 (sd-scripts' "Conv2d 3×3": needs --conv-rank)."""
        return len(self.shape) > 2 and math.prod(self.shape[2:]) > 1

    @property
    def target(self) -> Target:
        return Target(self.component, self.module)


@dataclass
class Pairing:
    jobs: list[Job]                                       # in TUNED's file order
    loose: list[tuple[str, str, str, Slot, Slot]]         # (component, name, label, ORIGINAL slot, TUNED slot)
    components: list[str]


def read_slots(base: BaseModel, slots: tuple[Slot, ...] | list[Slot]) -> RawSlots:
    """The slots' tensors as stored (file dtype), shapes checked against the native windows later."""
    return [(s, base.file.get(s.key)) for s in slots]


def place_slots(dst: Tensor, raw: RawSlots, path: str, *, subtract: bool) -> None:
    """Write (or subtract) stored slot tensors into their windows of the native fp32 tensor ``dst``: a transposed
    tensor is turned back (a view), a 1×1 convolution stored as a Linear weight (or back) is reshaped, swapped
    halves are placed crosswise (no copy)."""
    for s, stored in raw:
        win = dst if s.rows is None else dst[s.rows[0]:s.rows[1]]
        try:
            t = fit_shape(stored_to_native(stored, transpose=s.transpose), tuple(win.shape))
        except ValueError:
            raise ShapeMismatchError(s.key, win.shape, stored.shape, path=path,
                                     hint="the file's tensor does not have the size its architecture implies.") from None
        parts = [(win, t)]
        if s.swap:   # the file stores the native halves swapped
            h = t.shape[0] // 2
            parts = [(win[:h], t[h:]), (win[h:], t[:h])]
        for w, src in parts:
            if subtract:
                w.sub_(src)          # mixed dtypes promote inside the kernel: no fp32 temporary
            else:
                w.copy_(src)


def assemble(base: BaseModel, slots: list[Slot], shape: tuple[int, ...]) -> Tensor:
    """The full native tensor (fp32) of one module parameter from its file slots."""
    out = torch.empty(shape, dtype=torch.float32)
    place_slots(out, read_slots(base, slots), base.file.path or "", subtract=False)
    return out


def difference(buf: Tensor, job: Job, raw_t: RawSlots, raw_o: RawSlots, paths: tuple[str, str]) -> Tensor:
    """``W_tuned − W_original`` of a job's weight, in native orientation, in (a view of) ``buf``."""
    d = buf[:math.prod(job.shape)].view(job.shape)
    place_slots(d, [(s, t) for s, t in raw_t if s.param == "weight"], paths[1], subtract=False)
    place_slots(d, [(s, t) for s, t in raw_o if s.param == "weight"], paths[0], subtract=True)
    return d


def _file_position(base: BaseModel, slots: tuple[Slot, ...] | list[Slot]) -> tuple[str, int]:
    infos = [base.file.infos[s.key] for s in slots]
    first = min(infos, key=lambda i: (i.file, i.start))
    return (first.file or "", first.start)


def param_slots(slots: list[Slot], param: str) -> list[Slot]:
    """The slots holding one parameter (``weight`` or ``bias``)."""
    return [s for s in slots if s.param == param]


def _weight_shape(base: BaseModel, component: str, module: str, slots: list[Slot]) -> tuple[int, ...]:
    """ΔW's shape of a module (``out × in × *kernel``); kernel sizes the layout leaves open come from the file."""
    m = base.arch.module_map(component)[module]
    if all(d > 0 for d in m.shape):
        return m.shape
    w = next(s for s in slots if s.param == "weight")
    stored = tuple(base.file.shape(w.key))
    stored = stored[::-1] if w.transpose else stored
    return (m.out, *stored[1:])


def pair_models(orig: BaseModel, tune: BaseModel, report: ExtractReport) -> Pairing:
    """Pair both models' slots per component and native module (headers only); the unpaired ones go to the
    report. Components only one model holds are not compared (a warning says so)."""
    spec = tune.arch.spec
    comps = [c for c in spec.components if c in orig.parts and c in tune.parts]
    for c in spec.components:
        if (c in orig.parts) != (c in tune.parts):
            report.warnings.append(f"the {spec.components[c].label} ({c}) is only in "
                                   f"{'ORIGINAL' if c in orig.parts else 'TUNED'}: not compared.")
    jobs: list[Job] = []
    loose: list[tuple[str, str, str, Slot, Slot]] = []
    for comp in comps:
        om, tm = orig.by_module(comp), tune.by_module(comp)
        for name in sorted(set(om) ^ set(tm)):
            report.unpaired.append(f"{_label(tune, comp, name)} (only in {'ORIGINAL' if name in om else 'TUNED'})")
        lo = {s.param: s for s in orig.slots.values() if s.module is None and s.component == comp}
        lt = {s.param: s for s in tune.slots.values() if s.module is None and s.component == comp}
        for name in sorted(set(lo) ^ set(lt)):
            report.unpaired.append(f"{_label(tune, comp, name)} (only in {'ORIGINAL' if name in lo else 'TUNED'})")
        loose += [(comp, n, _label(tune, comp, n), lo[n], lt[n]) for n in sorted(set(lo) & set(lt))]
        for name, cm in tune.arch.module_map(comp).items():
            if name not in om or name not in tm:
                continue
            bad = [lbl for lbl, sl in (("ORIGINAL", om[name]), ("TUNED", tm[name]))
                   if not covered(param_slots(sl, "weight"), cm.out)]
            if bad:
                report.unpaired.append(f"{_label(tune, comp, name)} (weight rows incomplete in {' and '.join(bad)})")
                continue
            jobs.append(Job(comp, name, _label(tune, comp, name), _weight_shape(tune, comp, name, tm[name]),
                            tuple(tm[name]), tuple(om[name])))
    jobs.sort(key=lambda j: _file_position(tune, j.tuned))   # sequential reads of TUNED
    return Pairing(jobs, loose, comps)


def sorted_slots(slots: tuple[Slot, ...]) -> list[Slot]:
    """Slots in a stable order: by parameter, then row window."""
    return sorted(slots, key=lambda s: (s.param, s.rows or (0, 0)))
