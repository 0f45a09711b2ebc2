"""``lorakit doctor``: verdicts and causes on crafted LoRAs against tiny FLUX bases."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit import doctor
from lorakit.cli import main
from lorakit.ops.diagnose import INVALID, OK, PARTIAL, WILL_NOT_APPLY
from lorakit.errors import NotALoraError
from lorakit.io import save_tensors
from lorakit.samples.synthetic import TINY_CLIP, TINY_FLUX, write_aitoolkit_lora, write_base, write_sdscripts_lora

H = TINY_FLUX["H"]


def _lora(path, modules: dict[str, tuple[int, int]], *, rank=4, alpha=None, seed=0, meta=None, dtype=torch.float32,
          style="kohya") -> str:
    g = torch.Generator().manual_seed(seed)
    t = {}
    for stem, (o, i) in modules.items():
        down, up = ("lora_down.weight", "lora_up.weight") if style == "kohya" else ("lora_A.weight", "lora_B.weight")
        t[f"{stem}.{down}"] = torch.randn(rank, i, generator=g).to(dtype)
        t[f"{stem}.{up}"] = torch.randn(o, rank, generator=g).to(dtype)
        if alpha is not None:
            t[f"{stem}.alpha"] = torch.tensor(float(alpha))
    save_tensors(path, t, meta)
    return str(path)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("bases")
    return {
        "dev": write_base(d / "dev.safetensors"),
        "dev_diffusers": write_base(d / "dev_diffusers.safetensors", layout="diffusers"),
        "dev_comfy": write_base(d / "dev_comfy.safetensors", prefix="model.diffusion_model."),
        "schnell": write_base(d / "schnell.safetensors", {**TINY_FLUX, "guidance": 0}),
        "chroma": write_base(d / "chroma.safetensors", {**TINY_FLUX, "modulation": 0}),
        "fill": write_base(d / "fill.safetensors", {**TINY_FLUX, "IN": 384}),
    }


def _one(path, base=None, **kw):
    rep = doctor([path], base, **kw)
    assert len(rep.loras) == 1
    return rep.loras[0], rep


# --- the four cases the issue asks for ------------------------------------------------------

def test_sdxl_lora_against_flux_base_will_not_apply(tmp_path, bases, capsys) -> None:
    sdxl = _lora(tmp_path / "sdxl.safetensors", {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k": (640, 640),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048),
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q": (1280, 1280),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),   # matches CLIP-L names!
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
    }, alpha=4)
    d, rep = _one(sdxl, bases["dev"])
    assert d.verdict == WILL_NOT_APPLY and rep.exit_code == 2
    assert "SDXL" in d.summary and "SDXL" in (d.fix or "")
    rc = main(["doctor", sdxl, "--base", bases["dev"]])
    out = capsys.readouterr().out
    assert rc == 2 and "WILL NOT APPLY" in out and "SDXL" in out


def test_fill_lora_against_dev_base_names_img_in(tmp_path, bases) -> None:
    fill = _lora(tmp_path / "fill.safetensors", {"lora_unet_img_in": (H, 384), "lora_unet_double_blocks_0_img_attn_proj": (H, H)})
    d, _ = _one(fill, bases["dev"])
    assert d.verdict == WILL_NOT_APPLY
    assert d.info["variant"] == "fill"
    mism = d.coverage["shape_mismatches"]
    assert [m["module"] for m in mism] == ["transformer:img_in"]
    assert mism[0]["lora"] == [H, 384] and mism[0]["base"] == [H, TINY_FLUX["IN"]]
    assert "img_in" in d.summary and "Fill" in d.summary and "Fill" in d.fix
    assert d.coverage["applies"] == 1
    # the same LoRA fits a Fill base
    d2, _ = _one(fill, bases["fill"])
    assert d2.verdict == OK, d2.summary


def test_text_encoder_part_without_text_encoder_is_partial(tmp_path, bases, capsys) -> None:
    lora = write_sdscripts_lora(tmp_path / "te.safetensors")
    d, rep = _one(lora, bases["dev"])
    assert d.verdict == PARTIAL and rep.exit_code == 1
    groups = {g["cause"]: g for g in d.coverage["unmatched"]}
    assert set(groups) == {"text encoder"}
    assert groups["text encoder"]["count"] == 6 * TINY_CLIP["layers"]
    assert "CLIP-L" in d.summary and "--text-encoder" in d.fix
    assert d.coverage["applies"] == d.coverage["modules"] - 6 * TINY_CLIP["layers"]
    rc = main(["doctor", lora, "--base", bases["dev"]])
    assert rc == 1 and "PARTIAL" in capsys.readouterr().out


def test_correct_lora_ok_on_every_base_layout(tmp_path, bases, capsys) -> None:
    lora = write_aitoolkit_lora(tmp_path / "ok.safetensors")
    for key in ("dev", "dev_diffusers", "dev_comfy"):
        d, rep = _one(lora, bases[key])
        assert d.verdict == OK and rep.exit_code == 0, (key, d.summary)
        assert d.coverage["applies"] == d.coverage["modules"] > 0
        assert d.coverage["unmatched"] == [] and d.coverage["shape_mismatches"] == []
    assert main(["doctor", lora, "--base", bases["dev"]]) == 0
    assert "VERDICT       OK" in capsys.readouterr().out


# --- further causes ----------------------------------------------------------------------------

def test_text_encoder_given_makes_it_ok(tmp_path, bases) -> None:
    lora = write_sdscripts_lora(tmp_path / "te.safetensors")
    g = torch.Generator().manual_seed(3)
    te = {}
    for i in range(TINY_CLIP["layers"]):
        for sub, (o, n) in {"self_attn.q_proj": (24, 24), "self_attn.k_proj": (24, 24), "self_attn.v_proj": (24, 24),
                            "self_attn.out_proj": (24, 24), "mlp.fc1": (48, 24), "mlp.fc2": (24, 48)}.items():
            te[f"text_model.encoder.layers.{i}.{sub}.weight"] = torch.randn(o, n, generator=g)
            te[f"text_model.encoder.layers.{i}.{sub}.bias"] = torch.randn(o, generator=g)
    te_path = save_tensors(tmp_path / "clip_l.safetensors", te)
    d, rep = _one(lora, bases["dev"], text_encoders=[te_path])
    assert d.verdict == OK, d.summary
    assert rep.text_encoders[0]["component"] == "clip_l"
    # a wrong-size text encoder is a mismatch
    te_small = {k: v[:, :12] if v.dim() == 2 else v for k, v in te.items()}
    te2 = save_tensors(tmp_path / "clip_small.safetensors", te_small)
    d2, _ = _one(lora, bases["dev"], text_encoders=[te2])
    assert d2.verdict == WILL_NOT_APPLY and d2.coverage["shape_mismatches"]


def test_guidance_lora_on_schnell_base(tmp_path, bases) -> None:
    lora = _lora(tmp_path / "g.safetensors", {"lora_unet_guidance_in_in_layer": (H, TINY_FLUX["T"]),
                                              "lora_unet_double_blocks_0_img_attn_proj": (H, H)})
    d, _ = _one(lora, bases["schnell"])
    assert d.verdict == PARTIAL
    assert d.fix == "use a FLUX.1-dev base, this LoRA has guidance_in"
    assert d.coverage["unmatched"][0]["modules"] == ["transformer:guidance_in.in_layer"]
    assert _one(lora, bases["dev"])[0].verdict == OK


def test_modulation_lora_on_chroma_base(tmp_path, bases) -> None:
    lora = _lora(tmp_path / "m.safetensors", {"lora_unet_double_blocks_0_img_mod_lin": (6 * H, H),
                                              "lora_unet_double_blocks_0_img_attn_proj": (H, H)})
    d, _ = _one(lora, bases["chroma"])
    assert d.verdict == PARTIAL and "Chroma" in d.summary


def test_lora_for_bigger_model_and_missing_blocks(tmp_path, bases) -> None:
    lora = _lora(tmp_path / "b.safetensors", {"lora_unet_double_blocks_5_img_attn_proj": (H, H),
                                              "lora_unet_double_blocks_0_img_attn_proj": (H, H)})
    d, _ = _one(lora, bases["dev"])
    assert d.verdict == PARTIAL and d.coverage["unmatched"][0]["cause"] == "model size"
    wide = _lora(tmp_path / "w.safetensors", {"lora_unet_double_blocks_0_img_attn_proj": (2 * H, 2 * H)})
    d2, _ = _one(wide, bases["dev"])
    assert d2.verdict == WILL_NOT_APPLY and "size" in d2.summary


def test_prefix_problem_is_named(tmp_path, bases) -> None:
    g = torch.Generator().manual_seed(0)
    t = {}
    for i, stem in enumerate(["transformer.transformer_blocks.0.attn.to_out.0",
                              "foo.transformer.transformer_blocks.1.attn.to_out.0"]):
        t[stem + ".lora_A.weight"] = torch.randn(4, H, generator=g)
        t[stem + ".lora_B.weight"] = torch.randn(H, 4, generator=g)
    p = save_tensors(tmp_path / "prefix.safetensors", t)
    d, _ = _one(p, bases["dev"])
    assert d.verdict == PARTIAL
    g0 = d.coverage["unmatched"][0]
    assert g0["cause"] == "prefix" and "'foo.'" in g0["reason"] and g0["count"] == 2


def test_nan_inf_zero_and_extreme_scale(tmp_path, bases) -> None:
    mods = {"lora_unet_double_blocks_0_img_attn_proj": (H, H), "lora_unet_double_blocks_1_img_attn_proj": (H, H)}
    p = _lora(tmp_path / "n.safetensors", mods, alpha=4)
    from safetensors.torch import load_file, save_file
    t = load_file(p)
    t["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"][0, 0] = float("nan")
    save_file(t, str(tmp_path / "nan.safetensors"))
    d, rep = _one(str(tmp_path / "nan.safetensors"), bases["dev"])
    assert d.verdict == INVALID and rep.exit_code == 2 and d.checks["nonfinite_count"] == 1
    t = load_file(p)
    t["lora_unet_double_blocks_1_img_attn_proj.lora_down.weight"][1, 2] = float("inf")
    save_file(t, str(tmp_path / "inf.safetensors"))
    assert _one(str(tmp_path / "inf.safetensors"))[0].verdict == INVALID
    t = load_file(p)
    t["lora_unet_double_blocks_1_img_attn_proj.lora_up.weight"].zero_()
    save_file(t, str(tmp_path / "zero1.safetensors"))
    d, _ = _one(str(tmp_path / "zero1.safetensors"), bases["dev"])
    assert d.verdict == PARTIAL and d.checks["zero_up_count"] == 1
    for k in t:
        if k.endswith("lora_up.weight"):
            t[k].zero_()
    save_file(t, str(tmp_path / "zero.safetensors"))
    assert _one(str(tmp_path / "zero.safetensors"))[0].verdict == WILL_NOT_APPLY
    big = _lora(tmp_path / "big.safetensors", mods, alpha=4 * 64)
    d, _ = _one(big, bases["dev"])
    assert d.verdict == OK and d.checks["extreme_scale_count"] == 2
    assert any("extreme scale" in w for w in d.warnings)
    assert main(["doctor", "--strict", big]) == 1


def test_dtype_oddities(tmp_path) -> None:
    mods = {"lora_unet_double_blocks_0_img_attn_proj": (H, H), "lora_unet_double_blocks_1_img_attn_proj": (H, H)}
    d, _ = _one(_lora(tmp_path / "f64.safetensors", mods, dtype=torch.float64))
    assert any("fp64" in w for w in d.warnings)
    from safetensors.torch import load_file, save_file
    t = load_file(_lora(tmp_path / "x.safetensors", mods))
    t["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"] = t[
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"].to(torch.bfloat16)
    save_file(t, str(tmp_path / "mixed.safetensors"))
    d, _ = _one(str(tmp_path / "mixed.safetensors"))
    assert any("mixed factor dtypes" in w for w in d.warnings)
    t["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"] = torch.ones(H, 4, dtype=torch.int8)
    save_file(t, str(tmp_path / "int.safetensors"))
    d, _ = _one(str(tmp_path / "int.safetensors"))
    # integer factors are refused at header level (parse): the verdict is INVALID, naming the key and dtype
    assert d.verdict == "INVALID" and "I8" in d.summary and "img_attn_proj.lora_up.weight" in d.summary


def test_stale_hash_warning(tmp_path) -> None:
    p = _lora(tmp_path / "s.safetensors", {"lora_unet_double_blocks_0_img_attn_proj": (H, H)},
              meta={"sshs_model_hash": "0" * 64, "ss_network_dim": "4"})
    d, _ = _one(p)
    assert any("sshs_model_hash" in w and "--rehash" in w for w in d.warnings)


def test_invalid_inputs_are_verdicts_not_exceptions(tmp_path, bases, capsys) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00")
    d, _ = _one(str(tmp_path / "junk.safetensors"), bases["dev"])
    assert d.verdict == INVALID and d.error["type"] == "HeaderError"
    d, _ = _one(bases["schnell"], bases["dev"])       # a base model given as LoRA
    assert d.verdict == INVALID and d.error["type"] == "NotALoraError"
    with pytest.raises(NotALoraError):               # a LoRA given as base is a usage error
        doctor([bases["dev"]], write_aitoolkit_lora(tmp_path / "l.safetensors"))
    rc = main(["doctor", str(tmp_path / "junk.safetensors"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 2 and out["exit_code"] == 2 and out["loras"][0]["verdict"] == "INVALID"


def test_worst_verdict_sets_exit_code_and_json(tmp_path, bases, capsys) -> None:
    ok = write_aitoolkit_lora(tmp_path / "ok.safetensors")
    part = write_sdscripts_lora(tmp_path / "te.safetensors")
    rc = main(["doctor", ok, part, "--base", bases["dev"], "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and [x["verdict"] for x in out["loras"]] == ["OK", "PARTIAL"]
    assert out["base"]["variant"] == "dev"
    assert out["loras"][0]["info"]["format"] == "diffusers"


def test_portability_note_for_lycoris_format(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    t = {"lycoris_transformer_blocks_0_attn_to_out_0.lora_down.weight": torch.randn(4, H, generator=g),
         "lycoris_transformer_blocks_0_attn_to_out_0.lora_up.weight": torch.randn(H, 4, generator=g)}
    d, _ = _one(save_tensors(tmp_path / "ly.safetensors", t))
    assert d.verdict == OK and any("lorakit convert --to kohya" in n for n in d.notes)


def test_kontext_metadata_note(tmp_path, bases) -> None:
    p = _lora(tmp_path / "k.safetensors", {"lora_unet_double_blocks_0_img_attn_proj": (H, H)},
              meta={"modelspec.architecture": "flux-1-kontext-dev/lora"})
    d, _ = _one(p, bases["dev"])
    assert d.verdict == OK and any("Kontext" in n for n in d.notes)


def test_complete_module_with_unknown_name_is_not_called_incomplete(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from lorakit.ops.diagnose import doctor
    from lorakit.samples.synthetic import write_base, write_sdscripts_lora
    src = write_sdscripts_lora(tmp_path / "k.safetensors", rank=4, alpha=2.0, clip=None)
    t = load_file(src)
    t["lora_unet_bogus_module.lora_down.weight"] = torch.zeros(4, 32)
    t["lora_unet_bogus_module.lora_up.weight"] = torch.zeros(32, 4)
    path = str(tmp_path / "u.safetensors")
    save_file(t, path)
    rep = doctor([path], write_base(tmp_path / "b.safetensors")).loras[0]
    assert rep.verdict == "PARTIAL"
    assert "not FLUX.1 module names" in rep.summary and "missing their" not in rep.summary
