"""Review findings on reading and writing formats: non-finite α, DoRA axes, LyCORIS/DoRA/rounding limits of the
diffusers target, malformed adapter metadata and non-float factor dtypes. Tiny synthetic files written with the
reference ``safetensors`` package; expected deltas computed here in float64."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.lora.adapters import LoRA, NotExact
from lorakit.lora.checks import nonfinite_modules, require_finite_model
from lorakit.ops.conversion import convert
from lorakit.errors import FormatError, LossyConversionError, NonFiniteError, UnsupportedDtypeError
from lorakit.formats import fuse, read_lora
from lorakit.formats.emit import fold_error, fold_scale
from lorakit.ops.inspection import format_report, inspect_lora
from lorakit.lora.model import LoraModel, Patch, Target, dense_deltas

H = 32
PROJ = "lora_unet_double_blocks_0_img_attn_proj"
QKV = "lora_unet_double_blocks_0_img_attn_qkv"
MLP = "lora_unet_double_blocks_0_img_mlp_0"


def _lora(t: dict, stem: str, out: int, inp: int, r: int = 4, alpha: float | None = 2.0, seed: int = 0,
          dtype: torch.dtype = torch.float32) -> None:
    g = torch.Generator().manual_seed(seed)
    t[f"{stem}.lora_down.weight"] = (torch.randn(r, inp, generator=g) * 0.2).to(dtype)
    t[f"{stem}.lora_up.weight"] = (torch.randn(out, r, generator=g) * 0.2).to(dtype)
    if alpha is not None:
        t[f"{stem}.alpha"] = torch.tensor(alpha)


def _exact(t: dict, stem: str) -> torch.Tensor:
    down, up = t[f"{stem}.lora_down.weight"].double(), t[f"{stem}.lora_up.weight"].double()
    alpha = float(t[f"{stem}.alpha"]) if f"{stem}.alpha" in t else down.shape[0]
    return alpha / down.shape[0] * up @ down


def _diffusers(t: dict, name: str, out: int, inp: int, r: int = 4, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    t[f"transformer.{name}.lora_A.weight"] = torch.randn(r, inp, generator=g) * 0.2
    t[f"transformer.{name}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.2


# ---------------------------------------------------------------------------------------------
# 1. NaN/Inf alpha
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_stored_alpha_is_refused_naming_the_key(write_st, bad) -> None:
    t: dict = {}
    _lora(t, PROJ, H, H)
    _lora(t, MLP, 4 * H, H, seed=1)
    t[f"{PROJ}.alpha"] = torch.tensor(bad)
    path = write_st(t)
    with pytest.raises(NonFiniteError, match=f"{PROJ}.alpha") as exc:
        read_lora(path)
    assert exc.value.path == path
    with pytest.raises(NonFiniteError, match=f"{PROJ}.alpha"):
        convert(path, path + ".out.safetensors", "diffusers")
    # doctor: INVALID, naming the alpha key
    d = lorakit.doctor(path).loras[0]
    assert d.verdict == "INVALID" and f"{PROJ}.alpha" in d.summary
    # inspect shows the file and flags the key; --deep lists the module as non-finite
    r = inspect_lora(path, deep=True)
    assert r["nonfinite_alpha_keys"] == [f"{PROJ}.alpha"]
    assert r["deep"]["nonfinite_modules"] == [PROJ]
    assert "NaN/Inf alpha" in format_report(r) and sum(r["scales"].values()) == 1   # the other module only


def test_nonfinite_config_alpha_is_refused_naming_the_metadata_key(write_st) -> None:
    t: dict = {}
    _diffusers(t, "transformer_blocks.0.attn.to_out.0", H, H)
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": math.nan})}
    path = write_st(t, meta)
    with pytest.raises(NonFiniteError, match="transformer.lora_alpha"):
        read_lora(path)
    assert lorakit.doctor(path).loras[0].verdict == "INVALID"
    assert inspect_lora(path, deep=True)["deep"]["nonfinite_modules"] == ["transformer.transformer_blocks.0.attn.to_out.0"]


def test_checks_look_at_alpha_and_scale() -> None:
    """A model built in code with a NaN α has finite factors but a NaN delta: the finite checks must see it."""
    g = torch.Generator().manual_seed(3)
    good = LoRA(alpha=2.0, down=torch.randn(4, H, generator=g), up=torch.randn(H, 4, generator=g))
    bad = LoRA(alpha=math.nan, down=good.down.clone(), up=good.up.clone())
    model = LoraModel(None, [Patch(Target("transformer", "img_in"), good, source="ok"),  # type: ignore[arg-type]
                             Patch(Target("transformer", "txt_in"), bad, source="nan_alpha")], "kohya")
    assert nonfinite_modules(model) == ["nan_alpha"]
    with pytest.raises(NonFiniteError, match="nan_alpha"):
        require_finite_model(model)


# ---------------------------------------------------------------------------------------------
# 3. Input-axis DoRA magnitudes keep their axis
# ---------------------------------------------------------------------------------------------

def _dora_file(write_st, stem: str, out: int, inp: int, shape: tuple[int, ...], extra: bool = True) -> tuple[str, dict]:
    t: dict = {}
    _lora(t, stem, out, inp)
    t[f"{stem}.dora_scale"] = torch.rand(*shape, generator=torch.Generator().manual_seed(9)) + 0.5
    if extra:
        _lora(t, MLP, 4 * H, H, seed=2)
        t[f"{MLP}.dora_scale"] = torch.rand(4 * H, 1, generator=torch.Generator().manual_seed(10)) + 0.5
    return write_st(t), t


def test_input_axis_dora_is_loaded_as_1_by_in_and_output_axis_as_out(write_st) -> None:
    # square module (out == in): only the stored shape tells the axis
    path, t = _dora_file(write_st, PROJ, H, H, (1, H))
    model = read_lora(path)
    got = {p.source: p.dora for p in model.patches}
    assert got[PROJ].shape == (1, H) and torch.equal(got[PROJ], t[f"{PROJ}.dora_scale"])
    assert got[MLP].shape == (4 * H,) and torch.equal(got[MLP], t[f"{MLP}.dora_scale"].reshape(-1))


@pytest.mark.parametrize("stem,out", [(PROJ, H), (QKV, 3 * H)])
@pytest.mark.parametrize("target", ["kohya", "comfy"])
def test_input_axis_dora_survives_kohya_and_comfy(write_st, tmp_path, stem, out, target) -> None:
    path, t = _dora_file(write_st, stem, out, H, (1, H))
    dst = str(tmp_path / f"{target}.safetensors")
    convert(path, dst, target)
    written = {k: v for k, v in load_file(dst).items() if k.endswith("dora_scale")}
    key = next(k for k in written if "attn" in k)
    assert written[key].shape == (1, H) and torch.equal(written[key], t[f"{stem}.dora_scale"])
    mlp = next(k for k in written if "mlp" in k)
    assert written[mlp].shape == (4 * H, 1)
    back = {p.target.module: p.dora for p in read_lora(dst).patches}
    native = {PROJ: "double_blocks.0.img_attn.proj", QKV: "double_blocks.0.img_attn.qkv"}[stem]
    assert torch.equal(back[native], t[f"{stem}.dora_scale"])


@pytest.mark.parametrize("stem,out", [(PROJ, H), (QKV, 3 * H)])
@pytest.mark.parametrize("allow_lossy", [False, True])
def test_input_axis_dora_to_diffusers_is_refused(write_st, tmp_path, stem, out, allow_lossy) -> None:
    """PEFT magnitudes are per output row; a per-column one (or one split across q/k/v) has no representation."""
    path, _ = _dora_file(write_st, stem, out, H, (1, H), extra=False)
    dst = str(tmp_path / "d.safetensors")
    with pytest.raises(LossyConversionError, match="cannot represent") as exc:
        convert(path, dst, "diffusers", allow_lossy=allow_lossy)
    assert all("transformer_blocks.0.attn" in m for m in exc.value.modules) and exc.value.modules
    assert "--allow-lossy does not help" in str(exc.value)
    assert not (tmp_path / "d.safetensors").exists()


def test_fuse_refuses_input_axis_dora_across_windows() -> None:
    g = torch.Generator().manual_seed(4)
    parts = [((k * H, (k + 1) * H), LoRA(alpha=None, down=torch.randn(2, H, generator=g),
                                          up=torch.randn(H, 2, generator=g)), None, torch.rand(1, H, generator=g))
             for k in range(3)]
    with pytest.raises(NotExact, match="input-axis"):
        fuse(parts, 3 * H, (H,))
    # one part covering every row keeps its magnitude as it is
    whole = LoRA(alpha=None, down=torch.randn(2, H, generator=g), up=torch.randn(3 * H, 2, generator=g))
    m = torch.rand(1, H, generator=g)
    _, _, dora = fuse([((0, 3 * H), whole, None, m)], 3 * H, (H,))
    assert dora is m
    # a DoRA module fused with a plain one would normalize the plain one's delta too
    plain = [((0, H), whole.row_slice(0, H), None, torch.rand(H, generator=g)),
             ((H, 2 * H), whole.row_slice(H, 2 * H), None, None)]
    with pytest.raises(NotExact, match="DoRA and non-DoRA"):
        fuse(plain, 2 * H, (H,))


# ---------------------------------------------------------------------------------------------
# 4. LoHa / LoKr to diffusers
# ---------------------------------------------------------------------------------------------

def test_lokr_and_loha_to_diffusers_plain_or_refused_by_size(write_st, tmp_path) -> None:
    """LoHa becomes exact plain LoRA factors (issue 11); a LoKr of two full factors whose exact rank (2·16 = 32)
    would hold more numbers than its 32×32 dense weight is refused naming --keep-algo / --allow-lossy."""
    g = torch.Generator().manual_seed(6)
    w1, w2 = torch.randn(2, 2, generator=g), torch.randn(16, 16, generator=g) * 0.1
    t = {f"{PROJ}.lokr_w1": w1, f"{PROJ}.lokr_w2": w2}
    mlp2 = "lora_unet_double_blocks_0_img_mlp_2"           # (H, 4H)
    h = {n: torch.randn(*s, generator=g) * 0.3 for n, s in (("w1_a", (H, 2)), ("w1_b", (2, 4 * H)),
                                                             ("w2_a", (H, 2)), ("w2_b", (2, 4 * H)))}
    t.update({f"{mlp2}.hada_{n}": v for n, v in h.items()})
    path = write_st(t)
    want = {"double_blocks.0.img_attn.proj": torch.kron(w1.double(), w2.double()),
            "double_blocks.0.img_mlp.2": (h["w1_a"].double() @ h["w1_b"].double())
            * (h["w2_a"].double() @ h["w2_b"].double())}
    dst = str(tmp_path / "d.safetensors")
    with pytest.raises(LossyConversionError, match="more numbers than its dense weight") as exc:
        convert(path, dst, "diffusers")
    assert set(exc.value.modules) == {"transformer:transformer_blocks.0.attn.to_out.0"}
    assert "--keep-algo" in str(exc.value) and "--allow-lossy --lossy-rank N" in str(exc.value)
    report = convert(path, dst, "diffusers", allow_lossy=True)
    assert {m for m, _ in report.lossy} == set(exc.value.modules)
    assert all(0 <= e < 1e-5 for _, e in report.lossy)
    assert report.converted == [("transformer:double_blocks.0.img_mlp.2", "loha", 4)]
    keys = list(load_file(dst))
    assert keys and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)
    got = {t_.module: d.double() for t_, d in dense_deltas(read_lora(dst)).items()}
    for name, w in want.items():
        assert float((got[name] - w).norm() / w.norm()) < 1e-5
    # kohya: the same size refusal by default; --keep-algo keeps both modules exactly, as LyCORIS keys
    with pytest.raises(LossyConversionError, match="more numbers"):
        convert(path, str(tmp_path / "k.safetensors"), "kohya")
    convert(path, str(tmp_path / "k.safetensors"), "kohya", keep_algo=True)
    kept = load_file(str(tmp_path / "k.safetensors"))
    assert any(".lokr_w1" in k for k in kept) and any(".hada_w1_a" in k for k in kept)


# ---------------------------------------------------------------------------------------------
# 5. DoRA and plain modules mixed in one diffusers component
# ---------------------------------------------------------------------------------------------

def test_mixed_dora_and_plain_in_one_diffusers_component_is_refused(write_st, tmp_path) -> None:
    t: dict = {}
    _lora(t, PROJ, H, H)
    _lora(t, MLP, 4 * H, H, seed=1)
    _lora(t, "lora_unet_img_in", H, 16, seed=2)
    t[f"{MLP}.dora_scale"] = torch.rand(4 * H, 1) + 0.5
    t[f"{PROJ}.dora_scale"] = torch.rand(H, 1) + 0.5
    path = write_st(t)
    with pytest.raises(LossyConversionError, match="use_dora") as exc:
        convert(path, str(tmp_path / "d.safetensors"), "diffusers", allow_lossy=True)
    assert exc.value.modules == ["transformer:x_embedder"]      # the one plain module among two DoRA ones
    convert(path, str(tmp_path / "k.safetensors"), "kohya")      # kohya has no such flag
    # all-DoRA is fine
    del t["lora_unet_img_in.lora_down.weight"], t["lora_unet_img_in.lora_up.weight"], t["lora_unet_img_in.alpha"]
    convert(write_st(t), str(tmp_path / "d2.safetensors"), "diffusers")


# ---------------------------------------------------------------------------------------------
# 6. Folding a non-power-of-two scale into low-precision factors
# ---------------------------------------------------------------------------------------------

def test_fold_rounding_in_bf16_is_refused_reported_or_avoided(write_st, tmp_path) -> None:
    t: dict = {}
    _lora(t, PROJ, H, H, alpha=3.0, dtype=torch.bfloat16)        # scale 3/4: not a power of two
    _lora(t, MLP, 4 * H, H, alpha=2.0, seed=1, dtype=torch.bfloat16)   # scale 1/2: exact in any dtype
    path = write_st(t)
    dst = str(tmp_path / "d.safetensors")
    with pytest.raises(LossyConversionError, match="--dtype fp32") as exc:
        convert(path, dst, "diffusers")
    assert exc.value.modules == ["transformer:transformer_blocks.0.attn.to_out.0"]
    assert not (tmp_path / "d.safetensors").exists()
    report = convert(path, dst, "diffusers", allow_lossy=True)
    ((module, err),) = report.lossy
    assert module == "transformer:transformer_blocks.0.attn.to_out.0"
    written = load_file(dst)
    b = written["transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight"].double()
    a = written["transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight"].double()
    want = _exact(t, PROJ)
    assert abs(float((b @ a - want).norm() / want.norm()) - err) < 1e-9 and 1e-4 < err < 1e-2
    # fp32 output: exact
    report = convert(path, str(tmp_path / "f.safetensors"), "diffusers", dtype=torch.float32)
    assert report.lossy == []
    got = {t_.module: d.double() for t_, d in dense_deltas(read_lora(str(tmp_path / "f.safetensors"))).items()}
    assert float((got["double_blocks.0.img_attn.proj"] - want).norm() / want.norm()) <= 1e-6
    # kohya stores α: nothing is folded, nothing reported
    assert convert(path, str(tmp_path / "k.safetensors"), "kohya").lossy == []


def test_fold_error_matches_dense() -> None:
    g = torch.Generator().manual_seed(8)
    lora = LoRA(alpha=3.0, down=torch.randn(4, 24, generator=g).bfloat16(), up=torch.randn(40, 4, generator=g).bfloat16())
    folded = fold_scale(lora)
    dense = (folded.up.double() @ folded.down.double()) - 0.75 * lora.up.double() @ lora.down.double()
    ref = 0.75 * lora.up.double() @ lora.down.double()
    assert fold_error(lora, folded) == pytest.approx(float(dense.norm() / ref.norm()), rel=1e-6)
    assert fold_error(lora.to(torch.float32), fold_scale(lora.to(torch.float32))) < 1e-6


# ---------------------------------------------------------------------------------------------
# 7. Malformed lora_adapter_metadata
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("meta,match", [
    ({"transformer.lora_alpha": 0}, "alpha 0 gives a zero LoRA"),
    ({"transformer.lora_alpha": "abc"}, "transformer.lora_alpha"),
    ({"transformer.lora_alpha": True}, "transformer.lora_alpha"),
    ({"transformer.lora_alpha": 4, "transformer.alpha_pattern": ["to_q"]}, "transformer.alpha_pattern"),
    ({"transformer.lora_alpha": 4, "transformer.alpha_pattern": {"to_q": "x"}}, "alpha_pattern"),
])
def test_malformed_adapter_metadata_is_a_format_error(write_st, tmp_path, meta, match) -> None:
    t: dict = {}
    for k, part in enumerate("qkv"):
        _diffusers(t, f"transformer_blocks.0.attn.to_{part}", H, H, seed=k)
    path = write_st(t, {"lora_adapter_metadata": json.dumps(meta)})
    with pytest.raises(FormatError, match=match) as exc:
        convert(path, str(tmp_path / "k.safetensors"), "kohya")
    assert "lora_adapter_metadata" in str(exc.value)
    assert lorakit.doctor(path).loras[0].verdict == "INVALID"


def test_non_json_adapter_metadata_is_a_format_error(write_st) -> None:
    t: dict = {}
    _diffusers(t, "transformer_blocks.0.attn.to_out.0", H, H)
    with pytest.raises(FormatError, match="lora_adapter_metadata"):
        read_lora(write_st(t, {"lora_adapter_metadata": "abc"}))


def test_fusing_with_a_zero_scale_part_is_exact() -> None:
    """A part with α = 0 (scale 0) must not be the reference scale of a block-diagonal fuse."""
    g = torch.Generator().manual_seed(12)
    zero = LoRA(alpha=0.0, down=torch.randn(2, H, generator=g), up=torch.randn(H, 2, generator=g))
    live = LoRA(alpha=3.0, down=torch.randn(2, H, generator=g), up=torch.randn(H, 2, generator=g))
    fused, _, _ = fuse([((0, H), zero, None, None), ((H, 2 * H), live, None, None)], 2 * H, (H,))
    want = torch.cat([torch.zeros(H, H), live.dense()])
    assert torch.allclose(fused.dense(), want, rtol=1e-6, atol=1e-7)
    fused, _, _ = fuse([((0, H), zero, None, None), ((H, 2 * H), zero, None, None)], 2 * H, (H,))
    assert not bool(fused.dense().ne(0).any())


# ---------------------------------------------------------------------------------------------
# 8. Integer / bool dtypes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,dtype", [(f"{PROJ}.lora_up.weight", torch.int8), (f"{PROJ}.lora_down.weight", torch.int32),
                                       (f"{PROJ}.alpha", torch.bool), (f"{PROJ}.dora_scale", torch.int64)])
def test_non_float_factors_are_refused_naming_key_and_dtype(write_st, tmp_path, key, dtype) -> None:
    t: dict = {}
    _lora(t, PROJ, H, H)
    t[f"{PROJ}.dora_scale"] = torch.rand(H, 1) + 0.5
    t[key] = (t[key] * 3).to(dtype)
    path = write_st(t)
    with pytest.raises(UnsupportedDtypeError, match=key) as exc:
        read_lora(path)
    code = {torch.int8: "I8", torch.int32: "I32", torch.bool: "BOOL", torch.int64: "I64"}[dtype]
    assert code in str(exc.value)
    with pytest.raises(UnsupportedDtypeError):
        convert(path, str(tmp_path / "o.safetensors"), "diffusers", allow_lossy=True)


def test_integer_alpha_scalar_is_read_as_float(write_st) -> None:
    t: dict = {}
    _lora(t, PROJ, H, H)
    t[f"{PROJ}.alpha"] = torch.tensor(2, dtype=torch.int64)
    (delta,) = dense_deltas(read_lora(write_st(t))).values()
    want = 0.5 * t[f"{PROJ}.lora_up.weight"].double() @ t[f"{PROJ}.lora_down.weight"].double()
    assert float((delta.double() - want).norm() / want.norm()) < 1e-6


# ---------------------------------------------------------------------------------------------
# Optional: sd-scripts split_qkv files (flux.md §6.4)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,blockdiag,warned", [(True, True, True), (False, True, False), (True, False, False)])
def test_split_qkv_warning(write_st, flag, blockdiag, warned) -> None:
    g = torch.Generator().manual_seed(13)
    r = 2
    down = torch.randn(3 * r, H, generator=g)
    up = torch.randn(3 * H, 3 * r, generator=g)
    if blockdiag:
        mask = torch.zeros_like(up)
        for j in range(3):
            mask[j * H:(j + 1) * H, j * r:(j + 1) * r] = 1
        up = up * mask
    t = {f"{QKV}.lora_down.weight": down, f"{QKV}.lora_up.weight": up, f"{QKV}.alpha": torch.tensor(2.0)}
    _lora(t, PROJ, H, H)
    meta = {"ss_network_module": "networks.lora_flux",
            "ss_network_args": json.dumps({"split_qkv": "True"} if flag else {"train_blocks": "all"})}
    path = write_st(t, meta)
    before = {k: v.clone() for k, v in t.items()}
    r_ = inspect_lora(path)
    d = lorakit.doctor(path).loras[0]
    if warned:
        assert len(r_["warnings"]) == 1 and "split_qkv" in r_["warnings"][0] and "1/3" in r_["warnings"][0]
        assert QKV in r_["warnings"][0] and "warning" in format_report(r_)
        assert any("split_qkv" in w for w in d.warnings)
    else:
        assert r_["warnings"] == [] and not any("split_qkv" in w for w in d.warnings)
    # numbers unchanged
    (delta,) = [v for k, v in dense_deltas(read_lora(path)).items() if k.module.endswith("qkv")]
    want = 2.0 / (3 * r) * before[f"{QKV}.lora_up.weight"].double() @ before[f"{QKV}.lora_down.weight"].double()
    assert float((delta.double() - want).norm() / want.norm()) < 1e-6
