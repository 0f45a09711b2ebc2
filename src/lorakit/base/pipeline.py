"""Diffusers pipeline folders (``model_index.json`` with one subfolder per component) opened as base models, and
the refusal of checkpoints lorakit cannot compute with."""

from __future__ import annotations

from typing import TYPE_CHECKING

import os
from dataclasses import replace


from lorakit.base.checkpoint import BaseModel, open_base
from lorakit.errors import LorakitError, UnsupportedArchitectureError, UnsupportedDtypeError
from lorakit.io import WeightFile, open_weights
from lorakit.layouts import available, resolve
from lorakit.lora.model import ArchInstance

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch


def refuse_scaled_fp8(file: WeightFile) -> None:
    """Refuse a ComfyUI scaled-fp8 file inside a diffusers pipeline folder: single scaled-fp8 checkpoints are
    read and baked (:mod:`lorakit.base.quant`), pipeline subfolders only as plain weights."""
    scales = [k for k in file.keys() if k.endswith((".scale_weight", ".weight_scale"))]
    if scales:
        raise UnsupportedDtypeError(
            f"this pipeline subfolder is a scaled-fp8 checkpoint ({len(scales)} scale tensors, e.g. {scales[0]!r}); "
            "lorakit reads and bakes scaled fp8 as single-file checkpoints only.",
            path=file.path, hint="pass the scaled-fp8 file itself (or a bf16/fp16 pipeline folder).")


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


class FolderFile(WeightFile):
    """The weight files of several pipeline subfolders seen as one read-only file with keys ``<folder>/<key>``."""

    def __init__(self, path: str, files: dict[str, WeightFile]) -> None:
        self.path, self.files, self.metadata = path, files, {}
        self.infos = {f"{fo}/{k}": replace(i, name=f"{fo}/{k}") for fo, f in files.items() for k, i in f.infos.items()}

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        folder, key = name.split("/", 1)
        return self.files[folder].get(key, out)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def combined_base(path: str, parts: list[tuple[str, BaseModel]]) -> BaseModel:
    """One base model over a pipeline's component subfolders (:func:`open_pipeline`'s parts, the denoiser's first):
    what doctor, diff and extract read, which see a model's components wherever they are stored."""
    main = parts[0][1]
    slots = {f"{fo}/{k}": replace(s, key=f"{fo}/{k}") for fo, b in parts for k, s in b.slots.items()}
    params = {c: p for _fo, b in parts for c, p in b.arch.params.items() if c in b.parts}
    preset = {c: p for _fo, b in parts for c, p in b.arch.preset.items() if c in b.parts}
    arch = ArchInstance(main.arch.spec, params, main.arch.variant, preset)
    return BaseModel(FolderFile(path, {fo: b.file for fo, b in parts}), main.layout, main.prefix, arch, slots,
                     [f"{fo}/{k}" for fo, b in parts for k in b.passthrough],
                     {c: replace(p, prefix=f"{fo}/{p.prefix}") for fo, b in parts for c, p in b.parts.items()})


def open_model(path: str | os.PathLike[str], *, allow_pickle: bool = False, expert: str | None = None) -> BaseModel:
    """A base model from a weight file, a sharded folder or a diffusers pipeline folder (its component subfolders
    combined); the caller closes ``.file``. ``expert``: a single file's expert when it is one of paired experts
    (see :func:`~lorakit.base.checkpoint.open_base`)."""
    p = os.fspath(path)
    if is_pipeline(p):
        opened: list[WeightFile] = []
        try:
            return combined_base(p, open_pipeline(p, opened))
        except BaseException:
            for f in opened:
                f.close()
            raise
    f = open_weights(p, allow_pickle=allow_pickle)
    try:
        from lorakit.base.quant import dequantized     # torch-backed codecs: imported when a base is opened
        return open_base(dequantized(f), expert=expert)
    except BaseException:
        f.close()
        raise
