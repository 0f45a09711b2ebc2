"""FLUX.1 layout data: BFL (native) names, diffusers names with fused row windows, XLabs names.

Sizes: H hidden, M MLP width, IN/OUT latent channels in/out, CTX T5 width, VEC pooled CLIP width,
T timestep-embedding width, D attention head width; counts ``double``/``single``; flags
``guidance`` (dev-style guidance embedder) and ``modulation`` (absent in Chroma).
"""

from __future__ import annotations

from dataclasses import replace

from lorakit.layouts.base import (Alias, ArchSpec, ComponentSpec, Container, ModuleSpec, ParamSpec, Portability, Preset, Rule,
                   Stamp, Variant)
from lorakit.layouts.block_schemes import FLUX1_BLOCKS
from lorakit.layouts.text_encoders import CLIP_L, T5_XXL


def _m(native: str, out: str, inp: str, group: str, *, diffusers: tuple[Alias, ...] = (),
       xlabs: tuple[Alias, ...] = (), repeat: str | None = None, requires: str | None = None) -> ModuleSpec:
    aliases = {"diffusers": diffusers}
    if xlabs:
        aliases["xlabs"] = xlabs
    return ModuleSpec(native, out, inp, group, aliases=aliases, repeat=repeat, requires=requires)


def _d(name: str, rows: tuple[str, str] | None = None, swap: bool = False) -> tuple[Alias, ...]:
    return (Alias(name, rows, swap),)


def _split(prefix: str, parts: list[tuple[str, str, str]]) -> tuple[Alias, ...]:
    return tuple(Alias(prefix + name, (start, size)) for name, start, size in parts)


_QKV = [("to_q", "0", "H"), ("to_k", "H", "H"), ("to_v", "2*H", "H")]
_ADD_QKV = [("add_q_proj", "0", "H"), ("add_k_proj", "H", "H"), ("add_v_proj", "2*H", "H")]
_DB = "transformer_blocks.{i}."
_SB = "single_transformer_blocks.{i}."

# the q/k RMSNorm scales of BFL's double/single blocks (FLUX.1 and FLUX.2 name them alike)
QK_NORMS = tuple(
    ParamSpec(native, ("D",), group, aliases={"diffusers": diff}, repeat=repeat)
    for native, diff, group, repeat in (
        ("double_blocks.{i}.img_attn.norm.query_norm.scale", _DB + "attn.norm_q.weight", "double_blocks", "double"),
        ("double_blocks.{i}.img_attn.norm.key_norm.scale", _DB + "attn.norm_k.weight", "double_blocks", "double"),
        ("double_blocks.{i}.txt_attn.norm.query_norm.scale", _DB + "attn.norm_added_q.weight", "double_blocks",
         "double"),
        ("double_blocks.{i}.txt_attn.norm.key_norm.scale", _DB + "attn.norm_added_k.weight", "double_blocks", "double"),
        ("single_blocks.{i}.norm.query_norm.scale", _SB + "attn.norm_q.weight", "single_blocks", "single"),
        ("single_blocks.{i}.norm.key_norm.scale", _SB + "attn.norm_k.weight", "single_blocks", "single"),
    )
)

TRANSFORMER = ComponentSpec(
    name="transformer",
    label="FLUX.1 transformer",
    namings=("native", "diffusers", "xlabs"),
    modules=(
        _m("img_in", "H", "IN", "embedders", diffusers=_d("x_embedder")),
        _m("txt_in", "H", "CTX", "embedders", diffusers=_d("context_embedder")),
        _m("time_in.in_layer", "H", "T", "embedders", diffusers=_d("time_text_embed.timestep_embedder.linear_1")),
        _m("time_in.out_layer", "H", "H", "embedders", diffusers=_d("time_text_embed.timestep_embedder.linear_2")),
        _m("vector_in.in_layer", "H", "VEC", "embedders", diffusers=_d("time_text_embed.text_embedder.linear_1")),
        _m("vector_in.out_layer", "H", "H", "embedders", diffusers=_d("time_text_embed.text_embedder.linear_2")),
        _m("guidance_in.in_layer", "H", "T", "embedders", requires="guidance",
           diffusers=_d("time_text_embed.guidance_embedder.linear_1")),
        _m("guidance_in.out_layer", "H", "H", "embedders", requires="guidance",
           diffusers=_d("time_text_embed.guidance_embedder.linear_2")),
        # double-stream blocks
        _m("double_blocks.{i}.img_mod.lin", "6*H", "H", "double_blocks", repeat="double", requires="modulation",
           diffusers=_d(_DB + "norm1.linear")),
        _m("double_blocks.{i}.img_attn.qkv", "3*H", "H", "double_blocks", repeat="double",
           diffusers=_split(_DB + "attn.", _QKV), xlabs=_d("double_blocks.{i}.processor.qkv_lora1")),
        _m("double_blocks.{i}.img_attn.proj", "H", "H", "double_blocks", repeat="double",
           diffusers=_d(_DB + "attn.to_out.0"), xlabs=_d("double_blocks.{i}.processor.proj_lora1")),
        _m("double_blocks.{i}.img_mlp.0", "M", "H", "double_blocks", repeat="double",
           diffusers=_d(_DB + "ff.net.0.proj")),
        _m("double_blocks.{i}.img_mlp.2", "H", "M", "double_blocks", repeat="double", diffusers=_d(_DB + "ff.net.2")),
        _m("double_blocks.{i}.txt_mod.lin", "6*H", "H", "double_blocks", repeat="double", requires="modulation",
           diffusers=_d(_DB + "norm1_context.linear")),
        _m("double_blocks.{i}.txt_attn.qkv", "3*H", "H", "double_blocks", repeat="double",
           diffusers=_split(_DB + "attn.", _ADD_QKV), xlabs=_d("double_blocks.{i}.processor.qkv_lora2")),
        _m("double_blocks.{i}.txt_attn.proj", "H", "H", "double_blocks", repeat="double",
           diffusers=_d(_DB + "attn.to_add_out"), xlabs=_d("double_blocks.{i}.processor.proj_lora2")),
        _m("double_blocks.{i}.txt_mlp.0", "M", "H", "double_blocks", repeat="double",
           diffusers=_d(_DB + "ff_context.net.0.proj")),
        _m("double_blocks.{i}.txt_mlp.2", "H", "M", "double_blocks", repeat="double",
           diffusers=_d(_DB + "ff_context.net.2")),
        # single-stream blocks
        _m("single_blocks.{i}.modulation.lin", "3*H", "H", "single_blocks", repeat="single", requires="modulation",
           diffusers=_d(_SB + "norm.linear")),
        _m("single_blocks.{i}.linear1", "3*H+M", "H", "single_blocks", repeat="single",
           diffusers=_split(_SB + "attn.", _QKV) + (Alias(_SB + "proj_mlp", ("3*H", "M")),),
           xlabs=(Alias("single_blocks.{i}.processor.qkv_lora", ("0", "3*H")),)),
        _m("single_blocks.{i}.linear2", "H", "H+M", "single_blocks", repeat="single",
           diffusers=_d(_SB + "proj_out"), xlabs=_d("single_blocks.{i}.processor.proj_lora")),
        # final layer: BFL stores [shift; scale], diffusers [scale; shift]
        _m("final_layer.adaLN_modulation.1", "2*H", "H", "final_layer", requires="modulation",
           diffusers=_d("norm_out.linear", swap=True)),
        _m("final_layer.linear", "OUT", "H", "final_layer", diffusers=_d("proj_out")),
    ),
    params=QK_NORMS,
    group_labels={"embedders": "embedders", "double_blocks": "double blocks", "single_blocks": "single blocks",
                  "final_layer": "final layer"},
    presets=(
        Preset("flux1", {"H": 3072, "M": 12288, "IN": 64, "OUT": 64, "CTX": 4096, "VEC": 768, "T": 256, "D": 128,
                         "double": 19, "single": 38}, varies=("IN",)),
    ),
    flags=("guidance", "modulation"),
    flag_reasons={
        "modulation": ("the base has no modulation layers (Chroma): these modules are unused",
                       "expected for a FLUX.1 LoRA on Chroma; the rest applies"),
        "guidance": ("this LoRA has guidance_in (a FLUX.1-dev LoRA); the base has no guidance embedder (schnell)",
                     "use a FLUX.1-dev base, this LoRA has guidance_in"),
    },
    counts=("double", "single"),
    fallbacks={"M": "4*H", "OUT": "IN"},
    # architectures whose LoRAs share FLUX.1's diffusers names (SD3's joint blocks are ``transformer_blocks.N.attn.
    # to_q`` / ``add_q_proj`` too): told apart by their hidden size (FLUX.1 is 3072 wide)
    refusals=(("H", 1536, "SD3 / SD3.5 Medium (hidden size 1536)"), ("H", 2432, "SD3.5 Large (hidden size 2432)")),
    # FLUX.2 shares the BFL names and the double blocks' diffusers attention names: its hidden size (6144 dev, 4096
    # Klein 9B) or its MLP (SwiGLU 3×hidden: img_mlp.0 and linear1 read as FLUX.1 give M = 6·H, img_mlp.2 and
    # linear2 M = 3·H; Klein 4B is 3072 wide like FLUX.1) tell it apart
    deferrals=(("H", 6144, "FLUX.2-dev (hidden size 6144)", "flux2"),
               ("H", 4096, "FLUX.2 [klein] 9B (hidden size 4096)", "flux2"),
               ("M-6*H", 0, "FLUX.2 (SwiGLU MLP: 2×3×hidden input rows)", "flux2"),
               ("M-3*H", 0, "FLUX.2 (MLP 3×hidden)", "flux2"),
               # txt_in: FLUX.1 reads T5 (4096 wide); FLUX.2 three stacked hidden states of its text encoder
               ("CTX", 15360, "FLUX.2-dev (text width 15360)", "flux2"),
               ("CTX", 7680, "FLUX.2 [klein] 4B (text width 7680)", "flux2"),
               ("CTX", 12288, "FLUX.2 [klein] 9B (text width 12288)", "flux2")),
)

_T = "transformer"
_BFL_OR_DIFFUSERS = ("native", "diffusers")

# How each LoRA format names FLUX.1's components (first rule per component = what a writer uses).
RULES: dict[str, tuple[Rule, ...]] = {
    # sd-scripts networks/lora_flux.py: lora_unet_ (BFL names), lora_te1_ (CLIP-L), lora_te3_ (T5); older
    # tools wrote T5 as lora_te2_ and CLIP-L as lora_te_
    "kohya": (Rule("lora_unet_", _T, _BFL_OR_DIFFUSERS, True), Rule("lora_te1_", "clip_l", ("native",), True),
              Rule("lora_te_", "clip_l", ("native",), True), Rule("lora_te3_", "t5", ("native",), True),
              Rule("lora_te2_", "t5", ("native",), True)),
    # diffusers names under ``diffusion_model.``: SimpleTuner ``--lora_format comfyui`` (lora_A/lora_B + alpha)
    "comfy": (Rule("diffusion_model.", _T, _BFL_OR_DIFFUSERS, False),
              Rule("text_encoders.clip_l.transformer.", "clip_l", ("native",), False),
              Rule("text_encoders.t5xxl.transformer.", "t5", ("native",), False)),
    "diffusers": (Rule("transformer.", _T, ("diffusers",), False), Rule("text_encoder.", "clip_l", ("native",), False),
                  Rule("text_encoder_2.", "t5", ("native",), False)),
    # the last rule also reads fal's Kontext trainer: ``base_model.model.`` + BFL names (formats.md F7)
    "peft": (Rule("transformer.", _T, ("diffusers",), False), Rule("text_encoder.", "clip_l", ("native",), False),
             Rule("text_encoder_2.", "t5", ("native",), False), Rule("", _T, ("diffusers", "native"), False)),
    "xlabs": (Rule("", _T, ("xlabs",), False),),
    "onetrainer": (Rule("lora_transformer_", _T, ("diffusers",), True), Rule("lora_te1_", "clip_l", ("native",), True),
                   Rule("lora_te2_", "t5", ("native",), True)),
    "lycoris": (Rule("lycoris_", _T, ("diffusers",), True),),
    "bfl": (Rule("", _T, ("native",), False),),
    "diffsynth": (Rule("", _T, ("diffusers",), False),),
}

FLUX1 = ArchSpec(
    name="flux1",
    label="FLUX.1",
    # --clip-l/--t5 (sd-scripts' flux_merge_lora: --clip_l/--clip_l_save_to, --t5xxl/--t5xxl_save_to)
    components={"transformer": TRANSFORMER,
                "clip_l": replace(CLIP_L, role="te1", flag="clip-l", flag_aliases=("clip_l", "clip_l_save_to")),
                "t5": replace(T5_XXL, role="te2", flag="t5", flag_aliases=("t5xxl", "t5xxl_save_to"))},
    rules=RULES,
    # FluxLoraLoaderMixin._lora_loadable_modules = ["transformer", "text_encoder"] (diffusers 0.42.1): never T5
    diffusers_loader="diffusers' FLUX loader (FluxPipeline.load_lora_weights / load_lora_adapter)",
    diffusers_loads=("transformer", "clip_l"),
    mixable_variants=(frozenset({"dev", "schnell"}),),
    native_layout="bfl",
    base_layouts="in BFL, ComfyUI or diffusers layout",
    portability=(
        Portability("lycoris", "ComfyUI does not load SimpleTuner `lycoris_` keys (Comfy-Org/ComfyUI#4476)",
                    "convert with `lorakit convert --to kohya`"),
        Portability("peft", "ComfyUI does not load FLUX LoRAs with `base_model.model.` keys (Comfy-Org/ComfyUI#4347)",
                    "convert with `lorakit convert --to comfy` (or --to kohya)"),
        Portability("onetrainer", "Forge and newer loaders mis-read OneTrainer legacy `lora_transformer_` keys",
                    "convert with `lorakit convert --to kohya`"),
        Portability("diffsynth", "diffusers' loader silently ignores keys without the `transformer.` prefix",
                    "convert with `lorakit convert --to diffusers`"),
        Portability("kohya", "diffusers silently drops kohya FLUX embedder and final-layer keys (formats.md §6.1)",
                    "convert with `lorakit convert --to diffusers`", layout="diffusers",
                    groups=("embedders", "final_layer")),
    ),
    # BFL single files, ComfyUI full checkpoints (``model.diffusion_model.``), ``diffusion_model.``-prefixed
    # files, diffusers transformers (single file, sharded, or a pipeline's ``transformer/`` folder)
    containers=tuple(Container(_T, prefix, _BFL_OR_DIFFUSERS, folder="transformer")
                     for prefix in ("model.diffusion_model.", "diffusion_model.", "transformer.", "")),
    named_by=("flux", "chroma"),
    blocks=FLUX1_BLOCKS,
    stamp=Stamp(kohya_module="networks.lora_flux", ss_version="flux1", modelspec="flux-1",
                implementation="https://github.com/black-forest-labs/flux", resolution="1024x1024",
                variants={"chroma": ("chroma", "chroma"), "schnell": ("flux1", "flux-1-schnell"),
                          **{v: ("flux1", "flux-1-dev") for v in ("dev", "fill", "control")}}),
    variants=(
        Variant("fill", "FLUX.1 Fill (img_in takes 384 channels)", {"IN": 384}),
        Variant("control", "FLUX.1 Canny/Depth (img_in takes 128 channels)", {"IN": 128}),
        Variant("chroma", "Chroma (no modulation layers)", {"modulation": 0}),
        # Kontext LoRAs have dev's keys and shapes: only metadata tells them apart (AI-Toolkit's
        # extensions_built_in/diffusion_models/flux_kontext/flux_kontext.py writes ss_base_model_version
        # "flux.1_kontext"; PEFT/diffusers configs name "black-forest-labs/FLUX.1-Kontext-dev")
        Variant("kontext", "FLUX.1 Kontext (dev's layout; named by the file's metadata)", {"guidance": 1},
                named_by=("kontext",)),
        Variant("dev", "FLUX.1-dev (guidance embedder)", {"guidance": 1}),
        Variant("schnell", "FLUX.1-schnell (no guidance embedder)", {"guidance": 0}),
    ),
    default_variant="dev-or-schnell",
)
