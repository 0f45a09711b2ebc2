"""Text-encoder components shared by several architectures (layout data)."""

from __future__ import annotations

from lorakit.layouts.base import ComponentSpec, ModuleSpec, Preset


def _layer(name: str, out: str, inp: str, *, bias: bool, group: str, repeat: str) -> ModuleSpec:
    return ModuleSpec(name, out, inp, group, repeat=repeat, bias=bias)


CLIP_L = ComponentSpec(
    name="clip_l",
    label="CLIP-L",
    modules=tuple(
        _layer(f"text_model.encoder.layers.{{i}}.{sub}", out, inp, bias=True, group="layers", repeat="layers")
        for sub, out, inp in (
            ("self_attn.q_proj", "D", "D"),
            ("self_attn.k_proj", "D", "D"),
            ("self_attn.v_proj", "D", "D"),
            ("self_attn.out_proj", "D", "D"),
            ("mlp.fc1", "FF", "D"),
            ("mlp.fc2", "D", "FF"),
        )
    ),
    group_labels={"layers": "CLIP-L layers"},
    presets=(Preset("clip-l", {"D": 768, "FF": 3072, "layers": 12}),),
    counts=("layers",),
)

# the width that tells CLIP-L from SD2's ViT-H, both read under ``lora_te_`` with HF names (SD architectures set it;
# FLUX.1 leaves CLIP-L's sizes free for the suite's tiny encoders)
CLIP_L_WIDTH = {"D": 768}

T5_XXL = ComponentSpec(
    name="t5",
    label="T5-XXL",
    modules=tuple(
        _layer(f"encoder.block.{{i}}.{sub}", out, inp, bias=False, group="blocks", repeat="blocks")
        for sub, out, inp in (
            ("layer.0.SelfAttention.q", "INNER", "D"),
            ("layer.0.SelfAttention.k", "INNER", "D"),
            ("layer.0.SelfAttention.v", "INNER", "D"),
            ("layer.0.SelfAttention.o", "D", "INNER"),
            ("layer.1.DenseReluDense.wi_0", "FF", "D"),
            ("layer.1.DenseReluDense.wi_1", "FF", "D"),
            ("layer.1.DenseReluDense.wo", "D", "FF"),
        )
    ),
    group_labels={"blocks": "T5 blocks"},
    presets=(Preset("t5-xxl", {"D": 4096, "INNER": 4096, "FF": 10240, "blocks": 24}),),
    counts=("blocks",),
)
