"""SD 1.x layout: the LDM UNet (native names as in single-file checkpoints, diffusers names as alias) and
CLIP-L. kohya names the UNet in diffusers style (sd-scripts trains ``original_unet.py``, which has diffusers
module names), ComfyUI in LDM style."""

from __future__ import annotations

from dataclasses import replace

from lorakit.layouts.base import ArchSpec, Stamp, Variant
from lorakit.layouts.block_schemes import SD_BLOCKS
from lorakit.layouts.sd_family import DIFFUSERS_FIRST, UNET, Encoder, sd_containers, sd_rules
from lorakit.layouts.sd_unet import SD1_UNET
from lorakit.layouts.text_encoders import CLIP_L, CLIP_L_WIDTH

ENCODERS = (Encoder("clip_l", "native", ("lora_te_", "lora_te1_"), "clip_l", "text_encoder",
                    "cond_stage_model.transformer."),)

SD1 = ArchSpec(
    name="sd1",
    label="SD 1.x",
    components={UNET: SD1_UNET, "clip_l": replace(CLIP_L, role="te1", fixed=CLIP_L_WIDTH)},
    variants=(
        Variant("inpaint", "SD 1.x inpainting (conv_in takes 9 channels)", {"IN": 9}),
        Variant("base", "SD 1.x", {"IN": 4}),
    ),
    default_variant="base",
    rules=sd_rules(DIFFUSERS_FIRST, ENCODERS),
    containers=sd_containers(ENCODERS),
    native_layout="ldm",
    base_layouts="as single-file checkpoints, bare UNets or diffusers pipeline folders",
    named_by=("sd_v1", "stable-diffusion-v1"),
    blocks=SD_BLOCKS,
    stamp=Stamp(kohya_module="networks.lora", ss_version="sd_v1", modelspec="stable-diffusion-v1",
                implementation="diffusers", resolution="512x512",
                variants={v: ("sd_v1", "stable-diffusion-v1") for v in ("base", "inpaint")}),
)
