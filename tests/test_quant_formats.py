"""Quantized bases read and written standalone: ComfyUI scaled fp8 (both conventions, mixed precision), plain
fp8 and GGUF. Expected values come from the formats' definitions re-implemented here (ComfyUI's
``TensorCoreFP8Layout``: ``value = code.to(fp32) * scale``, ``scale = amax / finfo.max``, codes
``(w * (1 / scale)).to(fp8)``) and from gguf-py itself (``quantize`` / ``dequantize`` / ``GGUFReader``)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorakit.base.quant import dequantized, open_quantized
from lorakit.base.quant.requant import write_baked
from lorakit.base.quant.retention import by_block, overall, warnings_for
from lorakit.errors import NonFiniteError, UnsupportedDtypeError
from lorakit.io import open_weights

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

E4 = torch.float8_e4m3fn
SPECS = [("blocks.0.attn.weight", (64, 32)), ("blocks.0.attn.bias", (64,)), ("blocks.1.mlp.weight", (32, 64)),
         ("blocks.1.norm.scale", (32,)), ("head.weight", (16, 32))]


def _values(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * 0.05 for n, s in SPECS}


def comfy_quantize(w: torch.Tensor, dtype: torch.dtype = E4) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's TensorCoreFP8Layout.quantize (fp32 input), saturating as a loader-safe writer must."""
    lim = torch.finfo(dtype).max
    scale = (torch.amax(w.abs()) / lim).to(torch.float32)
    return (w * (1.0 / scale)).clamp(-lim, lim).to(dtype), scale


def comfy_dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.float32) * scale


def _old_file(path, vals, fmt=E4):
    t = {}
    for n, v in vals.items():
        if n.endswith(".weight"):
            t[n], t[n[:-7] + ".scale_weight"] = comfy_quantize(v, fmt)
            t[n[:-7] + ".scale_input"] = torch.tensor(1.0)
        else:
            t[n] = v.to(torch.bfloat16)
    t["scaled_fp8"] = torch.empty(0, dtype=fmt)
    save_file(t, str(path), {"format": "pt", "note": "old"})
    return t


def _new_file(path, vals, bf16_layers=("head",), extra_layer=None):
    t, layers = {}, {}
    for n, v in vals.items():
        stem = n[:-7]
        if n.endswith(".weight") and stem not in bf16_layers:
            t[n], t[stem + ".weight_scale"] = comfy_quantize(v)
            t[stem + ".input_scale"] = torch.tensor(1.0)
            layers[stem] = {"format": "float8_e4m3fn"}
        else:
            t[n] = v.to(torch.bfloat16)
    conf = json.dumps({"format": "float8_e4m3fn"}).encode()
    t["blocks.1.mlp.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
    layers.pop("blocks.1.mlp")          # this layer's config is in its .comfy_quant tensor only
    if extra_layer:
        layers.update(extra_layer)
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers}), "x": "y"}
    save_file(t, str(path), meta)
    return t


def _delta(name: str, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(name) % 1000)
    return torch.randn(shape, generator=g) * 0.01


def _add(name: str, w: torch.Tensor) -> None:
    w += _delta(name, tuple(w.shape))


@pytest.mark.parametrize("convention", ["old", "new"])
def test_scaled_fp8_reads_with_comfy_formula(tmp_path, convention):
    vals = _values()
    path = tmp_path / "b.safetensors"
    t = (_old_file if convention == "old" else _new_file)(path, vals)
    view = dequantized(open_weights(path))
    scale = ".scale_weight" if convention == "old" else ".weight_scale"
    assert not any(k.endswith((scale, ".scale_input", ".input_scale", ".comfy_quant", "scaled_fp8")) for k in view.keys())
    for n in vals:
        got = view.get(n)
        if n.endswith(".weight") and (convention == "old" or n != "head.weight"):
            assert torch.equal(got, comfy_dequantize(t[n], t[n[:-7] + scale]))
        else:
            assert torch.equal(got, t[n])


@pytest.mark.parametrize("convention", ["old", "new"])
def test_scaled_fp8_bake_equals_dequant_add_requant(tmp_path, convention):
    vals = _values()
    src, out = tmp_path / "b.safetensors", tmp_path / "o.safetensors"
    t = (_old_file if convention == "old" else _new_file)(src, vals)
    view = dequantized(open_weights(src))
    targets = ["blocks.0.attn.weight", "blocks.1.mlp.weight", "head.weight", "blocks.0.attn.bias"]
    res = write_baked(view, out, targets, _add, inputs=[str(src)])
    scale = ".scale_weight" if convention == "old" else ".weight_scale"
    with safe_open(str(out), "pt") as f, safe_open(str(src), "pt") as s:
        assert f.metadata() == s.metadata()
        assert set(f.keys()) == set(s.keys())
        for k in f.keys():
            got, was = f.get_tensor(k), s.get_tensor(k)
            assert got.dtype == was.dtype and got.shape == was.shape
            stem = k[:-7]
            if k in targets and (stem + scale) in t:
                w = comfy_dequantize(t[k], t[stem + scale]) + _delta(k, tuple(got.shape))
                codes, sc = comfy_quantize(w)
                assert torch.equal(got.view(torch.uint8), codes.view(torch.uint8)), k
                assert torch.equal(f.get_tensor(stem + scale), sc)
                assert f.get_tensor(stem + scale).dtype == torch.float32
                back = comfy_dequantize(got, f.get_tensor(stem + scale))
                assert (back - w).abs().max() <= w.abs().max() / 16     # within fp8 resolution of the target
            elif k in targets:   # a bf16 tensor: fp32 add, one cast
                want = (t[k].float() + _delta(k, tuple(got.shape))).to(torch.bfloat16)
                assert torch.equal(got, want), k
            elif not k.endswith(scale) or k[:-len(scale)] + ".weight" not in targets:
                assert torch.equal(got.view(torch.uint8) if got.dtype == E4 else got,
                                   was.view(torch.uint8) if was.dtype == E4 else was), k   # copied as stored
    assert sorted(res.changed) == sorted(targets) and res.copied > 0
    assert all(r.policy in ("amax scale recomputed", "cast") for r in res.retained)


def test_deterministic_bytes(tmp_path):
    vals = _values()
    src = tmp_path / "b.safetensors"
    _new_file(src, vals)
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}.safetensors"
        write_baked(dequantized(open_weights(src)), out, ["blocks.0.attn.weight"], _add)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_kept_scale_and_overflow(tmp_path):
    w = torch.full((8, 32), 0.25)
    scale = torch.tensor(2.0 ** -6)         # codes 16 < 448: not an amax scale, so it is kept
    save_file({"l.weight": (w / scale).to(E4), "l.scale_weight": scale, "scaled_fp8": torch.empty(0, dtype=E4)},
              str(tmp_path / "b.safetensors"))
    view = dequantized(open_weights(tmp_path / "b.safetensors"))
    res = write_baked(view, tmp_path / "o.safetensors", ["l.weight"], lambda n, x: x.add_(0.25))
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("l.scale_weight"), scale)
        assert torch.equal(f.get_tensor("l.weight").float(), torch.full((8, 32), 32.0))
    assert res.retained[0].policy == "source scale kept"
    with pytest.raises(NonFiniteError, match="kept scale"):
        write_baked(view, tmp_path / "o2.safetensors", ["l.weight"], lambda n, x: x.add_(10.0))
    assert not (tmp_path / "o2.safetensors").exists()


def test_retention_half_below_step(tmp_path):
    """Half the elements sit at code 1 (fp8 spacing 0.125), half at code 256 (spacing 32): the same delta of
    0.5 code units survives exactly on the first half and rounds away on the second."""
    scale = torch.tensor(2.0 ** -9)         # powers of two: every value below is exact in fp32
    codes = torch.ones(4, 64)
    codes[:, 32:] = 256.0
    save_file({"blocks.0.q.weight": codes.to(E4), "blocks.0.q.scale_weight": scale.clone(),
               "blocks.1.q.weight": codes.to(E4), "blocks.1.q.scale_weight": scale.clone()}, str(tmp_path / "b.safetensors"))
    view = dequantized(open_weights(tmp_path / "b.safetensors"))
    delta = 0.5 * scale
    low = {"blocks.0.q.weight": delta, "blocks.1.q.weight": delta}
    res = write_baked(view, tmp_path / "o.safetensors", list(low), lambda n, x: x.add_(low[n]))
    expected = (32 * 4 * float(delta) ** 2) ** 0.5 / (64 * 4 * float(delta) ** 2) ** 0.5     # √½
    for r in res.retained:
        assert r.retention == pytest.approx(expected, rel=1e-6)
        assert r.error == pytest.approx(expected, rel=1e-6)
    assert [b.block for b in by_block(res.retained)] == ["blocks.0", "blocks.1"]
    assert overall(res.retained) == pytest.approx(expected, rel=1e-6)
    warned = warnings_for(res.retained)         # retention √½ is above the 50 % floor; the lost half is noise
    assert len(warned) == 1 and "rounding noise of 71%" in warned[0] and "--dtype bf16" in warned[0]
    tiny = write_baked(view, tmp_path / "o2.safetensors", ["blocks.0.q.weight"], lambda n, x: x[:, 32:].add_(delta))
    assert tiny.retained[0].retention == 0.0
    assert "--dtype bf16" in warnings_for(tiny.retained)[0] and "blocks.0" in warnings_for(tiny.retained)[0]


def test_plain_fp8(tmp_path):
    vals = _values()
    t = {n: (v.to(E4) if n.endswith(".weight") else v.to(torch.bfloat16)) for n, v in vals.items()}
    save_file(t, str(tmp_path / "b.safetensors"))
    view = dequantized(open_weights(tmp_path / "b.safetensors"))
    assert view.convention == "plain fp8"
    write_baked(view, tmp_path / "o.safetensors", ["head.weight"], _add)
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        want = (t["head.weight"].float() + _delta("head.weight", (16, 32))).to(E4)
        assert torch.equal(f.get_tensor("head.weight").view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("keys,meta,name", [
    ({"a.weight": torch.zeros(4, dtype=torch.uint8), "a.weight.quant_state.bitsandbytes__nf4": torch.zeros(4, dtype=torch.uint8)},
     None, "bitsandbytes NF4"),
    ({"a.qweight": torch.zeros(4, dtype=torch.int8), "a.wscales": torch.zeros(4)}, None, "SVDQuant"),
    ({"a.weight": torch.zeros(4, 4, dtype=torch.int8), "a.weight_scale": torch.zeros(1)},
     {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {"a": {"format": "int8_blockwise"}}})},
     "int8_blockwise"),
])
def test_refused_by_name(tmp_path, keys, meta, name):
    save_file(keys, str(tmp_path / "b.safetensors"), meta)
    with pytest.raises(UnsupportedDtypeError, match=name):
        dequantized(open_weights(tmp_path / "b.safetensors"))


# --- GGUF ------------------------------------------------------------------------------------------------------

GSPECS = [("blocks.0.attn.weight", (64, 32)), ("blocks.0.attn.bias", (64,)), ("blocks.1.mlp.weight", (32, 64)),
          ("head.weight", (16, 32)), ("conv.weight", (8, 4, 2, 2, 2))]


def _gguf_file(path, qtype, *, ktype_for=None):
    g = torch.Generator().manual_seed(1)
    vals = {n: torch.randn(s, generator=g) * 0.05 for n, s in GSPECS}
    w = gguf.GGUFWriter(str(path), arch="flux")
    w.add_string("general.name", "tiny")
    w.add_array("comfy.gguf.orig_shape.conv.weight", [8, 4, 2, 2, 2])
    stored = {}
    for n, v in vals.items():
        arr = v.numpy().reshape(8, 32) if n == "conv.weight" else v.numpy()
        if n == ktype_for:
            qt = gguf.GGMLQuantizationType.Q4_K
            data = np.zeros(gguf.quants.quant_shape_to_byte_shape((arr.shape[0], 256), qt), dtype=np.uint8)
            vals[n] = torch.zeros(arr.shape[0], 256)
            w.add_tensor(n, data, raw_dtype=qt)
            stored[n] = (data, qt)
            continue
        qt = gguf.GGMLQuantizationType[qtype] if arr.ndim == 2 else gguf.GGMLQuantizationType.F32
        data = gguf.quants.quantize(arr.astype(np.float32), qt)
        w.add_tensor(n, data, raw_dtype=qt)
        stored[n] = (data, qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def _deq(data, qt, shape):
    return torch.from_numpy(np.array(gguf.quants.dequantize(data, qt), dtype=np.float32)).reshape(shape)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_read_and_bake(tmp_path, qtype):
    src, out = tmp_path / "b.gguf", tmp_path / "o.gguf"
    stored = _gguf_file(src, qtype)
    view = open_quantized(str(src))
    shapes = dict(GSPECS)
    assert view.shape("conv.weight") == (8, 4, 2, 2, 2)
    for n, (data, qt) in stored.items():
        assert torch.equal(view.get(n), _deq(data, qt, shapes[n])), n
    targets = ["blocks.0.attn.weight", "conv.weight", "blocks.0.attn.bias"]
    res = write_baked(view, out, targets, _add, inputs=[str(src)])
    r_src, r_out = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    assert [f for f in r_out.fields if not f.startswith("GGUF.")] == [f for f in r_src.fields if not f.startswith("GGUF.")]
    assert r_out.fields["general.name"].contents() == "tiny"
    assert r_out.fields["comfy.gguf.orig_shape.conv.weight"].contents() == [8, 4, 2, 2, 2]
    got = {t.name: t for t in r_out.tensors}
    for n, (data, qt) in stored.items():
        t = got[n]
        assert t.tensor_type == qt
        if n in targets:
            w = _deq(data, qt, shapes[n]) + _delta(n, shapes[n])
            want = gguf.quants.quantize(w.numpy().reshape(data.shape[0], -1) if qt != gguf.GGMLQuantizationType.F32
                                        else w.numpy(), qt)
            assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), np.asarray(want).view(np.uint8).reshape(-1)), n
            back = _deq(np.asarray(t.data), qt, shapes[n])
            assert torch.equal(back, _deq(np.asarray(want), qt, shapes[n]))
        else:
            assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(data).view(np.uint8)), n
    assert sorted(res.changed) == sorted(targets)


def test_gguf_kquant_refused_then_requant(tmp_path):
    src = tmp_path / "b.gguf"
    _gguf_file(src, "Q8_0", ktype_for="head.weight")
    view = open_quantized(str(src))
    assert view.entries["head.weight"].codec == "gguf_Q4_K"
    with pytest.raises(UnsupportedDtypeError, match="--requant q8_0"):
        write_baked(view, tmp_path / "o.gguf", ["head.weight"], _add)
    assert not (tmp_path / "o.gguf").exists()
    res = write_baked(view, tmp_path / "o.gguf", ["head.weight", "blocks.1.mlp.weight"], _add, requant="q8_0")
    assert res.requantized_as == {"head.weight": "gguf_Q8_0"}
    t = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "o.gguf")).tensors}
    assert t["head.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    want = gguf.quants.quantize(_delta("head.weight", (16, 256)).numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(np.asarray(t["head.weight"].data).reshape(-1), np.asarray(want).reshape(-1))


def test_corrupt_gguf_is_a_typed_error(tmp_path):
    from lorakit.errors import HeaderError
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(HeaderError, match="not a readable GGUF"):
        open_weights(bad)
    src = tmp_path / "ok.gguf"
    _gguf_file(src, "Q8_0")
    (tmp_path / "cut.gguf").write_bytes(src.read_bytes()[:200])
    with pytest.raises(HeaderError):
        open_weights(tmp_path / "cut.gguf")
