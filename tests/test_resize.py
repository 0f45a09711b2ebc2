"""lorakit resize: exact optimal truncation from the factors, strength kept, dynamic ranks, verification."""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile

import pytest
import torch

from lorakit.lora.adapters import Full, LoHa, LoKr, LoRA
from lorakit.cli.main import main as cli
from lorakit.ops.conversion import lora_output_metadata
from lorakit.errors import KeyMappingError, UsageError
from lorakit.formats import emit, read_lora
from lorakit.io import open_weights, save_tensors
from lorakit.layouts import FLUX1, expand
from lorakit.lora.model import LoraModel, Patch, Target, dense_deltas
from lorakit.ops.resizing import resize, resize_adapter, verify_models
from lorakit.samples.synthetic import TINY_FLUX, write_aitoolkit_lora, write_sdscripts_lora

COMPONENT = FLUX1.components["transformer"]


@functools.lru_cache(maxsize=1)
def tiny_arch():
    """The tiny FLUX ArchInstance, as read back from a tiny LoRA."""
    with tempfile.TemporaryDirectory() as d:
        return read_lora(write_sdscripts_lora(os.path.join(d, "a.safetensors"), clip=None)).arch


def write_model(path, patches: list[Patch], fmt: str = "kohya") -> str:
    model = LoraModel(tiny_arch(), patches, fmt, {"ss_training_comment": "trained by hand"})
    result = emit(model, fmt, keep_algo=True)   # fixtures keep their LoHa/LoKr keys as written
    meta = lora_output_metadata(model, result, fmt, operation="test", inputs=[], title=None)
    return save_tensors(path, result.tensors, meta)


def lora_with_spectrum(out: int, inp: int, s: torch.Tensor, stored_rank: int, alpha: float | None,
                       g: torch.Generator) -> LoRA:
    """A LoRA of stored rank ``stored_rank`` whose delta has exactly the singular values ``s``."""
    k = s.numel()
    u, _ = torch.linalg.qr(torch.randn(out, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(inp, k, generator=g))
    mix = torch.randn(k, stored_rank, generator=g)            # B = U·S·M, A = pinv(M)·Vᵀ: same product
    up = (u * s) @ mix
    down = torch.linalg.pinv(mix) @ v.T
    scale = (alpha if alpha is not None else stored_rank) / stored_rank
    return LoRA(alpha=alpha, down=down.contiguous(), up=(up / scale).contiguous())


def model_with_spectrum(tmp_path, s: torch.Tensor, stored_rank: int = 8, alpha: float | None = 4.0,
                        seed: int = 0) -> tuple[str, list[Patch]]:
    g = torch.Generator().manual_seed(seed)
    patches = []
    for m in expand(COMPONENT, TINY_FLUX):
        if "blocks." not in m.name:
            continue
        a = lora_with_spectrum(m.out, m.inp, s, stored_rank, alpha, g)
        patches.append(Patch(Target("transformer", m.name), a, source=m.name))
    return write_model(tmp_path / "in.safetensors", patches), patches


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def check_optimal(in_path, out_path, k: int) -> None:
    """Each output delta equals the best rank-k approximation of the input delta (Eckart–Young)."""
    din = dense_deltas(read_lora(in_path))
    dout = dense_deltas(read_lora(out_path))
    assert set(din) == set(dout)
    for t, d in din.items():
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        # fp32 inputs: the kept subspace is determined to about eps·‖D‖/gap (≈1.5e-5 for the 0.125/0.0625 gap)
        assert float((dout[t].double() - best).norm() / best.norm()) <= 1e-4, t


# ---------------------------------------------------------------------------------------------
# Exactness and optimality
# ---------------------------------------------------------------------------------------------

def test_resize_to_at_least_the_true_rank_is_exact(tmp_path):
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])
    src, _ = model_with_spectrum(tmp_path, s, stored_rank=8, alpha=4.0)
    for k in (4, 6):
        rep = resize(src, tmp_path / f"r{k}.safetensors", rank=k, verify=True)
        assert {m.rank_out for m in rep.modules} == {4 if k == 4 else 6}
        assert {m.path for m in rep.modules} == {"factored"}
        din, dout = dense_deltas(read_lora(src)), dense_deltas(read_lora(tmp_path / f"r{k}.safetensors"))
        assert max(rel(dout[t], din[t]) for t in din) <= 1e-6
        assert rep.max_verify_error <= 1e-6
        assert all(m.relative_error <= 1e-6 for m in rep.modules)
    # a resize whose target is already met (every module at or below the rank) writes the deltas unchanged
    rep = resize(src, tmp_path / "r8.safetensors", rank=8)
    assert rep.target_met and "already met" in rep.notes[0] and {m.path for m in rep.modules} == {"unchanged"}
    din, dout = dense_deltas(read_lora(src)), dense_deltas(read_lora(tmp_path / "r8.safetensors"))
    assert all(torch.equal(dout[t], din[t]) for t in din)


def test_lower_rank_is_the_optimal_truncation_and_strength_is_kept(tmp_path):
    s = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.125])
    src, _ = model_with_spectrum(tmp_path, s, stored_rank=8, alpha=4.0)
    rep = resize(src, tmp_path / "r2.safetensors", rank=2, verify=True)
    check_optimal(src, tmp_path / "r2.safetensors", 2)
    tail = float((s[2:] ** 2).sum() / (s ** 2).sum())
    for m in rep.modules:
        assert m.rank_in == 8 and m.rank_out == 2
        assert m.retained_energy == pytest.approx(1 - tail, abs=1e-6)
        assert m.relative_error == pytest.approx(math.sqrt(tail), rel=1e-4)
    for t, e in rep.verified.items():
        assert e == pytest.approx(math.sqrt(tail), rel=1e-4), t
    with open_weights(tmp_path / "r2.safetensors") as f:
        alphas = {float(f.get(k)) for k in f.keys() if k.endswith(".alpha")}
        assert alphas == {1.0}          # scale α/r = 4/8 kept: new α = 0.5 · 2
        meta = f.metadata
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1"
    assert meta["ss_training_comment"].startswith("resized by lorakit: rank 2; ranks 8 -> 2; trained by hand")
    prov = json.loads(meta["lorakit.provenance"])
    assert prov["operation"] == "resize" and prov["rank"] == 2 and prov["inputs"][0]["sha256"]


def test_factored_path_never_forms_the_dense_delta(tmp_path, monkeypatch):
    s = torch.tensor([3.0, 2.0, 1.0])
    src, _ = model_with_spectrum(tmp_path, s, stored_rank=8)

    original = LoRA.dense

    def boom(self):
        if self.down.device.type == "meta":      # shape-only checks while parsing
            return original(self)
        raise AssertionError("LoRA densified")

    monkeypatch.setattr(LoRA, "dense", boom)
    rep = resize(src, tmp_path / "r.safetensors", rank=2, verify=True)
    assert {m.path for m in rep.modules} == {"factored"}


@pytest.mark.parametrize("alpha", [None, 4.0, 16.0, -2.0])
def test_resize_adapter_keeps_the_scale(alpha):
    g = torch.Generator().manual_seed(3)
    a = lora_with_spectrum(40, 24, torch.tensor([2.0, 1.0, 0.1]), 6, alpha, g)
    new, info = resize_adapter(a, 3, None)
    assert new.scale == pytest.approx(a.scale) and new.rank == 3
    assert rel(new.dense(), a.dense()) <= 1e-5 and info["relative_error"] <= 1e-6


# ---------------------------------------------------------------------------------------------
# Dynamic ranks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,expected", [
    ("sv_ratio:5", 3),          # s > 8/5 = 1.6: 8, 4, 2
    ("sv_ratio:100", 7),        # s > 0.08: all but 0.0625
    ("sv_fro:0.9", 2),          # energy ≥ 0.81: 64/85.3 = 0.75, 80/85.3 = 0.9375
    ("sv_fro:0.97", 3),         # ≥ 0.9409: 84/85.3 = 0.984
    ("sv_cumulative:0.7", 2),   # mass ≥ 0.7: 8/15.94 = 0.50, 12/15.94 = 0.75
    ("sv_cumulative:0.95", 5),  # 14/15.94 = 0.878, 15/15.94 = 0.941, 15.5/15.94 = 0.972
])
def test_dynamic_methods_keep_the_documented_ranks(tmp_path, spec, expected):
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625])
    src, _ = model_with_spectrum(tmp_path, s, stored_rank=8, alpha=8.0)
    rep = resize(src, tmp_path / "d.safetensors", dynamic=spec, verify=True)
    assert {m.rank_out for m in rep.modules} == {expected}
    check_optimal(src, tmp_path / "d.safetensors", expected)
    capped = resize(src, tmp_path / "c.safetensors", dynamic=spec, rank=1)
    assert {m.rank_out for m in capped.modules} == {1}


def test_sd_scripts_dynamic_aliases(tmp_path, capsys):
    s = torch.tensor([8.0, 4.0, 2.0, 1.0])
    src, _ = model_with_spectrum(tmp_path, s, stored_rank=6)
    rc = cli(["resize", src, "--save_to", str(tmp_path / "o.safetensors"), "--new_rank", "8", "--dynamic_method",
              "sv_ratio", "--dynamic_param", "3", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert {m["rank_out"] for m in rep["modules"]} == {2} and rep["dynamic"] == "sv_ratio:3"
    assert read_lora(tmp_path / "o.safetensors").metadata["ss_network_dim"] == "2"


# ---------------------------------------------------------------------------------------------
# Other adapter kinds and split files
# ---------------------------------------------------------------------------------------------

def test_split_format_parts_are_resized_separately(tmp_path):
    src = write_aitoolkit_lora(tmp_path / "ait.safetensors", rank=8)
    rep = resize(src, tmp_path / "r.safetensors", rank=3, verify=True)
    assert rep.source_format == rep.target_format == "diffusers"
    q = [m for m in rep.modules if m.module.endswith("attn.to_q")]
    assert q and all(m.rows is not None and m.rank_out == 3 for m in q)
    with open_weights(src) as a, open_weights(tmp_path / "r.safetensors") as b:
        assert sorted(a.keys()) == sorted(b.keys())
    # each part is its own optimal truncation
    model_in, model_out = read_lora(src), read_lora(tmp_path / "r.safetensors")
    outs = {(p.target, p.rows): p for p in model_out.patches}
    for p in model_in.patches:
        d = p.dense().double()
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert rel(outs[(p.target, p.rows)].dense().double(), best) <= 1e-5
    # a fused output stacks them: three rank-3 parts give rank 9 on qkv
    rep = resize(src, tmp_path / "k.safetensors", rank=3, to="kohya", verify=True)
    with open_weights(tmp_path / "k.safetensors") as f:
        assert f.shape("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight")[0] == 9
    assert max(rep.verified.values()) == pytest.approx(max(m.relative_error for m in rep.modules), rel=1e-3)


def test_loha_lokr_full_are_densified_into_lora(tmp_path):
    g = torch.Generator().manual_seed(4)
    H = TINY_FLUX["H"]
    loha = LoHa(alpha=2.0, w1a=torch.randn(H, 2, generator=g), w1b=torch.randn(2, H, generator=g),
                w2a=torch.randn(H, 2, generator=g), w2b=torch.randn(2, H, generator=g))
    lokr = LoKr(alpha=None, w1=torch.randn(4, 4, generator=g), w2a=torch.randn(H // 4, 2, generator=g),
                w2b=torch.randn(2, H // 4, generator=g))
    full = Full(alpha=None, diff=torch.randn(H, H, generator=g))
    patches = [Patch(Target("transformer", "double_blocks.0.img_attn.proj"), loha),
               Patch(Target("transformer", "double_blocks.0.txt_attn.proj"), lokr),
               Patch(Target("transformer", "double_blocks.1.img_attn.proj"), full)]
    src = write_model(tmp_path / "lyco.safetensors", patches)
    rep = resize(src, tmp_path / "r.safetensors", rank=3, verify=True)
    assert sorted(m.kind for m in rep.modules) == ["full", "loha", "lokr"]
    assert {m.path for m in rep.modules} == {"dense"} and {m.rank_out for m in rep.modules} == {3}
    assert read_lora(tmp_path / "r.safetensors").adapter_kinds() == ["lora"]
    check_optimal(src, tmp_path / "r.safetensors", 3)
    for m in rep.modules:
        assert rep.verified[m.target] == pytest.approx(m.relative_error, rel=1e-4)


def test_bias_is_kept_and_dora_refused(tmp_path):
    g = torch.Generator().manual_seed(2)
    H = TINY_FLUX["H"]
    a = lora_with_spectrum(H, H, torch.tensor([2.0, 1.0, 0.5]), 4, 4.0, g)
    bias = torch.linspace(-1, 1, H)
    src = write_model(tmp_path / "b.safetensors", [Patch(Target("transformer", "double_blocks.0.img_attn.proj"), a,
                                                         bias=bias)])
    resize(src, tmp_path / "r.safetensors", rank=2)
    (p,) = read_lora(tmp_path / "r.safetensors").patches
    assert p.adapter.rank == 2 and torch.equal(p.bias, bias)
    dora = write_model(tmp_path / "dora.safetensors", [Patch(Target("transformer", "double_blocks.0.img_attn.proj"),
                                                             a, dora=torch.ones(H))])
    with pytest.raises(UsageError, match="DoRA"):
        resize(dora, tmp_path / "x.safetensors", rank=2)


def test_verify_detects_a_wrong_output():
    g = torch.Generator().manual_seed(5)
    a = lora_with_spectrum(48, 32, torch.tensor([2.0, 1.0]), 2, None, g)
    t = Target("transformer", "double_blocks.0.img_attn.proj")
    ref = LoraModel(tiny_arch(), [Patch(t, a)], "kohya")
    same = LoraModel(tiny_arch(), [Patch(t, a.scaled(1.0))], "kohya")
    wrong = LoraModel(tiny_arch(), [Patch(t, a.scaled(1.1))], "kohya")
    assert verify_models(ref, same)[str(t)] <= 1e-7
    assert verify_models(ref, wrong)[str(t)] == pytest.approx(0.1, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Determinism, options, CLI
# ---------------------------------------------------------------------------------------------

def test_two_runs_are_byte_identical(tmp_path):
    src = write_sdscripts_lora(tmp_path / "sd.safetensors", rank=8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for sub in ("a", "b"):
        resize(src, tmp_path / sub / "out.safetensors", dynamic="sv_fro:0.9", rank=6)
    assert (tmp_path / "a" / "out.safetensors").read_bytes() == (tmp_path / "b" / "out.safetensors").read_bytes()


def test_text_encoder_modules_are_resized_too(tmp_path):
    src = write_sdscripts_lora(tmp_path / "sd.safetensors", rank=8)
    rep = resize(src, tmp_path / "out.safetensors", rank=2, dtype=torch.bfloat16)
    assert any(m.target.startswith("clip_l:") for m in rep.modules) and rep.dtype == "bfloat16"
    with open_weights(tmp_path / "out.safetensors") as f:
        assert {f.infos[k].dtype for k in f.keys() if not k.endswith(".alpha")} == {"BF16"}


def test_options_and_refusals(tmp_path):
    src = write_sdscripts_lora(tmp_path / "sd.safetensors", rank=4)
    with pytest.raises(UsageError, match="no rank"):
        resize(src, tmp_path / "x.safetensors")
    with pytest.raises(UsageError, match="dynamic"):
        resize(src, tmp_path / "x.safetensors", dynamic="fro:0.5")
    with pytest.raises(UsageError, match="cannot write"):
        resize(src, tmp_path / "x.safetensors", rank=2, to="xlabs")
    with open_weights(src) as f:
        tensors = {k: f.get(k) for k in f.keys()}
    tensors["lora_unet_mystery.lora_down.weight"] = torch.zeros(2, 2)
    save_tensors(tmp_path / "odd.safetensors", tensors, {})
    with pytest.raises(KeyMappingError):
        resize(tmp_path / "odd.safetensors", tmp_path / "x.safetensors", rank=2)
    rep = resize(tmp_path / "odd.safetensors", tmp_path / "x.safetensors", rank=2, allow_partial=True)
    assert rep.unknown_keys == ["lora_unet_mystery.lora_down.weight"]


def test_cli_text_summary(tmp_path, capsys):
    src = write_sdscripts_lora(tmp_path / "sd.safetensors", rank=8)
    assert cli(["resize", src, "-o", str(tmp_path / "o.safetensors"), "--rank", "4", "--verify", "--to",
                "diffusers"]) == 0
    err = capsys.readouterr().err
    assert "kohya → diffusers" in err and "ranks 8 → 4" in err and "verified" in err
    assert cli(["resize", src, "-o", str(tmp_path / "p.safetensors")]) == 2
