"""``lorakit doctor`` and ``lorakit diff`` on SD 1.x / SDXL files: coverage of every component a single-file
checkpoint holds, separate text-encoder files, architecture mismatches, inpainting and metadata-named derived
models (Pony, Illustrious); diffs of LoRAs and of multi-component checkpoints, with the Frobenius norms of the
changes the test made computed here from its own tensors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.cli.main import main
from lorakit.ops.diagnose import OK, PARTIAL, WILL_NOT_APPLY, doctor
from lorakit.ops.diffing import diff
from lorakit.errors import UsageError
from lorakit.layouts import resolve
from lorakit.samples.synthetic import PASSTHROUGH_SD, TINY_SD, TINY_TE, write_checkpoint

C = TINY_SD["sdxl"]["C"]          # 16 model channels (SDXL and SD1 tiny UNets alike)
G = TINY_TE["clip_g"]["D"]        # 64-wide OpenCLIP-G
L = TINY_TE["clip_l"]["D"]        # 768-wide CLIP-L
RANK = 4
UNET, TE1, TE2 = "model.diffusion_model.", "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."

# kohya stem -> ΔW shape; every module exists in the tiny SDXL checkpoint (the test knows the layout: SGM names)
SDXL_LORA = {
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": (2 * C, 2 * C),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (2 * C, 2048),
    "lora_unet_input_blocks_1_0_in_layers_2": (C, C, 3, 3),
    "lora_unet_output_blocks_5_2_conv": (2 * C, 2 * C, 3, 3),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (L, L),
    "lora_te2_text_model_encoder_layers_1_self_attn_q_proj": (G, G),
    "lora_te2_text_model_encoder_layers_1_self_attn_v_proj": (G, G),
    "lora_te2_text_projection": (G, G),
}
SDXL_TE1 = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj"}
SDXL_TE2 = {k for k in SDXL_LORA if k.startswith("lora_te2_")}
# SD 1.x (kohya writes the UNet in diffusers names): attn2 reads the 768-wide CLIP-L context
SD1_LORA = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (C, 768),
    "lora_unet_down_blocks_0_resnets_0_conv1": (C, C, 3, 3),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (L, L),
}
SD1_INPAINT = {
    "lora_unet_conv_in": (C, 9, 3, 3),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (C, 768),
}


def write_lora(path, modules, *, seed=0, meta=None) -> str:
    g = torch.Generator().manual_seed(seed)
    t = {}
    for stem, shape in modules.items():
        out, rest = shape[0], shape[1:]
        t[stem + ".lora_down.weight"] = torch.randn(RANK, *rest, generator=g) * 0.1
        t[stem + ".lora_up.weight"] = torch.randn(out, RANK, *([1, 1] if len(rest) == 3 else []), generator=g) * 0.1
        t[stem + ".alpha"] = torch.tensor(float(RANK))
    save_file(t, str(path), meta)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd")
    sdxl, sd1 = resolve("sdxl"), resolve("sd1")
    out = {
        "sdxl": write_checkpoint(d / "sdxl.safetensors", sdxl, {"unet": TINY_SD["sdxl"], "clip_l": TINY_TE["clip_l"],
                                                               "clip_g": TINY_TE["clip_g"]}, extra=PASSTHROUGH_SD),
        "sd1": write_checkpoint(d / "sd1.safetensors", sd1, {"unet": TINY_SD["sd1"], "clip_l": TINY_TE["clip_l"]},
                                extra=PASSTHROUGH_SD),
        "sd1_inpaint": write_checkpoint(d / "sd1_inpaint.safetensors", sd1,
                                        {"unet": {**TINY_SD["sd1"], "IN": 9}, "clip_l": TINY_TE["clip_l"]}),
        "sdxl_unet": write_checkpoint(d / "unet.safetensors", sdxl, {"unet": TINY_SD["sdxl"]}),
        "clip_l": write_checkpoint(d / "clip_l.safetensors", sdxl, {"clip_l": TINY_TE["clip_l"]},
                                   prefixes={"clip_l": ""}, seed=1),
        "clip_g": write_checkpoint(d / "clip_g.safetensors", sdxl, {"clip_g": TINY_TE["clip_g"]},
                                   prefixes={"clip_g": ""}, seed=2),
    }
    t = load_file(out["sdxl"])
    pruned = UNET + "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight"
    save_file({k: v for k, v in t.items() if k != pruned}, str(d / "pruned.safetensors"))
    out["pruned"] = str(d / "pruned.safetensors")
    out["illustrious"] = str(d / "illustriousXL_v01.safetensors")
    shutil.copyfile(out["sdxl"], out["illustrious"])
    out["sdxl_lora"] = write_lora(d / "sdxl_lora.safetensors", SDXL_LORA)
    out["pony_lora"] = write_lora(d / "pony_lora.safetensors", SDXL_LORA,
                                  meta={"ss_sd_model_name": "ponyDiffusionV6XL_v6.safetensors"})
    out["sd1_lora"] = write_lora(d / "sd1_lora.safetensors", SD1_LORA)
    out["inpaint_lora"] = write_lora(d / "inpaint_lora.safetensors", SD1_INPAINT)
    out["dir"] = d
    return out


def _one(lora, base=None, **kw):
    rep = doctor([lora], base, **kw)
    return rep.loras[0], rep


# --- doctor ------------------------------------------------------------------------------------

def test_sdxl_lora_on_sdxl_single_file_checks_every_component(files) -> None:
    d, rep = _one(files["sdxl_lora"], files["sdxl"])
    assert d.verdict == OK, d.summary
    assert d.coverage["applies"] == d.coverage["modules"] == len(SDXL_LORA)
    assert set(d.coverage["checked_components"]) == {"unet", "clip_l", "clip_g"}
    assert rep.base["architecture"] == "sdxl" and set(rep.base["components"]) == {"unet", "clip_l", "clip_g"}
    assert "CLIP-L" in d.summary and "OpenCLIP ViT-bigG" in d.summary


def test_unet_only_base_with_and_without_text_encoder_files(files, capsys) -> None:
    d, _ = _one(files["sdxl_lora"], files["sdxl_unet"])
    assert d.verdict == PARTIAL
    groups = {g["reason"]: g["count"] for g in d.coverage["unmatched"] if g["cause"] == "text encoder"}
    assert sorted(groups.values()) == sorted([len(SDXL_TE1), len(SDXL_TE2)])
    assert d.coverage["applies"] == len(SDXL_LORA) - len(SDXL_TE1) - len(SDXL_TE2)
    assert "--text-encoder" in d.fix
    d2, rep = _one(files["sdxl_lora"], files["sdxl_unet"], text_encoders=[files["clip_l"], files["clip_g"]])
    assert d2.verdict == OK, d2.summary
    assert {t["component"] for t in rep.text_encoders} == {"clip_l", "clip_g"}
    assert d2.coverage["applies"] == len(SDXL_LORA)
    rc = main(["doctor", files["sdxl_lora"], "--base", files["sdxl_unet"], "--text-encoder", files["clip_l"],
               "--text-encoder", files["clip_g"]])
    assert rc == 0 and "VERDICT       OK" in capsys.readouterr().out


def test_module_missing_from_pruned_base_is_partial_and_named(files) -> None:
    d, _ = _one(files["sdxl_lora"], files["pruned"])
    assert d.verdict == PARTIAL
    missing = [g for g in d.coverage["unmatched"] if g["cause"] == "missing in base"]
    assert len(missing) == 1 and missing[0]["modules"] == ["unet:input_blocks.4.1.transformer_blocks.1.attn1.to_q"]
    assert d.coverage["applies"] == len(SDXL_LORA) - 1
    assert "input_blocks.4.1.transformer_blocks.1.attn1.to_q" in d.summary


@pytest.mark.parametrize("lora, base, mine, theirs", [("sdxl_lora", "sd1", "SDXL", "SD 1.x"),
                                                      ("sd1_lora", "sdxl", "SD 1.x", "SDXL")])
def test_wrong_architecture_will_not_apply(files, capsys, lora, base, mine, theirs) -> None:
    d, rep = _one(files[lora], files[base])
    assert d.verdict == WILL_NOT_APPLY and rep.exit_code == 2
    assert f"this is a {mine}" in d.summary and f"the {theirs} base" in d.summary
    assert d.fix and mine in d.fix
    assert main(["doctor", files[lora], "--base", files[base]]) == 2
    out = capsys.readouterr().out
    assert "WILL NOT APPLY" in out and mine in out and theirs in out


def test_inpainting_lora_on_plain_base_names_the_variant(files) -> None:
    d, _ = _one(files["inpaint_lora"], files["sd1"])
    assert d.verdict == WILL_NOT_APPLY
    assert d.info["architecture"] == "sd1" and d.info["variant"] == "inpaint"
    mism = d.coverage["shape_mismatches"]
    assert [m["module"] for m in mism] == ["unet:input_blocks.0.0"]
    assert mism[0]["lora"] == [C, 9] and mism[0]["base"] == [C, 4]
    assert "inpainting" in d.summary and "inpainting" in d.fix
    d2, _ = _one(files["inpaint_lora"], files["sd1_inpaint"])
    assert d2.verdict == OK, d2.summary


def test_pony_lora_and_illustrious_base_named(files) -> None:
    d, _ = _one(files["pony_lora"], files["sdxl"])
    assert d.verdict == OK and d.info["variant"] == "pony"
    assert any("Pony Diffusion" in n for n in d.notes)
    d2, rep = _one(files["pony_lora"], files["illustrious"])
    assert rep.base["variant"] == "illustrious"
    assert d2.verdict == OK and "Illustrious" in d2.summary
    assert any("Pony Diffusion" in n and "Illustrious" in n for n in d2.notes)
    d3, _ = _one(files["sdxl_lora"], files["illustrious"])        # a plain SDXL LoRA on a named base
    assert d3.verdict == OK and any("Illustrious" in n for n in d3.notes)


def test_flux_flag_reasons_are_layout_data() -> None:
    flux = resolve("flux1").denoiser
    assert set(flux.flag_reasons) == set(flux.flags) == {"guidance", "modulation"}
    assert "Chroma" in flux.flag_reasons["modulation"][0]
    assert all(not resolve(n).denoiser.flag_reasons for n in ("sd1", "sd2", "sdxl"))


# --- diff --------------------------------------------------------------------------------------

def test_diff_sd_lora_with_itself_is_zero(files, capsys) -> None:
    rep = diff(files["sdxl_lora"], files["sdxl_lora"])
    # native targets: OpenCLIP-G's q and v windows are one fused target (transformer.resblocks.1.attn)
    assert rep.equivalent and rep.shared == len(SDXL_LORA) - 1
    assert rep.total["relative_difference"] == pytest.approx(0.0, abs=1e-7)
    assert rep.differing_blocks == []
    assert set(rep.components) == {"unet", "clip_l", "clip_g"}
    # blocks: UNet by LoRA-Block-Weight id, text encoders per layer / projection
    assert {"unet:IN01", "unet:IN04", "unet:OUT05", "clip_g:projection"} <= set(rep.blocks)
    assert main(["diff", files["sdxl_lora"], files["sdxl_lora"]]) == 0
    capsys.readouterr()


def test_diff_two_loras_of_one_module_changed(files) -> None:
    other = load_file(files["sdxl_lora"])
    stem = "lora_unet_output_blocks_5_2_conv"
    other[stem + ".lora_up.weight"] = other[stem + ".lora_up.weight"] * 2      # ΔB = 2·ΔA in OUT05 only
    path = str(files["dir"] / "other_lora.safetensors")
    save_file(other, path)
    rep = diff(files["sdxl_lora"], path)
    assert rep.differing_blocks == ["unet:OUT05"]
    a = load_file(files["sdxl_lora"])
    delta = a[stem + ".lora_up.weight"].flatten(1).double() @ a[stem + ".lora_down.weight"].flatten(1).double()
    assert rep.blocks["unet:OUT05"]["norm_a"] == pytest.approx(float(delta.norm()), rel=1e-6)
    assert rep.blocks["unet:OUT05"]["difference_norm"] == pytest.approx(float(delta.norm()), rel=1e-6)
    assert rep.blocks["unet:OUT05"]["ratio"] == pytest.approx(0.5, rel=1e-6)


def test_diff_checkpoints_reports_exactly_the_changed_blocks(files, capsys) -> None:
    a = load_file(files["sdxl"])
    b = {k: v.clone() for k, v in a.items()}
    g = torch.Generator().manual_seed(7)
    unet_key = UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"      # block IN04
    d1 = torch.randn(b[unet_key].shape, generator=g) * 0.01
    b[unet_key] += d1
    te_key = TE2 + "transformer.resblocks.1.attn.in_proj_weight"                      # OpenCLIP-G layer 1, k rows
    d2 = torch.randn(G, G, generator=g) * 0.01
    b[te_key][G:2 * G] += d2
    path = str(files["dir"] / "changed.safetensors")
    save_file(b, path)
    rep = diff(files["sdxl"], path)
    assert rep.kind == "model" and not rep.equivalent
    assert rep.only_in_a == [] and rep.only_in_b == [] and rep.shape_mismatches == []
    assert rep.differing_blocks == ["clip_g:transformer.resblocks.1", "unet:IN04"]
    want1 = float((b[unet_key].double() - a[unet_key].double()).norm())
    want2 = float((b[te_key].double() - a[te_key].double()).norm())
    assert want1 == pytest.approx(float(d1.double().norm()), rel=1e-5)
    assert rep.blocks["unet:IN04"]["difference_norm"] == pytest.approx(want1, rel=1e-9)
    assert rep.blocks["clip_g:transformer.resblocks.1"]["difference_norm"] == pytest.approx(want2, rel=1e-9)
    assert rep.components["unet"]["difference_norm"] == pytest.approx(want1, rel=1e-9)
    assert rep.components["clip_l"]["difference_norm"] == 0.0
    in04 = math.sqrt(sum(float(v.double().pow(2).sum()) for k, v in a.items()
                         if k.startswith(UNET + "input_blocks.4.")))
    assert rep.blocks["unet:IN04"]["norm_a"] == pytest.approx(in04, rel=1e-9)
    assert rep.total["difference_norm"] == pytest.approx(math.hypot(want1, want2), rel=1e-9)


def _hf_clip_g(t: dict[str, torch.Tensor], *, transpose_projection: bool = True) -> dict[str, torch.Tensor]:
    """The OpenCLIP-G part of a single file rewritten in HF (transformers CLIPTextModelWithProjection) names:
    fused in_proj split into q/k/v, c_fc/c_proj as fc1/fc2, text_projection stored out × in (Pᵀ)."""
    out = {k: v for k, v in t.items() if not k.startswith(TE2)}
    for i in range(TINY_TE["clip_g"]["layers"]):
        src, dst = f"{TE2}transformer.resblocks.{i}.", f"{TE2}text_model.encoder.layers.{i}."
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[dst + f"self_attn.{name}.weight"] = t[src + "attn.in_proj_weight"][j * G:(j + 1) * G].clone()
            out[dst + f"self_attn.{name}.bias"] = t[src + "attn.in_proj_bias"][j * G:(j + 1) * G].clone()
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[dst + b + ".weight"], out[dst + b + ".bias"] = t[src + a + ".weight"], t[src + a + ".bias"]
    proj = t[TE2 + "text_projection"]
    out[TE2 + "text_projection.weight"] = (proj.T if transpose_projection else proj).contiguous()
    return out


def test_diff_compares_openclip_in_native_orientation(files, capsys) -> None:
    # the OpenCLIP-G part of an SDXL single file alone (small), in OpenCLIP names and in HF names
    native = write_checkpoint(files["dir"] / "clip_g_native.safetensors", resolve("sdxl"),
                              {"clip_g": TINY_TE["clip_g"]}, seed=5)
    a = load_file(native)
    hf = str(files["dir"] / "hf_clip_g.safetensors")
    save_file(_hf_clip_g(a), hf)
    rep = diff(native, hf)
    assert rep.equivalent, (rep.differing_blocks, rep.only_in_a, rep.only_in_b, rep.shape_mismatches)
    assert rep.only_in_a == [] and rep.only_in_b == [] and rep.shared == len(a)
    wrong = str(files["dir"] / "hf_clip_g_untransposed.safetensors")
    save_file(_hf_clip_g(a, transpose_projection=False), wrong)
    rep2 = diff(native, wrong)
    assert rep2.differing_blocks == ["clip_g:projection"]
    p = a[TE2 + "text_projection"].double()
    assert rep2.blocks["clip_g:projection"]["difference_norm"] == pytest.approx(float((p - p.T).norm()), rel=1e-9)
    assert main(["diff", native, wrong, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["differing_blocks"] == ["clip_g:projection"]


@pytest.mark.parametrize("a, b", [("sd1", "sdxl"), ("sd1_lora", "sdxl_lora")])
def test_diff_refuses_sd1_against_sdxl(files, capsys, a, b) -> None:
    with pytest.raises(UsageError) as exc:
        diff(files[a], files[b])
    assert "SD 1.x" in str(exc.value) and "SDXL" in str(exc.value)
    assert main(["diff", files[a], files[b]]) == 2
    err = capsys.readouterr().err
    assert "SD 1.x" in err and "SDXL" in err
