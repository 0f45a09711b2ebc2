"""What the nodes need from ComfyUI, imported lazily so that the nodes load (and are tested) without it.

``folder_paths`` gives the LoRA folder listing and the output folder; a ComfyUI ``MODEL`` (a ModelPatcher)
gives its diffusion model's state dict, with pending patches (a ModelSubtract difference) applied first.
"""

from __future__ import annotations

import os
from typing import Any

DIFFUSION_PREFIX = "diffusion_model."      # ComfyUI's state-dict prefix of every diffusion model
NONE = "None"


def folder_paths() -> Any | None:
    """ComfyUI's ``folder_paths`` module (None outside ComfyUI)."""
    try:
        import folder_paths as fp  # type: ignore[import-not-found]
    except ImportError:
        return None
    return fp


def lora_names() -> list[str]:
    """The files of ComfyUI's ``loras`` folders (empty outside ComfyUI)."""
    fp = folder_paths()
    return list(fp.get_filename_list("loras")) if fp is not None else []


def lora_path(name: str) -> str:
    """The full path of a file picked from the ``loras`` list (a path as given outside ComfyUI)."""
    fp = folder_paths()
    if fp is None:
        return name
    path = fp.get_full_path("loras", name)
    if path is None:
        from lorakit.errors import InputFileError
        raise InputFileError("not found in ComfyUI's loras folders.", path=name,
                             hint="refresh the node list or pick another file.")
    return str(path)


def output_file(prefix: str) -> str:
    """A fresh ``<prefix>_00001_.safetensors`` under ComfyUI's output folder (its own numbering, as LoraSave)."""
    fp = folder_paths()
    if fp is None:
        raise RuntimeError("ComfyUI's folder_paths is not importable (run the node inside ComfyUI).")
    folder, filename, counter, _sub, _prefix = fp.get_save_image_path(prefix, fp.get_output_directory())
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{filename}_{counter:05}_.safetensors")


def model_state_dict(model: Any, *, apply_patches: bool = True) -> dict[str, Any]:
    """A ComfyUI MODEL's diffusion-model weights (``diffusion_model.*``), with its patches applied (a ModelSubtract
    difference, LoRAs loaded before) unless only names and shapes are needed (``apply_patches=False``)."""
    mm = None
    if apply_patches:
        try:
            import comfy.model_management as mm  # type: ignore[import-not-found]
        except ImportError:
            mm = None
    if mm is not None:   # as ComfyUI's own LoRA extraction does: patch the weights in place first
        mm.load_models_gpu([model], force_patch_weights=True)
    return dict(model.model_state_dict(filter_prefix=DIFFUSION_PREFIX))
