"""Differential test against diffusers 0.42.1 + PEFT.

A tiny FluxTransformer2DModel, diffusers-format LoRAs (one with DoRA magnitudes) loaded with
``load_lora_adapter`` / ``set_adapters`` and fused with ``fuse_lora`` (DoRA adapter first); lorakit's bake
of the same base must give the same weights — in the diffusers layout, and mapped to BFL names for a BFL
base built from the same weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit.samples.synthetic import iter_split_modules
from test_bake_util import native_state, read_all

pytestmark = pytest.mark.oracle
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True,
              axes_dims_rope=(4, 6, 6))
# the same sizes in lorakit's layout parameters (diffusers' timestep projection has 256 channels)
PARAMS = {"H": 32, "M": 128, "IN": 16, "OUT": 16, "CTX": 24, "VEC": 20, "T": 256, "D": 16, "double": 2, "single": 2,
          "guidance": 1, "modulation": 1}


def _model():
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**CONFIG)
    with torch.no_grad():   # non-zero biases everywhere (some diffusers inits are zero)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _lora(seed: int, rank: int, dora: bool, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name, out, inp in iter_split_modules(PARAMS):
        t[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, inp, generator=g) / inp ** 0.5
        t[f"transformer.{name}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.05
        if dora:   # PEFT's use_dora covers every module of the adapter: give each its magnitude
            norm = base[f"{name}.weight"].norm(dim=1)
            t[f"transformer.{name}.lora_magnitude_vector"] = norm * (1 + 0.3 * torch.rand(out, generator=g))
    return t


def _fused_state(model) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v.detach().clone().contiguous()
    return out


@pytest.mark.parametrize("dora", [False, True])
def test_bake_matches_diffusers_fuse_lora(tmp_path, dora):
    model = _model()
    base_sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    base = str(tmp_path / "base_diffusers.safetensors")
    save_file(base_sd, base)
    la, lb = _lora(1, 4, False, base_sd), _lora(2, 3, dora, base_sd)
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file(la, pa)
    save_file(lb, pb)
    weights = [0.8, -0.5 if not dora else 0.7]

    model.load_lora_adapter(dict(la), adapter_name="a", prefix="transformer")
    model.load_lora_adapter(dict(lb), adapter_name="b", prefix="transformer")
    model.set_adapters(["a", "b"], weights)
    # DoRA adapter fused first: PEFT then equals its own unfused forward pass, which lorakit follows
    model.fuse_lora(adapter_names=["b", "a"])
    fused = _fused_state(model)
    assert set(fused) == set(base_sd)
    assert sum(not torch.equal(fused[k], base_sd[k]) for k in fused) == len(list(iter_split_modules(PARAMS)))

    # diffusers layout in, diffusers layout out
    out = str(tmp_path / "out.safetensors")
    lorakit.bake(base, [(pa, weights[0]), (pb, weights[1])], out)
    got = read_all(out)
    for k, v in fused.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=2e-6, msg=lambda m, k=k: f"{k}: {m}")

    # the same weights as a BFL base (built with lorakit's layout mapping): compare in BFL names
    bfl_base = str(tmp_path / "base_bfl.safetensors")
    save_file(native_state(base), bfl_base)
    fused_file = str(tmp_path / "fused_diffusers.safetensors")
    save_file(fused, fused_file)
    want = native_state(fused_file)
    bfl_out = str(tmp_path / "out_bfl.safetensors")
    lorakit.bake(bfl_base, [(pa, weights[0]), (pb, weights[1])], bfl_out)
    got_bfl = read_all(bfl_out)
    assert set(got_bfl) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got_bfl[k], v, rtol=1e-5, atol=2e-6, msg=lambda m, k=k: f"{k}: {m}")
