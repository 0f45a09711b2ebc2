"""Guard: an architecture declared only in this test (tests/toyarch.py: a ``unet`` with a 3×3 and a 1×1 conv
and names over two indices, a ``te`` with OpenCLIP-style fused ``in_proj_weight`` and a transposed
``text_projection``) goes through inspect, convert, merge, resize, bake and extract with no line of shared
code knowing it. Expected deltas come from the factors the toy writers produce (tests/toyarch.py ``delta``)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from lorakit.cli.main import main
from lorakit.formats import read_lora
from lorakit.lora.model import Target, dense_deltas

from toyarch import (SIZES, TE_PREFIX, UNET_PREFIX, delta, lora_modules,  # noqa: F401
                     toy_arch, write_base, write_lora)

# kohya module -> (component, native module, row window in the native weight)
NATIVE = {
    "lora_unet_conv_in": ("unet", "conv_in", None),
    "lora_unet_mid_block_skip": ("unet", "mid.skip", None),
    "lora_unet_down_blocks_1_attentions_2_proj": ("unet", "blocks.1.sub.2.proj", None),
    "lora_te1_layers_1_self_attn_q_proj": ("te", "layers.1.attn", (0, SIZES["D"])),
    "lora_te1_text_projection": ("te", "text_projection", None),
}


def _check(model, factors: dict[str, torch.Tensor], weight: float = 1.0, tol: float = 1e-5) -> None:
    dense = dense_deltas(model)
    for name, (comp, native, rows) in NATIVE.items():
        got = dense[Target(comp, native)]
        got = got[rows[0]:rows[1]] if rows else got
        want = delta(factors, name) * weight
        assert got.shape == want.shape, name
        assert float((got - want).abs().max()) <= tol * max(1.0, float(want.abs().max())), name


def test_inspect(toy_arch, tmp_path, capsys) -> None:
    lora = str(tmp_path / "toy.safetensors")
    write_lora(lora, torch.Generator().manual_seed(0))
    assert main(["inspect", lora, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["architecture"], r["format"], r["modules"]) == ("toy", "kohya", 5)
    assert set(r["components"]) == {"unet", "te"} and "locon" in r["adapters"]


def test_convert_round_trip(toy_arch, tmp_path) -> None:
    lora = str(tmp_path / "toy.safetensors")
    factors = write_lora(lora, torch.Generator().manual_seed(1))
    _check(read_lora(lora), factors)
    comfy, back = str(tmp_path / "comfy.safetensors"), str(tmp_path / "back.safetensors")
    assert main(["convert", lora, "--to", "comfy", "-o", comfy]) == 0
    assert any(k.startswith("diffusion_model.blocks.1.sub.2.proj.") for k in load_file(comfy))
    assert main(["convert", comfy, "--to", "kohya", "-o", back]) == 0
    model = read_lora(back)
    assert model.arch.name == "toy" and model.format == "kohya"
    _check(model, factors)


def test_merge_concat_and_svd(toy_arch, tmp_path) -> None:
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    fa, fb = write_lora(a, torch.Generator().manual_seed(2)), write_lora(b, torch.Generator().manual_seed(3))
    out = str(tmp_path / "m.safetensors")
    assert main(["merge", f"{a}:0.5", f"{b}:0.25", "-o", out]) == 0
    dense = dense_deltas(read_lora(out))
    for name, (comp, native, rows) in NATIVE.items():
        got = dense[Target(comp, native)]
        got = got[rows[0]:rows[1]] if rows else got
        want = 0.5 * delta(fa, name) + 0.25 * delta(fb, name)
        assert torch.allclose(got, want, atol=1e-5), name
    svd = str(tmp_path / "svd.safetensors")
    assert main(["merge", a, b, "--method", "svd", "--rank", "2", "--conv-rank", "2", "-o", svd]) == 0
    assert read_lora(svd).arch.name == "toy"


def test_resize(toy_arch, tmp_path) -> None:
    lora = str(tmp_path / "toy.safetensors")
    write_lora(lora, torch.Generator().manual_seed(4))
    out = str(tmp_path / "r.safetensors")
    assert main(["resize", lora, "--rank", "1", "--conv-rank", "1", "-o", out]) == 0
    ranks = {k: v.shape[0] for k, v in load_file(out).items() if k.endswith("lora_down.weight")}
    assert ranks and all(r == 1 for r in ranks.values())


def test_bake_and_extract(toy_arch, tmp_path) -> None:
    base, lora = str(tmp_path / "base.safetensors"), str(tmp_path / "lora.safetensors")
    write_base(base, torch.Generator().manual_seed(5), fp16=())
    factors = write_lora(lora, torch.Generator().manual_seed(6))
    tuned = str(tmp_path / "tuned.safetensors")
    assert main(["bake", base, lora, "-o", tuned, "--no-progress"]) == 0
    b, t = load_file(base), load_file(tuned)
    want = delta(factors, "lora_unet_conv_in")
    assert torch.allclose(t[UNET_PREFIX + "conv_in.weight"].float() - b[UNET_PREFIX + "conv_in.weight"].float(), want,
                          atol=1e-4)
    proj = t[TE_PREFIX + "text_projection"].float() - b[TE_PREFIX + "text_projection"].float()
    assert torch.allclose(proj, delta(factors, "lora_te1_text_projection").T, atol=2e-2)   # fp16 te
    out = str(tmp_path / "extracted.safetensors")
    assert main(["extract", base, tuned, "--rank", "4", "--conv-rank", "3", "-o", out]) == 0
    model = read_lora(out)
    assert model.arch.name == "toy"
    dense = dense_deltas(model)
    got = dense[Target("unet", "conv_in")]
    assert torch.allclose(got.reshape(want.shape), want, atol=1e-3)
