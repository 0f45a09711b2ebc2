"""SD 2.x layout: SD1's UNet levels with Linear ``proj_in``/``proj_out`` and a 1,024-wide context, and the
OpenCLIP ViT-H text encoder (single files: ``cond_stage_model.model.``; LoRAs use its HF names). The
v-prediction (768-v) models have the same tensors: only metadata names them."""

from __future__ import annotations

from lorakit.layouts.base import ArchSpec, Stamp, Variant
from lorakit.layouts.block_schemes import SD_BLOCKS
from lorakit.layouts.openclip import OPENCLIP_H
from lorakit.layouts.sd_family import DIFFUSERS_FIRST, UNET, Encoder, sd_containers, sd_rules
from lorakit.layouts.sd_unet import SD2_UNET

ENCODERS = (Encoder("clip_h", "diffusers", ("lora_te_", "lora_te1_"), "clip_h", "text_encoder",
                    "cond_stage_model.model."),)

SD2 = ArchSpec(
    name="sd2",
    label="SD 2.x",
    components={UNET: SD2_UNET, "clip_h": OPENCLIP_H},
    variants=(
        Variant("inpaint", "SD 2.x inpainting (conv_in takes 9 channels)", {"IN": 9}),
        Variant("v", "SD 2.x v-prediction (768-v; named by the file's metadata)", {"IN": 4},
                named_by=("sd_v2_v", "768-v")),
        Variant("base", "SD 2.x", {"IN": 4}),
    ),
    default_variant="base",
    rules=sd_rules(DIFFUSERS_FIRST, ENCODERS),
    containers=sd_containers(ENCODERS),
    native_layout="ldm",
    base_layouts="as single-file checkpoints, bare UNets or diffusers pipeline folders",
    named_by=("sd_v2", "stable-diffusion-v2"),
    blocks=SD_BLOCKS,
    stamp=Stamp(kohya_module="networks.lora", ss_version="sd_v2", modelspec="stable-diffusion-v2-512",
                implementation="diffusers", resolution="512x512",
                variants={"base": ("sd_v2", "stable-diffusion-v2-512"), "inpaint": ("sd_v2", "stable-diffusion-v2-512"),
                          "v": ("sd_v2_v", "stable-diffusion-v2-768-v")}),
)
