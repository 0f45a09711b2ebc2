"""Every command (inspect, doctor, convert, merge, bake, extract, resize, diff) on tiny Qwen-Image and Z-Image
models. Bases come from the synthetic generators (layout data); LoRAs are spelled here key by key, and the
expected baked weights are computed here from the factors (Z-Image's fused qkv split by hand on a diffusers-layout
base)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.cli import main
from lorakit.formats import read_lora
from lorakit.layouts import resolve
from lorakit.lora.model import dense_deltas
from lorakit.samples.synthetic import TINY_QWEN, TINY_ZIMAGE, write_base

H = 32


def _factors(gen: torch.Generator, out: int, inp: int, r: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(r, inp, generator=gen) / inp ** 0.5, torch.randn(out, r, generator=gen) * 0.1


# (family, base layout, LoRA stems by hand: stem -> (native/diffusers weight names it lands on, (out, in)))
QWEN_LORA = {"lora_unet_transformer_blocks_0_attn_to_q": (["transformer_blocks.0.attn.to_q"], (H, H)),
             "lora_unet_transformer_blocks_1_img_mlp_net_0_proj": (["transformer_blocks.1.img_mlp.net.0.proj"],
                                                                   (128, H)),
             "lora_unet_transformer_blocks_1_txt_mod_1": (["transformer_blocks.1.txt_mod.1"], (6 * H, H)),
             "lora_unet_proj_out": (["proj_out"], (16, H))}
ZIMAGE_LORA = {"diffusion_model.layers.1.attention.qkv": (["layers.1.attention.to_q", "layers.1.attention.to_k",
                                                           "layers.1.attention.to_v"], (3 * H, H)),
               "diffusion_model.noise_refiner.0.attention.out": (["noise_refiner.0.attention.to_out.0"], (H, H)),
               "diffusion_model.x_embedder": (["all_x_embedder.2-1"], (H, 16)),
               "diffusion_model.layers.0.feed_forward.w2": (["layers.0.feed_forward.w2"], (H, 85))}
CASES = {"qwen-image": (TINY_QWEN, "bfl", QWEN_LORA), "z-image": (TINY_ZIMAGE, "diffusers", ZIMAGE_LORA)}


def _write_lora(path: Path, stems, seed: int, alpha: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for stem, (_, (o, i)) in stems.items():
        tensors[stem + ".lora_down.weight"], tensors[stem + ".lora_up.weight"] = _factors(gen, o, i)
        tensors[stem + ".alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return tensors


def _expected_deltas(tensors: dict[str, torch.Tensor], stems) -> dict[str, torch.Tensor]:
    out = {}
    for stem, (names, _) in stems.items():
        down, up = tensors[stem + ".lora_down.weight"], tensors[stem + ".lora_up.weight"]
        delta = up @ down * (float(tensors[stem + ".alpha"]) / down.shape[0])
        rows = delta.shape[0] // len(names)
        for k, name in enumerate(names):
            out[name + ".weight"] = delta[k * rows:(k + 1) * rows]
    return out


@pytest.mark.parametrize("family", sorted(CASES))
def test_every_command(tmp_path, capsys, family: str) -> None:
    sizes, layout, stems = CASES[family]
    base = write_base(tmp_path / "base.safetensors", sizes, layout=layout, arch=resolve(family))
    lora, lora2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ta = _write_lora(lora, stems, 1, 2.0)
    _write_lora(lora2, stems, 2, 4.0)

    assert main(["inspect", str(lora), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["architecture"], report["variant"], report["modules"]) == (family, "base", len(stems))

    assert main(["doctor", str(lora), "--base", base]) == 0
    assert "WILL NOT APPLY" not in capsys.readouterr().out

    for fmt in ("diffusers", "comfy", "kohya"):
        assert main(["convert", str(lora), "-o", str(tmp_path / f"c.{fmt}.safetensors"), "--to", fmt]) == 0

    # bake: W + ΔW, ΔW computed by hand; every other tensor copied bit for bit
    baked = tmp_path / "baked.safetensors"
    assert main(["bake", base, str(lora), "-o", str(baked), "--no-progress"]) == 0
    b0, b1 = load_file(base), load_file(str(baked))
    want = _expected_deltas(ta, stems)
    assert set(b1) == set(b0)
    for k in b0:
        if k in want:
            assert float((b1[k] - b0[k] - want[k]).abs().max()) <= 1e-6, k
        else:
            assert torch.equal(b1[k], b0[k]), k

    # extract the bake back: the same deltas (rank 4 holds them exactly up to fp32 SVD error)
    ext = tmp_path / "ext.safetensors"
    assert main(["extract", base, str(baked), "-o", str(ext), "--rank", "4"]) == 0
    got = dense_deltas(read_lora(ext))
    ref = dense_deltas(read_lora(lora))
    assert set(got) == set(ref)
    for t, d in ref.items():
        assert float((got[t] - d).abs().max()) <= 1e-4 * float(d.abs().max()), t

    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(lora), str(lora2), "-o", str(merged)]) == 0
    md, d2 = dense_deltas(read_lora(merged)), dense_deltas(read_lora(lora2))
    for t, d in ref.items():
        assert float((md[t] - d - d2[t]).abs().max()) <= 1e-5 * float(d.abs().max()), t

    resized = tmp_path / "resized.safetensors"
    assert main(["resize", str(lora), "-o", str(resized), "--rank", "2"]) == 0
    assert {p.adapter.rank for p in read_lora(resized).patches} == {2}

    capsys.readouterr()
    assert main(["diff", str(lora), str(ext)]) == 0
    assert f"shared {len(stems)}, only in A 0, only in B 0" in capsys.readouterr().out


@pytest.mark.parametrize("family,vector,weights", [
    # BASE, B00, B01: proj_out (outside the blocks) dropped, block 0 kept, block 1 halved
    ("qwen-image", "0,1,0.5", {"transformer_blocks.0.attn.to_q": 1.0, "transformer_blocks.1.img_mlp.net.0.proj": 0.5,
                               "transformer_blocks.1.txt_mod.1": 0.5}),
    # N00, C00, C01, L00, L01 (the LoRA shows 1 noise-refiner block and 2 layers; the context refiner count comes
    # from the published size, 2); x_embedder keeps 1 (a vector without BASE)
    ("z-image", "0,1,1,1,0.25", {"layers.1.attention.qkv": 0.25, "x_embedder": 1.0, "layers.0.feed_forward.w2": 1.0}),
])
def test_merge_block_vectors(tmp_path, family: str, vector: str, weights: dict[str, float]) -> None:
    _, _, stems = CASES[family]
    lora = tmp_path / "a.safetensors"
    _write_lora(lora, stems, 1, 2.0)
    out = tmp_path / "blocks.safetensors"
    assert main(["merge", str(lora), "--blocks", vector, "-o", str(out)]) == 0
    ref = {t.module: d for t, d in dense_deltas(read_lora(lora)).items()}
    got = {t.module: d for t, d in dense_deltas(read_lora(out)).items()}
    assert set(got) == set(weights)
    for name, w in weights.items():
        assert float((got[name] - w * ref[name]).abs().max()) <= 1e-6 * float(ref[name].abs().max()), name


@pytest.mark.parametrize("stems,noted", [
    ({"lora_unet_layers_0_attention_to_q": (H, H), "lora_unet_layers_0_feed_forward_w1": (85, H)}, True),
    # ComfyUI's own names flattened (and names both namings share) load there: no note
    ({"lora_unet_layers_0_attention_qkv": (3 * H, H), "lora_unet_layers_0_feed_forward_w1": (85, H)}, False),
])
def test_doctor_notes_musubi_zimage_names_comfyui_skips(tmp_path, capsys, stems, noted: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for stem, (o, i) in stems.items():
        tensors[stem + ".lora_down.weight"], tensors[stem + ".lora_up.weight"] = _factors(gen, o, i)
    path = tmp_path / "z.safetensors"
    save_file(tensors, str(path))
    assert main(["doctor", str(path)]) == 0
    out = capsys.readouterr().out
    assert ("ComfyUI does not read musubi-tuner's flattened diffusers names" in out) == noted
    assert ("lorakit convert --to comfy" in out) == noted


def test_zimage_norm_diffs_map_between_namings_and_bake(tmp_path, capsys) -> None:
    """ComfyUI ``attention.k_norm.weight.diff`` is diffusers ``attention.norm_k.weight``: converted by name and
    baked into a diffusers-layout base as a plain addition."""
    base = write_base(tmp_path / "base.safetensors", TINY_ZIMAGE, layout="diffusers", arch=resolve("z-image"))
    gen = torch.Generator().manual_seed(3)
    tensors = {"diffusion_model.layers.0.attention.k_norm.weight.diff": torch.randn(16, generator=gen),
               "diffusion_model.layers.1.ffn_norm2.weight.diff": torch.randn(H, generator=gen)}
    lora = tmp_path / "norms.safetensors"
    save_file(tensors, str(lora))
    out = tmp_path / "d.safetensors"
    # exit 1: written, with the warning that diffusers' loader does not apply ``.diff`` keys
    assert main(["convert", str(lora), "-o", str(out), "--to", "diffusers"]) == 1
    assert set(load_file(str(out))) == {"transformer.layers.0.attention.norm_k.weight.diff",
                                        "transformer.layers.1.ffn_norm2.weight.diff"}
    assert "does not apply these keys" in capsys.readouterr().err
    baked = tmp_path / "baked.safetensors"
    assert main(["bake", base, str(lora), "-o", str(baked), "--no-progress"]) == 0
    b0, b1 = load_file(base), load_file(str(baked))
    for key, diff in (("layers.0.attention.norm_k.weight",
                       tensors["diffusion_model.layers.0.attention.k_norm.weight.diff"]),
                      ("layers.1.ffn_norm2.weight", tensors["diffusion_model.layers.1.ffn_norm2.weight.diff"])):
        assert torch.allclose(b1[key] - b0[key], diff, atol=1e-6), key
    assert sum(not torch.equal(b0[k], b1[k]) for k in b0) == 2
