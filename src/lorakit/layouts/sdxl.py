"""SDXL layout: the SGM UNet (native = single-file names, diffusers names as alias), CLIP-L and OpenCLIP
ViT-bigG (single files: ``conditioner.embedders.0.transformer.`` / ``conditioner.embedders.1.model.``, the
latter with fused ``attn.in_proj_weight`` and a transposed ``text_projection``). kohya names the UNet in SGM
style (sd-scripts trains ``sdxl_original_unet.py``); OneTrainer's legacy export uses diffusers names under
the same ``lora_unet_`` prefix. Pony, Illustrious and NoobAI have SDXL's tensors: only metadata (the base
file's name) tells them apart."""

from __future__ import annotations

from dataclasses import replace

from lorakit.layouts.base import ArchSpec, Stamp, Variant
from lorakit.layouts.block_schemes import SDXL_BLOCKS
from lorakit.layouts.openclip import OPENCLIP_G
from lorakit.layouts.sd_family import SINGLE_FILE_FIRST, UNET, Encoder, sd_containers, sd_rules
from lorakit.layouts.sd_unet import SDXL_UNET
from lorakit.layouts.text_encoders import CLIP_L, CLIP_L_WIDTH

ENCODERS = (Encoder("clip_l", "native", ("lora_te1_",), "clip_l", "text_encoder",
                    "conditioner.embedders.0.transformer."),
            Encoder("clip_g", "diffusers", ("lora_te2_",), "clip_g", "text_encoder_2", "conditioner.embedders.1.model."))

# the SDXL refiner has the SGM names with other sizes (ComfyUI supported_models.SDXLRefiner: model channels 384,
# context 1280, adm 2560, transformer depth 4): recognised by its sizes and refused by name
_REFINER = (("CTX", 1280, "the SDXL refiner (cross-attention width 1280)"),
            ("ADM", 2560, "the SDXL refiner (label embedding of 2560 inputs)"))

_DERIVED = (("pony", "Pony Diffusion"), ("illustrious", "Illustrious"), ("noobai", "NoobAI"))

SDXL = ArchSpec(
    name="sdxl",
    label="SDXL",
    components={UNET: replace(SDXL_UNET, refusals=_REFINER), "clip_l": replace(CLIP_L, role="te1", fixed=CLIP_L_WIDTH), "clip_g": OPENCLIP_G},
    variants=(
        Variant("inpaint", "SDXL inpainting (conv_in takes 9 channels)", {"IN": 9}),
        *(Variant(name, f"{label} (SDXL's layout; named by the file's metadata)", {"IN": 4}, named_by=(name,))
          for name, label in _DERIVED),
        Variant("base", "SDXL", {"IN": 4}),
    ),
    default_variant="base",
    rules=sd_rules(SINGLE_FILE_FIRST, ENCODERS),
    containers=sd_containers(ENCODERS),
    native_layout="sgm",
    base_layouts="as single-file checkpoints, bare UNets or diffusers pipeline folders",
    named_by=("sdxl", "stable-diffusion-xl"),
    blocks=SDXL_BLOCKS,
    stamp=Stamp(kohya_module="networks.lora", ss_version="sdxl_base_v1-0", modelspec="stable-diffusion-xl-v1-base",
                implementation="https://github.com/Stability-AI/generative-models", resolution="1024x1024",
                variants={v: ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base")
                          for v in ("base", "inpaint", *(n for n, _ in _DERIVED))}),
)
