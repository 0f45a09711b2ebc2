"""The coverage gate: a bake that would apply only part of a LoRA (or nothing) stops before writing,
names the cause, and --allow-partial bakes the rest and reports what was skipped."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.cli import main
from lorakit.errors import CoverageError, UnsupportedArchitectureError
from test_bake_util import TINY_CLIP, TINY_FLUX, expected_native, make_base, native_state, write_kohya_all


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(["bake", *argv])
    cap = capsys.readouterr()
    return rc, cap.err + cap.out


def _nothing_written(tmp_path, before: set[str]) -> None:
    assert set(os.listdir(tmp_path)) == before, "an output or temporary file was left behind"


def test_sdxl_lora_is_refused_with_both_architectures_named(tmp_path, capsys):
    base = make_base(tmp_path, "bfl")
    g = torch.Generator().manual_seed(0)
    t = {}
    for stem, (out, inp) in (("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k", (640, 640)),
                             ("lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_v", (1280, 2048)),
                             ("lora_te2_text_model_encoder_layers_0_self_attn_k_proj", (1280, 1280))):
        t[f"{stem}.lora_down.weight"] = torch.randn(4, inp, generator=g)
        t[f"{stem}.lora_up.weight"] = torch.randn(out, 4, generator=g)
        t[f"{stem}.alpha"] = torch.tensor(4.0)
    lora = str(tmp_path / "sdxl.safetensors")
    save_file(t, lora)
    before = set(os.listdir(tmp_path))
    rc, text = _run(capsys, base, lora, "-o", str(tmp_path / "out.safetensors"))
    assert rc != 0
    assert "SDXL" in text and "FLUX.1-dev" in text
    _nothing_written(tmp_path, before)
    with pytest.raises(UnsupportedArchitectureError):
        lorakit.bake(base, [lora], str(tmp_path / "out.safetensors"), allow_partial=True)


def test_fill_lora_on_dev_base(tmp_path, capsys):
    base = make_base(tmp_path, "diffusers")
    lora = str(tmp_path / "fill.safetensors")
    write_kohya_all(lora, modules=["double_blocks.0.img_attn.qkv", "single_blocks.1.linear2"])
    g = torch.Generator().manual_seed(1)
    t = load_file(lora)
    t["lora_unet_img_in.lora_down.weight"] = torch.randn(4, 384, generator=g)   # FLUX Fill: 384 input channels
    t["lora_unet_img_in.lora_up.weight"] = torch.randn(TINY_FLUX["H"], 4, generator=g)
    t["lora_unet_img_in.alpha"] = torch.tensor(4.0)
    save_file(t, lora)
    before = set(os.listdir(tmp_path))
    out = str(tmp_path / "out.safetensors")
    rc, text = _run(capsys, base, lora, "-o", out)
    assert rc != 0
    assert "Fill" in text and "in-features 384 vs 16" in text and "img_in" in text
    _nothing_written(tmp_path, before)
    # --allow-partial: bake the rest, report img_in
    rc, text = _run(capsys, base, lora, "-o", out, "--allow-partial", "--json")
    assert rc == 1          # partial (opted in): exit 1, also with --json
    rep = json.loads(text[text.index("{"):])
    assert [s["module"] for s in rep["skipped"]] == ["img_in"]
    assert rep["inputs"][0]["applied"] == 2 and rep["inputs"][0]["skipped"] == 1
    assert torch.equal(load_file(out)["x_embedder.weight"], load_file(base)["x_embedder.weight"])
    assert not torch.equal(load_file(out)["single_transformer_blocks.1.proj_out.weight"],
                           load_file(base)["single_transformer_blocks.1.proj_out.weight"])


def test_guidance_lora_on_schnell_base(tmp_path, capsys):
    base = make_base(tmp_path, "bfl", params={**TINY_FLUX, "guidance": 0})
    lora = write_kohya_all(str(tmp_path / "dev.safetensors"),
                           modules=["guidance_in.in_layer", "guidance_in.out_layer", "double_blocks.1.img_mlp.0"])
    before = set(os.listdir(tmp_path))
    out = str(tmp_path / "out.safetensors")
    rc, text = _run(capsys, base, lora, "-o", out)
    assert rc != 0
    assert "schnell" in text and "guidance_in.in_layer" in text and "no guidance layers" in text
    _nothing_written(tmp_path, before)
    r = lorakit.bake(base, [lora], out, allow_partial=True)
    assert sorted(s["module"] for s in r.skipped) == ["guidance_in.in_layer", "guidance_in.out_layer"]
    assert r.changed == 1


def test_modulation_lora_on_chroma_base(tmp_path):
    base = make_base(tmp_path, "bfl", params={**TINY_FLUX, "modulation": 0, "guidance": 0})
    lora = write_kohya_all(str(tmp_path / "flux.safetensors"),
                           modules=["double_blocks.0.img_mod.lin", "single_blocks.0.modulation.lin",
                                    "final_layer.adaLN_modulation.1", "single_blocks.0.linear2"])
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(CoverageError, match="no modulation layers") as exc:
        lorakit.bake(base, [lora], out)
    assert "Chroma" in str(exc.value) and len(exc.value.unmatched) == 3
    assert not os.path.exists(out)
    r = lorakit.bake(base, [lora], out, allow_partial=True)
    assert len(r.skipped) == 3 and r.changed == 1


def test_partially_matching_lora_more_blocks_than_base(tmp_path, capsys):
    base = make_base(tmp_path, "sharded")
    lora = write_kohya_all(str(tmp_path / "big.safetensors"), params={**TINY_FLUX, "double": 3, "single": 2})
    before = set(os.listdir(tmp_path))
    out = str(tmp_path / "out")
    rc, text = _run(capsys, base, lora, "-o", out)
    assert rc != 0 and "block 2 is beyond the base's 2 double blocks" in text
    _nothing_written(tmp_path, before)
    rc, text = _run(capsys, base, lora, "-o", out, "--allow-partial")
    assert rc == 1 and "skipped" in text     # partial (opted in): exit 1
    # the modules that fit are baked exactly
    got, exp = native_state(out), expected_native(base, [])
    model = lorakit.read_lora(lora)
    from lorakit.lora.model import dense_deltas
    for target, d in dense_deltas(model).items():
        if not target.module.startswith("double_blocks.2."):
            exp[f"{target.module}.weight"] = exp[f"{target.module}.weight"] + d
    for k, v in exp.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=2e-6)


def test_no_op_bakes_are_errors(tmp_path, capsys):
    base = make_base(tmp_path, "bfl")
    lora = write_kohya_all(str(tmp_path / "k.safetensors"), modules=["img_in"])
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(CoverageError, match="every LoRA weight is 0"):
        lorakit.bake(base, [(lora, 0.0)], out)
    te_only = write_kohya_all(str(tmp_path / "te.safetensors"), modules=[], clip=TINY_CLIP)
    rc, text = _run(capsys, base, te_only, "-o", out)
    assert rc != 0 and "nothing to bake" in text
    assert not os.path.exists(out)


def test_unknown_keys_need_allow_partial(tmp_path):
    base = make_base(tmp_path, "bfl")
    lora = write_kohya_all(str(tmp_path / "k.safetensors"), modules=["img_in", "txt_in"])
    t = load_file(lora)
    t["lora_unet_mystery_layer.lora_down.weight"] = torch.zeros(4, 8)
    t["lora_unet_mystery_layer.lora_up.weight"] = torch.zeros(8, 4)
    save_file(t, lora)
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(CoverageError, match="not understood"):
        lorakit.bake(base, [lora], out)
    assert not os.path.exists(out)
    r = lorakit.bake(base, [lora], out, allow_partial=True)
    assert len(r.skipped) == 2 and r.changed == 2
