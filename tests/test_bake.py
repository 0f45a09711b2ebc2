"""Baking LoRAs into base models: exactness in every base layout × LoRA layout, dtypes, DoRA, text
encoders, metadata, dry run, recipes and the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.cli import main
from lorakit.errors import LorakitError, OutputError, UnsupportedDtypeError
from lorakit.samples.synthetic import write_aitoolkit_lora, write_sdscripts_lora
from test_bake_util import (COMFY_EXTRA, INDEX, SHARDS, TINY_CLIP, TINY_FLUX, TINY_T5, expected_native, make_base,
                            metadata_of, native_state, read_all, swap, write_kohya_all, write_te_file)

LAYOUTS = ["bfl", "comfy", "diffusers", "sharded"]
FINAL = "final_layer.adaLN_modulation.1"


def _loras(tmp_path, kind: str) -> list[tuple[str, float]]:
    k = write_kohya_all(str(tmp_path / "kohya.safetensors"), diff_b=[FINAL, "img_in", "single_blocks.1.linear1"])
    d = write_aitoolkit_lora(str(tmp_path / "diffusers.safetensors"), blocks_only=False, seed=7)
    return {"kohya": [(k, 0.7)], "diffusers": [(d, 1.0)], "both": [(k, 0.7), (d, -0.4)]}[kind]


def _assert_native_close(out: str, expected: dict[str, torch.Tensor], atol: float = 2e-6) -> None:
    got = native_state(out)
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert not torch.isnan(got[k]).any(), k
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["kohya", "diffusers", "both"])
def test_bake_exact_every_layout(tmp_path, layout, kind):
    base = make_base(tmp_path, layout)
    loras = _loras(tmp_path, kind)
    out = str(tmp_path / ("out" if layout == "sharded" else "out.safetensors"))
    report = lorakit.bake(base, loras, out)
    _assert_native_close(out, expected_native(base, loras))
    src, got = read_all(base), read_all(out)
    assert list(got) == list(src) or set(got) == set(src)
    for k, v in src.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
    changed = {k for k in src if not torch.equal(src[k], got[k])}
    assert len(changed) == report.changed > 0
    assert report.changed + report.copied == report.tensors == len(src)
    if layout == "comfy":   # other components are passed through byte for byte
        for k in COMFY_EXTRA:
            assert torch.equal(got[k], src[k])
    if layout == "sharded":
        assert sorted(os.listdir(out)) == sorted([*SHARDS, INDEX, "config.json"])
        with open(os.path.join(base, INDEX)) as a, open(os.path.join(out, INDEX)) as b:
            assert json.load(a)["weight_map"] == json.load(b)["weight_map"]
        for shard in SHARDS:
            assert set(load_file(os.path.join(out, shard))) == set(load_file(os.path.join(base, shard)))
        assert not [p for p in os.listdir(tmp_path) if "lorakit-tmp" in p]


def _raw_lora_delta(up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    return (up.double() @ down.double()).float() * scale


def test_final_layer_swap_and_windows_from_raw_factors(tmp_path):
    """Independent of lorakit's loader: diffusers-named factors into a BFL base and back."""
    H, M = TINY_FLUX["H"], TINY_FLUX["M"]
    g = torch.Generator().manual_seed(11)
    r = 3
    mods = {"norm_out.linear": (2 * H, H), "single_transformer_blocks.1.proj_mlp": (M, H),
            "single_transformer_blocks.1.attn.to_k": (H, H), "transformer_blocks.0.attn.add_v_proj": (H, H)}
    t = {}
    for name, (o, i) in mods.items():
        t[f"transformer.{name}.lora_A.weight"] = torch.randn(r, i, generator=g)
        t[f"transformer.{name}.lora_B.weight"] = torch.randn(o, r, generator=g)
    lora = str(tmp_path / "raw.safetensors")
    save_file(t, lora)
    base = make_base(tmp_path, "bfl")
    out = str(tmp_path / "out.safetensors")
    lorakit.bake(base, [(lora, 0.5)], out)
    b, o = load_file(base), load_file(out)

    def d(name):
        return 0.5 * _raw_lora_delta(t[f"transformer.{name}.lora_B.weight"], t[f"transformer.{name}.lora_A.weight"], 1)

    torch.testing.assert_close(o[f"{FINAL}.weight"], b[f"{FINAL}.weight"] + swap(d("norm_out.linear")))
    lin1 = b["single_blocks.1.linear1.weight"].clone()
    lin1[3 * H:] += d("single_transformer_blocks.1.proj_mlp")
    lin1[H:2 * H] += d("single_transformer_blocks.1.attn.to_k")
    torch.testing.assert_close(o["single_blocks.1.linear1.weight"], lin1)
    qkv = b["double_blocks.0.txt_attn.qkv.weight"].clone()
    qkv[2 * H:] += d("transformer_blocks.0.attn.add_v_proj")
    torch.testing.assert_close(o["double_blocks.0.txt_attn.qkv.weight"], qkv)
    untouched = [k for k in b if k not in (f"{FINAL}.weight", "single_blocks.1.linear1.weight",
                                           "double_blocks.0.txt_attn.qkv.weight")]
    assert all(torch.equal(b[k], o[k]) for k in untouched)

    # kohya (fused, BFL order) final layer into a diffusers base: norm_out.linear gets the swapped delta
    k = write_kohya_all(str(tmp_path / "k.safetensors"), modules=[FINAL, "single_blocks.0.linear1"], alpha=2.0)
    kt = load_file(k)
    dbase = make_base(tmp_path, "diffusers")
    dout = str(tmp_path / "dout.safetensors")
    lorakit.bake(dbase, [k], dout)
    db, do = load_file(dbase), load_file(dout)
    stem = "lora_unet_" + FINAL.replace(".", "_")
    delta = _raw_lora_delta(kt[f"{stem}.lora_up.weight"], kt[f"{stem}.lora_down.weight"], 2.0 / 4)
    torch.testing.assert_close(do["norm_out.linear.weight"], db["norm_out.linear.weight"] + swap(delta))
    delta = _raw_lora_delta(kt["lora_unet_single_blocks_0_linear1.lora_up.weight"],
                            kt["lora_unet_single_blocks_0_linear1.lora_down.weight"], 2.0 / 4)
    for name, (a, z) in {"to_q": (0, H), "to_k": (H, 2 * H), "to_v": (2 * H, 3 * H)}.items():
        key = f"single_transformer_blocks.0.attn.{name}.weight"
        torch.testing.assert_close(do[key], db[key] + delta[a:z])
    key = "single_transformer_blocks.0.proj_mlp.weight"
    torch.testing.assert_close(do[key], db[key] + delta[3 * H:])


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_small_chunks_give_identical_bytes(tmp_path, layout):
    """Row chunking (including the split at the swapped halves) does not change a single byte."""
    base = make_base(tmp_path, layout, dtype=torch.bfloat16)
    loras = _loras(tmp_path, "both")
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    lorakit.bake(base, loras, a)
    lorakit.bake(base, loras, b, chunk_bytes=700)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()


def test_bf16_base_single_rounding_and_dtype_override(tmp_path):
    base = make_base(tmp_path, "comfy", dtype=torch.bfloat16)
    loras = _loras(tmp_path, "both")
    exp = expected_native(base, loras)
    out = str(tmp_path / "out.safetensors")
    lorakit.bake(base, loras, out)
    got = read_all(out)
    assert all(v.dtype == torch.bfloat16 for k, v in got.items() if k not in COMFY_EXTRA)
    nat = native_state(out)
    for k, v in exp.items():      # one rounding of the fp32 sum: within half a bf16 ulp (+ fp32 noise)
        ulp = torch.finfo(torch.bfloat16).eps * v.abs().clamp_min(1e-30)
        assert ((nat[k] - v).abs() <= 0.5 * ulp + 1e-6).all(), k
    out32 = str(tmp_path / "out32.safetensors")
    lorakit.bake(base, loras, out32, dtype="fp32")
    got32 = read_all(out32)
    for k, v in got32.items():
        assert v.dtype == (torch.float16 if k in COMFY_EXTRA else torch.float32), k
    _assert_native_close(out32, exp)
    assert metadata_of(out32)["modelspec.architecture"] == "flux-1-dev"


def test_fp8_base_upcast_add_cast_once(tmp_path):
    base = make_base(tmp_path, "bfl", dtype=torch.float8_e4m3fn)
    lora = write_kohya_all(str(tmp_path / "k.safetensors"), modules=["double_blocks.0.img_attn.qkv"])
    out = str(tmp_path / "out.safetensors")
    lorakit.bake(base, [(lora, 2.0)], out)
    b, o = load_file(base), load_file(out)
    key = "double_blocks.0.img_attn.qkv.weight"
    want = expected_native(base, [(lora, 2.0)])[key]
    assert o[key].dtype == torch.float8_e4m3fn
    exact = (want.clamp(-448, 448).to(torch.float8_e4m3fn).float() == o[key].float()).float().mean()
    assert exact > 0.999
    assert all(torch.equal(b[k].view(torch.uint8), o[k].view(torch.uint8)) for k in b if k != key)


def test_scale_on_a_non_fp8_weight_is_refused(tmp_path):
    """Scaled fp8 bakes (tests/test_quant_bake.py); a scale_weight beside a weight that is not fp8 is no known
    convention and is refused."""
    base = make_base(tmp_path, "bfl")
    t = load_file(base)
    t["double_blocks.0.img_attn.qkv.scale_weight"] = torch.tensor(1.0)
    save_file(t, base)
    lora = write_sdscripts_lora(str(tmp_path / "k.safetensors"), clip=None)
    with pytest.raises(UnsupportedDtypeError, match="has a scale_weight but is F32, not fp8"):
        lorakit.bake(base, [lora], str(tmp_path / "out.safetensors"))
    assert not os.path.exists(tmp_path / "out.safetensors")


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_dora_peft_formula(tmp_path, layout, strength):
    """DoRA: + m·(W0 + s·ΔW)/‖W0 + s·ΔW‖ − W0 per output row, next to plain additive patches."""
    mods = [FINAL, "single_blocks.0.linear1", "double_blocks.1.img_attn.qkv", "img_in"]
    dora = write_kohya_all(str(tmp_path / "dora.safetensors"), modules=mods, dora=mods[:3], seed=21)
    plain = write_kohya_all(str(tmp_path / "plain.safetensors"), modules=mods[1:], seed=22)
    base = make_base(tmp_path, layout)
    out = str(tmp_path / "out.safetensors")
    lorakit.bake(base, [(dora, strength), (plain, 0.3)], out)
    w0 = native_state(base)
    exp = expected_native(base, [(plain, 0.3)])
    model = lorakit.read_lora(dora)
    assert sum(p.dora is not None for p in model.patches) == 3
    for p in model.patches:
        key = f"{p.target.module}.weight"
        v = w0[key] + strength * p.dense()
        if p.dora is not None:
            v = p.dora.float().reshape(-1, 1) * v / v.norm(dim=1, keepdim=True)
        exp[key] = exp[key] + (v - w0[key])
    _assert_native_close(out, exp, atol=5e-6)
    # the result does not depend on the order of the inputs
    out2 = str(tmp_path / "out2.safetensors")
    lorakit.bake(base, [(plain, 0.3), (dora, strength)], out2)
    _assert_native_close(out2, exp, atol=5e-6)


def test_text_encoders(tmp_path):
    base = make_base(tmp_path, "bfl")
    lora = write_kohya_all(str(tmp_path / "k.safetensors"), modules=["img_in"], clip=TINY_CLIP, t5=TINY_T5)
    clip = write_te_file(str(tmp_path / "clip.safetensors"), "clip_l", TINY_CLIP,
                         prefix="text_encoders.clip_l.transformer.")
    t5 = write_te_file(str(tmp_path / "t5.safetensors"), "t5", TINY_T5)
    out, cout, tout = (str(tmp_path / n) for n in ("o.safetensors", "c.safetensors", "t.safetensors"))
    # without the encoder files: baked transformer, TE modules listed as not applied
    r = lorakit.bake(base, [(lora, 0.8)], out)
    assert {(n["component"], n["modules"]) for n in r.not_applied} == {("clip_l", 12), ("t5", 14)}
    assert any("clip_l modules not applied" in w for w in r.warnings)
    os.unlink(out)
    r = lorakit.bake(base, [(lora, 0.8)], out, clip_l=clip, clip_l_out=cout, t5=t5, t5_out=tout)
    assert not r.not_applied
    model = lorakit.read_lora(lora)
    for path, outp, comp, prefix in ((clip, cout, "clip_l", "text_encoders.clip_l.transformer."), (t5, tout, "t5", "")):
        src, got = load_file(path), load_file(outp)
        assert set(src) == set(got)
        touched = set()
        for p in model.patches:
            if p.target.component != comp:
                continue
            key = prefix + p.target.module + ".weight"
            torch.testing.assert_close(got[key], src[key] + 0.8 * p.dense())
            touched.add(key)
        assert len(touched) == (12 if comp == "clip_l" else 14)
        assert all(torch.equal(src[k], got[k]) for k in src if k not in touched)
    # a text_model.-less CLIP file is matched by suffix too
    bare = write_te_file(str(tmp_path / "bare.safetensors"), "clip_l", TINY_CLIP)
    tb = {k.removeprefix("text_model."): v for k, v in load_file(bare).items()}
    save_file(tb, bare)
    cout2 = str(tmp_path / "c2.safetensors")
    lorakit.bake(base, [(lora, 0.8)], str(tmp_path / "o2.safetensors"), clip_l=bare, clip_l_out=cout2)
    got = load_file(cout2)
    p = next(p for p in model.patches if p.target.module == "text_model.encoder.layers.1.mlp.fc2")
    key = "encoder.layers.1.mlp.fc2.weight"
    torch.testing.assert_close(got[key], tb[key] + 0.8 * p.dense())


def test_metadata_and_provenance(tmp_path):
    base = make_base(tmp_path, "bfl", metadata={"modelspec.title": "my base", "sshs_model_hash": "stale"})
    lora = write_sdscripts_lora(str(tmp_path / "k.safetensors"), clip=None)
    out = str(tmp_path / "out.safetensors")
    lorakit.bake(base, [(lora, 0.6)], out)
    meta = metadata_of(out)
    assert meta["modelspec.title"] == "my base"
    assert meta["modelspec.architecture"] == "flux-1-dev"
    assert not any(k.startswith("sshs_") for k in meta)
    prov = json.loads(meta["lorakit.provenance"])
    assert prov["operation"] == "bake"
    assert prov["inputs"][0]["file"] == "k.safetensors" and prov["inputs"][0]["weight"] == 0.6
    assert prov["inputs"][0]["sha256"] == lorakit.ops.metadata.file_sha256(lora)
    assert prov["base"]["file"] == os.path.basename(base) and prov["base"]["bytes"] == os.path.getsize(base)
    schnell = make_base(tmp_path / ".." / tmp_path.name, "diffusers", params={**TINY_FLUX, "guidance": 0})
    out2 = str(tmp_path / "out2.safetensors")
    lorakit.bake(schnell, [lora], out2)
    assert metadata_of(out2)["modelspec.architecture"] == "flux-1-schnell"


def test_dry_run_reads_no_base_data(tmp_path, monkeypatch):
    base = make_base(tmp_path, "diffusers")
    loras = _loras(tmp_path, "both")
    import lorakit.ops.baking.run as baking
    import lorakit.io.reader as reader

    def boom(*a, **k):
        raise AssertionError("dry run touched tensor data")

    monkeypatch.setattr(baking, "Pipeline", boom)
    real_read = reader.read_tensor
    base_keys = set(read_all(base))

    def guarded(fd, info, out=None):
        if info.name in base_keys and info.file == base:
            boom()
        return real_read(fd, info, out)

    monkeypatch.setattr(reader, "read_tensor", guarded)
    out = str(tmp_path / "out.safetensors")
    r = lorakit.bake(base, loras, out, dry_run=True)
    assert not os.path.exists(out) and r.dry_run
    entry = next(e for e in r.plan if e["tensor"] == "norm_out.linear.weight")
    assert {c["input"] for c in entry["changes"]} == {"kohya.safetensors", "diffusers.safetensors"}
    assert entry["changes"][0]["native"] == f"{FINAL}.weight"
    q = next(e for e in r.plan if e["tensor"] == "single_transformer_blocks.0.proj_mlp.weight")
    H, M = TINY_FLUX["H"], TINY_FLUX["M"]
    kohya = next(c for c in q["changes"] if c["input"] == "kohya.safetensors")
    assert kohya["native_rows"] == [3 * H, 3 * H + M] and kohya["tensor_rows"] == [0, M]
    text = "\n".join(lorakit.ops.baking.format_plan(r))
    assert "single_transformer_blocks.0.proj_mlp.weight ←" in text


def test_cli_spellings_json_and_recipe(tmp_path, capsys):
    base = make_base(tmp_path, "bfl")
    k = write_sdscripts_lora(str(tmp_path / "k.safetensors"), clip=None)
    d = write_aitoolkit_lora(str(tmp_path / "d.safetensors"))
    out1 = str(tmp_path / "o1.safetensors")
    assert main(["bake", base, f"{k}:0.5", d, "-o", out1, "--json", "--save_precision", "bf16"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["changed"] > 0 and rep["dtype"] == "bf16" and len(rep["inputs"]) == 2
    out2 = str(tmp_path / "o2.safetensors")
    assert main(["bake", "--flux_model", base, "--models", k, d, "--ratios", "0.5", "1", "--save_to", out2,
                 "--save-precision", "bf16"]) == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {os.path.basename(base)}\ninputs:\n  - {{path: k.safetensors, weight: 0.5}}\n"
                      "  - d.safetensors\noutput: o3.safetensors\ndtype: bf16\n")   # relative to the recipe
    assert main(["bake", "--recipe", str(recipe)]) == 0
    t1, t2, t3 = (load_file(str(tmp_path / f"o{i}.safetensors")) for i in (1, 2, 3))
    assert all(torch.equal(t1[x], t2[x]) and torch.equal(t1[x], t3[x]) for x in t1)
    assert main(["bake", base, k, "--dry-run"]) == 0
    assert "rows" in capsys.readouterr().out


def test_outputs_are_checked_and_failures_leave_nothing(tmp_path, monkeypatch):
    base = make_base(tmp_path, "sharded")
    lora = write_sdscripts_lora(str(tmp_path / "k.safetensors"), clip=None)
    with pytest.raises(OutputError):
        lorakit.bake(base, [lora], base)                      # never overwrite the input
    with pytest.raises(OutputError):
        lorakit.bake(base, [lora], str(tmp_path / "x.safetensors"))   # sharded in -> folder out
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "f").write_text("x")
    with pytest.raises(OutputError):
        lorakit.bake(base, [lora], str(busy))
    import lorakit.ops.baking.compute as baking

    def fail(self, task, *a):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(baking.Compute, "run", fail)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(RuntimeError):
        lorakit.bake(base, [lora], str(tmp_path / "never"))
    assert sorted(os.listdir(tmp_path)) == before
    assert main(["bake", base, lora, "-o", str(tmp_path / "never")]) != 0
    assert sorted(os.listdir(tmp_path)) == before


def test_bake_refuses_lora_as_base(tmp_path):
    lora = write_sdscripts_lora(str(tmp_path / "k.safetensors"), clip=None)
    base = make_base(tmp_path, "bfl")
    with pytest.raises(LorakitError):
        lorakit.bake(lora, [base], str(tmp_path / "o.safetensors"))


def _lycoris_lora(path: str) -> str:
    """LoHa, LoKr (w1 full, w2 factored), full diff and a bias-only module, kohya-flattened names."""
    H, M = TINY_FLUX["H"], TINY_FLUX["M"]
    g = torch.Generator().manual_seed(31)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    qkv, lin1 = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"
    t = {
        # LoHa on the fused qkv (rows split across to_q/to_k/to_v in a diffusers base)
        f"{qkv}.hada_w1_a": r(3 * H, 4), f"{qkv}.hada_w1_b": r(4, H),
        f"{qkv}.hada_w2_a": r(3 * H, 4), f"{qkv}.hada_w2_b": r(4, H), f"{qkv}.alpha": torch.tensor(2.0),
        # LoKr on linear1: row blocks of 7 do not align with the H-row windows or small chunks
        f"{lin1}.lokr_w1": r((3 * H + M) // 7, 4), f"{lin1}.lokr_w2_a": r(7, 2), f"{lin1}.lokr_w2_b": r(2, H // 4),
        f"{lin1}.alpha": torch.tensor(1.0),
        "lora_unet_final_layer_adaLN_modulation_1.diff": r(2 * H, H),
        "lora_unet_final_layer_adaLN_modulation_1.diff_b": r(2 * H),
        "lora_unet_txt_in.diff_b": r(H),
    }
    save_file(t, path)
    return path


@pytest.mark.parametrize("layout", ["bfl", "sharded"])
def test_loha_lokr_full_and_bias_only(tmp_path, layout):
    assert (3 * TINY_FLUX["H"] + TINY_FLUX["M"]) % 7 == 0
    lora = _lycoris_lora(str(tmp_path / "lyco.safetensors"))
    model = lorakit.read_lora(lora)
    assert {p.adapter.kind if p.adapter else "bias" for p in model.patches} == {"loha", "lokr", "full", "bias"}
    base = make_base(tmp_path, layout)
    out = str(tmp_path / ("out" if layout == "sharded" else "out.safetensors"))
    lorakit.bake(base, [(lora, 0.9)], out, chunk_bytes=1000)
    _assert_native_close(out, expected_native(base, [(lora, 0.9)]))


def test_input_axis_dora_needs_whole_module(tmp_path):
    """LyCORIS input-axis magnitudes (shape (1, in)): column norms over the module's rows."""
    H = TINY_FLUX["H"]
    k = write_kohya_all(str(tmp_path / "k.safetensors"), modules=["double_blocks.0.img_attn.qkv", "txt_in"])
    t = load_file(k)
    g = torch.Generator().manual_seed(41)
    t["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"] = torch.rand(1, H, generator=g) + 0.5
    save_file(t, k)
    base = make_base(tmp_path, "bfl")
    out = str(tmp_path / "out.safetensors")
    lorakit.bake(base, [k], out, chunk_bytes=500)
    w0, exp = native_state(base), expected_native(base, [])
    model = lorakit.read_lora(k)
    for p in model.patches:
        key = f"{p.target.module}.weight"
        v = w0[key] + p.dense()
        if p.dora is not None:
            v = p.dora.float().reshape(1, -1) * v / v.norm(dim=0, keepdim=True)
        exp[key] = v
    _assert_native_close(out, exp, atol=5e-6)
    from lorakit.errors import MergeError
    with pytest.raises(MergeError, match="column norms"):   # the fused rows are split across three tensors
        lorakit.bake(make_base(tmp_path, "diffusers"), [k], str(tmp_path / "d.safetensors"))
    assert not os.path.exists(tmp_path / "d.safetensors")


def test_fp8_output_dtype_saturates(tmp_path):
    base = make_base(tmp_path, "bfl")
    t = load_file(base)
    t["img_in.weight"][0, 0] = 1000.0     # beyond the e4m3fn range
    save_file(t, base)
    lora = write_kohya_all(str(tmp_path / "k.safetensors"), modules=["img_in"])
    out = str(tmp_path / "out.safetensors")
    lorakit.bake(base, [lora], out, dtype="fp8_e4m3fn")
    got = load_file(out)
    assert got["img_in.weight"].dtype == torch.float8_e4m3fn
    assert all(torch.isfinite(v.float()).all() for v in got.values())
    assert got["img_in.weight"][0, 0].float() == 448.0


def test_unknown_device_and_missing_cuda(tmp_path):
    from lorakit.errors import UsageError
    base = make_base(tmp_path, "bfl")
    lora = write_kohya_all(str(tmp_path / "k.safetensors"), modules=["img_in"])
    with pytest.raises(UsageError):
        lorakit.bake(base, [lora], str(tmp_path / "o.safetensors"), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA"):
            lorakit.bake(base, [lora], str(tmp_path / "o.safetensors"), device="cuda")


def test_stage_timings_are_reported(tmp_path, capsys):
    """Where a bake's time goes: read, compute, write, copy, the waits and the commit, in --json and --timings."""
    base = make_base(tmp_path, "bfl")
    lora = _loras(tmp_path, "kohya")[0][0]
    out = str(tmp_path / "o.safetensors")
    r = lorakit.bake(base, [lora], out, progress=False)
    assert set(r.stages) == {"read", "compute", "write", "copy", "wait_read", "wait_write", "commit"}
    assert all(v >= 0 for v in r.stages.values()) and r.stages["compute"] > 0 and r.stages["commit"] > 0
    assert r.to_json()["stages"] == r.stages
    assert main(["bake", base, lora, "-o", str(tmp_path / "o2.safetensors"), "--timings", "--no-progress"]) == 0
    assert "stages (s, overlapping): read " in capsys.readouterr().err
