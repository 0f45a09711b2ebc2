"""lorakit extract on SDXL / SD1.5-shaped single-file checkpoints: known low-rank deltas ΔW = B·A added by this test
to UNet Linear layers, 3×3 and 1×1 convolutions, a CLIP-L weight, the q rows of an OpenCLIP fused ``in_proj_weight``
and OpenCLIP's ``text_projection`` (stored transposed) are recovered; lower ranks lose exactly the test's own SVD
truncation error; an unchanged text encoder is not written (sd-scripts' rule); different architectures are refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.cli.main import main
from lorakit.errors import ArchitectureError, UsageError
from lorakit.formats import read_lora
from lorakit.layouts import resolve
from lorakit.lora.model import Target, dense_deltas
from lorakit.samples.synthetic import PASSTHROUGH_SD, TINY_SD, TINY_TE, write_checkpoint

C = TINY_SD["sdxl"]["C"]
G = TINY_TE["clip_g"]["D"]
UNET = "model.diffusion_model."
TE1 = "conditioner.embedders.0.transformer."
TE2 = "conditioner.embedders.1.model."
SD1_TE = "cond_stage_model.transformer."

# (component, native module, checkpoint key, ΔW shape (out, in, *kernel), true rank, rows of the stored tensor,
#  stored transposed)
SDXL_DELTAS = (
    ("unet", "input_blocks.4.1.transformer_blocks.1.attn1.to_q",
     UNET + "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight", (2 * C, 2 * C), 3, None, False),
    ("unet", "input_blocks.4.1.transformer_blocks.0.attn2.to_k",
     UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", (2 * C, 2048), 2, None, False),
    ("unet", "input_blocks.1.0.in_layers.2", UNET + "input_blocks.1.0.in_layers.2.weight", (C, C, 3, 3), 3, None,
     False),
    ("unet", "input_blocks.4.0.skip_connection", UNET + "input_blocks.4.0.skip_connection.weight", (2 * C, C, 1, 1),
     2, None, False),
    ("clip_l", "text_model.encoder.layers.0.self_attn.q_proj",
     TE1 + "text_model.encoder.layers.0.self_attn.q_proj.weight", (768, 768), 2, None, False),
    ("clip_g", "transformer.resblocks.1.attn", TE2 + "transformer.resblocks.1.attn.in_proj_weight", (G, G), 3, (0, G),
     False),
    ("clip_g", "text_projection", TE2 + "text_projection", (G, G), 2, None, True),
)
SD1_DELTAS = (
    ("unet", "input_blocks.1.1.proj_in", UNET + "input_blocks.1.1.proj_in.weight", (C, C, 1, 1), 2, None, False),
    ("unet", "input_blocks.1.0.in_layers.2", UNET + "input_blocks.1.0.in_layers.2.weight", (C, C, 3, 3), 2, None,
     False),
    ("unet", "output_blocks.5.1.transformer_blocks.0.attn2.to_v",
     UNET + "output_blocks.5.1.transformer_blocks.0.attn2.to_v.weight", (4 * C, 768), 3, None, False),
)


def known_deltas(spec, seed: int) -> dict[tuple[str, str], torch.Tensor]:
    """ΔW = B·A (native orientation, out × in × *kernel) per (component, module); max |ΔW| well above 0.01."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for comp, mod, _key, shape, rank, _rows, _tr in spec:
        b = torch.randn(shape[0], rank, generator=g) * 0.2
        a = torch.randn(rank, math.prod(shape[1:]), generator=g) * 0.2
        out[(comp, mod)] = (b @ a).reshape(shape)
    return out


def write_tuned(base_path: str, path, spec, deltas, extra=None) -> str:
    """The base with every ΔW added where the checkpoint stores it (q rows of in_proj; Pᵀ for text_projection)."""
    tensors = load_file(base_path)
    for comp, mod, key, _shape, _rank, rows, transposed in spec:
        d = deltas[(comp, mod)]
        d = d.T if transposed else d
        if rows is None:
            tensors[key] = tensors[key] + d
        else:
            tensors[key] = tensors[key].clone()
            tensors[key][rows[0]:rows[1]] += d
    tensors.update(extra or {})
    save_file(tensors, str(path))
    return str(path)


def fused(comp: str, mod: str, d: torch.Tensor) -> torch.Tensor:
    """ΔW of the whole native module: the q window of OpenCLIP's fused 3·G × G attention weight, zeros elsewhere."""
    if mod.endswith(".attn"):
        return torch.cat([d, torch.zeros(2 * G, G)])
    return d


def written(path) -> dict[tuple[str, str], torch.Tensor]:
    """Dense ΔW per (component, native module) of a LoRA file, read back by lorakit."""
    return {(t.component, t.module): d for t, d in dense_deltas(read_lora(path)).items()}


def truncation_error(d: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(d.flatten(1).double())
    return float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdxl-extract")
    base = write_checkpoint(d / "base.safetensors", resolve("sdxl"),
                            {"unet": TINY_SD["sdxl"], "clip_l": TINY_TE["clip_l"], "clip_g": TINY_TE["clip_g"]},
                            dtype=torch.float32, extra=PASSTHROUGH_SD)
    deltas = known_deltas(SDXL_DELTAS, seed=11)
    tuned = write_tuned(base, d / "tuned.safetensors", SDXL_DELTAS, deltas)
    return d, base, tuned, deltas


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd1-extract")
    base = write_checkpoint(d / "base.safetensors", resolve("sd1"),
                            {"unet": TINY_SD["sd1"], "clip_l": TINY_TE["clip_l"]}, dtype=torch.float32,
                            extra=PASSTHROUGH_SD)
    deltas = known_deltas(SD1_DELTAS, seed=12)
    tuned = write_tuned(base, d / "tuned.safetensors", SD1_DELTAS, deltas)
    return d, base, tuned, deltas


# ---------------------------------------------------------------------------------------------
# Recovery at ranks ≥ the true ranks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_sdxl_known_deltas_are_recovered_in_every_component(sdxl, fmt) -> None:
    d, base, tuned, deltas = sdxl
    out = d / f"lora-{fmt}.safetensors"
    rep = lorakit.extract(base, tuned, out, rank=4, conv_rank=4, to=fmt, dtype=torch.float32)
    assert read_lora(out).format == fmt
    got = written(out)
    assert set(got) == set(deltas)                          # nothing else changed, nothing else written
    for (comp, mod), want in deltas.items():
        assert rel(got[(comp, mod)], fused(comp, mod, want)) <= 1e-4, (comp, mod)
    assert sorted(e["component"] for e in rep.text_encoders if e["extracted"]) == ["clip_g", "clip_l"]
    assert rep.components == ["unet", "clip_l", "clip_g"] and not rep.unpaired and not rep.convs_left_out
    assert rep.architecture == "sdxl"
    by_name = {m.module: m for m in rep.modules}
    assert by_name["clip_g:transformer.resblocks.1.attn"].shape == (3 * G, G)
    conv = by_name["input_blocks.1.0.in_layers.2"]
    assert conv.rank == 4 and conv.shape == (C, C, 3, 3) and conv.relative_error <= 1e-4   # --conv-rank 4 (true 3)
    meta = safe_open(str(out), "pt").metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4.0"}


def test_sdxl_kohya_factors_are_sd_scripts_shaped(sdxl) -> None:
    """Raw factors: 3×3 conv down (r, in, 3, 3) / up (out, r, 1, 1); 1×1 conv (r, in, 1, 1) / (out, r, 1, 1) at --rank;
    the fused in_proj written as te2 q/k/v; text_projection under its HF name; B·A·α/r is the known ΔW."""
    d, base, tuned, deltas = sdxl
    out = d / "raw.safetensors"
    lorakit.extract(base, tuned, out, rank=4, conv_rank=5, dtype=torch.float32, exact=True)
    t = load_file(out)
    stems = {k.rsplit(".", 2)[0] for k in t if k.endswith(".lora_down.weight")}
    assert {"lora_te2_text_model_encoder_layers_1_self_attn_q_proj",
            "lora_te2_text_projection", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"} <= stems

    def factors(stem):
        down, up, alpha = t[stem + ".lora_down.weight"], t[stem + ".lora_up.weight"], float(t[stem + ".alpha"])
        return down, up, (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0])

    down, up, dw = factors("lora_unet_input_blocks_1_0_in_layers_2")
    assert down.shape == (5, C, 3, 3) and up.shape == (C, 5, 1, 1)   # --conv-rank 5 (the true rank is 3)
    assert rel(dw.reshape(C, C, 3, 3), deltas[("unet", "input_blocks.1.0.in_layers.2")]) <= 1e-4
    down, up, dw = factors("lora_unet_input_blocks_4_0_skip_connection")
    assert down.shape == (4, C, 1, 1) and up.shape == (2 * C, 4, 1, 1)     # --rank 4, not --conv-rank
    assert rel(dw.reshape(2 * C, C, 1, 1), deltas[("unet", "input_blocks.4.0.skip_connection")]) <= 1e-4
    _d, _u, dw = factors("lora_te2_text_projection")
    assert rel(dw, deltas[("clip_g", "text_projection")]) <= 1e-4          # native (HF, out × in) orientation
    _d, _u, dw = factors("lora_te2_text_model_encoder_layers_1_self_attn_q_proj")
    assert rel(dw, deltas[("clip_g", "transformer.resblocks.1.attn")]) <= 1e-4


def test_sdxl_extracted_lora_bakes_back_to_the_tuned_model(sdxl) -> None:
    d, base, tuned, _deltas = sdxl
    out = d / "roundtrip.safetensors"
    lorakit.extract(base, tuned, out, rank=4, conv_rank=4, dtype=torch.float32)
    baked = d / "baked.safetensors"
    lorakit.bake(base, [str(out)], str(baked), progress=False)
    want, got = load_file(tuned), load_file(baked)
    for k, v in want.items():
        assert float((got[k] - v).abs().max()) <= 1e-5, k


# ---------------------------------------------------------------------------------------------
# Lower ranks: the error is the SVD truncation error
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exact", [False, True])
def test_lower_rank_loses_exactly_the_truncation_error(sdxl, exact) -> None:
    d, base, tuned, deltas = sdxl
    out = d / f"low-{exact}.safetensors"
    rep = lorakit.extract(base, tuned, out, rank=1, conv_rank=2, dtype=torch.float32, exact=exact)
    got = written(out)
    reported = {m.module if m.component == "unet" else m.module.split(":", 1)[1]: m for m in rep.modules}
    for (comp, mod), want in deltas.items():
        k = 2 if len(want.shape) == 4 and want.shape[2:] != (1, 1) else 1     # 1×1 convs take --rank
        expected = truncation_error(want, k)
        assert expected > 0.05
        assert rel(got[(comp, mod)], fused(comp, mod, want)) == pytest.approx(expected, rel=1e-3), (comp, mod)
        assert reported[mod].relative_error == pytest.approx(expected, rel=1e-3) and reported[mod].rank == k


# ---------------------------------------------------------------------------------------------
# Text encoders: sd-scripts' rule
# ---------------------------------------------------------------------------------------------

def test_sd1_unchanged_text_encoder_is_not_written(sd1) -> None:
    d, base, tuned, deltas = sd1
    out = d / "sd1.safetensors"
    rep = lorakit.extract(base, tuned, out, rank=4, conv_rank=4, dtype=torch.float32)
    assert rep.architecture == "sd1" and rep.text_encoders == [
        {"component": "clip_l", "label": "CLIP-L", "max_abs_diff": 0.0, "extracted": False}]
    assert not any(k.startswith("lora_te") for k in load_file(out))
    got = written(out)
    assert set(got) == set(deltas)
    for key, want in deltas.items():
        assert rel(got[key], want) <= 1e-4, key
    assert safe_open(str(out), "pt").metadata()["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_text_encoder_threshold_is_per_encoder(sdxl, tmp_path) -> None:
    """CLIP-L changed by at most 0.005 everywhere (≤ sd-scripts' 0.01): left out, while OpenCLIP-G (changed) is
    extracted; --te-min-diff 0 extracts it too."""
    _d, base, _tuned, deltas = sdxl
    only_g = tuple(x for x in SDXL_DELTAS if x[0] != "clip_l")
    key = TE1 + "text_model.encoder.layers.1.mlp.fc1.weight"
    small = load_file(base)[key] + 0.005
    tuned = write_tuned(base, tmp_path / "t.safetensors", only_g, deltas, extra={key: small})
    rep = lorakit.extract(base, tuned, tmp_path / "a.safetensors", rank=4, conv_rank=4, dtype=torch.float32)
    enc = {e["component"]: e for e in rep.text_encoders}
    assert not enc["clip_l"]["extracted"] and enc["clip_l"]["max_abs_diff"] == pytest.approx(0.005, rel=1e-3)
    assert enc["clip_g"]["extracted"]
    keys = load_file(tmp_path / "a.safetensors")
    assert not any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    rep = lorakit.extract(base, tuned, tmp_path / "b.safetensors", rank=4, conv_rank=4, te_min_diff=0,
                          dtype=torch.float32)
    got = written(tmp_path / "b.safetensors")
    fc1 = torch.full((TINY_TE["clip_l"]["FF"], 768), 0.005)
    assert rel(got[("clip_l", "text_model.encoder.layers.1.mlp.fc1")], fc1) <= 1e-3
    assert all(e["extracted"] for e in rep.text_encoders)


# ---------------------------------------------------------------------------------------------
# Convolutions without --conv-rank, refusals, CLI
# ---------------------------------------------------------------------------------------------

def test_3x3_convs_need_conv_rank_as_in_sd_scripts(sd1) -> None:
    d, base, tuned, deltas = sd1
    out = d / "noconv.safetensors"
    rep = lorakit.extract(base, tuned, out, rank=4, dtype=torch.float32)
    assert rep.convs_left_out == ["input_blocks.1.0.in_layers.2"]
    assert any("--conv-rank" in w for w in rep.warnings)
    got = written(out)
    assert set(got) == {("unet", "input_blocks.1.1.proj_in"), ("unet", "output_blocks.5.1.transformer_blocks.0.attn2.to_v")}
    assert rel(got[("unet", "input_blocks.1.1.proj_in")], deltas[("unet", "input_blocks.1.1.proj_in")]) <= 1e-4


def test_different_architectures_are_refused_naming_both(sdxl, sd1, tmp_path) -> None:
    _d, xl_base, _t, _dx = sdxl
    _d1, sd1_base, sd1_tuned, _ds = sd1
    with pytest.raises(ArchitectureError, match=r"ORIGINAL is SD 1\.x.*TUNED is SDXL"):
        lorakit.extract(sd1_base, xl_base, tmp_path / "x.safetensors", rank=4)
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ArchitectureError, match=r"ORIGINAL is SDXL.*TUNED is SD 1\.x"):
        lorakit.extract(xl_base, sd1_tuned, tmp_path / "x.safetensors", rank=4)


def test_identical_sd_models_are_an_error(sd1, tmp_path) -> None:
    _d, base, _t, _ds = sd1
    with pytest.raises(UsageError, match="identical"):
        lorakit.extract(base, base, tmp_path / "x.safetensors", rank=4)


def test_cli_flags_and_aliases(sdxl, tmp_path, capsys) -> None:
    _d, base, tuned, deltas = sdxl
    out = tmp_path / "cli.safetensors"
    rc = main(["extract", "--model_org", base, "--model_tuned", tuned, "--save_to", str(out), "--dim", "4",
               "--conv_dim", "4", "--te_min_diff", "0.01", "--save_precision", "float", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["conv_rank"] == 4 and rep["te_min_diff"] == 0.01 and rep["architecture"] == "sdxl"
    assert {e["component"] for e in rep["text_encoders"] if e["extracted"]} == {"clip_l", "clip_g"}
    got = written(out)
    assert rel(got[("unet", "input_blocks.1.0.in_layers.2")], deltas[("unet", "input_blocks.1.0.in_layers.2")]) <= 1e-4
    rc = main(["extract", base, tuned, "-o", str(tmp_path / "cli2.safetensors"), "--rank", "1", "--conv-rank", "2",
               "--te-min-diff", "1.0"])
    err = capsys.readouterr().err
    assert rc == 0 and "not extracted" in err and "OpenCLIP ViT-bigG" in err
    keys = load_file(tmp_path / "cli2.safetensors")
    assert not any(k.startswith("lora_te") for k in keys)
    assert keys["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape == (2, C, 3, 3)
    assert main(["extract", base, tuned, "-o", str(tmp_path / "plan.safetensors"), "--rank", "2", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "needs --conv-rank" in text and "transformer.resblocks.1.attn.in_proj_weight" in text
    assert "(transposed)" in text and not (tmp_path / "plan.safetensors").exists()
