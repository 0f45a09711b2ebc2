"""Review findings on the writing commands: weights, LoKr windows, exit codes, diff of biases/DoRA,
--dynamic ranges, typed recipes, --dry-run of extract/resize, and the command registry."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import lorakit
from lorakit.lora.adapters import LoKr
from lorakit.cli import main
from lorakit.errors import RecipeError, UsageError
from lorakit.formats import read_lora
from lorakit.io import open_weights, save_tensors
from lorakit.lora.linalg import parse_dynamic
from lorakit.lora.model import Patch, Target
from lorakit.ops.recipes import WeightedInput, load_recipe, parse_weighted
from lorakit.samples.synthetic import TINY_CLIP, TINY_FLUX, write_aitoolkit_lora, write_base, write_sdscripts_lora

H = TINY_FLUX["H"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("review")
    return {"base": write_base(d / "base.safetensors"),
            "tuned": write_base(d / "tuned.safetensors", seed=9),
            "kohya": write_sdscripts_lora(d / "kohya.safetensors", clip=None),
            "kohya_te": write_sdscripts_lora(d / "kohya_te.safetensors", clip=TINY_CLIP, seed=5),
            "ait": write_aitoolkit_lora(d / "ait.safetensors")}


def _listing(folder) -> set[str]:
    return set(os.listdir(folder))


# ---------------------------------------------------------------------------------------------
# 2. non-finite weights are refused once, for every command that takes weights
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "1e999"])
def test_non_finite_weight_is_refused_at_parse(text):
    with pytest.raises(UsageError, match="lora.safetensors"):
        parse_weighted(f"lora.safetensors:{text}")
    with pytest.raises(UsageError, match="not finite"):
        WeightedInput("lora.safetensors", float(text))
    with pytest.raises(UsageError, match="number"):
        WeightedInput("lora.safetensors", "0.5")          # type: ignore[arg-type]


@pytest.mark.parametrize("argv_of", [
    lambda f, o: ["bake", f["base"], f["kohya"] + ":inf", "-o", o],
    lambda f, o: ["bake", f["base"], "-o", o, "--models", f["kohya"], "--ratios", "nan"],
    lambda f, o: ["merge", f["kohya"] + ":0.5", f["ait"] + ":nan", "-o", o],
], ids=["bake", "bake-ratios", "merge"])
def test_cli_refuses_non_finite_weights(files, tmp_path, capsys, argv_of):
    out = str(tmp_path / "out.safetensors")
    assert main(argv_of(files, out)) == 2
    err = capsys.readouterr().err
    assert "not finite" in err and err.count("\n") == 1
    assert not os.path.exists(out)


def test_recipe_input_weight_must_be_a_finite_number(files, tmp_path):
    r = tmp_path / "r.yaml"
    for weight in (".inf", ".nan", "true", "'0.5'"):
        r.write_text(f"inputs:\n  - {{path: {files['kohya']}, weight: {weight}}}\n")
        with pytest.raises(RecipeError, match="weight|number"):
            load_recipe(r, {"output": str})
    r.write_text(f"inputs:\n  - {{path: {files['kohya']}, wieght: 0.5}}\n")   # a typo is not ignored
    with pytest.raises(RecipeError, match="bad input entry"):
        load_recipe(r, {"output": str})


def test_bake_api_refuses_non_finite_weight(files, tmp_path):
    with pytest.raises(UsageError, match="not finite"):
        lorakit.bake(files["base"], [(files["kohya"], math.inf)], tmp_path / "o.safetensors")


# ---------------------------------------------------------------------------------------------
# 9. bake densifies only the LoKr row blocks a compute window needs
# ---------------------------------------------------------------------------------------------

def test_lokr_misaligned_windows_densify_only_covering_blocks(monkeypatch):
    from lorakit.ops.baking import compute as baking
    from lorakit.ops.baking.tasks import Use
    k, blocks, cols = 7, 12, 10
    g = torch.Generator().manual_seed(0)
    adapter = LoKr(alpha=3.0, w1=torch.randn(blocks, 2, generator=g), w2a=torch.randn(k, 2, generator=g),
                   w2b=torch.randn(2, cols // 2, generator=g))
    n = adapter.out_features
    assert n == k * blocks
    full = adapter.dense().reshape(n, -1)
    use = Use(Patch(Target("transformer", "x"), adapter), 1.0, 0, (0, n))
    kron_rows: list[int] = []
    real_kron = torch.kron

    def counting_kron(a, b):
        out = real_kron(a, b)
        kron_rows.append(out.shape[0])
        return out

    monkeypatch.setattr(torch, "kron", counting_kron)
    for a, b in [(0, 5), (3, 11), (6, 8), (13, 14), (20, 61), (n - 4, n), (0, n)]:
        kron_rows.clear()
        got = baking._delta_rows(use, a, b, torch.device("cpu"))
        assert torch.equal(got, full[a:b]), (a, b)              # bit-exact, like dense()[a:b]
        assert kron_rows and max(kron_rows) <= (b - a) + 2 * (k - 1), (a, b, kron_rows)


def test_lokr_bake_with_tiny_chunks_is_exact(files, tmp_path):
    """A LoKr whose row blocks (7) align neither with the window nor the chunks bakes exactly."""
    lin1 = "lora_unet_single_blocks_0_linear1"
    rows = 3 * H + TINY_FLUX["M"]
    g = torch.Generator().manual_seed(1)
    t = {f"{lin1}.lokr_w1": torch.randn(rows // 8, 4, generator=g), f"{lin1}.lokr_w2_a": torch.randn(8, 2, generator=g),
         f"{lin1}.lokr_w2_b": torch.randn(2, H // 4, generator=g), f"{lin1}.alpha": torch.tensor(2.0)}
    lora = save_tensors(tmp_path / "lokr.safetensors", t, {})
    outs = []
    for chunk in (1000, 1 << 20):
        out = tmp_path / f"o{chunk}.safetensors"
        lorakit.bake(files["base"], [(lora, 0.7)], out, chunk_bytes=chunk)
        with open_weights(out) as f:
            outs.append(f.get("single_blocks.0.linear1.weight"))
    with open_weights(files["base"]) as f:
        w0 = f.get("single_blocks.0.linear1.weight").float()
    delta = read_lora(lora).patches[0].adapter.dense().float()
    assert torch.equal(outs[0], outs[1])
    assert torch.allclose(outs[0].float(), w0 + 0.7 * delta, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 10. exit codes: 0 ok, 1 partial or warnings, 2 refused
# ---------------------------------------------------------------------------------------------

def test_merge_exit_codes(files, tmp_path, capsys):
    assert main(["merge", files["kohya"] + ":0.5", files["ait"] + ":0.7", "-o", str(tmp_path / "a.safetensors")]) == 0
    capsys.readouterr()
    argv = ["merge", files["kohya"] + ":0.5", files["ait"] + ":0", "-o", str(tmp_path / "b.safetensors"), "--dry-run"]
    assert main(argv) == 1                                   # a zero-weight input is a warning
    assert "weight 0" in capsys.readouterr().err
    assert main([*argv, "--json"]) == 1                      # also with --json
    assert any("weight 0" in w for w in json.loads(capsys.readouterr().out)["warnings"])


def test_bake_exit_codes(files, tmp_path, capsys):
    out = str(tmp_path / "o.safetensors")
    assert main(["bake", files["base"], files["kohya"] + ":0.5", "-o", out]) == 0
    # a zero-weight input, text-encoder modules left unapplied: exit 1 (also with --json)
    assert main(["bake", files["base"], files["kohya"] + ":0.5", files["ait"] + ":0", "-o", out]) == 1
    assert "weight 0" in capsys.readouterr().err
    assert main(["bake", files["base"], files["kohya_te"], "-o", out, "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["not_applied"] and rep["not_applied"][0]["component"] == "clip_l"


def test_extract_exit_codes(files, tmp_path, capsys):
    # bias and norm-scale differences left out of the file are warnings: exit 1
    rc = main(["extract", files["base"], files["tuned"], "-o", str(tmp_path / "x.safetensors"), "--rank", "2"])
    assert rc == 1 and "--include-bias" in capsys.readouterr().err
    rc = main(["extract", files["base"], files["tuned"], "-o", str(tmp_path / "y.safetensors"), "--rank", "2",
               "--include-bias", "--include-norms", "--to", "comfy", "--json"])
    assert rc == 0, json.loads(capsys.readouterr().out)["warnings"]


def test_resize_exit_codes_and_no_op_refused(files, tmp_path, capsys):
    src = files["kohya"]                                 # rank 4 everywhere
    before = _listing(tmp_path)
    rc = main(["resize", src, "-o", str(tmp_path / "same.safetensors"), "--rank", "8"])
    err = capsys.readouterr().err
    assert rc == 0 and "target already met" in err           # written unchanged, said so (not refused)
    assert _listing(tmp_path) == before | {"same.safetensors"}
    assert main(["resize", src, "-o", str(tmp_path / "r.safetensors"), "--rank", "2"]) == 0
    # keys not understood, opted in with --allow-partial: exit 1
    with open_weights(src) as f:
        t = {k: f.get(k) for k in f.keys()}
    t["lora_unet_mystery.lora_down.weight"] = torch.zeros(4, 3)
    partial = save_tensors(tmp_path / "partial.safetensors", t, {})
    assert main(["resize", partial, "-o", str(tmp_path / "p.safetensors"), "--rank", "2", "--allow-partial",
                 "--json"]) == 1


# ---------------------------------------------------------------------------------------------
# 11. diff compares bias deltas and DoRA magnitudes
# ---------------------------------------------------------------------------------------------

def _with_extras(src: str, path, *, dora: float = 1.0, bias: float = 1.0) -> str:
    stem = "lora_unet_double_blocks_0_img_attn_proj"
    with open_weights(src) as f:
        t = {k: f.get(k) for k in f.keys()}
    g = torch.Generator().manual_seed(4)
    t[f"{stem}.dora_scale"] = (torch.rand(H, 1, generator=g) + 0.5) * dora
    t[f"{stem}.diff_b"] = torch.randn(H, generator=g) * bias
    return save_tensors(path, t, {})


def test_diff_sees_dora_and_bias_differences(files, tmp_path, capsys):
    a = _with_extras(files["kohya"], tmp_path / "a.safetensors")
    same = _with_extras(files["kohya"], tmp_path / "same.safetensors")
    assert main(["diff", a, same]) == 0
    assert "equivalent" in capsys.readouterr().out
    dora = _with_extras(files["kohya"], tmp_path / "dora.safetensors", dora=1.01)
    rep = lorakit.diff(a, dora)
    assert not rep.equivalent and [d["module"] for d in rep.dora_differences] == \
        ["transformer:double_blocks.0.img_attn.proj"] and not rep.bias_differences
    assert rep.total["relative_difference"] <= 1e-6       # the low-rank deltas are the same
    assert main(["diff", a, dora]) == 1
    assert "DoRA magnitudes differ" in capsys.readouterr().out
    bias = _with_extras(files["kohya"], tmp_path / "bias.safetensors", bias=-1.0)
    rep = lorakit.diff(a, bias)
    assert not rep.equivalent and len(rep.bias_differences) == 1 and not rep.dora_differences
    assert rep.bias_differences[0]["relative_difference"] == pytest.approx(2.0)
    assert main(["diff", a, bias, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["equivalent"] is False and out["bias_differences"]
    # a bias or DoRA only on one side
    rep = lorakit.diff(files["kohya"], a)
    assert not rep.equivalent and rep.bias_differences and rep.dora_differences[0]["only_in"] == "B"


# ---------------------------------------------------------------------------------------------
# 12. --dynamic ranges shared by every command
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["sv_cumulative:0", "sv_fro:2", "sv_fro:0", "sv_fro:nan", "sv_cumulative:1.5",
                                  "sv_ratio:1", "sv_ratio:0.5", "sv_ratio:-3", "sv_ratio:inf", "sv_ratio:nan"])
def test_dynamic_ranges_everywhere(spec, files, tmp_path, capsys):
    with pytest.raises(UsageError):
        parse_dynamic(spec)
    out = str(tmp_path / "o.safetensors")
    for argv in (["resize", files["kohya"], "-o", out, "--dynamic", spec],
                 ["extract", files["base"], files["tuned"], "-o", out, "--dynamic", spec],
                 ["merge", files["kohya"], files["ait"], "-o", out, "--method", "svd", "--dynamic", spec]):
        assert main(argv) == 2, argv
        assert "--dynamic" in capsys.readouterr().err
        assert not os.path.exists(out)
    with pytest.raises(UsageError):
        lorakit.resize(files["kohya"], out, dynamic=(spec.split(":")[0], float(spec.split(":")[1])))


def test_dynamic_valid_edges():
    assert parse_dynamic("sv_fro:1") == ("sv_fro", 1.0)
    assert parse_dynamic("sv_cumulative:0.5") == ("sv_cumulative", 0.5)
    assert parse_dynamic("sv_ratio:1.5") == ("sv_ratio", 1.5)


# ---------------------------------------------------------------------------------------------
# 13. recipe values are type-checked
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd,line,key", [
    ("bake", "device: 7", "device"),
    ("bake", "dtype: [1]", "dtype"),
    ("bake", "allow_partial: maybe", "allow_partial"),
    ("bake", "dry_run: 3", "dry_run"),
    ("bake", "device: tpu", "device"),
    ("merge", "verify: maybe", "verify"),
    ("merge", "dry_run: 1", "dry_run"),
    ("merge", "rank: '3'", "rank"),
    ("merge", "rank: 2.5", "rank"),
    ("merge", "density: yes", "density"),
    ("merge", "method: 5", "method"),
])
def test_recipe_values_are_typed(cmd, line, key, files, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    r = tmp_path / "r.yaml"
    head = f"base: {files['base']}\n" if cmd == "bake" else ""
    r.write_text(head + f"inputs: [{files['kohya']}]\noutput: {out}\n{line}\n")
    assert main([cmd, "--recipe", str(r)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and repr(key) in err and "expected" in err and "internal error" not in err
    assert not out.exists()


def test_recipe_schema_accepts_well_typed_values(tmp_path):
    from lorakit.ops.recipes import opt
    r = tmp_path / "r.yaml"
    r.write_text("rank: 4\ndensity: 1\nverify: false\nmethod: svd\nblocks: [1, 0.5]\nseed: null\n")
    got = load_recipe(r, {"rank": int, "density": float, "verify": bool, "method": opt(str, choices=("svd",)),
                          "blocks": opt(str, list, dict), "seed": int})
    assert got == {"rank": 4, "density": 1.0, "verify": False, "method": "svd", "blocks": [1, 0.5]}
    assert isinstance(got["density"], float)


# ---------------------------------------------------------------------------------------------
# 14. --dry-run for extract and resize
# ---------------------------------------------------------------------------------------------

def test_extract_dry_run_reads_headers_only(files, tmp_path, capsys, monkeypatch):
    import lorakit.io.reader as reader

    def boom(*a, **k):
        raise AssertionError("dry run read tensor data")

    monkeypatch.setattr(reader, "read_tensor", boom)
    out = tmp_path / "x.safetensors"
    assert main(["extract", files["base"], files["tuned"], "-o", str(out), "--rank", "4", "--dry-run"]) == 0
    text = capsys.readouterr()
    assert "single_blocks.0.linear1" in text.out and "rank 4" in text.out
    assert not out.exists() and _listing(tmp_path) == set()
    rep = lorakit.extract(files["base"], files["tuned"], None, rank=8, dry_run=True, include_bias=True)
    entry = next(e for e in rep.plan if e["module"] == "double_blocks.0.img_attn.qkv")
    assert entry["shape"] == [3 * H, H] and entry["rank"] == 8
    assert {s["param"] for s in entry["tuned"]} == {"weight", "bias"}
    assert all(s["shape"] for s in entry["original"])
    assert len(rep.plan) == len({e["module"] for e in rep.plan}) > 10


def test_extract_dry_run_pairs_across_layouts(tmp_path):
    orig = write_base(tmp_path / "o.safetensors")
    tuned = write_base(tmp_path / "t", layout="diffusers", seed=3)
    rep = lorakit.extract(orig, tuned, None, dynamic="sv_fro:0.9", dry_run=True)
    qkv = next(e for e in rep.plan if e["module"] == "double_blocks.0.img_attn.qkv")
    assert len(qkv["tuned"]) == 3 and len(qkv["original"]) == 1           # q, k, v rows vs one fused tensor
    assert sorted(tuple(s["rows"]) for s in qkv["tuned"]) == [(0, H), (H, 2 * H), (2 * H, 3 * H)]
    assert qkv["rank_rule"].startswith("dynamic")


def test_resize_dry_run_plans_and_writes_nothing(files, tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    assert main(["resize", files["kohya"], "-o", str(out), "--rank", "2", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "rank 4 → 2" in text and not out.exists()
    assert main(["resize", files["kohya"], "--dynamic", "sv_fro:0.5", "--dry-run", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["dry_run"] and rep["output"] is None and all(1 <= m["rank_out"] <= 4 for m in rep["modules"])
    assert _listing(tmp_path) == set()
    rep = lorakit.resize(files["kohya"], None, rank=4, dry_run=True)   # a met target is planned, not refused
    assert rep.target_met and {m.path for m in rep.modules} == {"unchanged"} and _listing(tmp_path) == set()


# ---------------------------------------------------------------------------------------------
# 15. every command module is imported; a missing one is a bug
# ---------------------------------------------------------------------------------------------

def test_build_parser_never_drops_a_command(monkeypatch):
    import importlib
    cli_main = importlib.import_module("lorakit.cli.main")    # (lorakit.cli.main is also the function's name)
    parser = cli_main.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(cli_main.COMMANDS)
    real = cli_main.importlib.import_module

    def missing(name, package=None):
        if name == ".resize_cmd":
            raise ModuleNotFoundError("No module named 'lorakit.cli.resize_cmd'", name="lorakit.cli.resize_cmd")
        return real(name, package)

    monkeypatch.setattr(cli_main.importlib, "import_module", missing)
    with pytest.raises(ModuleNotFoundError):
        cli_main.build_parser()
