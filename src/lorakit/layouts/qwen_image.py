"""Qwen-Image layout data (also Qwen-Image-Edit, -Edit-2509/Plus, -Edit-2511 and -2512: one architecture).

The native names are the diffusers ``QwenImageTransformer2DModel`` names: ComfyUI's module and the official release
use them too, and diffusers' single-file loader maps Qwen-Image checkpoints with the identity
(``shapes/qwen-image-diffusers.json``). Nothing is fused, so every format addresses whole weights.

Sizes: H hidden (24 heads × 128), M MLP width (4·H), IN patchified latent channels (64), OUT output channels
(patch² × 16 = 64), CTX text width (Qwen2.5-VL, 3584), T timestep-embedding width (256), D head width; count
``blocks``.

LoRA spellings (ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet`` for QwenImage, diffusers 0.42.1
``_convert_non_diffusers_qwen_lora_to_diffusers``): diffusers ``transformer.`` + lora_A/lora_B; AI-Toolkit and
ComfyUI ``diffusion_model.``; musubi-tuner ``lora_unet_`` + the names flattened (``lora_unet_transformer_blocks_0_
attn_to_q``: the reader restores the dots from this table, not by guessing which underscores are separators);
DiffSynth-Studio the bare names (``transformer_blocks.0.attn.to_q.lora_A.default.weight``: PEFT's adapter-named
keys, which detection reports as the PEFT format; without ``default``: the DiffSynth format); SimpleTuner
LyCORIS ``lycoris_`` + flattened names.

The Edit variants have Qwen-Image's keys and shapes: only metadata names them (musubi-tuner's modelspec
architectures ``Qwen-Image-Edit``, ``Qwen-Image-Edit-Plus``, ``Qwen-Image-Edit-2511``; PEFT configs' base model).
Qwen-Image 2.1 is another architecture: a file whose metadata names it is refused by name.
"""

from __future__ import annotations

from lorakit.layouts.base import (Alias, ArchSpec, ComponentSpec, Container, ModuleSpec, ParamSpec, Preset, Rule, Stamp,
                                  Variant)
from lorakit.layouts.block_schemes import BlockScheme, Run, Vector

_T = "transformer"
_B = "transformer_blocks.{i}."


def _m(native: str, out: str, inp: str, group: str, *, repeat: str | None = None) -> ModuleSpec:
    return ModuleSpec(native, out, inp, group, aliases={"diffusers": (Alias(native),)}, repeat=repeat)


def _block(name: str, out: str, inp: str) -> ModuleSpec:
    return _m(_B + name, out, inp, "blocks", repeat="blocks")


TRANSFORMER = ComponentSpec(
    name=_T,
    label="Qwen-Image transformer",
    namings=("native", "diffusers"),
    modules=(
        _m("img_in", "H", "IN", "embedders"),
        _m("txt_in", "H", "CTX", "embedders"),
        _m("time_text_embed.timestep_embedder.linear_1", "H", "T", "embedders"),
        _m("time_text_embed.timestep_embedder.linear_2", "H", "H", "embedders"),
        _block("img_mod.1", "6*H", "H"),
        _block("attn.to_q", "H", "H"),
        _block("attn.to_k", "H", "H"),
        _block("attn.to_v", "H", "H"),
        _block("attn.add_q_proj", "H", "H"),
        _block("attn.add_k_proj", "H", "H"),
        _block("attn.add_v_proj", "H", "H"),
        _block("attn.to_out.0", "H", "H"),
        _block("attn.to_add_out", "H", "H"),
        _block("img_mlp.net.0.proj", "M", "H"),
        _block("img_mlp.net.2", "H", "M"),
        _block("txt_mod.1", "6*H", "H"),
        _block("txt_mlp.net.0.proj", "M", "H"),
        _block("txt_mlp.net.2", "H", "M"),
        _m("norm_out.linear", "2*H", "H", "final_layer"),
        _m("proj_out", "OUT", "H", "final_layer"),
    ),
    params=(
        ParamSpec("txt_norm.weight", ("CTX",), "embedders", aliases={"diffusers": "txt_norm.weight"}),
        *(ParamSpec(_B + f"attn.{n}.weight", ("D",), "blocks", aliases={"diffusers": _B + f"attn.{n}.weight"},
                    repeat="blocks")
          for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")),
    ),
    group_labels={"embedders": "embedders", "blocks": "transformer blocks", "final_layer": "final layer"},
    presets=(Preset("qwen-image", {"H": 3072, "M": 12288, "IN": 64, "OUT": 64, "CTX": 3584, "T": 256, "D": 128,
                                   "blocks": 60}),),
    counts=("blocks",),
    fallbacks={"M": "4*H", "OUT": "IN"},
)

_NATIVE = ("native",)

RULES: dict[str, tuple[Rule, ...]] = {
    "kohya": (Rule("lora_unet_", _T, _NATIVE, True),),            # musubi-tuner networks/lora_qwen_image.py
    "comfy": (Rule("diffusion_model.", _T, _NATIVE, False),),     # AI-Toolkit, ComfyUI
    "diffusers": (Rule("transformer.", _T, _NATIVE, False),),     # QwenImagePipeline.save_lora_weights
    "peft": (Rule("transformer.", _T, _NATIVE, False), Rule("", _T, _NATIVE, False)),   # DiffSynth ``.default.``
    "lycoris": (Rule("lycoris_", _T, _NATIVE, True),),
    "diffsynth": (Rule("", _T, _NATIVE, False),),
}

_RUN = Run("blocks", "B")
BLOCKS = BlockScheme(
    runs=(_RUN,),
    groups={"embedders": ("IN", "BASE"), "final_layer": ("OUT", "BASE")},
    unplaced=("BASE",),
    vectors=(Vector("transformer blocks", (_RUN,)), Vector("BASE (every module outside the blocks) + blocks",
                                                            ("BASE", _RUN)),
             Vector("IN + blocks + OUT", ("IN", _RUN, "OUT"))),
    example="transformer_blocks.0-29=0.5,img_in=0",
    summary="one value per transformer block (Qwen-Image: 60; BASE first: 61; IN, blocks, OUT: 62); ids B00…, IN, "
            "OUT, BASE; names such as transformer_blocks.0-29=0.5,img_in=0",
)

# every published name of Qwen-Image 2.1 seen in metadata / file names (another architecture, not supported yet);
# none of them is a prefix of a Qwen-Image name (``qwen-image-2512`` is Qwen-Image's layout)
_V21 = ("qwen-image-2.1", "qwen_image_2.1", "qwen image 2.1", "qwen-image-21", "qwen_image_21", "qwen_image21",
        "qwenimage21", "qwenimage-2.1", "qwen-image-v2.1")

QWEN_IMAGE = ArchSpec(
    name="qwen-image",
    label="Qwen-Image",
    components={_T: TRANSFORMER},
    rules=RULES,
    containers=tuple(Container(_T, prefix, _NATIVE, folder=_T)
                     for prefix in ("model.diffusion_model.", "diffusion_model.", "transformer.", "")),
    named_by=("qwen-image", "qwen_image", "qwenimage", "qwen image"),
    native_layout="diffusers",
    base_layouts="in diffusers or ComfyUI layout (the same names)",
    diffusers_loader="diffusers' Qwen-Image loader (QwenImagePipeline.load_lora_weights)",
    diffusers_loads=(_T,),
    blocks=BLOCKS,
    stamp=Stamp(kohya_module="networks.lora_qwen_image", ss_version="qwen_image", modelspec="Qwen-Image",
                implementation="https://github.com/QwenLM/Qwen-Image", resolution="1328x1328",
                variants={"base": ("qwen_image", "Qwen-Image"), "2512": ("qwen_image", "Qwen-Image-2512"),
                          "edit": ("qwen_image", "Qwen-Image-Edit"),
                          "edit-plus": ("qwen_image", "Qwen-Image-Edit-Plus"),
                          "edit-2511": ("qwen_image", "Qwen-Image-Edit-2511")}),
    variants=(
        Variant("2.1", "Qwen-Image 2.1 (another architecture)", {}, named_by=_V21, supported=False),
        Variant("edit-2511", "Qwen-Image-Edit-2511 (Qwen-Image's layout; named by the file's metadata)", {},
                named_by=("edit-2511", "edit_2511", "edit 2511")),
        Variant("edit-plus", "Qwen-Image-Edit-2509 / Edit-Plus (Qwen-Image's layout; named by the file's metadata)",
                {}, named_by=("edit-2509", "edit_2509", "edit 2509", "edit-plus", "edit_plus", "edit plus")),
        Variant("edit", "Qwen-Image-Edit (Qwen-Image's layout; named by the file's metadata)", {},
                named_by=("edit",)),
        Variant("2512", "Qwen-Image-2512 (Qwen-Image's layout; named by the file's metadata)", {},
                named_by=("2512",)),
        Variant("base", "Qwen-Image", {}),
    ),
    default_variant="base",
)
