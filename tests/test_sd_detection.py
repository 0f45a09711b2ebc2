"""Which architecture a LoRA is for, from its keys, shapes and metadata: SD1.x / SD2.x / SDXL told apart,
variants only metadata names (SD2 v-prediction, Pony), and architectures lorakit does not support (SD3, the SDXL
refiner) refused by name instead of being mistaken for a registered one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lorakit.cli.main import main
from lorakit.errors import UnsupportedArchitectureError
from lorakit.formats import read_lora


def _lora(path, modules: dict[str, tuple[int, ...]], meta: dict[str, str] | None = None, style="kohya") -> str:
    """modules: key stem -> ΔW shape (out, in[, k, k])."""
    g = torch.Generator().manual_seed(0)
    t = {}
    dn, up = ("lora_down.weight", "lora_up.weight") if style == "kohya" else ("lora_A.weight", "lora_B.weight")
    for stem, shape in modules.items():
        conv = len(shape) == 4
        t[f"{stem}.{dn}"] = torch.randn(2, *shape[1:], generator=g)
        t[f"{stem}.{up}"] = torch.randn(shape[0], 2, *([1, 1] if conv else []), generator=g)
    save_file(t, str(path), metadata=meta)
    return str(path)


SD2 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 1024),
       "lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320),            # Linear in SD2 (conv 1×1 in SD1)
       "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (1024, 1024)}  # OpenCLIP-H, HF names
SD1 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
       "lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320, 1, 1),
       "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)}
SDXL = {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k": (640, 2048),
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2": (1280, 5120),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
        "lora_te2_text_model_encoder_layers_31_mlp_fc1": (5120, 1280)}


@pytest.mark.parametrize("modules,arch", ((SD1, "sd1"), (SD2, "sd2"), (SDXL, "sdxl")), ids=("sd1", "sd2", "sdxl"))
def test_sd_generations_told_apart_by_keys_and_shapes(tmp_path, modules, arch) -> None:
    model = read_lora(_lora(tmp_path / "x.safetensors", modules))
    assert model.arch.name == arch and not model.unknown_keys


def test_sd2_text_encoder_alone_is_sd2_by_its_width(tmp_path) -> None:
    """``lora_te_`` with HF names is CLIP-L (SD1, 768 wide) or OpenCLIP-H (SD2, 1024 wide)."""
    te = "lora_te_text_model_encoder_layers_3_mlp_fc2"
    assert read_lora(_lora(tmp_path / "h.safetensors", {te: (1024, 4096)})).arch.name == "sd2"
    assert read_lora(_lora(tmp_path / "l.safetensors", {te: (768, 3072)})).arch.name == "sd1"


def test_sd2_v_prediction_and_pony_are_named_by_metadata(tmp_path) -> None:
    v = read_lora(_lora(tmp_path / "v.safetensors", SD2, {"ss_base_model_version": "sd_v2_v"}))
    assert (v.arch.name, v.arch.variant) == ("sd2", "v")
    assert read_lora(_lora(tmp_path / "e.safetensors", SD2, {"ss_base_model_version": "sd_v2"})).arch.variant == "base"
    pony = read_lora(_lora(tmp_path / "p.safetensors", SDXL, {"ss_base_model_version": "sdxl_base_v1-0",
                                                              "ss_sd_model_name": "ponyDiffusionV6XL.safetensors"}))
    assert (pony.arch.name, pony.arch.variant) == ("sdxl", "pony")


def test_inpainting_is_named_by_its_conv_in(tmp_path) -> None:
    model = read_lora(_lora(tmp_path / "i.safetensors", {**SD1, "lora_unet_conv_in": (320, 9, 3, 3)}))
    assert (model.arch.name, model.arch.variant) == ("sd1", "inpaint")


def test_clip_only_lora_names_every_architecture_it_fits(tmp_path, capsys) -> None:
    path = _lora(tmp_path / "te.safetensors", {"lora_te1_text_model_encoder_layers_0_mlp_fc1": (3072, 768)})
    assert main(["inspect", path, "--json"]) == 0
    import json
    report = json.loads(capsys.readouterr().out)
    assert report["also_fits"]                         # FLUX.1 and SDXL both have this CLIP-L module
    assert main(["inspect", path, "--arch", "sdxl", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == "sdxl"
    # metadata settles it without --arch
    named = _lora(tmp_path / "te2.safetensors", {"lora_te1_text_model_encoder_layers_0_mlp_fc1": (3072, 768)},
                  {"ss_base_model_version": "sdxl_base_v1-0"})
    assert read_lora(named).arch.name == "sdxl"


REFUSED = {
    # SD3's joint blocks share FLUX.1's diffusers module names; its hidden size (1536) is not FLUX.1's
    "sd3-diffusers": ({"transformer.transformer_blocks.0.attn.to_q": (1536, 1536),
                       "transformer.transformer_blocks.0.attn.add_k_proj": (1536, 1536)}, "peft", "SD3"),
    "sd3-kohya": ({"lora_unet_joint_blocks_0_x_block_attn_qkv": (4608, 1536)}, "kohya", "SD3"),
    # the SDXL refiner: SGM names, context width 1280
    "sdxl-refiner": ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (768, 1280),
                      "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (768, 768)}, "kohya", "refiner"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_architectures_are_refused_by_name(tmp_path, capsys, case) -> None:
    modules, style, name = REFUSED[case]
    path = _lora(tmp_path / f"{case}.safetensors", modules, style="kohya" if style == "kohya" else "peft")
    with pytest.raises(UnsupportedArchitectureError, match=name):
        read_lora(path)
    assert main(["convert", path, "--to", "kohya", "-o", str(tmp_path / "out.safetensors")]) != 0
    err = capsys.readouterr().err
    assert name in err and "FLUX.1 transformer" not in err
    assert not (tmp_path / "out.safetensors").exists()
