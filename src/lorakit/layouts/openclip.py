"""OpenCLIP text encoders as layout data: SDXL's ViT-bigG (``clip_g``, te2) and SD2's ViT-H (``clip_h``, te1).

``native`` names are OpenCLIP's, as single-file checkpoints store them under ``conditioner.embedders.1.model.``
(SDXL) or ``cond_stage_model.model.`` (SD2), without that prefix. Each block's attention is one fused module
``transformer.resblocks.{i}.attn`` (``in_proj_weight`` ``3·D × D``, ``in_proj_bias``: rows q, k, v); its
``diffusers`` names are those of transformers' ``CLIPTextModel(WithProjection)`` (diffusers' ``text_encoder_2`` /
SD2 ``text_encoder``, and kohya/PEFT LoRAs), where q/k/v are separate row windows. ``text_projection`` (bigG
only) is stored as a bare ``D × D`` tensor ``P`` applied as ``x @ P``; diffusers' ``text_projection.weight``
is ``Pᵀ``. Sizes: D width, FF MLP width; count ``layers``. Layer norms (1-D) are not listed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lorakit.layouts.base import Alias, ComponentSpec, ModuleSpec, Preset

_BLOCK = "transformer.resblocks.{i}."
_LAYER = "text_model.encoder.layers.{i}."


@dataclass(frozen=True)
class _Module:
    """One row of the module table: native name, sizes, tensor names, diffusers aliases."""

    native: str
    out: str
    inp: str
    group: str
    diffusers: tuple[Alias, ...]
    repeat: str | None = "layers"
    weight: str = "weight"
    bias_param: str = "bias"
    bias: bool = True
    transpose: bool = False


_BLOCK_MODULES = (
    _Module(_BLOCK + "attn", "3*D", "D", "layers",
            tuple(Alias(_LAYER + f"self_attn.{n}", (start, "D"))
                  for n, start in (("q_proj", "0"), ("k_proj", "D"), ("v_proj", "2*D"))),
            weight="in_proj_weight", bias_param="in_proj_bias"),
    _Module(_BLOCK + "attn.out_proj", "D", "D", "layers", (Alias(_LAYER + "self_attn.out_proj"),)),
    _Module(_BLOCK + "mlp.c_fc", "FF", "D", "layers", (Alias(_LAYER + "mlp.fc1"),)),
    _Module(_BLOCK + "mlp.c_proj", "D", "FF", "layers", (Alias(_LAYER + "mlp.fc2"),)),
)

_PROJECTION = _Module("text_projection", "D", "D", "projection", (Alias("text_projection"),), repeat=None,
                      weight="", bias=False, transpose=True)


@dataclass(frozen=True)
class _Model:
    name: str
    label: str
    role: str
    preset: Preset
    modules: tuple[_Module, ...]


_MODELS = {
    "clip_g": _Model("clip_g", "OpenCLIP ViT-bigG", "te2",
                     Preset("clip-g", {"D": 1280, "FF": 5120, "layers": 32}), _BLOCK_MODULES + (_PROJECTION,)),
    # SD2 never applies the projection (diffusers' SD2 text encoder is a plain CLIPTextModel); not listed
    "clip_h": _Model("clip_h", "OpenCLIP ViT-H", "te1",
                     Preset("clip-h", {"D": 1024, "FF": 4096, "layers": 24}), _BLOCK_MODULES),
}

_GROUP_LABELS: Mapping[str, str] = {"layers": "{label} layers", "projection": "{label} text projection"}
# the width that tells ViT-H (SD2's only encoder, ``lora_te_``) from CLIP-L (SD1's, same HF names); bigG's names
# are never ambiguous (``lora_te2_`` / ``text_encoder_2.`` / ``clip_g``), so its sizes are left free
_FIXED = {"clip_h": ("D",), "clip_g": ()}


def _spec(m: _Module) -> ModuleSpec:
    return ModuleSpec(m.native, m.out, m.inp, m.group, aliases={"diffusers": m.diffusers}, repeat=m.repeat,
                      bias=m.bias, weight=m.weight, bias_param=m.bias_param, transpose=m.transpose)


def openclip_component(model: _Model) -> ComponentSpec:
    """The component of one OpenCLIP text encoder, from its row of :data:`_MODELS`."""
    groups = {m.group for m in model.modules}
    return ComponentSpec(
        name=model.name,
        label=model.label,
        modules=tuple(_spec(m) for m in model.modules),
        namings=("native", "diffusers"),
        group_labels={g: text.format(label=model.label) for g, text in _GROUP_LABELS.items() if g in groups},
        presets=(model.preset,),
        counts=("layers",),
        role=model.role,
        fixed={k: v for k, v in model.preset.params.items() if k in _FIXED[model.name]},
    )


OPENCLIP_G = openclip_component(_MODELS["clip_g"])
OPENCLIP_H = openclip_component(_MODELS["clip_h"])
