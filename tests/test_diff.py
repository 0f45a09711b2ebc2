"""``lorakit diff``: Gram-trick cosines/ratios against a dense oracle, native-target matching, model diffs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lorakit import diff
from lorakit.base.checkpoint import open_base
from lorakit.cli import main
from lorakit.ops.conversion import convert
from lorakit.ops.diffing import patch_inner
from lorakit.errors import UsageError
from lorakit.formats import read_lora
from lorakit.io import SafetensorsWriter, open_weights, save_tensors
from lorakit.lora.model import Patch, Target, dense_deltas
from lorakit.samples.synthetic import TINY_FLUX, write_aitoolkit_lora, write_base, write_sdscripts_lora
from lorakit.lora.adapters import LoRA, LoKr


def _dense_oracle(pa: str, pb: str):
    a, b = read_lora(pa), read_lora(pb)
    da, db = dense_deltas(a), dense_deltas(b)
    out = {}
    for t in da:
        if t in db:
            x, y = da[t].double(), db[t].double()
            out[str(t)] = (float(x.norm() / y.norm()), float((x * y).sum() / (x.norm() * y.norm())))
    return out


def test_lora_pair_matches_dense_oracle(tmp_path) -> None:
    a = write_aitoolkit_lora(tmp_path / "a.safetensors", seed=1)
    b = write_sdscripts_lora(tmp_path / "b.safetensors", seed=2, alpha=3.0)
    rep = diff(a, b)
    oracle = _dense_oracle(a, b)
    assert set(rep.modules) == set(oracle) and len(oracle) > 10
    for name, (ratio, cos) in oracle.items():
        assert rep.modules[name]["ratio"] == pytest.approx(ratio, rel=1e-6)
        assert rep.modules[name]["cosine"] == pytest.approx(cos, abs=1e-6)
    assert rep.only_in_a == [] and len(rep.only_in_b) == 12 and all(m.startswith("clip_l:") for m in rep.only_in_b)
    # per block: aggregate of the modules, checked densely for one block
    da, db = dense_deltas(read_lora(a)), dense_deltas(read_lora(b))
    keys = [t for t in da if t.module.startswith("double_blocks.1.") and t in db]
    dot = sum(float((da[t].double() * db[t].double()).sum()) for t in keys)
    na = math.sqrt(sum(float(da[t].double().square().sum()) for t in keys))
    nb = math.sqrt(sum(float(db[t].double().square().sum()) for t in keys))
    blk = rep.blocks["transformer:double_blocks.1"]
    assert blk["cosine"] == pytest.approx(dot / (na * nb), abs=1e-6)
    assert blk["ratio"] == pytest.approx(na / nb, rel=1e-6)
    assert not rep.equivalent


def test_conversion_compares_equivalent_across_formats(tmp_path, capsys) -> None:
    a = write_aitoolkit_lora(tmp_path / "a.safetensors")                 # split (diffusers) names, row windows
    k = str(tmp_path / "k.safetensors")
    convert(a, k, "kohya")                                                 # fused names, block-diagonal ups
    rep = diff(a, k)
    assert rep.equivalent and rep.only_in_a == [] and rep.only_in_b == []
    assert rep.total["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert rep.total["ratio"] == pytest.approx(1.0, rel=1e-9)
    assert rep.rank_differences   # split ranks 4+4+4 became one fused module of rank 12
    assert main(["diff", a, k]) == 0
    assert "equivalent" in capsys.readouterr().out
    assert main(["diff", a, k, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["equivalent"] is True and data["a"]["format"] == "diffusers" and data["b"]["format"] == "kohya"


def test_scaled_lora_ratio_and_alpha_difference(tmp_path, capsys) -> None:
    a = write_sdscripts_lora(tmp_path / "a.safetensors", alpha=2.0, clip=None)
    b = write_sdscripts_lora(tmp_path / "b.safetensors", alpha=4.0, clip=None)    # same factors, twice the scale
    rep = diff(a, b)
    assert rep.total["ratio"] == pytest.approx(0.5, rel=1e-9)
    assert rep.total["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert len(rep.alpha_differences) == rep.shared and not rep.rank_differences
    rc = main(["diff", a, b, "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 1 and data["equivalent"] is False and data["kind"] == "lora"
    assert data["total"]["ratio"] == pytest.approx(0.5)


def test_patch_inner_row_windows_and_dense_fallback() -> None:
    g = torch.Generator().manual_seed(0)
    t = Target("transformer", "double_blocks.0.img_attn.qkv")
    full = Patch(t, LoRA(alpha=2.0, down=torch.randn(3, 8, generator=g), up=torch.randn(24, 3, generator=g)))
    win = Patch(t, LoRA(alpha=None, down=torch.randn(2, 8, generator=g), up=torch.randn(8, 2, generator=g)),
                rows=(8, 16))
    kr = Patch(t, LoKr(alpha=None, w1=torch.randn(3, 1, generator=g), w2=torch.randn(8, 8, generator=g)))

    def placed(p: Patch) -> torch.Tensor:
        out = torch.zeros(24, 8, dtype=torch.float64)
        r = p.rows or (0, 24)
        out[r[0]:r[1]] = p.adapter.dense().double()
        return out

    for p in (full, win, kr):
        for q in (full, win, kr):
            assert patch_inner(p, q) == pytest.approx(float((placed(p) * placed(q)).sum()), rel=1e-6, abs=1e-9)


def _diffusers_copy(bfl: str, out: str) -> str:
    """The BFL base re-laid out in diffusers names (split rows, swapped norm_out), exactly."""
    probe = write_base(out + ".layout.safetensors", layout="diffusers", fill="zeros")
    with open_weights(bfl) as fb, open_weights(probe) as fp:
        src, layout = open_base(fb), open_base(fp)
        native = {}
        for s in src.slots.values():
            key = f"{s.module}.{s.param}" if s.module else s.param
            native[key] = fb.get(s.key)
        entries = [(k, fp.infos[k].dtype, fp.shape(k)) for k in fp.keys()]
        with SafetensorsWriter(out, entries, {"format": "pt"}) as w:
            for k, s in layout.slots.items():
                t = native[f"{s.module}.{s.param}" if s.module else s.param]
                if s.rows:
                    t = t[s.rows[0]:s.rows[1]]
                if s.swap:
                    h = t.shape[0] // 2
                    t = torch.cat([t[h:], t[:h]])
                w.write(k, t.contiguous())
    return out


def test_model_pair_across_layouts(tmp_path) -> None:
    bfl = write_base(tmp_path / "bfl.safetensors")
    comfy = write_base(tmp_path / "comfy.safetensors", prefix="model.diffusion_model.")
    dif = _diffusers_copy(bfl, str(tmp_path / "dif.safetensors"))
    for other in (comfy, dif):
        rep = diff(bfl, other)
        assert rep.kind == "model" and rep.equivalent, (other, rep.total, rep.only_in_a, rep.only_in_b)
        assert rep.total["relative_difference"] == 0.0
    other = write_base(tmp_path / "seed.safetensors", seed=5)
    rep = diff(bfl, other)
    assert not rep.equivalent and rep.total["relative_difference"] > 0.5
    half = write_base(tmp_path / "half.safetensors", dtype=torch.float16)
    rep = diff(bfl, half)
    assert rep.dtype_differences and rep.total["relative_difference"] < 1e-2
    schnell = write_base(tmp_path / "schnell.safetensors", {**TINY_FLUX, "guidance": 0})
    rep = diff(bfl, schnell)
    assert any(k.startswith("guidance_in.") for k in rep.only_in_a) and rep.only_in_b == []


def test_lora_against_model_is_a_usage_error(tmp_path, capsys) -> None:
    lora = write_aitoolkit_lora(tmp_path / "a.safetensors")
    base = write_base(tmp_path / "b.safetensors")
    with pytest.raises(UsageError, match="doctor"):
        diff(lora, base)
    assert main(["diff", base, lora]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorakit diff: error:")


def test_disjoint_loras(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    H = TINY_FLUX["H"]
    a = save_tensors(tmp_path / "a.safetensors", {
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(2, H, generator=g),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(H, 2, generator=g)})
    b = save_tensors(tmp_path / "b.safetensors", {
        "lora_unet_double_blocks_1_img_attn_proj.lora_down.weight": torch.randn(2, H, generator=g),
        "lora_unet_double_blocks_1_img_attn_proj.lora_up.weight": torch.randn(H, 2, generator=g)})
    rep = diff(a, b)
    assert rep.shared == 0 and rep.only_in_a == ["transformer:double_blocks.0.img_attn.proj"]
    assert rep.only_in_b == ["transformer:double_blocks.1.img_attn.proj"] and not rep.equivalent
