"""The library calls behind each UI screen, with the UI's values turned into the library's arguments.

Each function takes plain Python values (paths, numbers, option strings), calls the same library function
with the same arguments the matching ``lorakit`` command passes, and returns the library's report. Nothing
here knows about the UI toolkit, so the mapping is testable on its own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from lorakit.dtypes import parse_dtype
from lorakit.errors import UsageError
from lorakit.ops.recipes import WeightedInput
from lorakit.progress import Progress

KEEP = "keep"
DTYPES = (KEEP, "fp32", "fp16", "bf16")


def optional_int(value: float | int | None) -> int | None:
    """A number field where 0 (or empty) means "the library's default"."""
    if value is None or value == "":
        return None
    number = int(value)
    return number if number > 0 else None


def optional_text(value: str | None) -> str | None:
    """A text field where empty (or blanks) means "not given"."""
    value = (value or "").strip()
    return value or None


def input_path(value: str | None, what: str) -> str:
    """A picked input file: the typed or uploaded path (refused when empty, in the library's words)."""
    path = optional_text(value)
    if path is None:
        raise UsageError(f"no {what} given.", hint=f"upload the {what} or type its path.")
    return os.path.expanduser(path)


def output_path(value: str | None, output_dir: str, default: str) -> str:
    """Where a result is saved: an absolute path as given, a bare name inside the UI's output folder."""
    name = optional_text(value) or default
    name = os.path.expanduser(name)
    return name if os.path.isabs(name) else os.path.join(output_dir, name)


def weighted_inputs(paths: Sequence[str | None], weights: Sequence[float]) -> list[WeightedInput]:
    """The filled LoRA rows as (path, strength) pairs, in row order."""
    return [WeightedInput(os.path.expanduser(p.strip()), float(w)) for p, w in zip(paths, weights)
            if p and p.strip()]


def run_inspect(path: str, *, deep: bool = False) -> dict:
    """``lorakit inspect [--deep] --strength``: the report dict, with the per-block strength (``strength``)."""
    from lorakit.ops.batch import Item
    from lorakit.ops.batch_tasks import InspectTask
    result = InspectTask(deep=deep, strength=True)(Item(path)).result
    assert isinstance(result, dict)
    return result


def run_doctor(loras: Sequence[str], base: str | None):
    """``lorakit doctor LORA… [--base BASE]``: the DoctorReport (verdicts are returned, not raised)."""
    from lorakit.ops.diagnose import doctor
    return doctor(list(loras), base)


def run_convert(path: str, output: str, to: str, dtype: str, allow_lossy: bool, progress: Progress | None):
    """``lorakit convert IN -o OUT --to FMT [--dtype D] [--allow-lossy]``."""
    from lorakit.ops.conversion import convert
    return convert(path, output, to, dtype=parse_dtype(dtype), allow_lossy=allow_lossy, progress=progress)


def run_merge(inputs: list[WeightedInput], output: str, *, method: str, rank: int | None, conv_rank: int | None,
              to: str, blocks: str | None, dtype: str, density: float | None, seed: int | None,
              progress: Progress | None):
    """``lorakit merge IN:W … -o OUT --method M [--rank N] [--conv-rank M] [--to F] [--blocks S] [--dtype D]
    [--density X] [--seed S]`` (the seed only for the random methods, as the form always holds one)."""
    from lorakit.ops.merging import get_merge_method, merge
    if not inputs:
        raise UsageError("no LoRA to merge.", hint="upload LoRAs or type their paths in the rows above.")
    if "seed" not in get_merge_method(method).options:
        seed = None          # the form always holds a seed; only the random methods take one
    return merge(inputs, output, method=method, rank=rank, conv_rank=conv_rank, to=to, blocks=blocks,
                 dtype=parse_dtype(dtype), density=density, seed=seed, progress=progress)


def run_bake(base: str, inputs: list[WeightedInput], output: str, *, dtype: str, allow_partial: bool,
             progress: Progress | None):
    """``lorakit bake BASE IN:W … -o OUT [--dtype D] [--allow-partial]``."""
    from lorakit.ops.baking import bake
    if not inputs:
        raise UsageError("no LoRA to bake.", hint="upload LoRAs or type their paths in the rows above.")
    return bake(base, inputs, output, dtype=dtype if dtype != KEEP else None, allow_partial=allow_partial,
                progress=progress)


def run_extract(original: str, tuned: str, output: str, *, rank: int | None, conv_rank: int | None,
                dynamic: str | None, to: str, dtype: str, progress: Progress | None):
    """``lorakit extract ORIGINAL TUNED -o OUT --rank N [--conv-rank M] [--dynamic D] [--to F] [--dtype D]``."""
    from lorakit.ops.extraction import extract
    return extract(original, tuned, output, rank=rank, conv_rank=conv_rank, dynamic=dynamic, to=to,
                   dtype=parse_dtype(dtype), progress=progress)


def run_resize(path: str, output: str, *, rank: int | None, conv_rank: int | None, dynamic: str | None,
               dtype: str, progress: Progress | None):
    """``lorakit resize IN -o OUT --rank N [--conv-rank M] [--dynamic D] [--dtype D]``."""
    from lorakit.ops.resizing import resize
    return resize(path, output, rank=rank, conv_rank=conv_rank, dynamic=dynamic, dtype=parse_dtype(dtype),
                  progress=progress)
