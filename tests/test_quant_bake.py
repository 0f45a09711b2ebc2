"""``lorakit.bake`` into quantized FLUX-shaped bases equals dequantize → fp32 add → requantize computed here
independently: ComfyUI's formulas (``value = code.to(fp32) * scale``; ``scale = amax / finfo.max``, codes
``(w * (1 / scale)).to(fp8)``) re-implemented in the test, gguf-py's ``quantize``/``dequantize``/``GGUFReader``
for GGUF. ΔW comes from the LoRA file's own tensors (sd-scripts: ``up @ down · α / rank``)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lorakit
from lorakit.errors import UnsupportedDtypeError
from lorakit.samples.quantized import seeded_values, write_comfy_fp8, write_gguf
from lorakit.samples.synthetic import TINY_FLUX, base_tensors, write_sdscripts_lora

from tests.peak_rss import measure_bake

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")
E4 = torch.float8_e4m3fn
SPECS = [(t.name, t.shape) for t in base_tensors(TINY_FLUX)]
VALUES = seeded_values(0)


def comfy_requant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lim = torch.finfo(E4).max
    scale = (w.abs().amax() / lim).to(torch.float32)
    return (w * (1.0 / scale)).clamp(-lim, lim).to(E4), scale


def lora_deltas(path) -> dict[str, torch.Tensor]:
    """BFL weight name -> ΔW of an sd-scripts FLUX LoRA (flattened names: ``lora_unet_`` + dots as ``_``)."""
    t = load_file(str(path))
    names = {"lora_unet_" + n[:-len(".weight")].replace(".", "_"): n for n, _s in SPECS if n.endswith(".weight")}
    out = {}
    for k in t:
        if k.endswith(".lora_down.weight"):
            stem = k[:-len(".lora_down.weight")]
            down, up = t[k].float(), t[stem + ".lora_up.weight"].float()
            scale = float(t[stem + ".alpha"]) / down.shape[0]
            out[names[stem]] = (up @ down) * scale
    return out


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return write_sdscripts_lora(tmp_path_factory.mktemp("ql") / "l.safetensors", TINY_FLUX, rank=4, clip=None)


@pytest.mark.parametrize("convention", ["scale_weight", "quant_metadata"])
def test_bake_scaled_fp8(tmp_path, lora, convention):
    base, out = tmp_path / "b.safetensors", tmp_path / "o.safetensors"
    write_comfy_fp8(base, SPECS, VALUES, convention=convention, keep_bf16=lambda n: "single_blocks.1." in n)
    r = lorakit.bake(base, [lora], out)
    deltas = lora_deltas(lora)
    scale = ".scale_weight" if convention == "scale_weight" else ".weight_scale"
    with safe_open(str(out), "pt") as f, safe_open(str(base), "pt") as s:
        assert set(f.keys()) == set(s.keys())
        meta, smeta = f.metadata(), s.metadata()
        assert {k: v for k, v in meta.items() if not k.startswith(("lorakit", "modelspec"))} == smeta
        baked = 0
        for n, shape in SPECS:
            got = f.get_tensor(n)
            stem = n[:-len(".weight")]
            if n in deltas and (stem + scale) in s.keys():
                w = s.get_tensor(n).to(torch.float32) * s.get_tensor(stem + scale) + deltas[n]
                codes, sc = comfy_requant(w)
                assert torch.equal(got.view(torch.uint8), codes.view(torch.uint8)), n
                assert torch.equal(f.get_tensor(stem + scale), sc) and f.get_tensor(stem + scale).dtype == torch.float32
                # ComfyUI reads the output back to within fp8 rounding of W + ΔW
                back = got.to(torch.float32) * f.get_tensor(stem + scale)
                assert float((back - w).abs().max()) <= float(w.abs().max()) / 16
                baked += 1
            elif n in deltas:     # a bf16 layer of the mixed file
                want = (s.get_tensor(n).float() + deltas[n]).to(torch.bfloat16)
                assert torch.equal(got, want), n
            else:
                assert torch.equal(got.view(torch.uint8) if got.dtype == E4 else got,
                                   s.get_tensor(n).view(torch.uint8) if got.dtype == E4 else s.get_tensor(n)), n
        assert baked >= 20
    assert r.quantized is not None and r.quantized["requantized"] == len(deltas)
    assert r.quantized["retention"] == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_bake_gguf(tmp_path, lora, qtype):
    base, out = tmp_path / "b.gguf", tmp_path / "o.gguf"
    write_gguf(base, SPECS, VALUES, qtype=qtype)
    r = lorakit.bake(base, [lora], out)
    deltas = lora_deltas(lora)
    src = {t.name: t for t in gguf.GGUFReader(str(base)).tensors}
    got = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert list(got) == list(src)
    shapes = dict(SPECS)
    for n, t in got.items():
        s = src[n]
        assert t.tensor_type == s.tensor_type
        if n in deltas:
            w = gguf.quants.dequantize(np.asarray(s.data), s.tensor_type).reshape(shapes[n]) + deltas[n].numpy()
            want = gguf.quants.quantize(w.astype(np.float32), s.tensor_type)
            assert np.array_equal(np.asarray(t.data), want), n
            back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            step = np.abs(w).max() / (127 if qtype == "Q8_0" else 7)
            assert np.abs(back - w).max() <= step, n
        else:
            assert np.array_equal(np.asarray(t.data), np.asarray(s.data)), n
    assert r.quantized["requantized"] == len(deltas)
    expected = 0.9 if qtype == "Q4_0" else 0.99
    assert r.quantized["retention"] > expected * 0.5


def test_kquant_gguf_refused_then_requant(tmp_path):
    params = {**TINY_FLUX, "M": 256}        # rows of 256: one Q4_K super-block
    base = tmp_path / "b.gguf"
    lora = write_sdscripts_lora(tmp_path / "l.safetensors", params, rank=4, clip=None)
    target = "double_blocks.0.img_mlp.2.weight"
    write_gguf(base, [(t.name, t.shape) for t in base_tensors(params)], VALUES, qtype="Q8_0", keep={target: "Q4_K"})
    assert gguf.GGUFReader(str(base)).tensors[[t.name for t in gguf.GGUFReader(str(base)).tensors].index(target)] \
        .tensor_type == gguf.GGMLQuantizationType.Q4_K
    with pytest.raises(UnsupportedDtypeError, match="--requant q8_0"):
        lorakit.bake(base, [lora], tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()
    doc = lorakit.doctor(lora, base=str(base))
    assert any("--requant" in w for w in doc.loras[0].warnings)
    r = lorakit.bake(base, [lora], tmp_path / "o.gguf", requant="q8_0")
    assert r.quantized["requantized_as"] == {target: "gguf_Q8_0"}
    t = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "o.gguf")).tensors}
    assert t[target].tensor_type == gguf.GGMLQuantizationType.Q8_0


def test_doctor_predicts_bake_retention(tmp_path, lora):
    base = tmp_path / "b.safetensors"
    write_comfy_fp8(base, SPECS, VALUES, convention="quant_metadata")
    doc = lorakit.doctor(lora, base=str(base))
    predicted = doc.loras[0].checks["retention"]
    r = lorakit.bake(base, [lora], tmp_path / "o.safetensors")
    assert predicted["retention"] == r.quantized["retention"]
    assert predicted["blocks"] == r.quantized["blocks"]


def test_bake_widened_to_bf16(tmp_path, lora):
    base = tmp_path / "b.safetensors"
    write_comfy_fp8(base, SPECS, VALUES, convention="scale_weight")
    lorakit.bake(base, [lora], tmp_path / "o.safetensors", dtype="bf16")
    deltas = lora_deltas(lora)
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f, safe_open(str(base), "pt") as s:
        assert not any(k.endswith(("scale_weight", "scale_input", "scaled_fp8")) for k in f.keys())
        n = "double_blocks.0.img_attn.qkv.weight"
        w = s.get_tensor(n).float() * s.get_tensor(n[:-7] + ".scale_weight") + deltas[n]
        assert torch.equal(f.get_tensor(n), w.to(torch.bfloat16))


SCRIPT = r"""
import json, sys, torch
import lorakit
from lorakit.samples.quantized import seeded_values, write_comfy_fp8, write_gguf
from lorakit.samples.synthetic import base_tensors, write_sdscripts_lora
params, folder, kind = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
ext = ".gguf" if kind == "gguf" else ".safetensors"
base, lora, out = folder + "/base" + ext, folder + "/lora.safetensors", folder + "/out" + ext
if sys.argv[4] == "make":
    specs = [(t.name, t.shape) for t in base_tensors(params)]
    fill = lambda name, shape: torch.full(shape, 0.01)     # fast to make; the bake still decodes and requantizes
    if kind == "gguf":
        write_gguf(base, specs, fill, qtype="Q8_0")
    else:
        write_comfy_fp8(base, specs, fill, convention="quant_metadata")
    write_sdscripts_lora(lora, params, rank=4, dtype=torch.bfloat16, clip=None)
    sys.exit(0)
"""


@pytest.mark.slow      # ~1 min each on a loaded 2-core machine (making the 20-block bases dominates)
@pytest.mark.parametrize("kind", ["fp8", "gguf"])
def test_quantized_bake_peak_rss_independent_of_size(tmp_path, kind):
    import json
    res = {}
    for name, blocks in (("small", 2), ("big", 20)):
        folder = tmp_path / name
        folder.mkdir()
        params = {"H": 256, "M": 1024, "IN": 32, "OUT": 32, "CTX": 32, "VEC": 32, "T": 32, "D": 32,
                  "double": blocks, "single": blocks, "guidance": 1, "modulation": 1}
        res[name] = measure_bake(SCRIPT, json.dumps(params), str(folder), kind)
    grown = res["big"]["bytes"] - res["small"]["bytes"]
    assert grown > 50 << 20
    extra = res["big"]["peak"] - res["small"]["peak"]
    assert extra < 24 << 20, f"peak RSS grew by {extra / 2**20:.1f} MiB for {grown / 2**20:.0f} MiB more model"


def test_cli_bake_and_doctor(tmp_path, lora, capsys):
    from lorakit.cli import main
    base = tmp_path / "b.gguf"
    params = {**TINY_FLUX, "M": 256}
    lora2 = write_sdscripts_lora(tmp_path / "l.safetensors", params, rank=4, clip=None)
    write_gguf(base, [(t.name, t.shape) for t in base_tensors(params)], VALUES, qtype="Q8_0",
               keep={"double_blocks.0.img_mlp.2.weight": "Q4_K"})
    assert main(["bake", str(base), lora2, "-o", str(tmp_path / "o.gguf"), "--no-progress"]) == 2
    assert "--requant q8_0" in capsys.readouterr().err
    assert main(["bake", str(base), lora2, "-o", str(tmp_path / "o.gguf"), "--requant", "q8_0",
                 "--no-progress"]) == 0
    assert "delta retention" in capsys.readouterr().err
    fp8 = tmp_path / "b.safetensors"
    write_comfy_fp8(fp8, SPECS, VALUES, convention="scale_weight")
    main(["doctor", lora, "--base", str(fp8)])
    assert "keeps" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["float8_e5m2"])
def test_bake_scaled_e5m2(tmp_path, lora, fmt):
    base, out = tmp_path / "b.safetensors", tmp_path / "o.safetensors"
    write_comfy_fp8(base, SPECS, VALUES, convention="quant_metadata", fmt=fmt)
    lorakit.bake(base, [lora], out)
    deltas = lora_deltas(lora)
    n = "double_blocks.1.txt_mlp.0.weight"
    with safe_open(str(out), "pt") as f, safe_open(str(base), "pt") as s:
        w = s.get_tensor(n).to(torch.float32) * s.get_tensor(n[:-7] + ".weight_scale") + deltas[n]
        lim = torch.finfo(torch.float8_e5m2).max
        sc = (w.abs().amax() / lim).to(torch.float32)
        want = (w * (1.0 / sc)).clamp(-lim, lim).to(torch.float8_e5m2)
        assert torch.equal(f.get_tensor(n).view(torch.uint8), want.view(torch.uint8))
        assert torch.equal(f.get_tensor(n[:-7] + ".weight_scale"), sc)


def test_quantized_bake_reports_progress(tmp_path, lora):
    base = tmp_path / "b.safetensors"
    write_comfy_fp8(base, SPECS, VALUES, convention="scale_weight")
    seen = []
    lorakit.bake(base, [lora], tmp_path / "o.safetensors", progress=lambda d, t, n: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] == base.stat().st_size
    assert [d for d, _t in seen] == sorted(d for d, _t in seen)
