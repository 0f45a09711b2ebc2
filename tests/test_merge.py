"""lorakit merge: exact concat, SVD merges, dynamic rank, DARE reproducibility, errors, recipes, metadata."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.errors import ArchitectureError, LorakitError, MergeError, OutputError, UsageError
from lorakit.formats import read_lora
from lorakit.io import open_weights
from lorakit.lora.model import dense_deltas
from lorakit.samples.synthetic import TINY_FLUX, write_aitoolkit_lora, write_sdscripts_lora


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def deltas(path: str) -> dict:
    return {t: v.double() for t, v in dense_deltas(read_lora(path)).items()}


def weighted_sum(pairs: list[tuple[str, float]]) -> dict:
    total: dict = {}
    for path, w in pairs:
        for t, v in deltas(path).items():
            total[t] = total.get(t, 0) + w * v
    return total


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def assert_equals_sum(out: str, pairs: list[tuple[str, float]], tol: float = 1e-6) -> None:
    got = deltas(out)
    ref = weighted_sum(pairs)
    assert set(got) == set(ref)
    worst = max(rel(got[t], ref[t]) for t in ref)
    assert worst <= tol, worst


@pytest.fixture
def loras(tmp_path):
    """Two AI-Toolkit (diffusers) LoRAs of different ranks, an sd-scripts LoRA (α ≠ r, CLIP modules) and an
    AI-Toolkit LoRA converted to kohya by lorakit."""
    a = write_aitoolkit_lora(tmp_path / "a.safetensors", rank=4, seed=11)
    b = write_aitoolkit_lora(tmp_path / "b.safetensors", rank=8, seed=12)
    k = write_sdscripts_lora(tmp_path / "k.safetensors", rank=6, alpha=3.0, seed=13)
    c_src = write_aitoolkit_lora(tmp_path / "c_src.safetensors", rank=5, seed=14)
    c = str(tmp_path / "c_kohya.safetensors")
    lorakit.convert(c_src, c, to="kohya")
    return {"a": str(a), "b": str(b), "k": str(k), "c": c}


# ---------------------------------------------------------------------------------------------
# 1. the seed scenario: concat through the CLI
# ---------------------------------------------------------------------------------------------

def test_concat_two_aitoolkit_different_ranks_cli(loras, tmp_path):
    out = str(tmp_path / "merged.safetensors")
    assert main(["merge", f"{loras['a']}:0.3", f"{loras['b']}:0.7", "-o", out, "--to", "kohya"]) == 0
    model = read_lora(out)
    assert model.format == "kohya"
    assert_equals_sum(out, [(loras["a"], 0.3), (loras["b"], 0.7)])
    # the rank of a fused module is the sum of every input's parts: qkv from 3 split parts of 4 and of 8
    qkv = [p for p in model.patches if p.target.module == "double_blocks.0.img_attn.qkv"]
    assert len(qkv) == 1 and qkv[0].adapter.rank == 3 * 4 + 3 * 8
    assert qkv[0].adapter.scale == 1.0


def test_concat_with_a_third_input_in_kohya_format(loras, tmp_path):
    out = str(tmp_path / "merged3.safetensors")
    assert main(["merge", f"{loras['a']}:0.3", f"{loras['b']}:0.7", f"{loras['c']}:0.25", f"{loras['k']}:1.5",
                 "-o", out, "--to", "kohya"]) == 0
    assert_equals_sum(out, [(loras["a"], 0.3), (loras["b"], 0.7), (loras["c"], 0.25), (loras["k"], 1.5)])
    assert "clip_l" in read_lora(out).components()


@pytest.mark.parametrize("to", ["diffusers", "comfy"])
def test_concat_other_output_formats_and_negative_weights(loras, tmp_path, to):
    out = str(tmp_path / f"m_{to}.safetensors")
    pairs = [(loras["a"], -0.6), (loras["b"], 0.7), (loras["k"], -1.0)]
    report = lorakit.merge(pairs, out, to=to, verify=True)
    assert read_lora(out).format == to
    assert_equals_sum(out, pairs)
    assert report.verify["max_relative_error"] < 1e-6


def test_negative_weight_cancels_exactly(loras, tmp_path):
    out = str(tmp_path / "zero.safetensors")
    report = lorakit.merge([(loras["a"], 0.5), (loras["a"], -0.5), (loras["b"], 1.0)], out, verify=True)
    assert_equals_sum(out, [(loras["b"], 1.0)], tol=1e-6)
    assert report.verify["max_relative_error"] < 1e-6


def test_power_of_two_coefficients_stay_exact_in_bf16(tmp_path):
    a = write_aitoolkit_lora(tmp_path / "a.safetensors", rank=4, seed=3, dtype=torch.bfloat16)
    out = str(tmp_path / "m.safetensors")
    assert lorakit.merge([(a, 0.5), (a, -0.25)], out).warnings == []
    with open_weights(out) as f:
        assert {f.infos[k].dtype for k in f.keys() if not k.endswith(".alpha")} == {"BF16"}
    got, ref = deltas(out), weighted_sum([(str(a), 0.25)])
    # bf16 factors times 0.5 and −0.25 are exact; only the fp32/fp64 products differ
    assert max(rel(got[t], ref[t]) for t in ref) < 1e-6


def test_rounding_of_folded_weights_in_bf16_is_reported(tmp_path, capsys):
    a = write_aitoolkit_lora(tmp_path / "a.safetensors", rank=4, seed=3, dtype=torch.bfloat16)
    b = write_aitoolkit_lora(tmp_path / "b.safetensors", rank=8, seed=4, dtype=torch.bfloat16)
    out = str(tmp_path / "m.safetensors")
    assert main(["merge", f"{a}:0.3", f"{b}:0.7", "-o", out, "--verify"]) == 1     # a warning: exit 1
    err = capsys.readouterr().err
    assert "rounded" in err and "--dtype fp32" in err and "verify: max relative error" in err
    exact = str(tmp_path / "m32.safetensors")
    report = lorakit.merge([(a, 0.3), (b, 0.7)], exact, dtype=torch.float32, verify=True)
    assert report.warnings == [] and report.verify["max_relative_error"] < 1e-6
    assert_equals_sum(exact, [(str(a), 0.3), (str(b), 0.7)])


# ---------------------------------------------------------------------------------------------
# 3. SVD merges
# ---------------------------------------------------------------------------------------------

def test_svd_truncation_equals_dense_optimum(loras, tmp_path):
    out = str(tmp_path / "svd.safetensors")
    pairs = [(loras["a"], 0.3), (loras["b"], 0.7), (loras["k"], -0.4)]
    report = lorakit.merge(pairs, out, method="svd", rank=5, verify=True)
    got, ref = deltas(out), weighted_sum(pairs)
    energies = {m.module: m for m in report.modules}
    for t, d in ref.items():
        u, s, vh = torch.linalg.svd(d.reshape(d.shape[0], -1), full_matrices=False)
        best = (u[:, :5] * s[:5]) @ vh[:5]
        assert rel(got[t], best) < 1e-5, t
        retained = float(s[:5].square().sum() / s.square().sum())
        assert energies[str(t)].retained_energy == pytest.approx(retained, rel=1e-4)
        assert report.verify["modules"][str(t)] == pytest.approx(math.sqrt(1 - retained), rel=1e-3, abs=1e-6)


def test_svd_rank_at_least_total_is_exact(loras, tmp_path):
    out = str(tmp_path / "svd_full.safetensors")
    pairs = [(loras["a"], 0.3), (loras["b"], -0.7)]
    lorakit.merge(pairs, out, method="svd", rank=3 * (4 + 8), verify=True)
    assert_equals_sum(out, pairs, tol=1e-5)


def test_svd_default_rank_is_largest_input_rank(loras, tmp_path):
    out = str(tmp_path / "svd_default.safetensors")
    report = lorakit.merge([(loras["a"], 1.0), (loras["b"], 1.0)], out, method="svd")
    by = {m.module: m.rank for m in report.modules}
    assert by["transformer:double_blocks.0.img_attn.qkv"] == 3 * 8      # fused from three rank-8 parts
    assert by["transformer:double_blocks.0.img_attn.proj"] == 8


def _spectrum_lora(path, values):
    """A one-module kohya LoRA whose delta has exactly the given singular values."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    h = TINY_FLUX["H"]
    q1, _ = torch.linalg.qr(torch.randn(h, len(values), generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(h, len(values), generator=g, dtype=torch.float64))
    s = torch.tensor(values, dtype=torch.float64)
    stem = "lora_unet_double_blocks_0_img_attn_proj"
    save_file({f"{stem}.lora_up.weight": (q1 * s).float().contiguous(),
               f"{stem}.lora_down.weight": q2.T.float().contiguous(),
               f"{stem}.alpha": torch.tensor(float(len(values)))}, str(path))
    return str(path)


@pytest.mark.parametrize("dynamic,cap,expected", [
    ("sv_ratio:5", None, 3),          # s > 8/5: 8, 4, 2
    ("sv_fro:0.9", None, 2),          # (64+16)/85.3125 = 0.9377 ≥ 0.81
    ("sv_cumulative:0.9", None, 4),   # (8+4+2+1)/15.75 = 0.952 ≥ 0.9
    ("sv_cumulative:0.9", 2, 2),      # --rank caps the dynamic rank
])
def test_dynamic_rank_on_constructed_spectrum(tmp_path, dynamic, cap, expected):
    src = _spectrum_lora(tmp_path / "spec.safetensors", [8, 4, 2, 1, 0.5, 0.25])
    out = str(tmp_path / "dyn.safetensors")
    report = lorakit.merge([(src, 1.0)], out, method="svd", dynamic=dynamic, rank=cap)
    assert [m.rank for m in report.modules] == [expected]
    (patch,) = read_lora(out).patches
    s = torch.linalg.svdvals(patch.adapter.dense().double())
    assert torch.allclose(s[:expected], torch.tensor([8, 4, 2, 1, 0.5, 0.25][:expected], dtype=torch.float64),
                          rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# ties / dare: determinism (the PEFT oracle is in test_merge_oracle.py)
# ---------------------------------------------------------------------------------------------

def test_dare_same_seed_same_bytes_other_seed_other_bytes(loras, tmp_path):
    outs = []
    for folder, seed in (("x", 7), ("y", 7), ("z", 8)):
        os.makedirs(tmp_path / folder)
        out = str(tmp_path / folder / "dare.safetensors")
        lorakit.merge([(loras["a"], 0.5), (loras["b"], 0.5)], out, method="dare_ties", density=0.5, seed=seed)
        with open(out, "rb") as fh:
            outs.append(fh.read())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]
    with open_weights(str(tmp_path / "x" / "dare.safetensors")) as f:
        prov = json.loads(f.metadata["lorakit.provenance"])
    assert prov["seed"] == 7 and prov["method"] == "dare_ties" and prov["density"] == 0.5


def test_ties_is_deterministic_and_verifies_against_its_dense_result(loras, tmp_path):
    out = str(tmp_path / "ties.safetensors")
    report = lorakit.merge([(loras["a"], 0.5), (loras["b"], 0.8)], out, method="ties", density=0.3, rank=10_000,
                           verify=True, majority_sign="frequency")
    assert report.verify["reference"] == "dense ties/dare result"
    assert report.verify["max_relative_error"] < 1e-5


# ---------------------------------------------------------------------------------------------
# --kohya-ratios
# ---------------------------------------------------------------------------------------------

def test_kohya_ratios_reproduce_sd_scripts_coefficients(tmp_path):
    # math.md §3.2: ranks 4 and 8, alphas 2 and 8, ratios 0.7 and −0.5 → each lands at |ratio|·r/R of its
    # intended ratio·ΔW: 0.7·4/12 = 0.2333 and 0.5·8/12 = 0.3333
    one = write_sdscripts_lora(tmp_path / "one.safetensors", rank=4, alpha=2.0, seed=1, clip=None)
    two = write_sdscripts_lora(tmp_path / "two.safetensors", rank=8, alpha=8.0, seed=2, clip=None)
    out = str(tmp_path / "kr.safetensors")
    assert main(["merge", f"{one}:0.7", f"{two}:-0.5", "-o", out, "--kohya-ratios"]) == 0
    assert_equals_sum(out, [(one, 0.7 * 0.7 * 4 / 12), (two, -0.5 * 0.5 * 8 / 12)])
    # and the linear default differs
    lin = str(tmp_path / "lin.safetensors")
    lorakit.merge([(one, 0.7), (two, -0.5)], lin)
    assert_equals_sum(lin, [(one, 0.7), (two, -0.5)])


def test_kohya_ratios_equal_ranks_at_ratio_one_come_out_at_half_strength(tmp_path):
    one = write_sdscripts_lora(tmp_path / "one.safetensors", rank=4, alpha=4.0, seed=1, clip=None)
    two = write_sdscripts_lora(tmp_path / "two.safetensors", rank=4, alpha=4.0, seed=2, clip=None)
    out = str(tmp_path / "kr.safetensors")
    lorakit.merge([(one, 1.0), (two, 1.0)], out, kohya_ratios=True)
    assert_equals_sum(out, [(one, 0.5), (two, 0.5)])


# ---------------------------------------------------------------------------------------------
# LoHa / LoKr / full inputs
# ---------------------------------------------------------------------------------------------

def _lycoris_file(path, kind):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(5)
    h, m = TINY_FLUX["H"], TINY_FLUX["M"]
    t = {}
    stem = "lora_unet_double_blocks_0_img_mlp_0"     # M × H
    stem2 = "lora_unet_double_blocks_1_img_attn_proj"  # H × H
    if kind == "loha":
        for s, (o, i) in ((stem, (m, h)), (stem2, (h, h))):
            t[f"{s}.hada_w1_a"] = torch.randn(o, 2, generator=g)
            t[f"{s}.hada_w1_b"] = torch.randn(2, i, generator=g)
            t[f"{s}.hada_w2_a"] = torch.randn(o, 3, generator=g)
            t[f"{s}.hada_w2_b"] = torch.randn(3, i, generator=g)
            t[f"{s}.alpha"] = torch.tensor(1.0)
    elif kind == "lokr":
        t[f"{stem}.lokr_w1"] = torch.randn(4, 2, generator=g)          # (4·32) × (2·16)
        t[f"{stem}.lokr_w2_a"] = torch.randn(32, 2, generator=g)
        t[f"{stem}.lokr_w2_b"] = torch.randn(2, 16, generator=g)
        t[f"{stem}.alpha"] = torch.tensor(1.0)
        t[f"{stem2}.lokr_w1"] = torch.randn(4, 4, generator=g)
        t[f"{stem2}.lokr_w2"] = torch.randn(8, 8, generator=g)       # full second factor: densified
    else:
        t[f"{stem2}.diff"] = torch.randn(h, h, generator=g) * 0.01
    save_file({k: v.contiguous() for k, v in t.items()}, str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["loha", "lokr", "full"])
def test_lycoris_inputs_merge_exactly(tmp_path, loras, kind):
    src = _lycoris_file(tmp_path / f"{kind}.safetensors", kind)
    pairs = [(src, 0.6), (loras["a"], 0.4)]
    out = str(tmp_path / "m.safetensors")
    lorakit.merge(pairs, out, verify=True)
    assert_equals_sum(out, pairs, tol=1e-5)
    svd = str(tmp_path / "s.safetensors")
    lorakit.merge(pairs, svd, method="svd", rank=10_000)
    assert_equals_sum(svd, pairs, tol=1e-5)


def test_concat_to_diffusers_refuses_modules_needing_a_full_diff(tmp_path, loras):
    src = _lycoris_file(tmp_path / "full.safetensors", "full")
    out = tmp_path / "m.safetensors"
    with pytest.raises(MergeError, match="--method svd"):
        lorakit.merge([(src, 1.0), (loras["a"], 1.0)], str(out), to="diffusers")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# errors: typed, one line, no output file
# ---------------------------------------------------------------------------------------------

def test_mismatched_architectures_refused(tmp_path, loras):
    other = write_aitoolkit_lora(tmp_path / "wide.safetensors", dict(TINY_FLUX, H=48), rank=4)
    out = tmp_path / "m.safetensors"
    with pytest.raises(ArchitectureError):
        lorakit.merge([(loras["a"], 1.0), (str(other), 1.0)], str(out))
    assert not out.exists()


@pytest.mark.parametrize("kwargs,exc", [
    ({"method": "svd", "rank": 0}, UsageError),
    ({"method": "svd", "rank": -3}, UsageError),
    ({"method": "concat", "rank": 4}, UsageError),
    ({"method": "ties"}, UsageError),                       # --density required
    ({"method": "ties", "density": 0.0}, UsageError),
    ({"method": "svd", "density": 0.5}, UsageError),
    ({"method": "svd", "dynamic": "sv_fro:1.5"}, UsageError),
    ({"method": "svd", "dynamic": "nonsense"}, UsageError),
    ({"method": "svd", "seed": 3}, UsageError),
    ({"method": "svd", "kohya_ratios": True}, UsageError),
    ({"method": "magic"}, UsageError),
])
def test_bad_options_are_usage_errors(loras, tmp_path, kwargs, exc):
    out = tmp_path / "m.safetensors"
    with pytest.raises(exc):
        lorakit.merge([(loras["a"], 1.0), (loras["b"], 1.0)], str(out), **kwargs)
    assert not out.exists()


def test_empty_inputs_and_output_equal_to_input(loras, tmp_path):
    with pytest.raises(UsageError):
        lorakit.merge([], str(tmp_path / "m.safetensors"))
    before = open(loras["a"], "rb").read()
    with pytest.raises(OutputError):
        lorakit.merge([(loras["a"], 1.0), (loras["b"], 1.0)], loras["a"])
    assert open(loras["a"], "rb").read() == before


def test_cli_errors_are_one_line_with_exit_code_2(loras, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    for argv in (["merge", "-o", str(out)],
                 ["merge", loras["a"], "-o", str(out), "--method", "svd", "--rank", "0"],
                 ["merge", loras["a"], loras["b"], "-o", loras["b"]],
                 ["merge", loras["a"], "-o", str(out), "--blocks", "double_blokcs.0=0"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lorakit merge: error:") and "\n" not in err
    assert not out.exists()


def test_dora_inputs_are_refused(tmp_path, loras):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    h = TINY_FLUX["H"]
    stem = "lora_unet_double_blocks_0_img_attn_proj"
    src = str(tmp_path / "dora.safetensors")
    save_file({f"{stem}.lora_down.weight": torch.randn(2, h, generator=g),
               f"{stem}.lora_up.weight": torch.randn(h, 2, generator=g),
               f"{stem}.alpha": torch.tensor(2.0), f"{stem}.dora_scale": torch.rand(1, h, generator=g)}, src)
    with pytest.raises(MergeError, match="DoRA"):
        lorakit.merge([(src, 1.0), (loras["a"], 1.0)], str(tmp_path / "m.safetensors"))


# ---------------------------------------------------------------------------------------------
# dry run, JSON, recipes, metadata
# ---------------------------------------------------------------------------------------------

def test_dry_run_writes_nothing_and_json_reports(loras, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["merge", f"{loras['a']}:0.3", f"{loras['b']}:0.7", "-o", str(out), "--method", "svd", "--rank", "4",
                 "--dry-run", "--json"]) == 0
    assert not out.exists()
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] and report["method"] == "svd" and report["rank_range"] == [4, 4]
    assert all(0 < m["retained_energy"] <= 1 for m in report["modules"])


def test_recipe_and_explicit_cli_values_win(loras, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "inputs:\n"
        f"  - {{path: {os.path.basename(loras['a'])}, weight: 0.3}}\n"
        f"  - {os.path.basename(loras['b'])}:0.7\n"
        "method: svd\n"
        "rank: 3\n"
        "output: from_recipe.safetensors\n"
        "to: diffusers\n")
    assert main(["merge", "--recipe", str(recipe)]) == 0
    produced = tmp_path / "from_recipe.safetensors"
    assert read_lora(str(produced)).format == "diffusers"
    assert {p.adapter.rank for p in read_lora(str(produced)).patches} == {3}
    out = str(tmp_path / "cli.safetensors")
    # the recipe's rank still applies when only --method is overridden, and concat refuses a rank
    assert main(["merge", "--recipe", str(recipe), "--method", "concat", "-o", out]) == 2
    recipe.write_text(recipe.read_text().replace("rank: 3\n", ""))
    assert main(["merge", "--recipe", str(recipe), "--method", "concat", "-o", out, "--to", "kohya"]) == 0
    assert_equals_sum(out, [(loras["a"], 0.3), (loras["b"], 0.7)])


def test_recipe_unknown_key_is_an_error(loras, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inputs: [{loras['a']}]\nmethd: svd\n")
    assert main(["merge", "--recipe", str(recipe), "-o", str(tmp_path / "m.safetensors")]) == 2


def test_metadata_policy_and_provenance(tmp_path):
    from safetensors.torch import load_file, save_file
    srcs = []
    for i, tags in enumerate(['{"a": 1}', '{"b": 2}']):
        p = write_sdscripts_lora(tmp_path / f"s{i}.safetensors", rank=4, alpha=4.0, seed=i, clip=None)
        meta = {"ss_base_model_version": "flux1", "ss_tag_frequency": tags, "ss_output_name": "synthetic",
                "ss_seed": str(i), "sshs_model_hash": "stale"}
        save_file(load_file(p), p, metadata=meta)
        srcs.append(str(p))
    out = str(tmp_path / "merged.safetensors")
    lorakit.merge([(srcs[0], 0.25), (srcs[1], 0.75)], out)
    with open_weights(out) as f:
        meta = f.metadata
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["ss_output_name"] == "synthetic"           # all inputs agree
    assert "ss_tag_frequency" not in meta and "ss_seed" not in meta
    assert meta["sshs_model_hash"] != "stale"
    assert meta["modelspec.title"] == "merged"
    assert meta["modelspec.merged_from"] == "s0, s1"
    prov = json.loads(meta["lorakit.provenance"])
    assert prov["operation"] == "merge" and prov["method"] == "concat" and prov["strength"] == "linear"
    assert [i["weight"] for i in prov["inputs"]] == [0.25, 0.75]
    assert all(len(i["sha256"]) == 64 for i in prov["inputs"])


def test_weighted_input_objects_and_string_specs(loras, tmp_path):
    from lorakit.ops.recipes import WeightedInput
    out = str(tmp_path / "m.safetensors")
    lorakit.merge([WeightedInput(loras["a"], 0.3), f"{loras['b']}:0.7"], out)
    assert_equals_sum(out, [(loras["a"], 0.3), (loras["b"], 0.7)])


def test_help_documents_linear_default(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--kohya-ratios" in text and "default is linear strength" in text


def test_error_types_are_lorakit_errors():
    assert issubclass(MergeError, LorakitError) and issubclass(ArchitectureError, LorakitError)
