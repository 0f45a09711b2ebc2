"""One task per base tensor: the patches (with their weights and row windows) that land in it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
from collections.abc import Iterator
from dataclasses import dataclass, field


from lorakit.dtypes import itemsize
from lorakit.errors import MergeError
from lorakit.io import TensorInfo, WeightFile
from lorakit.lora.adapters import LoRA
from lorakit.lora.model import Patch
from lorakit.ops.baking.outputs import FileOutput
from lorakit.ops.baking.places import LOOSE, Place

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch


@dataclass
class Use:
    """One patch of one input, applied with that input's weight to a native window of rows."""

    patch: Patch
    weight: float
    input: int
    window: tuple[int, int]
    pending: int = 0                    # tasks still to compute (factor cache freed at 0)
    _cache: dict[str, torch.Tensor] | None = None

    @property
    def dora_axis(self) -> str | None:
        d = self.patch.dora
        if d is None:
            return None
        return "in" if d.dim() == 2 and d.shape[0] == 1 and self.window[1] - self.window[0] != 1 else "out"

    def factors(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._cache is None:
            c: dict[str, torch.Tensor] = {}
            a = self.patch.adapter
            # plain LoRA, or a conv LoRA whose up is 1×1: ΔW (flattened to out × in·k·k) = up @ down
            if isinstance(a, LoRA) and a.mid is None and a.up[0].numel() == a.down.shape[0]:
                c["up"] = a.up.reshape(a.up.shape[0], -1).to(device, torch.float32)
                c["down"] = a.down.reshape(a.down.shape[0], -1).to(device, torch.float32)
            if self.patch.bias is not None:
                c["bias"] = self.patch.bias.reshape(-1).to(device, torch.float32)
            if self.patch.dora is not None:
                c["dora"] = self.patch.dora.to(device, torch.float32)
            self._cache = c
        return self._cache

    def done(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self._cache = None


@dataclass
class Task:
    key: str
    info: TensorInfo
    out: FileOutput
    out_code: str
    place: Place | None = None
    additive: list[Use] = field(default_factory=list)
    doras: list[Use] = field(default_factory=list)
    whole: bool = False
    where: str = ""                     # the pipeline subfolder of the tensor's file (plans name it)

    @property
    def compute(self) -> bool:
        return self.info.nbytes > 0 and (bool(self.additive or self.doras) or self.out_code != self.info.dtype)

    @property
    def changed(self) -> bool:
        return bool(self.additive or self.doras)

    @property
    def rows(self) -> int:
        return self.info.shape[0] if self.info.shape else 1

    @property
    def row_elems(self) -> int:
        return math.prod(self.info.shape[1:]) if len(self.info.shape) > 1 else 1

    def chunks(self, chunk_bytes: int) -> Iterator[tuple[int, int]]:
        n = self.rows
        if self.whole or not self.info.shape:
            yield 0, n
            return
        per_row = self.row_elems * max(itemsize(self.info.dtype), itemsize(self.out_code))
        step = max(1, chunk_bytes // max(1, per_row))
        cuts = {0, n}
        if self.place is not None and self.place.swap:
            cuts.add(n // 2)
        bounds = sorted(cuts)
        for lo, hi in zip(bounds, bounds[1:]):
            for j in range(lo, hi, step):
                yield j, min(hi, j + step)


def plan_tasks(file: WeightFile, out: FileOutput | None, places: dict[str, Place],
               uses: dict[str, dict[str, list[Use]]], codes: dict[str, str]) -> list[Task]:
    """One task per tensor of ``file`` (file order); ``uses``: component -> native module -> patches."""
    tasks = []
    for info in sorted(file.infos.values(), key=lambda i: (i.file, i.start)):
        place = places.get(info.name)
        task = Task(info.name, info, out, codes[info.name], place)  # type: ignore[arg-type]
        if out is not None:
            assert out.writer(info.name).plan[info.name][0] == task.out_code
        if place is not None:
            lo, hi = place.rows
            for u in uses.get(place.component, {}).get(place.module, ()):
                if u.window[1] <= lo or u.window[0] >= hi:
                    continue
                if place.param == "bias":
                    if u.patch.bias is not None:
                        task.additive.append(u)
                elif place.param == LOOSE:
                    if u.patch.adapter is not None:
                        task.additive.append(u)
                elif place.param == "weight" and len(info.shape) >= 2:
                    if u.patch.dora is not None:
                        task.doras.append(u)
                        if u.dora_axis == "in":
                            if not (lo <= u.window[0] and u.window[1] <= hi):
                                raise MergeError(
                                    f"{u.patch.source}: an input-axis DoRA magnitude needs the column norms of "
                                    f"rows {u.window[0]}:{u.window[1]} of {place.module}, which this base splits "
                                    "across several tensors.",
                                    hint="bake into a base with fused (BFL) layout, or convert the LoRA.")
                            task.whole = True
                    elif u.patch.adapter is not None:
                        task.additive.append(u)
        for u in {id(u): u for u in (*task.additive, *task.doras)}.values():
            u.pending += 1
        tasks.append(task)
    return tasks
