"""Spellings written by trainers' own code (issue 11, item 2), read exactly.

Every fixture is written key by key with the producer's semantics (the producer's file is cited at each
fixture); every expected value is computed here by hand (B·A, kron, additions), never through lorakit's
name mapping or adapters.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.ops.baking import bake
from lorakit.ops.conversion import convert
from lorakit.errors import LorakitError, LossyConversionError, MergeError, NonFiniteError
from lorakit.formats import read_lora
from lorakit.ops.inspection import format_report, inspect_lora
from lorakit.ops.merging import merge
from lorakit.lora.model import Target, dense_deltas
from lorakit.samples.synthetic import TINY_FLUX, write_base

H, M, D, IN = TINY_FLUX["H"], TINY_FLUX["M"], TINY_FLUX["D"], TINY_FLUX["IN"]
T = "transformer"
Q0 = "double_blocks.0.img_attn.norm.query_norm.scale"
K0 = "double_blocks.0.img_attn.norm.key_norm.scale"
K1S = "single_blocks.1.norm.key_norm.scale"


def rnd(seed: int, *shape: int, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def deltas(path: str) -> dict[str, torch.Tensor]:
    model = read_lora(path)
    return {t.module: d for t, d in dense_deltas(model).items() if t.component == T}


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert (got.double() - want.double()).abs().max().item() <= 1e-6 * max(1.0, want.abs().max().item())


# ---------------------------------------------------------------------------------------------
# BFL control LoRA (FLUX.1 Canny/Depth dev LoRA)
# ---------------------------------------------------------------------------------------------
# black-forest-labs/flux src/flux/modules/lora.py: LinearLora keeps the Linear and adds
#   lora_B(lora_A(x)) * scale   (lora_A: Linear(in, rank, bias=False); lora_B: Linear(rank, out, bias=True))
# with scale 1.0 (FluxLoraWrapper lora_scale default) and no alpha. src/flux/util.py load_flow_model builds
# the model with in_channels=128 (configs "flux-dev-canny-lora"/"flux-dev-depth-lora"), zero-expands the
# base's img_in to 128 inputs (optionally_expand_state_dict) and load_state_dict()s the LoRA file over it:
# "loading the lora params + overwriting scale values in the norms" — the bare `…norm.query_norm.scale`
# tensors are the norms' new values, not differences.

CONTROL = dict(TINY_FLUX, IN=128)
CONTROL_MODULES = {          # native name -> (out, in)
    "img_in": (H, 128),
    "double_blocks.0.img_attn.qkv": (3 * H, H),
    "double_blocks.1.txt_mlp.0": (M, H),
    "single_blocks.0.linear1": (3 * H + M, H),
    "final_layer.linear": (IN, H),
}
CONTROL_NORMS = {Q0: 1.0, K0: 0.5, K1S: 2.0}     # replacement values (offsets of 1: RMSNorm scales near 1)


def control_tensors(rank: int = 4) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {}
    for i, (name, (out, inp)) in enumerate(CONTROL_MODULES.items()):
        t[f"{name}.lora_A.weight"] = rnd(10 + i, rank, inp)
        t[f"{name}.lora_B.weight"] = rnd(20 + i, out, rank)
        t[f"{name}.lora_B.bias"] = rnd(30 + i, out)
    for i, (name, off) in enumerate(CONTROL_NORMS.items()):
        t[name] = off + rnd(40 + i, D)
    return t


@pytest.fixture
def control_lora(write_st) -> tuple[str, dict[str, torch.Tensor]]:
    t = control_tensors()
    return write_st(t, name="flux1-canny-dev-lora.safetensors"), t


def test_bfl_control_lora_reads_exactly(control_lora) -> None:
    path, t = control_lora
    model = read_lora(path)
    assert model.format == "bfl"
    assert model.arch.variant == "control"
    assert model.arch.params[T]["IN"] == 128
    got = deltas(path)
    assert set(got) == set(CONTROL_MODULES)           # replacement values are not deltas
    for name in CONTROL_MODULES:
        close(got[name], t[f"{name}.lora_B.weight"] @ t[f"{name}.lora_A.weight"])   # scale 1, no alpha
    biases = {p.target.module: p.bias for p in model.patches if p.bias is not None}
    for name in CONTROL_MODULES:
        close(biases[name].float(), t[f"{name}.lora_B.bias"])
    reps = {p.target.module: p for p in model.replacements()}
    assert set(reps) == set(CONTROL_NORMS)
    for name in CONTROL_NORMS:
        assert reps[name].target.loose and reps[name].replace
        close(reps[name].adapter.dense(), t[name])
    assert not model.unknown_keys


def test_bfl_control_lora_inspect_reports_replacements(control_lora) -> None:
    path, _ = control_lora
    r = inspect_lora(path)
    assert r["format"] == "bfl" and r["variant"] == "control"
    assert r["loose_params"] == 3 and r["norm_replacements"] == 3
    assert r["modules"] == len(CONTROL_MODULES)
    text = format_report(r)
    assert "3 replacement values" in text and "loose parameter diffs" not in text


def _read(path: str) -> dict[str, torch.Tensor]:
    return load_file(path)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_bfl_control_lora_bakes_norms_as_replacements(tmp_path, control_lora, weight) -> None:
    path, t = control_lora
    base = write_base(tmp_path / "base.safetensors", CONTROL)
    out = tmp_path / "baked.safetensors"
    rep = bake(base, [(path, weight)], out)
    w0, w1 = _read(base), _read(str(out))
    for name in CONTROL_NORMS:
        assert torch.equal(w1[name], t[name]), name        # the file's value, not base + value
        assert not torch.allclose(w1[name], w0[name] + t[name])
    for name in CONTROL_MODULES:
        want = w0[f"{name}.weight"] + weight * (t[f"{name}.lora_B.weight"] @ t[f"{name}.lora_A.weight"])
        close(w1[f"{name}.weight"], want)
        close(w1[f"{name}.bias"], w0[f"{name}.bias"] + weight * t[f"{name}.lora_B.bias"])
    untouched = "double_blocks.1.img_attn.norm.query_norm.scale"
    assert torch.equal(w1[untouched], w0[untouched])
    said = any("replacement values" in w for w in rep.warnings)
    assert said == (weight != 1.0)


def test_replacement_plus_additive_diff_and_two_replacements(tmp_path, control_lora, write_st) -> None:
    path, t = control_lora
    base = write_base(tmp_path / "base.safetensors", CONTROL)
    diff = rnd(99, D)
    other = write_st({f"diffusion_model.{Q0}.diff": diff}, name="diff.safetensors")   # ComfyUI-spelled diff
    out = tmp_path / "baked.safetensors"
    bake(base, [(path, 1.0), (other, 0.5)], out)
    close(_read(str(out))[Q0], t[Q0] + 0.5 * diff)       # the replacement takes W0's place; diffs add to it
    with pytest.raises(MergeError, match="replace this norm scale"):
        bake(base, [path, path], tmp_path / "two.safetensors")
    assert not (tmp_path / "two.safetensors").exists()


def test_replacements_are_not_treated_as_diffs(tmp_path, control_lora) -> None:
    path, _ = control_lora
    for to in ("comfy", "kohya", "diffusers"):
        with pytest.raises(LossyConversionError, match="replacement values") as err:
            convert(path, tmp_path / "c.safetensors", to)
        assert "lorakit bake" in str(err.value)
    assert not (tmp_path / "c.safetensors").exists()
    with pytest.raises(MergeError, match="replacement value"):
        merge([(path, 1.0), (path, 0.5)], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_bare_replacement_and_diff_of_one_norm_is_refused(write_st) -> None:
    t = control_tensors()
    t[f"{Q0}.diff"] = rnd(5, D)                # the same parameter as a diff in the same file
    with pytest.raises(LorakitError, match="both a replacement value .* and a diff"):
        read_lora(write_st(t))


# ---------------------------------------------------------------------------------------------
# OneTrainer ORIGINAL_LORA: bare BFL names, lora_A / lora_B and `.alpha`
# ---------------------------------------------------------------------------------------------
# Nerogar/OneTrainer modules/modelSaver/mixin/LoRASaverMixin.py _save_original: the BFL-named state dict
# with the "transformer." prefix removed, then convert_lora_suffix_ab(peft_convention=False)
# (modules/util/convert_lora_util.py): lora_down/lora_up -> lora_A/lora_B, `.alpha` kept verbatim;
# OneTrainer's LoRA scale is alpha / rank.

def test_onetrainer_original_lora(write_st) -> None:
    rank, alpha = 4, 2.0
    mods = {"double_blocks.0.img_attn.qkv": (3 * H, H), "double_blocks.1.img_mod.lin": (6 * H, H),
            "single_blocks.1.linear2": (H, H + M), "txt_in": (H, TINY_FLUX["CTX"])}
    t = {}
    for i, (name, (out, inp)) in enumerate(mods.items()):
        t[f"{name}.lora_A.weight"] = rnd(i, rank, inp)
        t[f"{name}.lora_B.weight"] = rnd(50 + i, out, rank)
        t[f"{name}.alpha"] = torch.tensor(alpha)
    path = write_st(t, {"ot_branch": "master"})
    model = read_lora(path)
    assert model.format == "bfl" and not model.unknown_keys
    got = deltas(path)
    assert set(got) == set(mods)
    for name in mods:
        close(got[name], alpha / rank * t[f"{name}.lora_B.weight"] @ t[f"{name}.lora_A.weight"])


# ---------------------------------------------------------------------------------------------
# SimpleTuner --lora_format comfyui: `diffusion_model.` + diffusers names + `.alpha`
# ---------------------------------------------------------------------------------------------
# bghira/SimpleTuner simpletuner/helpers/training/lora_format.py convert_diffusers_to_comfyui: replaces the
# "transformer." prefix with "diffusion_model." (Flux did so from 8ec2f7d78, 2025-11-29, until it joined the
# prefix-preserving families in 6e83ac53c; other families still do), renames lora.down/up to lora_A/lora_B
# and adds `<module>.alpha` (float32) from _resolve_alpha_for_module (alpha_pattern, lora_alpha, else rank).
# The scale a ComfyUI-style reader applies is alpha / rank.

def test_simpletuner_comfyui_export(write_st) -> None:
    rank, alpha = 4, 8.0
    mods = {"transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv", 0, H, H),
            "transformer_blocks.0.attn.to_v": ("double_blocks.0.img_attn.qkv", 2 * H, H, H),
            "transformer_blocks.1.ff.net.2": ("double_blocks.1.img_mlp.2", 0, H, M),
            "single_transformer_blocks.0.proj_mlp": ("single_blocks.0.linear1", 3 * H, M, H)}
    t = {}
    for i, (name, (_, _, out, inp)) in enumerate(mods.items()):
        t[f"diffusion_model.{name}.lora_A.weight"] = rnd(i, rank, inp)
        t[f"diffusion_model.{name}.lora_B.weight"] = rnd(60 + i, out, rank)
        t[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"r": rank, "lora_alpha": alpha})}
    path = write_st(t, meta)
    model = read_lora(path)
    assert model.format == "comfy" and not model.unknown_keys
    got = deltas(path)
    want: dict[str, torch.Tensor] = {}
    for name, (native, start, out, inp) in mods.items():
        rows = {"double_blocks.0.img_attn.qkv": 3 * H, "double_blocks.1.img_mlp.2": H,
                "single_blocks.0.linear1": 3 * H + M}[native]
        w = want.setdefault(native, torch.zeros(rows, inp))
        w[start:start + out] += alpha / rank * (t[f"diffusion_model.{name}.lora_B.weight"]
                                                @ t[f"diffusion_model.{name}.lora_A.weight"])
    assert set(got) == set(want)
    for native in want:
        close(got[native], want[native])


# ---------------------------------------------------------------------------------------------
# AI-Toolkit full-module diffs on norms: `transformer.transformer_blocks.0.attn.norm_q.diff`
# ---------------------------------------------------------------------------------------------
# ostris/ai-toolkit toolkit/lora_special.py FullModule: `diff` (zeros_like the module's weight) and `diff_b`
# are the module's additive deltas (forward: weight + diff * multiplier); toolkit/network_mixins.py
# get_state_dict saves them under the module name with `$$` -> `.`, so an RMSNorm's key is
# `<module>.diff`, without `.weight`.

def test_aitoolkit_full_module_norm_diffs(tmp_path, write_st) -> None:
    rank = 4
    t = {"transformer.transformer_blocks.0.attn.norm_q.diff": rnd(1, D),
         "transformer.transformer_blocks.1.attn.norm_added_k.diff": rnd(2, D),
         "transformer.single_transformer_blocks.1.attn.norm_k.diff": rnd(3, D),
         "transformer.transformer_blocks.0.attn.to_out.0.diff": rnd(4, H, H),
         "transformer.transformer_blocks.0.attn.to_out.0.diff_b": rnd(5, H),
         "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": rnd(6, rank, H),
         "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": rnd(7, H, rank)}
    path = write_st(t, {"software": json.dumps({"name": "ai-toolkit"})})
    model = read_lora(path)
    assert model.format == "diffusers" and not model.unknown_keys
    assert not model.replacements()
    got = deltas(path)
    norms = {Q0: "transformer.transformer_blocks.0.attn.norm_q.diff",
             "double_blocks.1.txt_attn.norm.key_norm.scale": "transformer.transformer_blocks.1.attn.norm_added_k.diff",
             K1S: "transformer.single_transformer_blocks.1.attn.norm_k.diff"}
    for native, key in norms.items():
        close(got[native], t[key])
    close(got["double_blocks.0.img_attn.proj"], t["transformer.transformer_blocks.0.attn.to_out.0.diff"])
    qkv = torch.zeros(3 * H, H)
    qkv[H:2 * H] = t["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"] @ \
        t["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"]
    close(got["double_blocks.0.img_attn.qkv"], qkv)
    assert inspect_lora(path)["norm_replacements"] == 0
    base = write_base(tmp_path / "base.safetensors")
    out = tmp_path / "baked.safetensors"
    bake(base, [path], out)
    close(_read(str(out))[Q0], _read(base)[Q0] + t["transformer.transformer_blocks.0.attn.norm_q.diff"])


# ---------------------------------------------------------------------------------------------
# AI-Toolkit's default LoKr: alpha +inf in fp16, both Kronecker factors full
# ---------------------------------------------------------------------------------------------
# ostris/ai-toolkit toolkit/config_modules.py: lokr_full_rank (default True) sets linear = linear_alpha =
# 9999999999; toolkit/models/lokr.py LokrModule then makes both lokr_w1 and lokr_w2 full (lora_dim is never
# < max(...)/2), uses scale 1 ("if self.use_w2 and self.use_w1: alpha = lora_dim") and registers
# alpha = torch.tensor(9999999999), which get_state_dict(dtype=torch.float16) saves as +inf. For a 32-wide
# Linear, factorization(32) = (4, 8): lokr_w1 (4, 4), lokr_w2 (8, 8). LyCORIS's LokrModule and ComfyUI
# likewise ignore alpha when both factors are full (scale 1).

INF16 = torch.tensor(9999999999).to(torch.float16)


def lokr_tensors(prefix: str, alpha: torch.Tensor, decomposed: bool = False) -> dict[str, torch.Tensor]:
    t = {f"{prefix}.lokr_w1": rnd(1, 4, 4, scale=0.5), f"{prefix}.alpha": alpha.clone()}
    if decomposed:
        t[f"{prefix}.lokr_w2_a"] = rnd(2, 8, 2, scale=0.5)
        t[f"{prefix}.lokr_w2_b"] = rnd(3, 2, 8, scale=0.5)
    else:
        t[f"{prefix}.lokr_w2"] = rnd(2, 8, 8, scale=0.5)
    return t


def test_aitoolkit_full_lokr_with_inf_alpha_reads_with_scale_1(write_st) -> None:
    assert torch.isinf(INF16) and INF16.dtype == torch.float16
    mods = {"transformer.transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv", 0),
            "transformer.transformer_blocks.0.attn.to_out.0": ("double_blocks.0.img_attn.proj", None)}
    t = {}
    for name in mods:
        t.update(lokr_tensors(name, INF16))
    path = write_st({k: v.half() for k, v in t.items()})
    model = read_lora(path)
    assert model.format == "diffusers" and not model.unknown_keys
    r = inspect_lora(path, deep=True)
    assert r["nonfinite_alpha_keys"] == [] and r["deep"]["nonfinite_modules"] == []
    got = deltas(path)
    for name, (native, start) in mods.items():
        kron = torch.kron(t[f"{name}.lokr_w1"].half().float(), t[f"{name}.lokr_w2"].half().float())
        if start is None:
            close(got[native], kron)
        else:
            want = torch.zeros(3 * H, H)
            want[start:start + H] = kron
            close(got[native], want)


@pytest.mark.parametrize("case", ["lora", "lokr-decomposed", "lokr-full-nan", "lokr-full-neg-inf"])
def test_other_nonfinite_alphas_still_refused(write_st, case) -> None:
    prefix = "transformer.transformer_blocks.0.attn.to_q"
    if case == "lora":
        t = {f"{prefix}.lora_A.weight": rnd(1, 4, H), f"{prefix}.lora_B.weight": rnd(2, H, 4),
             f"{prefix}.alpha": torch.tensor(float("inf"))}
    elif case == "lokr-decomposed":
        t = lokr_tensors(prefix, torch.tensor(float("inf")), decomposed=True)
    elif case == "lokr-full-nan":
        t = lokr_tensors(prefix, torch.tensor(float("nan")))
    else:
        t = lokr_tensors(prefix, torch.tensor(float("-inf")))
    with pytest.raises(NonFiniteError, match="alpha"):
        read_lora(write_st(t))


# ---------------------------------------------------------------------------------------------
# Kontext: key-identical to dev; the variant comes from metadata
# ---------------------------------------------------------------------------------------------
# ostris/ai-toolkit extensions_built_in/diffusion_models/flux_kontext/flux_kontext.py get_base_model_version
# returns "flux.1_kontext", written as ss_base_model_version (jobs/process/BaseSDTrainProcess.py). PEFT /
# diffusers configs name the base repository (base_model_name_or_path "black-forest-labs/FLUX.1-Kontext-dev").

def _dev_lora(with_guidance: bool) -> dict[str, torch.Tensor]:
    t = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": rnd(1, 4, H),
         "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": rnd(2, H, 4)}
    if with_guidance:
        t["transformer.time_text_embed.guidance_embedder.linear_1.lora_A.weight"] = rnd(3, 4, TINY_FLUX["T"])
        t["transformer.time_text_embed.guidance_embedder.linear_1.lora_B.weight"] = rnd(4, H, 4)
    return t


@pytest.mark.parametrize("meta", [
    {"ss_base_model_version": "flux.1_kontext"},
    {"modelspec.architecture": "flux-1-kontext-dev/lora"},
    {"lora_adapter_metadata": json.dumps({"base_model_name_or_path": "black-forest-labs/FLUX.1-Kontext-dev",
                                          "r": 4, "lora_alpha": 4})},
])
@pytest.mark.parametrize("with_guidance", [True, False])
def test_kontext_variant_from_metadata(write_st, meta, with_guidance) -> None:
    t = _dev_lora(with_guidance)
    plain = write_st(t)
    named = write_st(t, meta)
    assert read_lora(plain).arch.variant == ("dev" if with_guidance else "dev-or-schnell")
    assert read_lora(named).arch.variant == "kontext"
    assert inspect_lora(named)["variant"] == "kontext"
    close(deltas(named)["double_blocks.0.img_attn.qkv"], deltas(plain)["double_blocks.0.img_attn.qkv"])


def test_kontext_metadata_does_not_override_shapes(write_st) -> None:
    # a Fill-sized img_in (384 inputs) stays Fill whatever the metadata says
    t = {"transformer.x_embedder.lora_A.weight": rnd(1, 4, 384), "transformer.x_embedder.lora_B.weight": rnd(2, H, 4)}
    assert read_lora(write_st(t, {"ss_base_model_version": "flux.1_kontext"})).arch.variant == "fill"


def test_inf_alpha_full_lokr_matches_lycoris_forward(write_st) -> None:
    """Oracle: lycoris-lora's own LokrModule at AI-Toolkit's "full rank" settings (lora_dim = alpha =
    9999999999, so both factors are full); its state dict saved in fp16 stores α = +inf."""
    lokr = pytest.importorskip("lycoris.modules.lokr")
    import torch.nn.functional as F
    lin = torch.nn.Linear(H, H)
    module = lokr.LokrModule("m", lin, multiplier=1.0, lora_dim=9999999999, alpha=9999999999, factor=-1)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith("org_"):
                p.copy_((torch.randn(p.shape, generator=gen) * 0.3).half().float())
    module.apply_to()
    x = torch.eye(H)
    with torch.no_grad():
        want = (module(x) - F.linear(x, lin.weight, lin.bias)).T
    prefix = "transformer.transformer_blocks.0.attn.to_out.0"
    sd = {f"{prefix}.{k}": v.detach().clone().half() for k, v in module.state_dict().items()
          if not k.startswith("org_")}
    assert set(sd) == {f"{prefix}.lokr_w1", f"{prefix}.lokr_w2", f"{prefix}.alpha"}
    assert torch.isinf(sd[f"{prefix}.alpha"]).item()
    got = deltas(write_st(sd))["double_blocks.0.img_attn.proj"]
    assert float((got - want).norm() / want.norm()) <= 1e-5


def test_a_base_model_is_not_read_as_replacement_norms(tmp_path) -> None:
    # a BFL base holds the same bare `…norm.query_norm.scale` names: without LoRA factors it is no LoRA
    base = write_base(tmp_path / "base.safetensors")
    with pytest.raises(LorakitError, match="not a LoRA"):
        read_lora(base)


def test_each_spelling_is_detected_unambiguously(write_st) -> None:
    """Every key of each fixture is understood by exactly the format named, and no other format reads the
    whole file (detection stays unambiguous)."""
    rank = 4
    st = {"diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight": rnd(1, rank, H),
          "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight": rnd(2, H, rank),
          "diffusion_model.transformer_blocks.0.attn.to_q.alpha": torch.tensor(4.0)}
    ot = {"double_blocks.0.img_attn.qkv.lora_A.weight": rnd(1, rank, H),
          "double_blocks.0.img_attn.qkv.lora_B.weight": rnd(2, 3 * H, rank),
          "double_blocks.0.img_attn.qkv.alpha": torch.tensor(4.0)}
    ait = {"transformer.transformer_blocks.0.attn.norm_q.diff": rnd(3, D),
           "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": rnd(1, rank, H),
           "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": rnd(2, H, rank)}
    for tensors, fmt in ((control_tensors(), "bfl"), (ot, "bfl"), (st, "comfy"), (ait, "diffusers")):
        r = inspect_lora(write_st(tensors))
        assert r["format"] == fmt and r["confidence"] == 1.0 and r["unknown_key_count"] == 0
        assert r["runner_up"] is None or r["runner_up"]["score"] < 1.0, (fmt, r["runner_up"])
