"""Issue 11 item 5 (rough edges a new user hit) and item 6's one-line usage errors.

Expected values are computed here, independently of the code under test: deltas and errors from the
files' raw tensors (read with the reference ``safetensors`` package) in float64, sd-scripts' clamp from
its own formula (networks/extract_lora_from_models.py: ``torch.quantile`` of ``cat(U·S, Vh)``).
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import os
import pkgutil
import sys

import pytest
import torch
from safetensors import safe_open

import lorakit
from lorakit.cli import main
from lorakit.errors import UsageError
from lorakit.progress import ProgressBar, terminal_progress
from lorakit.samples.synthetic import TINY_CLIP, TINY_FLUX, write_aitoolkit_lora, write_base, write_sdscripts_lora

H = TINY_FLUX["H"]


def tensors_of(path) -> dict[str, torch.Tensor]:
    with safe_open(os.fspath(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def meta_of(path) -> dict[str, str]:
    with safe_open(os.fspath(path), "pt") as f:
        return dict(f.metadata() or {})


def kohya_deltas(path) -> dict[str, torch.Tensor]:
    """Dense float64 deltas of a kohya file by hand: ΔW = (α/r)·up·down per module."""
    t = tensors_of(path)
    out = {}
    for k in t:
        if k.endswith(".lora_down.weight"):
            stem = k[: -len(".lora_down.weight")]
            down, up = t[k].double(), t[stem + ".lora_up.weight"].double()
            alpha = float(t[stem + ".alpha"]) if stem + ".alpha" in t else down.shape[0]
            out[stem] = (alpha / down.shape[0]) * up @ down
    return out


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("edges")
    return {"base": write_base(d / "base.safetensors"),
            "tuned": write_base(d / "tuned.safetensors", seed=9),
            "kohya": write_sdscripts_lora(d / "kohya.safetensors", clip=None, rank=8, alpha=4.0),
            "kohya_te": write_sdscripts_lora(d / "kohya_te.safetensors", clip=TINY_CLIP, seed=5),
            "ait": write_aitoolkit_lora(d / "ait.safetensors")}


# ---------------------------------------------------------------------------------------------
# resize: a target already met writes the deltas unchanged and says so
# ---------------------------------------------------------------------------------------------

def test_resize_target_met_writes_unchanged_and_says_so(files, tmp_path, capsys):
    out = tmp_path / "same.safetensors"
    assert main(["resize", files["kohya"], "-o", str(out), "--rank", "8"]) == 0
    err = capsys.readouterr().err
    assert "target already met" in err and "unchanged" in err
    want, got = kohya_deltas(files["kohya"]), kohya_deltas(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert main(["resize", files["kohya"], "-o", str(tmp_path / "j.safetensors"), "--rank", "16", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["target_met"] and rep["notes"] and {m["path"] for m in rep["modules"]} == {"unchanged"}


def test_resize_mixed_ranks_resizes_only_what_exceeds(tmp_path, capsys):
    g = torch.Generator().manual_seed(3)
    t = {}
    for stem, r in (("lora_unet_double_blocks_0_img_attn_proj", 2), ("lora_unet_double_blocks_0_txt_attn_proj", 8)):
        t[f"{stem}.lora_down.weight"] = torch.randn(r, H, generator=g)
        t[f"{stem}.lora_up.weight"] = torch.randn(H, r, generator=g)
        t[f"{stem}.alpha"] = torch.tensor(float(r))
    from safetensors.torch import save_file
    src = str(tmp_path / "mixed.safetensors")
    save_file(t, src)
    out = tmp_path / "r4.safetensors"
    assert main(["resize", src, "-o", str(out), "--rank", "4"]) == 0
    got, want = tensors_of(out), kohya_deltas(src)
    small = "lora_unet_double_blocks_0_img_attn_proj"
    assert got[small + ".lora_down.weight"].shape[0] == 2 and got["lora_unet_double_blocks_0_txt_attn_proj"
                                                                   ".lora_down.weight"].shape[0] == 4
    assert torch.allclose(kohya_deltas(out)[small], want[small], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# progress: on a terminal only, never with --json, never in captured output
# ---------------------------------------------------------------------------------------------

def test_progress_bar_draws_only_on_a_tty():
    tty, pipe = FakeTTY(), io.StringIO()
    for stream in (tty, pipe):
        bar = ProgressBar("merge", stream, interval=0)
        for i in range(3):
            bar(i, 3, f"module{i}")
        bar(3, 3, "")
    assert "merge [" in tty.getvalue() and "1/3" in tty.getvalue() and "module1" in tty.getvalue()
    assert tty.getvalue().endswith("\r")                 # erased when done
    assert pipe.getvalue() == ""
    assert terminal_progress("x", stream=pipe) is None
    assert terminal_progress("x", stream=tty, enabled=False) is None
    assert isinstance(terminal_progress("x", stream=tty), ProgressBar)


@pytest.mark.parametrize("argv_of", [
    lambda f, o: ["merge", f["kohya"], f["ait"] + ":0.5", "-o", o],
    lambda f, o: ["convert", f["ait"], "--to", "kohya", "-o", o],
    lambda f, o: ["resize", f["kohya"], "--rank", "2", "-o", o],
    lambda f, o: ["extract", f["base"], f["tuned"], "--rank", "2", "-o", o],
    lambda f, o: ["bake", f["base"], f["kohya"], "-o", o],
    lambda f, o: ["diff", f["base"], f["tuned"]],
], ids=["merge", "convert", "resize", "extract", "bake", "diff"])
def test_cli_progress_on_tty_and_never_with_json(files, tmp_path, capsys, monkeypatch, argv_of):
    label = argv_of(files, "x")[0]
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    main(argv_of(files, str(tmp_path / "a.safetensors")))
    assert f"{label} [" in tty.getvalue()
    capsys.readouterr()
    for argv in (argv_of(files, str(tmp_path / "b.safetensors")) + ["--json"],):
        tty.seek(0), tty.truncate()
        main(argv)
        assert "\r" not in tty.getvalue() and f"{label} [" not in tty.getvalue()
        json.loads(capsys.readouterr().out)
    monkeypatch.undo()
    main(argv_of(files, str(tmp_path / "c.safetensors")))   # captured (not a terminal): no bar
    assert "\r" not in capsys.readouterr().err


def test_library_prints_no_progress_by_itself(files, tmp_path, monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    lorakit.merge([files["kohya"], files["ait"]], tmp_path / "m.safetensors")
    lorakit.bake(files["base"], [files["kohya"]], tmp_path / "b.safetensors")
    assert tty.getvalue() == ""
    seen = []
    lorakit.merge([files["kohya"]], tmp_path / "m2.safetensors", progress=lambda d, t, i: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1]


# ---------------------------------------------------------------------------------------------
# the Python API takes the CLI's dtype strings; every public function is documented
# ---------------------------------------------------------------------------------------------

def test_api_takes_dtype_strings(files, tmp_path):
    def dtypes(path):
        return {t.dtype for k, t in tensors_of(path).items() if t.dim() > 0}
    lorakit.convert(files["ait"], tmp_path / "c.safetensors", to="kohya", dtype="bf16")
    assert dtypes(tmp_path / "c.safetensors") == {torch.bfloat16}
    lorakit.merge([files["kohya"], files["ait"]], tmp_path / "m.safetensors", dtype="fp16")
    assert dtypes(tmp_path / "m.safetensors") == {torch.float16}
    lorakit.resize(files["kohya"], tmp_path / "r.safetensors", rank=2, dtype="bf16")
    assert dtypes(tmp_path / "r.safetensors") == {torch.bfloat16}
    lorakit.extract(files["base"], files["tuned"], tmp_path / "e.safetensors", rank=2, dtype="fp16")
    assert dtypes(tmp_path / "e.safetensors") == {torch.float16}
    lorakit.bake(files["base"], [files["kohya"]], tmp_path / "b.safetensors", dtype="bf16")
    assert dtypes(tmp_path / "b.safetensors") == {torch.bfloat16}
    with pytest.raises(UsageError, match="unknown dtype"):
        lorakit.convert(files["ait"], tmp_path / "x.safetensors", to="kohya", dtype="bf17")


UNDOCUMENTED_OK: set[str] = set()
OPTIONAL_DEPENDENCIES = {"gradio"}     # lorakit[ui]: lorakit.ui.app imports it


def test_every_public_function_has_a_docstring():
    missing = []
    for name in lorakit.__all__:
        obj = getattr(lorakit, name)
        if callable(obj) and not (inspect.getdoc(obj) or "").strip():
            missing.append(f"lorakit.{name}")
        if inspect.isclass(obj) and (obj.__doc__ or "").startswith(obj.__name__ + "("):   # dataclass default
            missing.append(f"lorakit.{name}")
    for info in pkgutil.walk_packages(lorakit.__path__, "lorakit."):
        if info.name.endswith("__main__"):
            continue
        try:
            mod = importlib.import_module(info.name)
        except ModuleNotFoundError as exc:   # a module of an optional extra whose dependency is not installed
            if exc.name in OPTIONAL_DEPENDENCIES:
                continue
            raise
        for name, obj in vars(mod).items():
            if name.startswith("_") or not inspect.isfunction(obj) or obj.__module__ != info.name:
                continue
            if not (obj.__doc__ or "").strip() and f"{info.name}.{name}" not in UNDOCUMENTED_OK:
                missing.append(f"{info.name}.{name}")
    assert not missing, missing


# ---------------------------------------------------------------------------------------------
# command-line messages
# ---------------------------------------------------------------------------------------------

def test_bad_strength_is_named_not_a_missing_file(files, tmp_path, capsys):
    out = str(tmp_path / "m.safetensors")
    assert main(["merge", files["kohya"] + ":abc", "-o", out]) == 2
    err = capsys.readouterr().err
    assert "bad strength 'abc'" in err and "not found" not in err and err.count("\n") == 1
    assert main(["bake", files["base"], "missing.safetensors:0.x", "-o", out]) == 2
    assert "bad strength '0.x'" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_unknown_option_prints_the_commands_one_line_usage(files, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["merge", files["kohya"], "--rnak", "4", "-o", "x.safetensors"])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("usage: lorakit merge ") and "error: unrecognized arguments: --rnak" in lines[1]
    assert lines[2].startswith("hint:") and "--rank" in lines[2]
    with pytest.raises(SystemExit):
        main(["inspect"])                                   # a missing argument: the same three lines
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and lines[0].startswith("usage: lorakit inspect") and "required" in lines[1]


def test_debug_after_the_command(tmp_path, capsys):
    missing = str(tmp_path / "nope.safetensors")
    assert main(["inspect", missing]) == 2
    assert "Traceback" not in capsys.readouterr().err
    for argv in (["inspect", missing, "--debug"], ["--debug", "inspect", missing]):
        assert main(argv) == 2
        assert "Traceback" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# fp8 outputs of convert and merge report the rounding they add
# ---------------------------------------------------------------------------------------------

def _worst_cast_error(path, dtype) -> float:
    """Relative error of each module's delta once its factors are stored as ``dtype``, densely (float64)."""
    t = tensors_of(path)
    worst = 0.0
    for k in t:
        if k.endswith(".lora_down.weight"):
            stem = k[: -len(".lora_down.weight")]
            d, u = t[k], t[stem + ".lora_up.weight"]
            exact = u.double() @ d.double()
            cast = u.to(dtype).double() @ d.to(dtype).double()
            worst = max(worst, float((cast - exact).norm() / exact.norm()))
    return worst


def test_convert_to_fp8_reports_its_rounding(files, tmp_path, capsys):
    out = str(tmp_path / "c.safetensors")
    assert main(["convert", files["kohya"], "--to", "kohya", "--dtype", "fp8", "-o", out, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    want = _worst_cast_error(files["kohya"], torch.float8_e4m3fn)
    assert want > 1e-3 and rep["rounding"]["relative_error"] == pytest.approx(want, rel=1e-6)
    assert main(["convert", files["kohya"], "--to", "kohya", "--dtype", "fp8", "-o", out]) == 0
    assert f"adds up to {want:.2e} relative error" in capsys.readouterr().err


def test_merge_to_fp8_reports_its_rounding(files, tmp_path, capsys):
    out = str(tmp_path / "m.safetensors")
    assert main(["merge", files["kohya"], "-o", out, "--dtype", "fp8", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    # one input at weight 1: the written file's delta against the input's exact delta, module by module
    want, got = kohya_deltas(files["kohya"]), kohya_deltas(out)
    worst = max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want)
    assert worst > 1e-3 and rep["rounding"]["relative_error"] == pytest.approx(worst, rel=1e-5)
    assert main(["merge", files["kohya"], "-o", out, "--dtype", "fp8"]) == 0
    assert f"adds up to {worst:.2e} relative error" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# extract's rank, meta --check after --rehash, coverage totals
# ---------------------------------------------------------------------------------------------

def test_extract_text_and_json_agree_on_the_rank(files, tmp_path, capsys):
    # --rank 64 on H = 32: every module comes out at its full rank (≤ 32); both reports say which
    argv = ["extract", files["base"], files["tuned"], "--rank", "64", "--exact"]
    assert main(argv + ["-o", str(tmp_path / "a.safetensors"), "--json"]) in (0, 1)   # 1: bias diffs left out
    rep = json.loads(capsys.readouterr().out)
    written = {t.shape[0] for k, t in tensors_of(tmp_path / "a.safetensors").items() if k.endswith("lora_down.weight")}
    assert rep["rank"] == 64 and rep["rank_range"] == [min(written), max(written)]
    main(argv + ["-o", str(tmp_path / "b.safetensors")])
    err = capsys.readouterr().err
    lo, hi = min(written), max(written)
    assert (f"rank {lo}..{hi}" if lo != hi else f"rank {lo}") in err and "--rank 64 capped" in err


@pytest.mark.parametrize("which", ["kohya_te", "ait"])
def test_meta_check_passes_after_rehash(files, tmp_path, capsys, which):
    f = tmp_path / "f.safetensors"
    f.write_bytes(open(files[which], "rb").read())
    assert main(["meta", str(f), "--rehash"]) == 0
    capsys.readouterr()
    assert main(["meta", str(f), "--check"]) == 0, capsys.readouterr().out


def _cov(path, capsys):
    assert main(["inspect", str(path), "--json"]) in (0, 1)
    return json.loads(capsys.readouterr().out)["components"]


def test_coverage_totals_are_the_same_for_every_file_of_a_model(files, tmp_path, capsys):
    from safetensors.torch import save_file
    # real FLUX.1 sizes: CLIP-L has 12 layers × 6 linears = 72 modules, with or without CLIP modules in the file
    g = torch.Generator().manual_seed(0)
    no_clip = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(1, 3072, generator=g),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(3072, 1, generator=g)}
    with_clip = {**no_clip,
                 "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(1, 768, generator=g),
                 "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(3072, 1, generator=g)}
    save_file(no_clip, str(tmp_path / "a.safetensors"))
    save_file(with_clip, str(tmp_path / "b.safetensors"))
    a, b = _cov(tmp_path / "a.safetensors", capsys), _cov(tmp_path / "b.safetensors", capsys)
    assert a["clip_l"]["total"] == b["clip_l"]["total"] == 72 and (a["clip_l"]["present"], b["clip_l"]["present"]) == (0, 1)
    assert a["transformer"]["total"] == b["transformer"]["total"]
    # lorakit's tiny synthetic model (non-standard sizes): an absent component's count is not made up
    tiny_a, tiny_b = _cov(files["ait"], capsys), _cov(files["kohya_te"], capsys)
    assert tiny_a["clip_l"]["total"] is None and tiny_b["clip_l"]["total"] == 6 * TINY_CLIP["layers"]
    assert main(["inspect", files["ait"]]) == 0
    assert "CLIP-L none" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# sd-scripts spellings
# ---------------------------------------------------------------------------------------------

def test_merge_sd_scripts_spellings(files, tmp_path, capsys):
    base = ["merge", files["kohya"] + ":0.5", files["ait"] + ":0.5"]
    assert main(base + ["-o", str(tmp_path / "a.safetensors")]) == 0
    assert main(base + ["-o", str(tmp_path / "b.safetensors"), "--concat"]) == 0
    ta, tb = tensors_of(tmp_path / "a.safetensors"), tensors_of(tmp_path / "b.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert main(base + ["-o", str(tmp_path / "c.safetensors"), "--concat", "--method", "svd"]) == 2
    capsys.readouterr()
    assert main(base + ["-o", str(tmp_path / "d.safetensors"), "--precision", "bf16", "--device", "cuda"]) == 0
    err = capsys.readouterr().err
    assert "--precision" in err and "--device cuda" in err
    assert {t.dtype for t in tensors_of(tmp_path / "d.safetensors").values() if t.dim() > 0} == {torch.bfloat16}
    svd = base + ["--method", "svd", "--rank", "8"]
    assert main(svd + ["-o", str(tmp_path / "e.safetensors"), "--dynamic", "sv_fro:0.9"]) in (0, 1)
    assert main(svd + ["-o", str(tmp_path / "f.safetensors"), "--dynamic_method", "sv_fro",
                       "--dynamic_param", "0.9"]) in (0, 1)
    te, tf = tensors_of(tmp_path / "e.safetensors"), tensors_of(tmp_path / "f.safetensors")
    assert te.keys() == tf.keys() and all(torch.equal(te[k], tf[k]) for k in te)


def test_extract_model_org_and_model_tuned(files, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["extract", files["base"], files["tuned"], "--rank", "2", "-o", str(a)]) in (0, 1)
    assert main(["extract", "--model_org", files["base"], "--model_tuned", files["tuned"], "--dim", "2",
                 "--save_to", str(b)]) in (0, 1)
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert main(["extract", "--model_org", files["base"], "--rank", "2", "-o", str(tmp_path / "c.safetensors")]) == 2


def test_clamp_quantile_is_sd_scripts_formula_and_reports_its_error(files, tmp_path, capsys):
    q = 0.9
    plain, clamped = tmp_path / "plain.safetensors", tmp_path / "clamped.safetensors"
    argv = ["extract", files["base"], files["tuned"], "--rank", "4", "--exact", "--dtype", "fp32"]
    main(argv + ["-o", str(plain)])
    capsys.readouterr()
    main(argv + ["-o", str(clamped), "--clamp_quantile", str(q), "--json"])
    rep = json.loads(capsys.readouterr().out)
    tp, tc = tensors_of(plain), tensors_of(clamped)
    base, tuned = tensors_of(files["base"]), tensors_of(files["tuned"])
    worst = 0.0
    for k in tp:
        if not k.endswith(".lora_down.weight"):
            continue
        stem = k[: -len(".lora_down.weight")]
        up, down = tp[stem + ".lora_up.weight"], tp[k]       # α = rank: up = U·S, down = Vh as in sd-scripts
        assert float(tp[stem + ".alpha"]) == down.shape[0]
        # sd-scripts, networks/extract_lora_from_models.py:
        dist = torch.cat([up.flatten(), down.flatten()])
        hi_val = torch.quantile(dist, q)
        low_val = -hi_val
        want_up, want_down = up.clamp(low_val, hi_val), down.clamp(low_val, hi_val)
        assert torch.allclose(tc[stem + ".lora_up.weight"], want_up, rtol=0, atol=1e-7), stem
        assert torch.allclose(tc[k], want_down, rtol=0, atol=1e-7), stem
        exact = up.double() @ down.double()
        err = float((want_up.double() @ want_down.double() - exact).norm() / exact.norm())
        worst = max(worst, err)
        # the module's reported relative error is against D = tuned − base itself
        native = stem[len("lora_unet_"):]
        name = next(n for n in tuned if n.replace(".", "_") == native + "_weight")
        d = tuned[name].double() - base[name].double()
        m = next(m for m in rep["modules"] if m["module"].replace(".", "_") == native)
        want_rel = float((d - want_up.double() @ want_down.double()).norm() / d.norm())
        assert m["relative_error"] == pytest.approx(want_rel, rel=1e-4)
    assert worst > 0 and rep["worst_clamp_error"]["clamp_error"] == pytest.approx(worst, rel=1e-4)
    main(argv + ["-o", str(tmp_path / "t.safetensors"), "--clamp-quantile", str(q)])
    assert "--clamp-quantile 0.9 (sd-scripts' clamp) adds up to" in capsys.readouterr().err
    assert main(argv + ["-o", str(tmp_path / "bad.safetensors"), "--clamp_quantile", "1.5"]) == 2
