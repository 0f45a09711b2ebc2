"""FLUX.2 layout data (dev, [klein] 4B, [klein] 9B): BFL (native) names and diffusers ``Flux2Transformer2DModel``
names with their fused row windows.

FLUX.2 is not FLUX.1 with other sizes: there are no per-block modulation layers (three shared ones instead), the MLPs
are SwiGLU (``img_mlp.0`` / ``ff.linear_in`` holds gate and value rows, 2·M), the single blocks fuse q, k, v and the
MLP input in ``linear1`` — which diffusers keeps fused too (``attn.to_qkv_mlp_proj``) — and no tensor has a bias.
The double blocks' fused ``qkv`` are split into ``to_q``/``to_k``/``to_v`` (``add_*_proj`` for text) in diffusers.
``final_layer.adaLN_modulation.1`` is BFL ``[shift; scale]`` and diffusers ``norm_out.linear`` ``[scale; shift]``
(diffusers 0.42.1 ``convert_flux2_transformer_checkpoint_to_diffusers`` swaps the halves).

Sizes: H hidden, M MLP width (3·H in every release), IN/OUT latent channels, CTX text-encoder width (3 stacked
hidden states of Mistral-3 / Qwen3), T timestep-embedding width (256), D attention head width; counts
``double``/``single``; flag ``guidance`` (dev's guidance embedder; the Klein models have none). Variants are told
apart by their hidden size. Shapes: ``shared/reference/shapes/flux2-*.json``.
"""

from __future__ import annotations

from lorakit.layouts.base import (Alias, ArchSpec, ComponentSpec, Container, ModuleSpec, Portability, Preset,
                                  Rule, Stamp, Variant)
from lorakit.layouts.block_schemes import BlockScheme, Run, Vector
from lorakit.layouts.flux1 import QK_NORMS


def _m(native: str, out: str, inp: str, group: str, diffusers: tuple[Alias, ...], *, repeat: str | None = None,
       requires: str | None = None, fused: str | None = None) -> ModuleSpec:
    aliases = {"diffusers": diffusers}
    if fused:
        aliases["diffusers_fused"] = (Alias(fused),)
    return ModuleSpec(native, out, inp, group, aliases=aliases, repeat=repeat, bias=False, requires=requires)


def _d(name: str, swap: bool = False) -> tuple[Alias, ...]:
    return (Alias(name, None, swap),)


def _qkv(prefix: str, names: tuple[str, str, str]) -> tuple[Alias, ...]:
    return tuple(Alias(prefix + n, (start, "H")) for n, start in zip(names, ("0", "H", "2*H")))


_DB = "transformer_blocks.{i}."
_SB = "single_transformer_blocks.{i}."
_TE = "time_guidance_embed."

TRANSFORMER = ComponentSpec(
    name="transformer",
    label="FLUX.2 transformer",
    # diffusers_fused: the double blocks' q/k/v after diffusers' ``fuse_qkv_projections()`` (``attn.to_qkv``,
    # ``attn.to_added_qkv``), where diffusers 0.42.1 puts LoKr modules of BFL files (read only; every other module
    # keeps its diffusers name)
    namings=("native", "diffusers", "diffusers_fused"),
    modules=(
        _m("img_in", "H", "IN", "embedders", _d("x_embedder")),
        _m("txt_in", "H", "CTX", "embedders", _d("context_embedder")),
        _m("time_in.in_layer", "H", "T", "embedders", _d(_TE + "timestep_embedder.linear_1")),
        _m("time_in.out_layer", "H", "H", "embedders", _d(_TE + "timestep_embedder.linear_2")),
        _m("guidance_in.in_layer", "H", "T", "embedders", _d(_TE + "guidance_embedder.linear_1"), requires="guidance"),
        _m("guidance_in.out_layer", "H", "H", "embedders", _d(_TE + "guidance_embedder.linear_2"),
           requires="guidance"),
        # modulation shared by all blocks of a kind: 2 sets of (shift, scale, gate) per double stream, 1 single
        _m("double_stream_modulation_img.lin", "6*H", "H", "modulation", _d("double_stream_modulation_img.linear")),
        _m("double_stream_modulation_txt.lin", "6*H", "H", "modulation", _d("double_stream_modulation_txt.linear")),
        _m("single_stream_modulation.lin", "3*H", "H", "modulation", _d("single_stream_modulation.linear")),
        # double-stream blocks
        _m("double_blocks.{i}.img_attn.qkv", "3*H", "H", "double_blocks",
           _qkv(_DB + "attn.", ("to_q", "to_k", "to_v")), repeat="double", fused=_DB + "attn.to_qkv"),
        _m("double_blocks.{i}.img_attn.proj", "H", "H", "double_blocks", _d(_DB + "attn.to_out.0"), repeat="double"),
        _m("double_blocks.{i}.img_mlp.0", "2*M", "H", "double_blocks", _d(_DB + "ff.linear_in"), repeat="double"),
        _m("double_blocks.{i}.img_mlp.2", "H", "M", "double_blocks", _d(_DB + "ff.linear_out"), repeat="double"),
        _m("double_blocks.{i}.txt_attn.qkv", "3*H", "H", "double_blocks",
           _qkv(_DB + "attn.", ("add_q_proj", "add_k_proj", "add_v_proj")), repeat="double",
           fused=_DB + "attn.to_added_qkv"),
        _m("double_blocks.{i}.txt_attn.proj", "H", "H", "double_blocks", _d(_DB + "attn.to_add_out"),
           repeat="double"),
        _m("double_blocks.{i}.txt_mlp.0", "2*M", "H", "double_blocks", _d(_DB + "ff_context.linear_in"),
           repeat="double"),
        _m("double_blocks.{i}.txt_mlp.2", "H", "M", "double_blocks", _d(_DB + "ff_context.linear_out"),
           repeat="double"),
        # single-stream blocks: q, k, v and the SwiGLU input fused in both namings
        _m("single_blocks.{i}.linear1", "3*H+2*M", "H", "single_blocks", _d(_SB + "attn.to_qkv_mlp_proj"),
           repeat="single"),
        _m("single_blocks.{i}.linear2", "H", "H+M", "single_blocks", _d(_SB + "attn.to_out"), repeat="single"),
        # final layer: BFL stores [shift; scale], diffusers [scale; shift]
        _m("final_layer.adaLN_modulation.1", "2*H", "H", "final_layer", _d("norm_out.linear", swap=True)),
        _m("final_layer.linear", "OUT", "H", "final_layer", _d("proj_out")),
    ),
    params=QK_NORMS,
    group_labels={"embedders": "embedders", "modulation": "shared modulation", "double_blocks": "double blocks",
                  "single_blocks": "single blocks", "final_layer": "final layer"},
    presets=(
        Preset("flux2-dev", {"H": 6144, "M": 18432, "IN": 128, "OUT": 128, "CTX": 15360, "T": 256, "D": 128,
                             "double": 8, "single": 48}),
        Preset("flux2-klein-4b", {"H": 3072, "M": 9216, "IN": 128, "OUT": 128, "CTX": 7680, "T": 256, "D": 128,
                                  "double": 5, "single": 20}),
        Preset("flux2-klein-9b", {"H": 4096, "M": 12288, "IN": 128, "OUT": 128, "CTX": 12288, "T": 256, "D": 128,
                                  "double": 8, "single": 24}),
    ),
    flags=("guidance",),
    flag_reasons={
        "guidance": ("this LoRA has guidance_in (a FLUX.2-dev LoRA); the base has no guidance embedder (Klein)",
                     "use a FLUX.2-dev base, this LoRA has guidance_in"),
    },
    counts=("double", "single"),
    fallbacks={"M": "3*H", "OUT": "IN"},
    # architectures whose LoRAs share FLUX.2's module names: FLUX.1 (BFL names, and diffusers' double-block
    # attention), whose MLP is 4×hidden (read as FLUX.2, its img_mlp.0/linear1 give M = 2·H, img_mlp.2/linear2
    # M = 4·H), and SD3 (diffusers' joint attention), told apart by its hidden size
    deferrals=(("M-2*H", 0, "FLUX.1 (MLP 4×hidden)", "flux1"), ("M-4*H", 0, "FLUX.1 (MLP 4×hidden)", "flux1")),
    refusals=(("H", 1536, "SD3 / SD3.5 Medium (hidden size 1536)"), ("H", 2432, "SD3.5 Large (hidden size 2432)")),
)

_T = "transformer"
_BOTH = ("native", "diffusers")

# How each LoRA format names FLUX.2's transformer (first rule = what a writer uses). FLUX.2 LoRAs carry no text
# encoder (Mistral-3 / Qwen3) modules in any of the trainers below.
RULES: dict[str, tuple[Rule, ...]] = {
    # sd-scripts / musubi-tuner networks/lora_flux_2.py: ``lora_unet_`` + the BFL module name flattened (musubi's
    # DoubleStreamBlock/SingleStreamBlock); flattened diffusers names are read too, restored through this table
    "kohya": (Rule("lora_unet_", _T, _BOTH, True),),
    # ComfyUI / AI-Toolkit / BFL-style trainers: ``diffusion_model.`` + BFL names (diffusers' FLUX.2 loader also
    # accepts expanded diffusers block names there)
    "comfy": (Rule("diffusion_model.", _T, _BOTH, False),),
    "diffusers": (Rule("transformer.", _T, ("diffusers", "diffusers_fused"), False),),
    # PEFT containers: fal's FLUX.2 trainer writes ``base_model.model.`` + BFL names (diffusers 0.42.1 renames that
    # prefix to ``diffusion_model.``); PEFT's own files have diffusers names
    "peft": (Rule("transformer.", _T, ("diffusers",), False), Rule("", _T, ("diffusers", "native"), False)),
    "lycoris": (Rule("lycoris_", _T, ("diffusers",), True),),
    "onetrainer": (Rule("lora_transformer_", _T, ("diffusers",), True),),
    "bfl": (Rule("", _T, ("native",), False),),
    "diffsynth": (Rule("", _T, ("diffusers",), False),),
}

_DOUBLE, _SINGLE = Run("double", "D"), Run("single", "S")

FLUX2_BLOCKS = BlockScheme(
    runs=(_DOUBLE, _SINGLE),
    groups={"embedders": ("IN", "BASE"), "modulation": ("MOD", "BASE"), "final_layer": ("OUT", "BASE")},
    unplaced=("BASE",),
    vectors=(
        Vector("double + single blocks", (_DOUBLE, _SINGLE)),
        Vector("BASE (every module outside the blocks) + blocks", ("BASE", _DOUBLE, _SINGLE)),
        Vector("blocks + IN + MOD + OUT", (_DOUBLE, _SINGLE, "IN", "MOD", "OUT")),
    ),
    example="double_blocks.0-3=0.5,single_blocks=1.2,txt_in=0",
    summary="double+single block values (FLUX.2-dev: 56, Klein 4B: 25, Klein 9B: 32; BASE first: one more; "
            "then IN,MOD,OUT after the blocks instead); ids D00…, S00…, IN, MOD (shared modulation), OUT, BASE; "
            "names such as double_blocks.0-3=0.5,single_blocks=1.2,txt_in=0",
)

_DIFFUSERS_MIXIN = "diffusers 0.42.1 Flux2LoraLoaderMixin / lora_conversion_utils"

FLUX2 = ArchSpec(
    name="flux2",
    label="FLUX.2",
    components={"transformer": TRANSFORMER},
    rules=RULES,
    diffusers_loader="diffusers' FLUX.2 loader (Flux2Pipeline.load_lora_weights / load_lora_adapter)",
    diffusers_loads=("transformer",),
    native_layout="bfl",
    base_layouts="in BFL, ComfyUI or diffusers layout",
    portability=(
        Portability("kohya", "diffusers' kohya-FLUX.2 converter drops the shared modulation, guidance_in and "
                    f"final_layer.adaLN_modulation keys with a warning ({_DIFFUSERS_MIXIN})",
                    "convert with `lorakit convert --to diffusers`", layout="diffusers",
                    groups=("modulation", "final_layer")),
        Portability("comfy", "diffusers' FLUX.2 loader sends every file with `.lora_down.weight` keys to its kohya "
                    "converter, which reads `lora_unet_` names only: a `diffusion_model.` file spelled with "
                    "lora_down/lora_up (ComfyUI's spelling, `lorakit convert --to comfy`) loads nothing there "
                    f"({_DIFFUSERS_MIXIN})", "convert with `lorakit convert --to diffusers`", layout="diffusers"),
        Portability("comfy", "diffusers' FLUX.2 loader maps final_layer.adaLN_modulation.1 to norm_out.linear without "
                    f"swapping its [shift; scale] halves ({_DIFFUSERS_MIXIN}): that module is applied wrongly",
                    "convert with `lorakit convert --to diffusers`", layout="diffusers", groups=("final_layer",)),
        Portability("lycoris", "ComfyUI does not load SimpleTuner `lycoris_` keys (Comfy-Org/ComfyUI#4476)",
                    "convert with `lorakit convert --to comfy --keep-algo`"),
        Portability("diffsynth", "diffusers' loader silently ignores keys without the `transformer.` prefix",
                    "convert with `lorakit convert --to diffusers`"),
    ),
    containers=tuple(Container(_T, prefix, _BOTH, folder="transformer")
                     for prefix in ("model.diffusion_model.", "diffusion_model.", "transformer.", "")),
    # musubi-tuner's modelspec.architecture values: Flux.2-dev, Flux.2-klein-4b, Flux.2-klein-9b
    named_by=("flux.2", "flux2", "flux-2", "flux_2"),
    blocks=FLUX2_BLOCKS,
    stamp=Stamp(kohya_module="networks.lora_flux_2", ss_version="flux2", modelspec="Flux.2",
                implementation="https://github.com/black-forest-labs/flux2", resolution="1024x1024",
                variants={"dev": ("flux2", "Flux.2-dev"), "klein-4b": ("flux2", "Flux.2-klein-4b"),
                          "klein-9b": ("flux2", "Flux.2-klein-9b")}),
    variants=(
        Variant("dev", "FLUX.2-dev (hidden size 6144)", {"H": 6144}),
        Variant("klein-4b", "FLUX.2 [klein] 4B (hidden size 3072)", {"H": 3072}),
        Variant("klein-9b", "FLUX.2 [klein] 9B (hidden size 4096)", {"H": 4096}),
    ),
    default_variant="any",
)
