"""--blocks: spec parsing (lengths derived from the layout) and multipliers applied exactly once."""

from __future__ import annotations

import pytest

import lorakit
from lorakit.ops.blocks import parse_blocks
from lorakit.errors import UsageError
from lorakit.formats import read_lora
from lorakit.layouts import FLUX1
from lorakit.lora.model import ArchInstance, Target, dense_deltas
from lorakit.samples.synthetic import full_flux_params, write_aitoolkit_lora, write_sdscripts_lora

from conftest import TINY


def _arch(params):
    return ArchInstance(FLUX1, {"transformer": dict(params)})


def _t(module: str, component: str = "transformer") -> Target:
    return Target(component, module)


@pytest.fixture
def full_arch():
    return _arch(full_flux_params())


def test_full_flux_vector_lengths_come_from_block_counts(full_arch):
    n = full_flux_params()["double"] + full_flux_params()["single"]
    for length in (n, n + 1, n + 2, n + 3, n + 4):
        parse_blocks(",".join(["1"] * length), full_arch)
    with pytest.raises(UsageError, match=f"{n} = .*{n + 4} = LoRA Block Weight"):
        parse_blocks(",".join(["1"] * (n + 5)), full_arch)


def test_lbw_61_vector_slots(full_arch):
    d, s = full_flux_params()["double"], full_flux_params()["single"]
    values = [0.1, 0.2, 0.3] + [1 + i / 100 for i in range(d)] + [2 + i / 100 for i in range(s)] + [0.9]
    bw = parse_blocks(",".join(map(str, values)), full_arch)
    assert bw.kind == "lbw" and len(values) == 3 + d + s + 1
    assert bw.multiplier(_t("text_model.encoder.layers.3.mlp.fc1", "clip_l")) == 0.1
    assert bw.multiplier(_t("encoder.block.0.layer.0.SelfAttention.q", "t5")) == 0.2
    assert bw.multiplier(_t("txt_in")) == 0.3
    assert bw.multiplier(_t("guidance_in.out_layer")) == 0.3
    assert bw.multiplier(_t("double_blocks.0.img_attn.qkv")) == 1.0
    assert bw.multiplier(_t(f"double_blocks.{d - 1}.txt_mlp.2")) == pytest.approx(1 + (d - 1) / 100)
    assert bw.multiplier(_t("single_blocks.5.linear1")) == pytest.approx(2.05)
    assert bw.multiplier(_t("final_layer.adaLN_modulation.1")) == 0.9


def test_plain_vectors_base_and_tail_slots():
    tiny = _arch(TINY)
    n = TINY["double"] + TINY["single"]
    blocks_only = parse_blocks(",".join(["2"] * n), tiny)
    assert blocks_only.multiplier(_t("single_blocks.1.linear2")) == 2
    assert blocks_only.multiplier(_t("img_in")) == 1
    base = parse_blocks(",".join(["0.5"] + ["2"] * n), tiny)
    assert base.multiplier(_t("img_in")) == 0.5
    assert base.multiplier(_t("text_model.encoder.layers.0.mlp.fc1", "clip_l")) == 0.5
    assert base.multiplier(_t("double_blocks.1.img_mlp.0")) == 2
    tail = parse_blocks(",".join(["1"] * n + ["3", "4", "5"]), tiny)
    assert (tail.multiplier(_t("time_in.in_layer")), tail.multiplier(_t("final_layer.linear")),
            tail.multiplier(_t("encoder.block.1.layer.0.SelfAttention.o", "t5"))) == (3, 4, 5)


def test_selectors_ranges_components_last_wins():
    tiny = _arch(TINY)
    bw = parse_blocks("double_blocks=0.5,double_blocks.1.img_attn=0,single_blocks.0-1=1.5,txt_in=0,clip_l=2", tiny)
    assert bw.multiplier(_t("double_blocks.0.txt_mlp.0")) == 0.5
    assert bw.multiplier(_t("double_blocks.1.img_attn.qkv")) == 0           # later, more specific selector
    assert bw.multiplier(_t("double_blocks.1.img_mlp.0")) == 0.5
    assert bw.multiplier(_t("single_blocks.1.linear1")) == 1.5
    assert bw.multiplier(_t("txt_in")) == 0
    assert bw.multiplier(_t("img_in")) == 1
    assert bw.multiplier(_t("text_model.encoder.layers.1.mlp.fc2", "clip_l")) == 2
    star = parse_blocks("double_blocks.*.img_mlp=3", tiny)
    assert star.multiplier(_t("double_blocks.1.img_mlp.2")) == 3
    assert star.multiplier(_t("double_blocks.1.txt_mlp.2")) == 1


@pytest.mark.parametrize("spec,needle", [
    ("double_blokcs.0=1", "did you mean 'double_blocks"),
    ("single_blocks.0-7=1", "single_blocks.2"),         # the tiny model has 2 single blocks
    ("txt_inn=0", "did you mean 'txt_in'"),
    ("double_blocks.3-1=1", "empty range"),
    ("double_blocks=abc", "not a number"),
    ("1,2,x", "not a number"),
])
def test_bad_specs(spec, needle):
    with pytest.raises(UsageError, match=needle):
        parse_blocks(spec, _arch(TINY))


@pytest.fixture
def pair(tmp_path):
    a = str(write_aitoolkit_lora(tmp_path / "a.safetensors", rank=4, seed=41))
    k = str(write_sdscripts_lora(tmp_path / "k.safetensors", rank=6, alpha=3.0, seed=42))
    return a, k


def _expected(pairs, mult):
    total = {}
    for path, w in pairs:
        for t, v in dense_deltas(read_lora(path)).items():
            total[t] = total.get(t, 0) + w * mult(t) * v.double()
    return {t: v for t, v in total.items() if mult(t) != 0}


@pytest.mark.parametrize("method", ["concat", "svd"])
def test_multipliers_apply_once_and_zero_blocks_vanish(pair, tmp_path, method):
    a, k = pair
    spec = "double_blocks.0=0,single_blocks=3,clip_l=-0.5"
    out = str(tmp_path / f"{method}.safetensors")
    report = lorakit.merge([(a, 0.3), (k, 0.7)], out, method=method, blocks=spec,
                           rank=10_000 if method == "svd" else None)

    def mult(t):
        if t.module.startswith("double_blocks.0."):
            return 0.0
        if t.module.startswith("single_blocks."):
            return 3.0                                   # m, not m² = 9
        return -0.5 if t.component == "clip_l" else 1.0
    got = dense_deltas(read_lora(out))
    ref = _expected([(a, 0.3), (k, 0.7)], mult)
    assert set(got) == set(ref)
    assert not any(t.module.startswith("double_blocks.0.") for t in got)
    assert all(s.startswith("transformer:double_blocks.0.") for s in report.dropped) and report.dropped
    for t in ref:
        assert float((got[t].double() - ref[t]).norm() / ref[t].norm()) < 1e-5, t


def test_lbw_vector_through_cli_on_tiny_model(pair, tmp_path):
    from lorakit.cli import main
    a, k = pair
    n_d, n_s = TINY["double"], TINY["single"]
    # CLIP, T5, IN, D0.., S0.., OUT
    values = ["0", "1", "1"] + ["1"] * (n_d - 1) + ["2"] + ["1"] * n_s + ["1"]
    out = str(tmp_path / "lbw.safetensors")
    assert main(["merge", f"{a}:1", f"{k}:1", "-o", out, "--blocks", ",".join(values)]) == 0
    got = dense_deltas(read_lora(out))
    assert "clip_l" not in {t.component for t in got}
    last = f"double_blocks.{n_d - 1}."
    ref = _expected([(a, 1.0), (k, 1.0)], lambda t: 0.0 if t.component == "clip_l" else
                    2.0 if t.module.startswith(last) else 1.0)
    for t in ref:
        assert float((got[t].double() - ref[t]).norm() / ref[t].norm()) < 1e-6


def test_ties_block_multiplier_scales_the_merged_module_once(pair, tmp_path):
    a, _ = pair
    b = str(write_aitoolkit_lora(tmp_path / "b.safetensors", rank=4, seed=43))
    plain, scaled = str(tmp_path / "p.safetensors"), str(tmp_path / "s.safetensors")
    lorakit.merge([(a, 1.0), (b, 1.0)], plain, method="ties", density=0.5, rank=10_000)
    lorakit.merge([(a, 1.0), (b, 1.0)], scaled, method="ties", density=0.5, rank=10_000, blocks="single_blocks=2.5")
    p, s = dense_deltas(read_lora(plain)), dense_deltas(read_lora(scaled))
    for t in p:
        m = 2.5 if t.module.startswith("single_blocks.") else 1.0
        assert float((s[t].double() - m * p[t].double()).norm() / p[t].double().norm()) < 1e-5 * m, t
