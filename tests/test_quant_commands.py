"""Quantized bases through the commands: extract (with the quantization noise floor), diff and doctor read
scaled-fp8 and GGUF FLUX-shaped bases dequantized; the noise estimate matches the real rounding error."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.base.checkpoint import open_base
from lorakit.base.quant import dequantized, open_quantized
from lorakit.io import open_weights
from lorakit.samples.quantized import seeded_values, write_comfy_fp8, write_gguf
from lorakit.samples.synthetic import TINY_FLUX, base_tensors, write_base

gguf = pytest.importorskip("gguf")
SPECS = [(t.name, t.shape) for t in base_tensors(TINY_FLUX)]
BASE = seeded_values(0)
STEP = seeded_values(5)


def _tuned(name, shape):
    x = BASE(name, shape)
    return x + 0.02 * STEP(name, shape) if name.endswith(".weight") and len(shape) == 2 else x


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("qbases")
    out = {}
    for name, fn in (("old", lambda p, v: write_comfy_fp8(p, SPECS, v, convention="scale_weight")),
                     ("new", lambda p, v: write_comfy_fp8(p, SPECS, v, convention="quant_metadata",
                                                          keep_bf16=lambda n: "final_layer" in n)),
                     ("q8", lambda p, v: write_gguf(p, SPECS, v, qtype="Q8_0"))):
        ext = ".gguf" if name == "q8" else ".safetensors"
        out[name] = fn(str(d / (name + ext)), BASE)
        out[name + "_t"] = fn(str(d / (name + "_t" + ext)), _tuned)
    return d, out


@pytest.mark.parametrize("kind", ["old", "new", "q8"])
def test_recognised_as_flux_base(bases, kind):
    _d, b = bases
    bm = open_base(dequantized(open_weights(b[kind])))
    assert bm.arch.name == "flux1" and not bm.passthrough
    assert len(bm.slots) == len(SPECS)
    assert not any(k.endswith(("scale_weight", "weight_scale", "comfy_quant", "scaled_fp8")) for k in bm.file.keys())


@pytest.mark.parametrize("kind", ["old", "q8"])
def test_extract_reports_noise_floor(bases, kind, tmp_path):
    _d, b = bases
    r = lorakit.extract(b[kind], b[kind + "_t"], tmp_path / "x.safetensors", rank=4)
    quantized = [m for m in r.modules if "blocks" in m.module]
    assert quantized and all(m.noise_floor > 0 for m in quantized)
    assert any("rounding noise" in w for w in r.warnings)


def test_extract_plain_bases_have_no_floor(tmp_path):
    write_base(tmp_path / "a.safetensors", TINY_FLUX, seed=0)
    write_base(tmp_path / "b.safetensors", TINY_FLUX, seed=1)
    r = lorakit.extract(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "x.safetensors", rank=2)
    assert all(m.noise_floor == 0 for m in r.modules)
    assert not any("rounding noise" in w for w in r.warnings)


@pytest.mark.parametrize("kind,codec", [("old", "fp8_e4m3fn_scaled"), ("q8", "gguf_Q8_0")])
def test_noise_estimate_matches_real_rounding(bases, kind, codec):
    """The codec's estimate of ‖Q(W) − W‖ against the true error of quantizing W (the seeded values)."""
    _d, b = bases
    view = open_quantized(b[kind])
    view.track_noise = True
    name = next(n for n, e in view.entries.items() if e.codec == codec and view.shape(n)[0] >= 96)
    got = view.get(name)
    true = BASE(name, view.shape(name))
    real = float((got - true).norm())
    assert view.noise[name] == pytest.approx(real, rel=0.25)


def test_diff_and_doctor_read_quantized(bases, tmp_path):
    d, b = bases
    rep = lorakit.diff(b["old"], b["q8"])
    assert rep is not None
    from lorakit.samples.synthetic import write_sdscripts_lora
    lora = write_sdscripts_lora(tmp_path / "l.safetensors", TINY_FLUX, rank=4, clip=None)
    doc = lorakit.doctor(lora, base=b["new"])
    assert doc.base is not None


def test_gguf_with_comfy_prefix(tmp_path):
    """ComfyUI-GGUF files may keep the ``model.diffusion_model.`` prefix; the base is found under it."""
    specs = [("model.diffusion_model." + n, s) for n, s in SPECS]
    path = write_gguf(str(tmp_path / "p.gguf"), specs, BASE, qtype="Q8_0")
    bm = open_base(dequantized(open_weights(path)))
    assert bm.prefix == "model.diffusion_model." and len(bm.slots) == len(SPECS) and not bm.passthrough
