"""The convert CLI: dtypes (sd-scripts spellings), per-format alpha/metadata, provenance, dry run, no overwrite."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.cli import main
from lorakit.formats import read_lora
from lorakit.lora.model import dense_deltas

H = 32


def kohya_input(path, *, ranks: dict[str, int] | None = None, alpha: float = 2.0, meta: dict | None = None) -> str:
    """A kohya FLUX LoRA with rank 4 (or per-module ranks), alpha ≠ rank, fused qkv/linear1 and final layer."""
    g = torch.Generator().manual_seed(5)
    mods = {"double_blocks_0_img_attn_qkv": (3 * H, H), "double_blocks_0_img_attn_proj": (H, H),
            "double_blocks_1_txt_mlp_0": (4 * H, H), "single_blocks_0_linear1": (7 * H, H),
            "single_blocks_1_linear2": (H, 5 * H), "final_layer_adaLN_modulation_1": (2 * H, H),
            "final_layer_linear": (16, H)}
    t = {}
    for name, (o, i) in mods.items():
        r = (ranks or {}).get(name, 4)
        t[f"lora_unet_{name}.lora_down.weight"] = torch.randn(r, i, generator=g) * 0.2
        t[f"lora_unet_{name}.lora_up.weight"] = torch.randn(o, r, generator=g) * 0.2
        t[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
    save_file(t, str(path), metadata=meta or {"ss_network_module": "networks.lora_flux", "ss_network_dim": "16",
                                              "ss_network_alpha": "16", "ss_output_name": "mine",
                                              "sshs_model_hash": "stale", "modelspec.title": "old"})
    return str(path)


def meta_of(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as fh:
        return dict(fh.metadata() or {})


def rel_err(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


@pytest.mark.parametrize("flag", ["--dtype", "--save-precision", "--save_precision"])
@pytest.mark.parametrize("spelling, dtype", [("float", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16),
                                             ("fp8_e4m3fn", torch.float8_e4m3fn)])
def test_dtype_spellings(tmp_path, capsys, flag, spelling, dtype) -> None:
    src = kohya_input(tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    assert main(["convert", src, "-o", str(out), "--to", "kohya", flag, spelling]) == 0
    tensors = load_file(str(out))
    factors = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    assert {v.dtype for v in factors.values()} == {dtype}
    inp = load_file(src)
    for k, v in factors.items():
        assert torch.equal(v.float(), inp[k].to(dtype).float()), k


def test_unknown_dtype_is_usage_error(tmp_path, capsys) -> None:
    src = kohya_input(tmp_path / "in.safetensors")
    assert main(["convert", src, "-o", str(tmp_path / "o.safetensors"), "--to", "kohya", "--dtype", "fp7"]) == 2
    err = capsys.readouterr().err.strip()
    assert "fp7" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("target", ["kohya", "comfy"])
def test_kohya_style_output_has_alpha_per_module(tmp_path, target) -> None:
    src = kohya_input(tmp_path / "in.safetensors", ranks={"double_blocks_0_img_attn_proj": 2})
    out = tmp_path / "out.safetensors"
    assert main(["convert", src, "-o", str(out), "--to", target]) == 0
    t = load_file(str(out))
    stems = {k[: -len(".lora_down.weight")] for k in t if k.endswith(".lora_down.weight")}
    assert stems and all(f"{s}.alpha" in t for s in stems)
    assert {k for k in t if k.endswith(".alpha")} == {f"{s}.alpha" for s in stems}
    meta = meta_of(out)
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "2"
    assert rel_err(dense_deltas(read_lora(out)), dense_deltas(read_lora(src))) < 1e-6


@pytest.mark.parametrize("target", ["kohya", "comfy"])
def test_alpha_written_even_when_input_has_none(tmp_path, target) -> None:
    """AI-Toolkit files store no α (α = r); kohya-style output still needs an .alpha for every module."""
    g = torch.Generator().manual_seed(1)
    t = {}
    for name, o in (("transformer_blocks.0.attn.to_q", H), ("transformer_blocks.0.attn.to_k", H),
                    ("transformer_blocks.0.attn.to_v", H), ("single_transformer_blocks.0.proj_out", H)):
        i = 5 * H if "proj_out" in name else H
        t[f"transformer.{name}.lora_A.weight"] = torch.randn(4, i, generator=g)
        t[f"transformer.{name}.lora_B.weight"] = torch.randn(o, 4, generator=g)
    src = str(tmp_path / "aitk.safetensors")
    save_file(t, src)
    out = tmp_path / "out.safetensors"
    assert main(["convert", src, "-o", str(out), "--to", target]) == 0
    res = load_file(str(out))
    stems = {k[: -len(".lora_down.weight")] for k in res if k.endswith(".lora_down.weight")}
    assert len(stems) == 2 and all(f"{s}.alpha" in res for s in stems)
    assert {float(res[f"{s}.alpha"]) for s in stems} == {12.0, 4.0}       # fused qkv: 3 x rank 4, scale 1
    assert rel_err(dense_deltas(read_lora(out)), dense_deltas(read_lora(src))) < 1e-6


def test_ss_network_keys_updated(tmp_path) -> None:
    src = kohya_input(tmp_path / "in.safetensors", alpha=3.0)
    out = tmp_path / "out.safetensors"
    assert main(["convert", src, "-o", str(out), "--to", "kohya"]) == 0
    meta = meta_of(out)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "3"   # was "16"/"16"
    assert meta["ss_output_name"] == "mine"          # carried over
    assert meta["modelspec.title"] == "old"         # the user's title is kept


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule (peft.utils.other.get_pattern_key): the first key with re.match(rf"(.*\\.)?({key})$")."""
    try:
        from peft.utils.other import get_pattern_key
        key = get_pattern_key(list(patterns), module)
        return patterns.get(key, default)
    except ImportError:  # pragma: no cover
        for key, v in patterns.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return v
        return default


def test_diffusers_output_scale_in_factors_and_metadata_agrees(tmp_path) -> None:
    src = kohya_input(tmp_path / "in.safetensors", ranks={"double_blocks_0_img_attn_proj": 2,
                                                          "single_blocks_1_linear2": 8}, alpha=3.0)
    out = tmp_path / "out.safetensors"
    assert main(["convert", src, "-o", str(out), "--to", "diffusers"]) == 0
    t = load_file(str(out))
    assert not any(k.endswith(".alpha") for k in t)
    meta = meta_of(out)
    cfg = json.loads(meta["lora_adapter_metadata"])
    ranks = {k[len("transformer."): -len(".lora_A.weight")]: int(v.shape[0]) for k, v in t.items()
             if k.endswith(".lora_A.weight")}
    assert set(cfg["transformer.target_modules"]) == set(ranks)
    assert len(set(ranks.values())) > 1                 # rank_pattern really is exercised
    for module, r in ranks.items():
        cfg_r = _pattern_value(cfg["transformer.rank_pattern"], module, cfg["transformer.r"])
        cfg_a = _pattern_value(cfg["transformer.alpha_pattern"], module, cfg["transformer.lora_alpha"])
        assert cfg_r == r, module
        assert cfg_a == r, module                       # scale 1: α already folded into the factors
    assert cfg["transformer.use_rslora"] is False and cfg["transformer.use_dora"] is False
    assert meta["ss_network_alpha"] == meta["ss_network_dim"] == "Dynamic"
    # the scale lives in the factors: plain B·A equals the source's (α/r)·B·A
    got = read_lora(out)
    assert all(p.adapter.alpha is None or p.adapter.alpha == p.adapter.rank for p in got.patches)
    assert rel_err(dense_deltas(got), dense_deltas(read_lora(src))) < 1e-6


def test_provenance_and_hashes(tmp_path) -> None:
    src = kohya_input(tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    assert main(["convert", src, "-o", str(out), "--to", "diffusers"]) == 0
    meta = meta_of(out)
    prov = json.loads(meta["lorakit.provenance"])
    assert prov["tool"] == "lorakit" and prov["operation"] == "convert"
    assert prov["inputs"] == [{"file": "in.safetensors", "format": "kohya",
                               "sha256": hashlib.sha256(open(src, "rb").read()).hexdigest()}]
    assert prov.get("target_format") == "diffusers"
    data = open(out, "rb").read()
    n = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()     # not the stale input hash
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]


def test_dry_run_writes_nothing(tmp_path, capsys) -> None:
    src = kohya_input(tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    before = sorted(os.listdir(tmp_path))
    assert main(["convert", src, "-o", str(out), "--to", "diffusers", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] is True and report["source_format"] == "kohya" and report["modules_out"] > 0
    assert sorted(os.listdir(tmp_path)) == before
    assert main(["convert", src, "--to", "kohya", "--dry-run"]) == 0      # no -o needed


def test_refuses_to_overwrite_input(tmp_path, capsys) -> None:
    src = kohya_input(tmp_path / "in.safetensors")
    before = open(src, "rb").read()
    link = tmp_path / "link.safetensors"
    os.symlink(src, link)
    hard = tmp_path / "hard.safetensors"
    os.link(src, hard)
    for out in (src, str(link), str(hard)):
        capsys.readouterr()
        assert main(["convert", src, "-o", out, "--to", "kohya"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "overwrite" in err[0]
    assert open(src, "rb").read() == before


def test_cli_lossy_refusal_and_allow_lossy(tmp_path, capsys) -> None:
    t = {}
    g = torch.Generator().manual_seed(9)
    for part in "qkv":
        stem = f"lycoris_transformer_blocks_0_attn_to_{part}"
        t[stem + ".lokr_w1"] = torch.randn(2, 4, generator=g)
        t[stem + ".lokr_w2"] = torch.randn(16, 8, generator=g)
    src = str(tmp_path / "lyco.safetensors")
    save_file(t, src)
    out = tmp_path / "out.safetensors"
    capsys.readouterr()
    # by default the LoKr parts become exact plain LoRA factors, which fuse block-diagonally (issue 11)
    plain = tmp_path / "plain.safetensors"
    assert main(["convert", src, "-o", str(plain), "--to", "kohya"]) == 0
    assert "3 lokr → rank 16" in capsys.readouterr().err
    assert not any(".lokr_" in k for k in load_file(str(plain)))
    assert rel_err(dense_deltas(read_lora(plain)), dense_deltas(read_lora(src))) < 1e-6
    # kept as LoKr, three different second factors cannot share one fused module: refused, then SVD'd
    assert main(["convert", src, "-o", str(out), "--to", "kohya", "--keep-algo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "double_blocks.0.img_attn.qkv" in err[0] and "--allow-lossy" in err[0]
    assert not out.exists()
    assert main(["convert", src, "-o", str(out), "--to", "kohya", "--keep-algo", "--allow-lossy"]) == 0
    err = capsys.readouterr().err
    m = re.search(r"LOSSY transformer:double_blocks\.0\.img_attn\.qkv: relative error ([0-9.e+-]+)", err)
    assert m and float(m.group(1)) < 1e-5
    meta = json.loads(meta_of(out)["lorakit.provenance"])
    assert meta["lossy"] == ["transformer:double_blocks.0.img_attn.qkv"]
    assert rel_err(dense_deltas(read_lora(out)), dense_deltas(read_lora(src))) < 1e-5


def test_partial_needs_opt_in(tmp_path, capsys) -> None:
    src = kohya_input(tmp_path / "in.safetensors")
    t = load_file(src)
    t["lora_unet_mystery_module.lora_down.weight"] = torch.zeros(4, 3)
    partial = str(tmp_path / "partial.safetensors")
    save_file(t, partial)
    out = tmp_path / "out.safetensors"
    assert main(["convert", partial, "-o", str(out), "--to", "comfy"]) == 2
    assert "mystery" in capsys.readouterr().err and not out.exists()
    assert main(["convert", partial, "-o", str(out), "--to", "comfy", "--allow-partial"]) == 1   # partial: exit 1
    assert "skipped 1 keys" in capsys.readouterr().err
    assert main(["convert", partial, "-o", str(tmp_path / "o2.safetensors"), "--to", "comfy", "--allow-partial",
                 "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["unknown_keys"] == ["lora_unet_mystery_module.lora_down.weight"]
    assert not any("mystery" in k for k in load_file(str(out)))
