"""Z-Image layout data (Z-Image, Z-Image-Turbo, Z-Image-Edit: one architecture).

Native names are ComfyUI's (its Lumina-2 ``NextDiT`` module, ``shapes/z-image-comfy.json``): fused
``attention.qkv`` [3·H, H] = rows [0:H] ``to_q``, [H:2H] ``to_k``, [2H:3H] ``to_v`` of the diffusers
``ZImageTransformer2DModel`` (whose names the official Tongyi-MAI code uses too, ``shapes/z-image-diffusers.json``);
``attention.out`` = ``attention.to_out.0``, ``x_embedder`` = ``all_x_embedder.2-1``, ``final_layer`` =
``all_final_layer.2-1``; q/k norms ``q_norm``/``k_norm`` = ``norm_q``/``norm_k``; everything else has one name.

Sizes: H hidden (3840), M FFN width (10240), IN/OUT patchified latent channels (64), T adaLN input width
(min(H, 256)), F timestep-frequency width (256), TM timestep-MLP width (1024), CAP caption width (Qwen3-4B, 2560),
D head width (128); counts ``layers`` (30), ``noise`` and ``context`` (the two refiners, 2 each; the context
refiner has no adaLN modulation).

LoRA spellings: diffusers ``transformer.`` + diffusers names (ZImagePipeline.save_lora_weights); AI-Toolkit
``diffusion_model.`` + diffusers names, lora_A/lora_B; ComfyUI ``diffusion_model.`` + its own names (fused qkv);
musubi-tuner ``lora_unet_`` + flattened diffusers names (``lora_unet_layers_0_attention_to_q``); kohya-style
trainers on the original module tree ``lora_unet_`` + flattened ComfyUI names (``…attention_qkv``), also spelled
with a double underscore (``lora_unet__layers_0_…``); bare diffusers names (DiffSynth-Studio); ``lycoris_``.
diffusers 0.42.1 ``_convert_non_diffusers_z_image_lora_to_diffusers`` reads the same set.
"""

from __future__ import annotations

from lorakit.layouts.base import (Alias, ArchSpec, ComponentSpec, Container, ModuleSpec, ParamSpec, Portability,
                                  Preset, Rule, Stamp, Variant)
from lorakit.layouts.block_schemes import BlockScheme, Run, Vector

_T = "transformer"
_BLOCKS = (("layers", "layers", "layers"), ("noise_refiner", "noise", "noise_refiner"),
           ("context_refiner", "context", "context_refiner"))


def _m(native: str, out: str, inp: str, group: str, diffusers: tuple[Alias, ...] | None = None,
       repeat: str | None = None, bias: bool = True) -> ModuleSpec:
    return ModuleSpec(native, out, inp, group, aliases={"diffusers": diffusers or (Alias(native),)}, repeat=repeat,
                      bias=bias)


def _block_modules(block: str, count: str, group: str) -> tuple[ModuleSpec, ...]:
    b = block + ".{i}."
    mods = [
        _m(b + "attention.qkv", "3*H", "H", group, repeat=count, bias=False,
           diffusers=(Alias(b + "attention.to_q", ("0", "H")), Alias(b + "attention.to_k", ("H", "H")),
                      Alias(b + "attention.to_v", ("2*H", "H")))),
        _m(b + "attention.out", "H", "H", group, (Alias(b + "attention.to_out.0"),), repeat=count, bias=False),
        _m(b + "feed_forward.w1", "M", "H", group, repeat=count, bias=False),
        _m(b + "feed_forward.w2", "H", "M", group, repeat=count, bias=False),
        _m(b + "feed_forward.w3", "M", "H", group, repeat=count, bias=False),
    ]
    if count != "context":
        mods.append(_m(b + "adaLN_modulation.0", "4*H", "T", group, repeat=count))
    return tuple(mods)


def _block_params(block: str, count: str, group: str) -> tuple[ParamSpec, ...]:
    b = block + ".{i}."
    out = [ParamSpec(b + f"attention.{native}.weight", ("D",), group,
                     aliases={"diffusers": b + f"attention.{diff}.weight"}, repeat=count)
           for native, diff in (("q_norm", "norm_q"), ("k_norm", "norm_k"))]
    out += [ParamSpec(b + f"{n}.weight", ("H",), group, aliases={"diffusers": b + f"{n}.weight"}, repeat=count)
            for n in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2")]
    return tuple(out)


TRANSFORMER = ComponentSpec(
    name=_T,
    label="Z-Image transformer",
    namings=("native", "diffusers"),
    modules=(
        _m("x_embedder", "H", "IN", "embedders", (Alias("all_x_embedder.2-1"),)),
        _m("t_embedder.mlp.0", "TM", "F", "embedders"),
        _m("t_embedder.mlp.2", "T", "TM", "embedders"),
        _m("cap_embedder.1", "H", "CAP", "embedders"),
        *(m for block, count, group in _BLOCKS for m in _block_modules(block, count, group)),
        _m("final_layer.linear", "OUT", "H", "final_layer", (Alias("all_final_layer.2-1.linear"),)),
        _m("final_layer.adaLN_modulation.1", "H", "T", "final_layer",
           (Alias("all_final_layer.2-1.adaLN_modulation.1"),)),
    ),
    params=(
        ParamSpec("x_pad_token", ("1", "H"), "embedders", aliases={"diffusers": "x_pad_token"}),
        ParamSpec("cap_pad_token", ("1", "H"), "embedders", aliases={"diffusers": "cap_pad_token"}),
        ParamSpec("cap_embedder.0.weight", ("CAP",), "embedders", aliases={"diffusers": "cap_embedder.0.weight"}),
        *(p for block, count, group in _BLOCKS for p in _block_params(block, count, group)),
    ),
    group_labels={"embedders": "embedders", "layers": "layers", "noise_refiner": "noise refiner",
                  "context_refiner": "context refiner", "final_layer": "final layer"},
    presets=(Preset("z-image", {"H": 3840, "M": 10240, "IN": 64, "OUT": 64, "T": 256, "F": 256, "TM": 1024, "CAP": 2560,
                                "D": 128, "layers": 30, "noise": 2, "context": 2}),),
    counts=("layers", "noise", "context"),
    fallbacks={"OUT": "IN"},
    # the same NextDiT names at other sizes (ComfyUI's Lumina-2 module serves both)
    refusals=(("H", 2304, "Lumina Image 2.0 (NextDiT, hidden size 2304)"),),
)

_DIFF_FIRST = ("diffusers", "native")

RULES: dict[str, tuple[Rule, ...]] = {
    # musubi-tuner writes the diffusers names flattened; kohya-style trainers on the original module tree the
    # ComfyUI names; some files have a double underscore after the prefix
    "kohya": (Rule("lora_unet_", _T, _DIFF_FIRST, True), Rule("lora_unet__", _T, _DIFF_FIRST, True)),
    # ComfyUI's own (fused qkv) first; AI-Toolkit's diffusers names under the same prefix
    "comfy": (Rule("diffusion_model.", _T, ("native", "diffusers"), False),),
    "diffusers": (Rule("transformer.", _T, ("diffusers",), False),),
    "peft": (Rule("transformer.", _T, ("diffusers",), False), Rule("", _T, ("diffusers",), False)),
    "lycoris": (Rule("lycoris_", _T, ("diffusers",), True),),
    "diffsynth": (Rule("", _T, ("diffusers",), False),),
}

_LAYERS, _NOISE, _CONTEXT = Run("layers", "L"), Run("noise", "N"), Run("context", "C")
BLOCKS = BlockScheme(
    runs=(_LAYERS, _NOISE, _CONTEXT),
    groups={"embedders": ("IN", "BASE"), "final_layer": ("OUT", "BASE")},
    unplaced=("BASE",),
    vectors=(Vector("layers", (_LAYERS,)), Vector("noise refiner + context refiner + layers",
                                                  (_NOISE, _CONTEXT, _LAYERS)),
             Vector("BASE (every module outside the blocks) + refiners + layers",
                    ("BASE", _NOISE, _CONTEXT, _LAYERS))),
    example="layers.0-14=0.5,noise_refiner=0,x_embedder=0",
    summary="one value per layer (Z-Image: 30; noise + context refiners first: 34; BASE first: 35); ids L00…, "
            "N00…, C00…, IN, OUT, BASE; names such as layers.0-14=0.5,noise_refiner=0",
)

Z_IMAGE = ArchSpec(
    name="z-image",
    label="Z-Image",
    components={_T: TRANSFORMER},
    rules=RULES,
    containers=tuple(Container(_T, prefix, ("native", "diffusers"), folder=_T)
                     for prefix in ("model.diffusion_model.", "diffusion_model.", "transformer.", "")),
    named_by=("z-image", "z_image", "zimage", "z image"),
    native_layout="comfy",
    base_layouts="in ComfyUI or diffusers / Tongyi-MAI layout",
    diffusers_loader="diffusers' Z-Image loader (ZImagePipeline.load_lora_weights)",
    diffusers_loads=(_T,),
    blocks=BLOCKS,
    # ComfyUI comfy/lora.py (Lumina2): ``lora_unet_`` keys are its own NextDiT names flattened; diffusers names only
    # under ``diffusion_model.`` / ``transformer.`` / ``lycoris_`` / bare
    portability=(Portability("kohya", "ComfyUI does not read musubi-tuner's flattened diffusers names for Z-Image "
                             "(`lora_unet_…_attention_to_q`, `…_to_out_0`, `…_all_x_embedder_…`): their modules are "
                             "skipped there", "convert with `lorakit convert --to comfy`", namings=("diffusers",)),),
    stamp=Stamp(kohya_module="networks.lora_zimage", ss_version="z_image", modelspec="Z-Image",
                implementation="https://github.com/Tongyi-MAI/Z-Image", resolution="1024x1024",
                variants={"base": ("z_image", "Z-Image"), "turbo": ("z_image", "Z-Image-Turbo"),
                          "edit": ("z_image", "Z-Image-Edit")}),
    variants=(
        Variant("turbo", "Z-Image-Turbo (Z-Image's layout; named by the file's metadata)", {}, named_by=("turbo",)),
        Variant("edit", "Z-Image-Edit (Z-Image's layout; named by the file's metadata)", {}, named_by=("edit",)),
        Variant("base", "Z-Image", {}),
    ),
    default_variant="base",
)
