"""Hostile input found by outside testing (issue 11, item 6): silent non-finite output, crashes, resource bombs
and small holes. Each case: exit ≠ 0 with ONE stderr line naming the problem (no traceback, never the
"internal error" exit 70), no output and no temporary file left, inputs byte-identical, bounded time.

Fixtures are written key by key with ``safetensors.torch.save_file`` in sd-scripts' kohya spelling
(networks/lora_flux.py: ``lora_unet_<BFL module, dots as underscores>.lora_down.weight`` [r, in],
``.lora_up.weight`` [out, r], ``.alpha`` scalar; ΔW = up @ down · alpha / r).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.lora import checks
from lorakit.cli import main
from lorakit.errors import HeaderError, InputFileError, LorakitError, brief
from lorakit.io import open_weights
from lorakit.io.header import MAX_JSON_DEPTH, MAX_TENSORS, JSONDepthError, loads_json
from lorakit.samples.synthetic import TINY_FLUX, write_base

H = TINY_FLUX["H"]                       # double_blocks.N.img_attn.proj is an H×H Linear in FLUX.1
MODULES = [f"lora_unet_double_blocks_{i}_img_attn_proj" for i in range(2)]


def kohya_lora(path, *, up: torch.Tensor | None = None, down: torch.Tensor | None = None,
               alpha: torch.Tensor | None = None, rank: int = 4, seed: int = 0,
               metadata: dict[str, str] | None = None) -> str:
    g = torch.Generator().manual_seed(seed)
    t = {}
    for stem in MODULES:
        t[stem + ".lora_down.weight"] = (down if down is not None else torch.randn(rank, H, generator=g)).clone()
        t[stem + ".lora_up.weight"] = (up if up is not None else torch.randn(H, rank, generator=g)).clone()
        t[stem + ".alpha"] = (alpha if alpha is not None else torch.tensor(float(rank))).clone()
    save_file(t, str(path), metadata=metadata)
    return str(path)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _refused(argv: list[str], capsys, *, words: tuple[str, ...] = (), inputs: tuple[str, ...] = ()) -> str:
    """Run the CLI; assert exit 2, one stderr line (no traceback, not an internal error) holding ``words``,
    no output and no temp file next to it, inputs unchanged. Returns the line."""
    before = {p: _sha(p) for p in inputs}
    out = argv[argv.index("-o") + 1] if "-o" in argv else None
    folder_before = set(os.listdir(os.path.dirname(out))) if out else set()
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(err) == 1 and "internal error" not in err[0] and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], (w, err[0])
    if out:
        assert not os.path.exists(out)
        assert set(os.listdir(os.path.dirname(out))) == folder_before, "temporary files left behind"
    assert {p: _sha(p) for p in inputs} == before
    return err[0]


def _all_finite(path) -> bool:
    return all(bool(torch.isfinite(v.float()).all()) for v in load_file(str(path)).values() if v.is_floating_point())


@pytest.fixture
def base(tmp_path) -> str:
    return write_base(tmp_path / "base.safetensors", TINY_FLUX, dtype=torch.float16)


# ---------------------------------------------------------------------------------------------
# Silent non-finite output
# ---------------------------------------------------------------------------------------------

def test_bake_strength_overflowing_fp16_is_refused(tmp_path, base, capsys) -> None:
    lora = kohya_lora(tmp_path / "l.safetensors")
    # |ΔW| ~ 1 per element (randn factors, α/r = 1): ×1e7 is far beyond fp16's 65504
    line = _refused(["bake", base, lora + ":1e7", "--dtype", "fp16", "-o", str(tmp_path / "b.safetensors"),
                     "--no-progress"], capsys, words=("double_blocks.", "float16", "strength", "--dtype"),
                    inputs=(base, lora))
    assert "proj.weight" in line


def test_bake_and_resize_of_an_overflowing_delta(tmp_path, base, capsys) -> None:
    # up = 3e38 (finite), down = 1: every ΔW element is 4 · 3e38 · α/r = 1.2e39, beyond float32
    lora = kohya_lora(tmp_path / "big.safetensors", up=torch.full((H, 4), 3e38), down=torch.ones(4, H))
    _refused(["bake", base, lora, "--dtype", "fp32", "-o", str(tmp_path / "b.safetensors"), "--no-progress"],
             capsys, words=("overflows float32", "strength"), inputs=(base, lora))
    out = tmp_path / "r.safetensors"
    rc = main(["resize", lora, "--rank", "1", "-o", str(out)])
    if rc == 0:          # factors of an unrepresentable ΔW may still be representable: then they must be finite
        assert _all_finite(out)
    else:
        assert rc == 2 and not out.exists() and "NaN or Inf" in capsys.readouterr().err


def test_merge_huge_weight_is_refused(tmp_path, capsys) -> None:
    a = kohya_lora(tmp_path / "a.safetensors", seed=1)
    b = kohya_lora(tmp_path / "b.safetensors", seed=2)
    for method in ("concat", "svd", "ties"):
        extra = ["--density", "0.5"] if method == "ties" else []
        _refused(["merge", a + ":1e300", b, "--method", method, *extra, "-o", str(tmp_path / "m.safetensors")],
                 capsys, words=("weights",), inputs=(a, b))


def test_f64_alpha_beyond_float32_is_refused_everywhere(tmp_path, capsys) -> None:
    lora = kohya_lora(tmp_path / "a64.safetensors", alpha=torch.tensor(1e300, dtype=torch.float64))
    out = str(tmp_path / "o.safetensors")
    for argv in (["merge", lora, "-o", out], ["resize", lora, "--rank", "2", "-o", out],
                 ["convert", lora, "--to", "kohya", "--dtype", "bf16", "-o", out],
                 ["convert", lora, "--to", "kohya", "-o", out]):
        line = _refused(argv, capsys, words=("NaN or Inf",), inputs=(lora,))
        assert "range" in line, line


def test_finite_outputs_still_written(tmp_path, base) -> None:
    lora = kohya_lora(tmp_path / "l.safetensors")
    for argv, out in ((["bake", base, lora + ":0.5", "--no-progress"], "b.safetensors"),
                      (["merge", lora + ":0.5", lora, "--method", "svd", "--rank", "2"], "m.safetensors"),
                      (["convert", lora, "--to", "diffusers", "--dtype", "bf16"], "c.safetensors"),
                      (["resize", lora, "--rank", "2", "--dtype", "fp16"], "r.safetensors")):
        assert main([*argv, "-o", str(tmp_path / out)]) == 0, argv
        assert _all_finite(tmp_path / out)


def test_all_finite_helper_decides_overflowing_sums_elementwise() -> None:
    big = torch.full((4,), 3e38)                        # finite values whose sum overflows float32
    assert checks.all_finite(big) and checks.all_finite(torch.ones(3).half())
    assert not checks.all_finite(torch.tensor([1.0, float("nan")]))
    assert not checks.all_finite(torch.tensor([float("inf"), -float("inf")]))
    assert checks.all_finite(torch.tensor([1, 2, 3]))   # integers are always finite
    assert not checks.all_finite(torch.tensor([448.0, float("nan")]).to(torch.float8_e4m3fn))


# ---------------------------------------------------------------------------------------------
# Crashes that must be typed one-line errors
# ---------------------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def test_deep_json_in_header_is_a_header_error(tmp_path, capsys) -> None:
    body = ('{"__metadata__":{},"x":' + DEEP + "}").encode()
    body += b" " * (-len(body) % 8)
    p = tmp_path / "deep.safetensors"
    p.write_bytes(len(body).to_bytes(8, "little") + body)
    _refused(["inspect", str(p)], capsys, words=("nested deeper than",), inputs=(str(p),))
    with pytest.raises(HeaderError):
        open_weights(str(p))


def test_deep_json_in_metadata_values_is_not_a_crash(tmp_path, capsys) -> None:
    meta = {"ss_tag_frequency": DEEP, "software": DEEP, "ss_network_args": DEEP, "ss_meta": DEEP}
    lora = kohya_lora(tmp_path / "m.safetensors", metadata=meta)
    for argv in (["inspect", lora], ["meta", lora], ["doctor", lora], ["inspect", lora, "--json"],
                 ["meta", lora, "--json"]):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc in (0, 1), (argv, rc, err)
        assert "internal error" not in err
    out = tmp_path / "c.safetensors"
    assert main(["convert", lora, "--to", "kohya", "-o", str(out)]) == 0
    assert open_weights(str(out)).metadata["ss_tag_frequency"] == DEEP     # carried over untouched


def test_deep_json_in_peft_metadata_is_a_format_error(tmp_path, capsys) -> None:
    # diffusers/PEFT spelling (diffusers' FluxLoraLoaderMixin.save_lora_weights): lora_A [r, in], lora_B [out, r],
    # no alpha tensor, so α comes from the lora_adapter_metadata JSON that is here nested 100k deep
    g = torch.Generator().manual_seed(0)
    stem = "transformer.transformer_blocks.0.attn.to_out.0"
    lora = str(tmp_path / "p.safetensors")
    save_file({stem + ".lora_A.weight": torch.randn(4, H, generator=g), stem + ".lora_B.weight": torch.randn(H, 4, generator=g)},
              lora, metadata={"lora_adapter_metadata": DEEP})
    _refused(["inspect", lora], capsys, words=("lora_adapter_metadata",), inputs=(lora,))


def test_deep_json_in_an_index_is_a_header_error(tmp_path) -> None:
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"a": ' + DEEP[:4000] + DEEP[-4000:] + "}}")
    with pytest.raises(HeaderError):
        open_weights(str(folder))


def test_loads_json_bounds_depth() -> None:
    assert loads_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None
    with pytest.raises(JSONDepthError):
        loads_json("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    with pytest.raises(ValueError):               # a ValueError: every "not JSON" handler covers it
        loads_json(DEEP)
    assert loads_json('{"a": {"b": [1, 2]}}') == {"a": {"b": [1, 2]}}


def test_bake_strength_beyond_float32(tmp_path, base, capsys) -> None:
    lora = kohya_lora(tmp_path / "l.safetensors")
    _refused(["bake", base, lora + ":1e39", "-o", str(tmp_path / "b.safetensors"), "--no-progress"], capsys,
             words=("float32", "strength"), inputs=(base, lora))


def test_merge_svd_of_non_finite_sum(tmp_path, capsys) -> None:
    a = kohya_lora(tmp_path / "a.safetensors")
    # 3e38 · ΔW sums (up @ down, entries ~ ±2) overflow float32 in the stacked factors
    _refused(["merge", a + ":3e38", a + ":3e38", "--method", "svd", "--rank", "2",
              "-o", str(tmp_path / "m.safetensors")], capsys, words=("overflows float32", "weights"), inputs=(a,))


def test_recipe_not_utf8_or_a_folder(tmp_path, capsys) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_bytes(b"inputs: [\xff\xfe]\n")
    _refused(["merge", "--recipe", str(bad), "-o", str(tmp_path / "m.safetensors")], capsys,
             words=("UTF-8", "r.yaml"), inputs=(str(bad),))
    (tmp_path / "rdir").mkdir()
    _refused(["merge", "--recipe", str(tmp_path / "rdir"), "-o", str(tmp_path / "m.safetensors")], capsys,
             words=("folder",))
    _refused(["bake", "--recipe", str(bad), "-o", str(tmp_path / "b.safetensors")], capsys, words=("UTF-8",))


def test_pickle_with_non_string_keys(tmp_path, capsys) -> None:
    for i, key in enumerate((1, (1, 2))):
        p = tmp_path / f"k{i}.pt"
        torch.save({key: torch.zeros(2), "lora_unet_x.alpha": torch.tensor(1.0)}, str(p))
        _refused(["inspect", str(p), "--allow-pickle"], capsys, words=("not strings",), inputs=(str(p),))
        with pytest.raises(InputFileError):
            open_weights(str(p), allow_pickle=True)


def test_legacy_non_zip_pickle_is_read(tmp_path, capsys) -> None:
    g = torch.Generator().manual_seed(3)
    tensors = {f"{MODULES[0]}.lora_down.weight": torch.randn(4, H, generator=g),
               f"{MODULES[0]}.lora_up.weight": torch.randn(H, 4, generator=g),
               f"{MODULES[0]}.alpha": torch.tensor(2.0)}
    p = tmp_path / "legacy.ckpt"
    torch.save(tensors, str(p), _use_new_zipfile_serialization=False)
    assert open(p, "rb").read(2) != b"PK"           # really the pre-1.6 format
    with open_weights(str(p), allow_pickle=True) as f:
        assert sorted(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            assert torch.equal(f.get(k), v)
    assert main(["inspect", str(p), "--allow-pickle"]) == 0
    # still weights_only: a pickle that would run code is refused, not executed
    evil = tmp_path / "evil.ckpt"

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    with open(evil, "wb") as fh:
        pickle.dump({"x": Boom()}, fh, protocol=2)
    assert main(["inspect", str(evil), "--allow-pickle"]) == 2
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------
# Resource bombs
# ---------------------------------------------------------------------------------------------

def test_ties_dense_module_beyond_memory_is_refused(tmp_path, capsys, monkeypatch) -> None:
    n = 65536       # one 65536×65536 rank-1 module: a 512 KiB file whose dense ΔW is 16 GiB in fp32
    p = tmp_path / "wide.safetensors"
    save_file({f"{MODULES[0]}.lora_down.weight": torch.ones(1, n), f"{MODULES[0]}.lora_up.weight": torch.ones(n, 1),
               f"{MODULES[0]}.alpha": torch.tensor(1.0)}, str(p))
    monkeypatch.setattr(checks, "available_memory", lambda: 8 << 30)     # deterministic: 8 GiB free
    for method in ("ties", "dare_linear", "dare_ties"):
        t0 = time.perf_counter()
        line = _refused(["merge", str(p), str(p), "--method", method, "--density", "0.5",
                         "-o", str(tmp_path / "m.safetensors")], capsys,
                        words=("65536×65536", "16 GiB", "8 GiB", "--method svd"), inputs=(str(p),))
        assert "double_blocks.0.img_attn.proj" in line
        assert time.perf_counter() - t0 < 5


def test_require_dense_fits_limits() -> None:
    checks.require_dense_fits("m", (4, 4), 10, path=None, fix="x")      # tiny: always fine
    avail = checks.available_memory()
    if avail is not None:
        with pytest.raises(LorakitError):
            checks.require_dense_fits("m", (1 << 20, 1 << 20), 1, path=None, fix="x")   # 4 TiB


def _alias_bomb(key: str) -> str:
    """The classic "billion laughs", under one known recipe key so that the loader gets as far as checking its
    value: level k is a list of nine aliases of level k-1 (9^9 ≈ 387 million strings expanded)."""
    names = "abcdefghi"
    levels = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    levels += [f"&{cur} [" + ",".join([f"*{prev}"] * 9) + "]" for prev, cur in zip(names, names[1:])]
    return f"{key}: [" + ", ".join(levels) + "]\n"


@pytest.mark.parametrize("key", ["seed", "inputs"])
def test_yaml_alias_bomb_is_refused_fast(tmp_path, capsys, key) -> None:
    bomb = _alias_bomb(key)
    assert len(bomb) < 400
    r = tmp_path / "bomb.yaml"
    r.write_text(bomb)
    t0 = time.perf_counter()
    line = _refused(["merge", "--recipe", str(r), "-o", str(tmp_path / "m.safetensors")], capsys,
                    words=("alias",), inputs=(str(r),))
    assert time.perf_counter() - t0 < 5 and len(line) < 400


def test_small_alias_use_and_value_reprs_are_bounded(tmp_path, capsys) -> None:
    # an alias repeated a few times is fine (under the node limit); the type error quotes a bounded value
    r = tmp_path / "small.yaml"
    r.write_text('rank: &m ["' + "x" * 5000 + '", 2, 3]\nseed: [*m, *m, *m]\n')
    line = _refused(["merge", "--recipe", str(r), "-o", str(tmp_path / "m.safetensors")], capsys, words=("rank",))
    assert len(line) < 600
    assert len(brief(["y" * 10_000] * 1000)) <= 120


def test_recursive_yaml_recipe(tmp_path, capsys) -> None:
    r = tmp_path / "rec.yaml"
    r.write_text("inputs: &a [*a]\n")
    _refused(["merge", "--recipe", str(r), "-o", str(tmp_path / "m.safetensors")], capsys, words=("itself",))


def _many_tensor_header(path, n: int, key: str = "data_offsets") -> str:
    parts = [f'"t{i}":{{"dtype":"F32","shape":[1],"{key}":[{4 * i},{4 * i + 4}]}}' for i in range(n)]
    body = ("{" + ",".join(parts) + "}").encode()
    body += b" " * (-len(body) % 8)
    with open(path, "wb") as fh:
        fh.write(len(body).to_bytes(8, "little"))
        fh.write(body)
        fh.write(b"\0" * (4 * n))
    return str(path)


def test_header_with_too_many_tensors_is_refused_fast(tmp_path, capsys) -> None:
    p = _many_tensor_header(tmp_path / "many.safetensors", 4 * MAX_TENSORS)
    t0 = time.perf_counter()
    with pytest.raises(HeaderError, match="tensors, more than"):
        open_weights(p)
    assert time.perf_counter() - t0 < 5
    _refused(["inspect", p], capsys, words=(str(4 * MAX_TENSORS),), inputs=(p,))
    # the same count spelled with an escaped key still counts (checked again after parsing)
    q = _many_tensor_header(tmp_path / "esc.safetensors", MAX_TENSORS + 1, key="data_offset\\u0073")
    with pytest.raises(HeaderError, match="tensors, more than"):
        open_weights(q)


def test_header_at_a_normal_count_reads(tmp_path) -> None:
    p = _many_tensor_header(tmp_path / "ok.safetensors", 3000)
    with open_weights(p) as f:
        assert len(f) == 3000 and f.get("t2999").shape == (1,)


# ---------------------------------------------------------------------------------------------
# Small holes
# ---------------------------------------------------------------------------------------------

def test_alpha_of_shape_zero_is_refused(tmp_path, capsys) -> None:
    lora = kohya_lora(tmp_path / "a0.safetensors", alpha=torch.zeros(0))
    for argv in (["inspect", lora], ["convert", lora, "--to", "diffusers", "-o", str(tmp_path / "c.safetensors")]):
        _refused(argv, capsys, words=("alpha", "[0]"), inputs=(lora,))


def test_bake_of_all_zero_ups_is_refused_unless_asked(tmp_path, base, capsys) -> None:
    lora = kohya_lora(tmp_path / "z.safetensors", up=torch.zeros(H, 4))
    out = tmp_path / "b.safetensors"
    _refused(["bake", base, lora, "-o", str(out), "--no-progress"], capsys,
             words=("all-zero up", "--allow-zero-lora"), inputs=(base, lora))
    assert main(["doctor", lora]) == 2                  # doctor agrees: WILL NOT APPLY
    capsys.readouterr()
    assert main(["bake", base, lora, "-o", str(out), "--no-progress", "--allow-zero-lora"]) == 0
    got, want = load_file(str(out)), load_file(base)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_lora_with_some_trained_modules_still_bakes(tmp_path, base) -> None:
    g = torch.Generator().manual_seed(5)
    t = {}
    for i, stem in enumerate(MODULES):
        t[stem + ".lora_down.weight"] = torch.randn(4, H, generator=g)
        t[stem + ".lora_up.weight"] = torch.zeros(H, 4) if i == 0 else torch.randn(H, 4, generator=g)
        t[stem + ".alpha"] = torch.tensor(4.0)
    p = tmp_path / "half.safetensors"
    save_file(t, str(p))
    assert main(["bake", base, str(p), "-o", str(tmp_path / "b.safetensors"), "--no-progress"]) == 0


def test_duplicate_recipe_keys(tmp_path, capsys) -> None:
    lora = kohya_lora(tmp_path / "l.safetensors")
    r = tmp_path / "dup.yaml"
    r.write_text(f"inputs: [{json.dumps(lora)}]\nmethod: svd\nrank: 4\nmethod: concat\n")
    _refused(["merge", "--recipe", str(r), "-o", str(tmp_path / "m.safetensors")], capsys,
             words=("'method'", "twice", "lines 2 and 4"), inputs=(str(r),))
    nested = tmp_path / "nested.yaml"
    nested.write_text(f"inputs:\n  - path: {json.dumps(lora)}\n    weight: 0.5\n    weight: 0.7\n")
    _refused(["merge", "--recipe", str(nested), "-o", str(tmp_path / "m.safetensors")], capsys,
             words=("'weight'", "twice"))
    # YAML merge keys are not duplicates: the explicit key overrides the merged one, as YAML defines
    ok = tmp_path / "ok.yaml"
    ok.write_text(f"inputs:\n  - &e {{path: {json.dumps(lora)}, weight: 0.5}}\n  - {{<<: *e, weight: 0.25}}\n"
                  "method: svd\nrank: 2\ndry_run: true\n")
    assert main(["merge", "--recipe", str(ok), "-o", str(tmp_path / "m.safetensors")]) == 0
