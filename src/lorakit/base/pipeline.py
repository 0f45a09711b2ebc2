"""Diffusers pipeline folders (``model_index.json`` with one subfolder per component) opened as base models, and
the refusal of checkpoints lorakit cannot compute with."""

from __future__ import annotations

import os

from lorakit.base.checkpoint import BaseModel, open_base
from lorakit.errors import LorakitError, UnsupportedArchitectureError, UnsupportedDtypeError
from lorakit.io import WeightFile, open_weights
from lorakit.layouts import available, resolve


def refuse_scaled_fp8(file: WeightFile) -> None:
    """Refuse a ComfyUI scaled-fp8 checkpoint (``scale_weight`` tensors): its codes mean nothing without the scales."""
    scales = [k for k in file.keys() if k.endswith((".scale_weight", ".weight_scale"))]
    if scales:
        raise UnsupportedDtypeError(
            f"this is a scaled-fp8 checkpoint ({len(scales)} scale tensors, e.g. {scales[0]!r}); adding a LoRA to the "
            "fp8 codes without the scales would corrupt the weights, and lorakit does not requantise scaled fp8 yet.",
            path=file.path, hint="bake into the bf16/fp16 original, then quantise the result.")



PIPELINE_INDEX = "model_index.json"


def is_pipeline(path: str) -> bool:
    """Whether ``path`` is a diffusers pipeline folder (a folder with ``model_index.json``)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, PIPELINE_INDEX))


def open_pipeline(path: str, opened: list[WeightFile]) -> list[tuple[str, BaseModel]]:
    """(subfolder, base) for each subfolder of a diffusers pipeline (``Container.folder``) that holds components
    of the denoiser's architecture, the denoiser's first; other subfolders are copied as they are."""
    folders = sorted({c.folder for n in available() for c in resolve(n).containers if c.folder})
    found: list[tuple[str, BaseModel]] = []
    errors: dict[str, LorakitError] = {}
    for folder in folders:
        sub = os.path.join(path, folder)
        if not os.path.isdir(sub):
            continue
        try:
            f = open_weights(sub)
        except LorakitError as exc:
            errors[folder] = exc
            continue
        opened.append(f)
        try:
            refuse_scaled_fp8(f)
            found.append((folder, open_base(f, folder=folder)))
        except LorakitError as exc:
            errors[folder] = exc
    main = next(((fo, b) for fo, b in found if b.arch.spec.role("denoiser") is not None
                 and b.arch.spec.denoiser.name in b.parts), None)
    if main is None:
        if errors:
            raise next(iter(errors.values()))
        raise UnsupportedArchitectureError("no denoiser subfolder of a supported architecture found in this "
                                           "pipeline folder.", path=path,
                                           hint="pass the pipeline's denoiser subfolder or a single-file checkpoint.")
    arch = main[1].arch.spec
    for folder, err in errors.items():
        if any(c.folder == folder for c in arch.containers):
            raise err
    return [main, *((fo, b) for fo, b in found if b is not main[1] and b.arch.name == arch.name)]
