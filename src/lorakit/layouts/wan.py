"""Wan 2.1 / 2.2 layout data: original Wan (and ComfyUI) names as native, diffusers ``WanTransformer3DModel`` names
as the ``diffusers`` alias. Nothing is fused: every alias is a plain rename (``shapes/README.md``, "Native layouts").

Variants (told apart by sizes and, for Wan 2.2 A14B, by the second expert): T2V 14B (hidden 5120), T2V 1.3B (1536),
I2V 14B (5120 with the image cross-attention ``k_img``/``v_img`` and the image embedder ``img_emb``, flag ``i2v``),
TI2V 5B (3072, 48 latent channels) and Wan 2.2 A14B, two experts with the T2V-14B layout: ``transformer`` (the
high-noise expert; also the only transformer of every other variant) and ``transformer_2`` (the low-noise expert).
diffusers' Wan 2.2 pipelines name them so (``load_lora_weights(..., load_into_transformer_2=True)`` targets the
second); AI-Toolkit's combined files spell them ``diffusion_model.transformer_1.`` / ``.transformer_2.``
(``extensions_built_in/diffusion_models/wan22/wan22_14b_model.py``: transformer_1 runs above the boundary
timestep) and its split files end in ``_high_noise`` / ``_low_noise``.

Sizes: ``H`` hidden, ``FF`` feed-forward width, ``IN`` latent channels into the 1×2×2 Conv3d ``patch_embedding``,
``HEAD`` rows of ``head.head`` (out channels × 4), ``TEXT`` umT5 width, ``T`` sinusoidal time width, ``IMG`` CLIP
image width (I2V); count ``blocks``; flag ``i2v``.
"""

from __future__ import annotations

from dataclasses import replace

from lorakit.layouts.base import (Alias, ArchSpec, ComponentSpec, Container, ModuleSpec, ParamSpec, Portability,
                                  Preset, Rule, Stamp, Variant)

_B = "blocks.{i}."
PATCH_KERNEL = ("1", "2", "2")      # Conv3d patch size (t, h, w) of every Wan model


def _m(native: str, diffusers: str, out: str, inp: str, group: str, *, repeat: str | None = None,
       requires: str | None = None, kernel: tuple[str, ...] = ()) -> ModuleSpec:
    return ModuleSpec(native, out, inp, group, aliases={"diffusers": (Alias(diffusers),)}, repeat=repeat,
                      requires=requires, kernel=kernel)


def _blocks() -> list[ModuleSpec]:
    out = []
    for native, diff in (("self_attn", "attn1"), ("cross_attn", "attn2")):
        for n, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0")):
            out.append(_m(f"{_B}{native}.{n}", f"{_B}{diff}.{d}", "H", "H", "blocks", repeat="blocks"))
    out += [_m(_B + "cross_attn.k_img", _B + "attn2.add_k_proj", "H", "H", "blocks", repeat="blocks", requires="i2v"),
            _m(_B + "cross_attn.v_img", _B + "attn2.add_v_proj", "H", "H", "blocks", repeat="blocks", requires="i2v"),
            _m(_B + "ffn.0", _B + "ffn.net.0.proj", "FF", "H", "blocks", repeat="blocks"),
            _m(_B + "ffn.2", _B + "ffn.net.2", "H", "FF", "blocks", repeat="blocks")]
    return out


_CE = "condition_embedder."
_MODULES = (
    _m("patch_embedding", "patch_embedding", "H", "IN", "embedders", kernel=PATCH_KERNEL),
    _m("text_embedding.0", _CE + "text_embedder.linear_1", "H", "TEXT", "embedders"),
    _m("text_embedding.2", _CE + "text_embedder.linear_2", "H", "H", "embedders"),
    _m("time_embedding.0", _CE + "time_embedder.linear_1", "H", "T", "embedders"),
    _m("time_embedding.2", _CE + "time_embedder.linear_2", "H", "H", "embedders"),
    _m("time_projection.1", _CE + "time_proj", "6*H", "H", "embedders"),
    _m("img_emb.proj.1", _CE + "image_embedder.ff.net.0.proj", "IMG", "IMG", "embedders", requires="i2v"),
    _m("img_emb.proj.3", _CE + "image_embedder.ff.net.2", "H", "IMG", "embedders", requires="i2v"),
    *_blocks(),
    _m("head.head", "proj_out", "HEAD", "H", "head"),
)


def _p(native: str, diffusers: str, shape: tuple[str, ...], group: str, *, repeat: str | None = None,
       requires: str | None = None) -> ParamSpec:
    return ParamSpec(native, shape, group, aliases={"diffusers": diffusers}, repeat=repeat, requires=requires,
                     module_keyed=True)


_IE = _CE + "image_embedder."
_PARAMS = (
    _p("head.modulation", "scale_shift_table", ("1", "2", "H"), "head"),
    _p("img_emb.proj.0.weight", _IE + "norm1.weight", ("IMG",), "embedders", requires="i2v"),
    _p("img_emb.proj.0.bias", _IE + "norm1.bias", ("IMG",), "embedders", requires="i2v"),
    _p("img_emb.proj.4.weight", _IE + "norm2.weight", ("H",), "embedders", requires="i2v"),
    _p("img_emb.proj.4.bias", _IE + "norm2.bias", ("H",), "embedders", requires="i2v"),
    _p(_B + "modulation", _B + "scale_shift_table", ("1", "6", "H"), "blocks", repeat="blocks"),
    *(_p(f"{_B}{n}.norm_{qk}.weight", f"{_B}{d}.norm_{qk}.weight", ("H",), "blocks", repeat="blocks")
      for n, d in (("self_attn", "attn1"), ("cross_attn", "attn2")) for qk in ("q", "k")),
    _p(_B + "cross_attn.norm_k_img.weight", _B + "attn2.norm_added_k.weight", ("H",), "blocks", repeat="blocks",
       requires="i2v"),
    # the affine cross-attention LayerNorm: Wan's norm3 is diffusers' norm2 (norm1/norm2 have no parameters)
    _p(_B + "norm3.weight", _B + "norm2.weight", ("H",), "blocks", repeat="blocks"),
    _p(_B + "norm3.bias", _B + "norm2.bias", ("H",), "blocks", repeat="blocks"),
)

_SHARED = {"TEXT": 4096, "T": 256, "blocks": 40}
TRANSFORMER = ComponentSpec(
    name="transformer",
    label="Wan transformer",
    namings=("native", "diffusers"),
    modules=_MODULES,
    params=_PARAMS,
    group_labels={"embedders": "embedders", "blocks": "blocks", "head": "head"},
    presets=(
        Preset("wan-14b", {"H": 5120, "FF": 13824, "IN": 16, "HEAD": 64, "IMG": 1280, **_SHARED}, varies=("IN",)),
        Preset("wan-1.3b", {"H": 1536, "FF": 8960, "IN": 16, "HEAD": 64, **_SHARED, "blocks": 30}),
        Preset("wan-5b", {"H": 3072, "FF": 14336, "IN": 48, "HEAD": 192, **_SHARED, "blocks": 30}),
    ),
    flags=("i2v",),
    counts=("blocks",),
    flag_reasons={
        "i2v": ("this is an image-to-video (Wan 2.1 I2V) LoRA: the base has no image cross-attention (k_img/v_img, "
                "norm_k_img) nor image embedder (img_emb), so these modules have nothing to apply to",
                "expected for a Wan 2.1 I2V LoRA on a Wan 2.2 or T2V base: the rest applies (bake with "
                "--allow-partial); use a Wan 2.1 I2V base to apply all of it"),
    },
    # the CLI's --low-noise FILE / --low-noise-out OUT name the second expert's file (see TRANSFORMER_2)
)

# The Wan 2.2 A14B low-noise expert: the same layout under its own component name. A single-expert file names no
# component in its keys; its expert is told by ``expert_tags`` in its file name or metadata.
TRANSFORMER_2 = replace(TRANSFORMER, name="transformer_2", label="Wan 2.2 low-noise expert", flag="low-noise",
                        expert_tags=("low_noise", "low-noise", "lownoise"))
TRANSFORMER_1 = replace(TRANSFORMER, label="Wan transformer (or Wan 2.2 high-noise expert)",
                        expert_tags=("high_noise", "high-noise", "highnoise"))

_T, _T2 = "transformer", "transformer_2"
_NATIVE_FIRST = ("native", "diffusers")
_DIFFUSERS_FIRST = ("diffusers", "native")

# How each LoRA format names Wan's transformer(s) (first rule per component = what a writer uses; ``paired``
# rules name one expert inside a file that holds both and are used by writers only for such files).
RULES: dict[str, tuple[Rule, ...]] = {
    # musubi-tuner networks/lora_wan.py: lora_unet_ + Wan module names flattened, .alpha per module; VideoX-Fun
    # (Wan-Fun) writes lora_unet__ (ComfyUI's convert_lora_wan_fun); sd-scripts-style trainers on diffusers names
    "kohya": (Rule("lora_unet_", _T, _NATIVE_FIRST, True), Rule("lora_unet__", _T, _NATIVE_FIRST, True)),
    # ComfyUI: diffusion_model. + Wan names (lora_A/B or lora_down/up, .alpha, .diff/.diff_b); some trainers put
    # diffusers names there
    "comfy": (Rule("diffusion_model.", _T, _NATIVE_FIRST, False),),
    # AI-Toolkit: Wan names (or diffusers names) under diffusion_model., lora_A/lora_B; its combined Wan 2.2 files
    # put the experts under diffusion_model.transformer_1. (high noise) / .transformer_2. (low noise)
    "aitoolkit": (Rule("diffusion_model.", _T, _NATIVE_FIRST, False),
                  Rule("diffusion_model.transformer_1.", _T, _NATIVE_FIRST, False, paired=True),
                  Rule("diffusion_model.transformer_2.", _T2, _NATIVE_FIRST, False, paired=True)),
    # SimpleTuner's LyCORIS files: lycoris_ + Wan names flattened (ComfyUI reads them)
    "lycoris": (Rule("lycoris_", _T, ("native",), True),),
    # diffusers WanLoraLoaderMixin (transformer. + diffusers names; load_into_transformer_2=True for the second
    # expert: the same spelling); fal's trainers write transformer. too, some with Wan names
    "diffusers": (Rule("transformer.", _T, _DIFFUSERS_FIRST, False),),
    "peft": (Rule("transformer.", _T, _DIFFUSERS_FIRST, False), Rule("", _T, _DIFFUSERS_FIRST, False)),
    # DiffSynth-Studio: bare Wan names (lora_A/lora_B)
    "diffsynth": (Rule("", _T, _NATIVE_FIRST, False),),
}

WAN = ArchSpec(
    name="wan",
    label="Wan 2.1/2.2",
    components={_T: TRANSFORMER_1, _T2: TRANSFORMER_2},
    experts=(_T, _T2),
    rules=RULES,
    diffusers_loader="diffusers' Wan loader (WanPipeline.load_lora_weights; load_into_transformer_2=True for the "
                     "low-noise expert)",
    native_layout="wan",
    base_layouts="in Wan/ComfyUI or diffusers layout",
    containers=(*(Container(_T, prefix, _NATIVE_FIRST, folder="transformer")
                  for prefix in ("model.diffusion_model.", "diffusion_model.", "transformer.", "")),
                Container(_T2, "", _DIFFUSERS_FIRST, folder="transformer_2")),
    named_by=("wan",),
    stamp=Stamp(kohya_module="networks.lora_wan", ss_version="wan", modelspec="wan",
                implementation="https://github.com/Wan-Video/Wan2.1",
                variants={"t2v-14b": ("wan2.1_t2v_14b", "wan-2.1-t2v-14b"),
                          "t2v-1.3b": ("wan2.1_t2v_1.3b", "wan-2.1-t2v-1.3b"),
                          "i2v-14b": ("wan2.1_i2v_14b", "wan-2.1-i2v-14b"),
                          "ti2v-5b": ("wan2.2_ti2v_5b", "wan-2.2-ti2v-5b"),
                          "a14b": ("wan2.2_a14b", "wan-2.2-a14b")}),
    portability=(
        Portability("kohya", "diffusers' Wan loader reads lora_unet_ files only when every block has every attention "
                    "and FFN module (it pops each one; a partial LoRA raises)", "convert with `lorakit convert --to "
                    "diffusers`", layout="diffusers"),
    ),
    variants=(
        Variant("a14b", "Wan 2.2 A14B (high-noise and low-noise experts, each T2V-14B-shaped)", {"H": 5120},
                components=(_T2,)),
        Variant("a14b", "Wan 2.2 A14B expert (T2V-14B layout; named by the file's metadata or name)", {"H": 5120},
                named_by=("wan2.2_a14b", "wan_2.2_14b", "wan22_14b", "a14b", "high_noise", "low_noise")),
        Variant("i2v-14b", "Wan 2.1 I2V 14B (image cross-attention k_img/v_img)", {"H": 5120, "i2v": 1}),
        Variant("t2v-14b", "Wan 2.1 T2V 14B", {"H": 5120}),
        Variant("t2v-1.3b", "Wan 2.1 T2V 1.3B", {"H": 1536}),
        Variant("ti2v-5b", "Wan 2.2 TI2V 5B", {"H": 3072}),
    ),
    default_variant="any",
)
