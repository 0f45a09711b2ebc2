"""What the Stable Diffusion architectures (SD1.x, SD2.x, SDXL) share as data: how each LoRA format names a
UNet and its text encoders, and where single-file checkpoints and diffusers folders keep them.

Sources of the spellings: sd-scripts ``networks/lora.py`` (``lora_unet_`` with diffusers names for SD1/SD2 and
SGM names for SDXL, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` with HF CLIP names), ComfyUI ``comfy/lora.py``
(``diffusion_model.`` + single-file names, ``text_encoders.clip_l.transformer.`` …, ``lycoris_`` + diffusers
names), diffusers' ``save_lora_weights`` (``unet.`` / ``text_encoder.`` / ``text_encoder_2.``), OneTrainer's
ORIGINAL export (bare single-file names).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lorakit.layouts.base import Container, Rule

UNET = "unet"
SINGLE_FILE_FIRST = ("native", "diffusers")
DIFFUSERS_FIRST = ("diffusers", "native")


@dataclass(frozen=True)
class Encoder:
    """One text encoder of an SD model: component name, the naming its LoRAs use (HF names: ``native`` for
    CLIP-L, ``diffusers`` for OpenCLIP, whose native names are OpenCLIP's), its kohya prefixes (first = written),
    its ComfyUI name, its diffusers pipeline folder and its single-file checkpoint prefix."""

    component: str
    naming: str
    kohya: tuple[str, ...]
    comfy: str
    folder: str
    single_file: str


def sd_rules(unet_kohya: tuple[str, ...], encoders: tuple[Encoder, ...]) -> Mapping[str, tuple[Rule, ...]]:
    """Format rules of an SD architecture: ``unet_kohya`` = the namings kohya's ``lora_unet_`` keys use (the
    first is what lorakit writes)."""
    te = {e.component: (e.naming,) for e in encoders}
    diffusers = (Rule("unet.", UNET, ("diffusers",), False),
                 *(Rule(f"{e.folder}.", e.component, te[e.component], False) for e in encoders))
    return {
        "kohya": (Rule("lora_unet_", UNET, unet_kohya, True),
                  *(Rule(p, e.component, te[e.component], True) for e in encoders for p in e.kohya)),
        "comfy": (Rule("diffusion_model.", UNET, SINGLE_FILE_FIRST, False),
                  *(Rule(f"text_encoders.{e.comfy}.transformer.", e.component, te[e.component], False)
                    for e in encoders)),
        "diffusers": diffusers,
        "diffusers_old": diffusers,
        "peft": (*diffusers, Rule("", UNET, ("diffusers",), False)),
        "lycoris": (Rule("lycoris_", UNET, ("diffusers",), True),),
        "bfl": (Rule("", UNET, ("native",), False),),
        "diffsynth": (Rule("", UNET, ("diffusers",), False),),
    }


def sd_containers(encoders: tuple[Encoder, ...], *, unet_prefix: str = "model.diffusion_model.") -> tuple[Container, ...]:
    """Single-file checkpoints (UNet under ``model.diffusion_model.``, encoders under their prefixes, VAE passed
    through), bare UNet files in either naming, and a diffusers pipeline's ``unet/`` / ``text_encoder*/`` folders."""
    return (Container(UNET, unet_prefix, SINGLE_FILE_FIRST, folder=UNET),
            Container(UNET, "diffusion_model.", SINGLE_FILE_FIRST, folder=UNET),
            *(Container(e.component, e.single_file, ("native", "diffusers"), folder=e.folder) for e in encoders),
            Container(UNET, "", SINGLE_FILE_FIRST, folder=UNET),
            *(Container(e.component, "", (e.naming, "native"), folder=e.folder) for e in encoders))
