"""Detection of Qwen-Image and Z-Image LoRAs (family and variant) among every registered architecture × format,
without confusing them with each other or with FLUX.1 (whose diffusers names Qwen-Image's attention shares).
Fixtures are written here key by key."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lorakit.cli import main
from lorakit.errors import UnsupportedArchitectureError
from lorakit.formats import read_lora
from lorakit.io import open_weights
from lorakit.formats import parse

H = 32
QWEN_ATTN = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")


def _lora(stems: dict[str, tuple[int, int]], down: str = "lora_A.weight", up: str = "lora_B.weight",
          alpha: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for stem, (o, i) in stems.items():
        out[f"{stem}.{down}"] = torch.randn(1, i, generator=gen)
        out[f"{stem}.{up}"] = torch.randn(o, 1, generator=gen)
        if alpha:
            out[f"{stem}.alpha"] = torch.tensor(1.0)
    return out


def _attention_only(blocks: range, stem) -> dict[str, tuple[int, int]]:
    return {stem(f"transformer_blocks.{i}.attn.{s}"): (H, H) for i in blocks for s in QWEN_ATTN}


def _save(tmp_path, tensors, metadata=None, name="lora.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


SPELL = {"diffusers": (lambda n: "transformer." + n, "lora_A.weight", "lora_B.weight", False),
         "kohya": (lambda n: "lora_unet_" + n.replace(".", "_"), "lora_down.weight", "lora_up.weight", True),
         "comfy": (lambda n: "diffusion_model." + n, "lora_A.weight", "lora_B.weight", False)}


@pytest.mark.parametrize("fmt", sorted(SPELL))
def test_attention_only_qwen_lora_with_60_blocks_is_qwen_image(tmp_path, fmt: str) -> None:
    """FLUX.1's diffusers double blocks have the same attention names and shapes; block 19 onwards exists only in
    Qwen-Image (60 blocks; FLUX.1 has 19 double blocks)."""
    stem, down, up, alpha = SPELL[fmt]
    path = _save(tmp_path, _lora(_attention_only(range(60), stem), down, up, alpha))
    with open_weights(path) as f:
        parsed = parse(f)
    assert (parsed.format, parsed.arch.spec.name, parsed.unknown_keys) == (fmt, "qwen-image", [])
    assert parsed.detection.also_fits == []
    assert parsed.arch.params["transformer"]["blocks"] == 60


@pytest.mark.parametrize("fmt", sorted(SPELL))
def test_attention_only_lora_on_the_first_blocks_stays_flux_unless_metadata_names_qwen(tmp_path, fmt: str) -> None:
    stem, down, up, alpha = SPELL[fmt]
    tensors = _lora(_attention_only(range(2), stem), down, up, alpha)
    plain = _save(tmp_path, tensors)
    with open_weights(plain) as f:
        parsed = parse(f)
    # (FLUX.2 Klein 4B is 3072 wide too: its double blocks have these diffusers attention names)
    assert parsed.arch.spec.name == "flux1" and sorted(parsed.detection.also_fits) == ["FLUX.2", "Qwen-Image"]
    for meta in ({"modelspec.architecture": "Qwen-Image/lora"}, {"ss_base_model_version": "qwen_image"},
                 {"ss_sd_model_name": "qwen_image_bf16.safetensors"}):
        named = _save(tmp_path, tensors, meta, name="named.safetensors")
        model = read_lora(named, allow_partial=False)
        assert model.arch.spec.name == "qwen-image", meta


def test_full_qwen_lora_is_not_flux_and_not_zimage(tmp_path) -> None:
    stems = _attention_only(range(2), lambda n: "transformer." + n)
    stems.update({"transformer.transformer_blocks.0.img_mlp.net.0.proj": (4 * H, H),
                  "transformer.transformer_blocks.1.txt_mod.1": (6 * H, H), "transformer.img_in": (H, 16)})
    model = read_lora(_save(tmp_path, _lora(stems)), allow_partial=False)
    assert (model.arch.spec.name, model.format) == ("qwen-image", "diffusers")


@pytest.mark.parametrize("stems,fmt", [
    ({"transformer.layers.0.attention.to_q": (H, H), "transformer.layers.1.feed_forward.w2": (H, 85)}, "diffusers"),
    ({"diffusion_model.layers.0.attention.qkv": (3 * H, H), "diffusion_model.layers.0.attention.out": (H, H)},
     "comfy"),
    ({"lora_unet_layers_0_attention_to_q": (H, H), "lora_unet_noise_refiner_0_feed_forward_w1": (85, H)}, "kohya"),
    ({"lora_unet__layers_0_attention_to_q": (H, H), "lora_unet__context_refiner_0_attention_to_out_0": (H, H)},
     "kohya"),
])
def test_zimage_spellings_are_zimage(tmp_path, stems, fmt: str) -> None:
    model = read_lora(_save(tmp_path, _lora(stems)), allow_partial=False)
    assert (model.arch.spec.name, model.format) == ("z-image", fmt)
    assert model.arch.variant == "base"


def test_flux_lora_is_still_flux(tmp_path) -> None:
    stems = {"transformer.transformer_blocks.0.attn.to_q": (H, H),
             "transformer.transformer_blocks.0.ff.net.0.proj": (4 * H, H),
             "transformer.single_transformer_blocks.0.proj_mlp": (4 * H, H)}
    assert read_lora(_save(tmp_path, _lora(stems))).arch.spec.name == "flux1"
    kohya = {"lora_unet_double_blocks_0_img_attn_qkv": (3 * H, H), "lora_unet_single_blocks_1_linear1": (7 * H, H)}
    assert read_lora(_save(tmp_path, _lora(kohya, "lora_down.weight", "lora_up.weight", True), name="k.safetensors")
                     ).arch.spec.name == "flux1"


QWEN_VARIANTS = [
    ({}, "base"),
    ({"modelspec.architecture": "Qwen-Image/lora"}, "base"),
    ({"modelspec.architecture": "Qwen-Image-Edit/lora"}, "edit"),
    ({"modelspec.architecture": "Qwen-Image-Edit-Plus/lora"}, "edit-plus"),
    ({"ss_sd_model_name": "qwen_image_edit_2509_bf16.safetensors"}, "edit-plus"),
    ({"modelspec.architecture": "Qwen-Image-Edit-2511/lora"}, "edit-2511"),
    ({"ss_sd_model_name": "qwen_image_2512_bf16.safetensors"}, "2512"),
    ({"lora_adapter_metadata": json.dumps({"transformer.base_model_name_or_path": "Qwen/Qwen-Image-Edit",
                                           "transformer.r": 1})}, "edit"),
]


@pytest.mark.parametrize("meta,variant", QWEN_VARIANTS)
def test_qwen_variant_is_named_by_metadata(tmp_path, meta, variant: str) -> None:
    stems = {"transformer.transformer_blocks.0.img_mlp.net.2": (H, 4 * H)}
    model = read_lora(_save(tmp_path, _lora(stems), meta), allow_partial=False)
    assert (model.arch.spec.name, model.arch.variant) == ("qwen-image", variant)


@pytest.mark.parametrize("meta,variant", [({}, "base"), ({"ss_sd_model_name": "z_image_turbo_bf16.safetensors"},
                                                         "turbo"),
                                          ({"modelspec.architecture": "Z-Image-Edit/lora"}, "edit")])
def test_zimage_variant_is_named_by_metadata(tmp_path, meta, variant: str) -> None:
    model = read_lora(_save(tmp_path, _lora({"transformer.layers.0.attention.to_k": (H, H)}), meta))
    assert model.arch.variant == variant


@pytest.mark.parametrize("meta", [{"modelspec.architecture": "Qwen-Image-2.1/lora"},
                                  {"ss_sd_model_name": "qwen_image_2.1_bf16.safetensors"}])
def test_qwen_image_21_is_refused_by_name(tmp_path, capsys, meta) -> None:
    path = _save(tmp_path, _lora({"transformer.transformer_blocks.0.img_mlp.net.2": (H, 4 * H)}), meta)
    with pytest.raises(UnsupportedArchitectureError, match="Qwen-Image 2.1"):
        read_lora(path)
    assert main(["inspect", str(path)]) == 2
    assert "Qwen-Image 2.1" in capsys.readouterr().err


def test_lumina2_sized_nextdit_lora_is_refused_by_size(tmp_path) -> None:
    path = _save(tmp_path, _lora({"diffusion_model.layers.0.attention.qkv": (3 * 2304, 2304)}))
    with pytest.raises(UnsupportedArchitectureError, match="Lumina Image 2.0"):
        read_lora(path)


@pytest.mark.parametrize("meta,variant", [({"modelspec.architecture": "Qwen-Image-Edit-Plus/lora"}, "edit-plus"),
                                          ({"ss_sd_model_name": "qwen_image_edit_2511.safetensors"}, "edit-2511"),
                                          ({"ss_sd_model_name": "qwen_image_2512.safetensors"}, "2512")])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "comfy"])
def test_qwen_variant_survives_conversion(tmp_path, meta, variant: str, fmt: str) -> None:
    from lorakit.ops.conversion import convert

    src = _save(tmp_path, _lora({"transformer.transformer_blocks.0.img_mlp.net.2": (H, 4 * H)}), meta)
    out = tmp_path / "out.safetensors"
    convert(src, out, to=fmt)
    assert read_lora(out).arch.variant == variant
