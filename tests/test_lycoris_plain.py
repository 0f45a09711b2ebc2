"""Issue 11 items 1 and 3: LyCORIS (LoHa, LoKr, Tucker LoCon) → plain LoRA factors exactly, by default; --keep-algo;
the size refusal; and the warnings for what a diffusers consumer drops.

Fixture files are the state dicts of lycoris-lora 4.1.3's own modules (``lycoris/modules/loha.py``, ``lokr.py``,
``locon.py``), saved key by key under kohya names exactly as LyCORIS's kohya wrapper writes them
(``lora_unet_<flattened BFL name>.<param>``); the expected delta of every module is LyCORIS's own forward pass
(module output minus the original layer's), never lorakit's code. The diffusers check loads lorakit's output into a
tiny ``FluxTransformer2DModel`` with diffusers 0.42.1 / PEFT 0.21.2 and fuses it.
"""

from __future__ import annotations

import json
import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lorakit.lora.adapters import LoHa, LoKr, LoRA
from lorakit.cli import main
from lorakit.ops.conversion import convert
from lorakit.errors import LossyConversionError, UsageError
from lorakit.formats import read_lora
from lorakit.lora.model import Target, dense_deltas

H, M = 32, 128   # tiny FLUX sizes (hidden, MLP), as the tiny diffusers config below
LYCORIS_KEYS = (".hada_", ".lokr_", ".lora_mid.")
TARGETS = ("kohya", "comfy", "diffusers")

# BFL Linear -> (out, in); fused qkv / linear1 are split for diffusers, the final modulation swaps halves there
MODULES = {"double_blocks.0.img_attn.qkv": (3 * H, H), "double_blocks.0.img_attn.proj": (H, H),
           "single_blocks.0.linear1": (3 * H + M, H), "double_blocks.1.img_mlp.2": (H, M),
           "final_layer.adaLN_modulation.1": (2 * H, H)}

# (algo, LyCORIS kwargs, the factor keys LyCORIS writes for the 32x32 proj: proves which case is exercised)
CASES = [
    ("loha", dict(lora_dim=4, alpha=2), {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    ("loha", dict(lora_dim=3, alpha=5, rs_lora=True), {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    ("lokr", dict(lora_dim=2, alpha=3, factor=4), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ("lokr", dict(lora_dim=1, alpha=3, factor=8, decompose_both=True),
     {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    # both factors full (scale 1); unbalanced so that the exact plain rank fits in the dense size
    ("lokr", dict(lora_dim=4, alpha=2, factor=4, full_matrix=True, unbalanced_factorization=True),
     {"lokr_w1", "lokr_w2"}),
]
IDS = [f"{a}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for a, kw, _ in CASES]


def _lycoris_cls(algo: str):
    if algo == "loha":
        return pytest.importorskip("lycoris.modules.loha").LohaModule
    if algo == "lokr":
        return pytest.importorskip("lycoris.modules.lokr").LokrModule
    return pytest.importorskip("lycoris.modules.locon").LoConModule


def _randomise(module: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith("org_"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


def _linear_delta(module: torch.nn.Module, lin: torch.nn.Linear) -> torch.Tensor:
    """LyCORIS's forward delta of a Linear, column by column (fp64 module: exact to ~1e-16)."""
    x = torch.eye(lin.in_features, dtype=lin.weight.dtype)
    with torch.no_grad():
        return (module(x) - F.linear(x, lin.weight, lin.bias)).T


def lycoris_file(path, algo: str, kwargs: dict, modules=MODULES, *, dtype=torch.float32,
                 seed: int = 7) -> tuple[str, dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Save LyCORIS modules' state dicts under kohya names; return (path, expected fp64 deltas, per-module tensors)."""
    gen = torch.Generator().manual_seed(seed)
    cls = _lycoris_cls(algo)
    tensors: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    per: dict[str, dict[str, torch.Tensor]] = {}
    for native, (out, inp) in modules.items():
        stem = "lora_unet_" + native.replace(".", "_")
        lin = torch.nn.Linear(inp, out).double()
        module = cls(stem, lin, multiplier=1.0, **kwargs).double()
        _randomise(module, gen)
        with torch.no_grad():   # the file holds dtype values: the expectation is computed from exactly those
            for p in module.parameters():
                p.copy_(p.to(dtype).double())
        module.apply_to()
        expected[native] = _linear_delta(module, lin)
        per[native] = {}
        for key, value in module.state_dict().items():
            if key.startswith("org_"):
                continue
            t = value.detach().clone().contiguous()
            t = t.to(dtype) if key != "alpha" else t.float()
            tensors[f"{stem}.{key}"] = t
            per[native][key] = t
        module.restore()
    save_file(tensors, str(path))
    return str(path), expected, per


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def no_lycoris_keys(path: str) -> dict[str, torch.Tensor]:
    t = load_file(path)
    assert t and not [k for k in t if any(s in k for s in LYCORIS_KEYS)]
    return t


# ---------------------------------------------------------------------------------------------
# LyCORIS-written files -> kohya / comfy / diffusers as plain LoRA, exactly
# ---------------------------------------------------------------------------------------------

@pytest.mark.oracle
@pytest.mark.parametrize("algo, kwargs, keys", CASES, ids=IDS)
def test_lycoris_files_convert_to_plain_lora_exactly(tmp_path, algo: str, kwargs: dict, keys: set) -> None:
    src, expected, per = lycoris_file(tmp_path / "lyco.safetensors", algo, kwargs)
    assert set(per["double_blocks.0.img_attn.proj"]) - {"alpha"} == keys
    for to in TARGETS:
        out = str(tmp_path / f"{to}.safetensors")
        report = convert(src, out, to)
        assert report.lossy == [] and report.warnings == []
        tensors = no_lycoris_keys(out)
        suffixes = {"kohya": (".lora_down.weight", ".lora_up.weight", ".alpha"),
                    "comfy": (".lora_down.weight", ".lora_up.weight", ".alpha"),
                    "diffusers": (".lora_A.weight", ".lora_B.weight")}[to]
        assert all(k.endswith(suffixes) for k in tensors), to
        # the reported plain ranks are the exact ones: r1·r2 (LoHa), inner(w1)·inner(w2) (LoKr)
        ranks = {m: r for m, a, r in report.converted}
        assert set(ranks) == {f"transformer:{n}" for n in MODULES} and {a for _, a, _ in report.converted} == {algo}
        p = per["double_blocks.0.img_attn.proj"]
        if algo == "loha":
            want_rank = p["hada_w1_b"].shape[0] * p["hada_w2_b"].shape[0]
        else:
            inner1 = min(p["lokr_w1"].shape) if "lokr_w1" in p else p["lokr_w1_b"].shape[0]
            inner2 = min(p["lokr_w2"].shape) if "lokr_w2" in p else p["lokr_w2_b"].shape[0]
            want_rank = inner1 * inner2
        assert ranks["transformer:double_blocks.0.img_attn.proj"] == want_rank
        got = dense_deltas(read_lora(out))
        for native, want in expected.items():
            err = rel(got[Target("transformer", native)], want)
            assert err <= 1e-6, f"{to} {native}: relative error {err:.2e} against LyCORIS's forward delta"


@pytest.mark.oracle
@pytest.mark.parametrize("alpha", [65504.0, math.inf], ids=["alpha-fp16-max", "alpha-fp16-inf"])
def test_lokr_with_both_factors_full_and_huge_alpha(tmp_path, alpha: float) -> None:
    """AI-Toolkit's default LoKr: both Kronecker factors full, alpha overflowing fp16 (+inf). LyCORIS ignores
    alpha then (``lokr.py``: ``if self.use_w2 and self.use_w1: alpha = lora_dim``, scale 1); so must the output."""
    kwargs = dict(lora_dim=4, alpha=2, factor=4, full_matrix=True, unbalanced_factorization=True)
    src, expected, per = lycoris_file(tmp_path / "full.safetensors", "lokr", kwargs, dtype=torch.float16)
    t = load_file(src)
    for k in [k for k in t if k.endswith(".alpha")]:
        t[k] = torch.tensor(alpha, dtype=torch.float16)     # what AI-Toolkit's default "full rank" alpha stores
    save_file(t, src)
    try:
        read_lora(src)
    except Exception as exc:   # noqa: BLE001 - the reader of this branch may still refuse it
        if math.isinf(alpha) and "inf" in str(exc):
            pytest.skip("this branch's reader still refuses a +inf alpha (issue 11 item 2 teaches it to accept it "
                        "when both LoKr factors are full); the fp16-max case covers the conversion itself")
        raise
    for to in TARGETS:
        out = str(tmp_path / f"{to}.safetensors")
        report = convert(src, out, to)
        assert report.lossy == []
        tensors = no_lycoris_keys(out)
        # both factors full: the plain factors are placements of the source values (kron with an identity),
        # so they stay exact in fp16 and keep the input dtype
        assert {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
        got = dense_deltas(read_lora(out))
        for native, want in expected.items():
            assert rel(got[Target("transformer", native)], want) <= 1e-6, (to, native)


# ---------------------------------------------------------------------------------------------
# Tucker / convolution forms (FLUX.1 has no convolutions: checked on the adapter objects)
# ---------------------------------------------------------------------------------------------

def _conv_delta(module: torch.nn.Module, conv: torch.nn.Conv2d) -> torch.Tensor:
    """LyCORIS's forward delta of a k×k conv (no padding): one-hot inputs of size k×k read W column by column."""
    cin, k = conv.in_channels, conv.kernel_size[0]
    x = torch.eye(cin * k * k, dtype=conv.weight.dtype).reshape(cin * k * k, cin, k, k)
    with torch.no_grad():
        d = module(x) - F.conv2d(x, conv.weight, conv.bias)
    return d.reshape(cin * k * k, conv.out_channels).T.reshape(conv.out_channels, cin, k, k)


CONV_CASES = [
    ("loha", dict(lora_dim=3, alpha=2, use_tucker=True)),
    ("loha", dict(lora_dim=3, alpha=2)),
    ("lokr", dict(lora_dim=2, alpha=3, factor=4, use_tucker=True)),
    ("lokr", dict(lora_dim=4, alpha=2, factor=4, full_matrix=True)),   # 4-D lokr_w2
    ("locon", dict(lora_dim=4, alpha=2, use_tucker=True)),
]


def _adapter(algo: str, sd: dict[str, torch.Tensor], shape: tuple[int, ...]):
    a = float(sd["alpha"])
    if algo == "loha":
        return LoHa(alpha=a, w1a=sd["hada_w1_a"], w1b=sd["hada_w1_b"], w2a=sd["hada_w2_a"], w2b=sd["hada_w2_b"],
                    t1=sd.get("hada_t1"), t2=sd.get("hada_t2"), shape=None if "hada_t1" in sd else shape)
    if algo == "lokr":
        return LoKr(alpha=a, w1=sd.get("lokr_w1"), w1a=sd.get("lokr_w1_a"), w1b=sd.get("lokr_w1_b"),
                    w2=sd.get("lokr_w2"), w2a=sd.get("lokr_w2_a"), w2b=sd.get("lokr_w2_b"), t2=sd.get("lokr_t2"))
    return LoRA(alpha=a, down=sd["lora_down.weight"], up=sd["lora_up.weight"], mid=sd.get("lora_mid.weight"))


@pytest.mark.oracle
@pytest.mark.parametrize("algo, kwargs", CONV_CASES, ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
                                                          for a, kw in CONV_CASES])
def test_tucker_and_conv_lycoris_contract_to_conv_lora(algo: str, kwargs: dict) -> None:
    """A LyCORIS conv module (Tucker hada_t1/t2, lokr_t2, lora_mid, or a 4-D lokr_w2) becomes a plain conv LoRA:
    down (r, in, k, k) and up (out, r, 1, 1), what kohya/ComfyUI/diffusers read, with LyCORIS's delta."""
    gen = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(16, 32, 3).double()
    module = _lycoris_cls(algo)("lora_unet_conv", conv, multiplier=1.0, **kwargs).double()
    _randomise(module, gen)
    module.apply_to()
    want = _conv_delta(module, conv)
    sd = {k: v.detach().float() for k, v in module.state_dict().items() if not k.startswith("org_")}
    if kwargs.get("use_tucker"):
        assert any(k in sd for k in ("hada_t1", "lokr_t2", "lora_mid.weight")), sorted(sd)
    adapter = _adapter(algo, sd, tuple(conv.weight.shape))
    plain = adapter.to_lora()
    assert isinstance(plain, LoRA) and plain.mid is None
    assert plain.down.dim() == 4 and tuple(plain.down.shape[1:]) == (16, 3, 3)
    assert tuple(plain.up.shape) == (32, plain.rank, 1, 1) and plain.rank == adapter.plain_rank
    assert rel(plain.dense(), want) <= 1e-6
    # the plain factors keep the row-window semantics used for split/fused targets
    assert rel(plain.row_slice(8, 24).dense(), want[8:24]) <= 1e-6
    assert rel(plain.swap_halves().dense(), torch.cat([want[16:], want[:16]])) <= 1e-6


# ---------------------------------------------------------------------------------------------
# diffusers loads and fuses the plain output
# ---------------------------------------------------------------------------------------------

@pytest.mark.oracle
@pytest.mark.parametrize("algo, kwargs, keys", [CASES[0], CASES[2], CASES[3], CASES[4]],
                         ids=[IDS[0], IDS[2], IDS[3], IDS[4]])
def test_diffusers_output_loads_and_fuses_to_lycoris_delta(tmp_path, caplog, algo: str, kwargs: dict,
                                                          keys: set) -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from diffusers.utils import logging as dlogging
    from peft.tuners.tuners_utils import BaseTunerLayer
    from test_oracle_diffusers import native_rows, to_native, tiny_transformer

    src, expected, _ = lycoris_file(tmp_path / "lyco.safetensors", algo, kwargs)
    out = str(tmp_path / "d.safetensors")
    assert main(["convert", src, "-o", out, "--to", "diffusers"]) == 0
    state = no_lycoris_keys(out)
    file_modules = {k.split(".lora_")[0][len("transformer."):] for k in state}
    model = tiny_transformer(seed=1)
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    dlogging.enable_propagation()
    try:
        caplog.set_level(logging.INFO)
        caplog.clear()     # only what loading says counts (not import-time notices of other libraries)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.load_lora_adapter(dict(state), prefix="transformer", adapter_name="lk")
    finally:
        dlogging.disable_propagation()
    bad = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    bad += [str(w.message) for w in caught if "lora" in str(w.message).lower() or "key" in str(w.message).lower()]
    assert bad == []
    injected = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and "lk" in m.lora_A}
    assert injected == file_modules          # no key left over, every written module injected
    natives = {to_native(n)[0] for n in injected}
    assert natives == set(expected)
    model.fuse_lora(lora_scale=1.0, adapter_names=["lk"])
    fused = model.state_dict()
    for name in injected:
        key = name + ".base_layer.weight" if name + ".base_layer.weight" in fused else name + ".weight"
        got = fused[key].double() - base[name + ".weight"].double()
        native, rows, swap = to_native(name)
        want = native_rows(expected[native], rows, swap)
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), name


# ---------------------------------------------------------------------------------------------
# --keep-algo, the size refusal, low precision, metadata
# ---------------------------------------------------------------------------------------------

@pytest.mark.oracle
def test_keep_algo_keeps_lycoris_keys_and_metadata(tmp_path, capsys) -> None:
    src, expected, _ = lycoris_file(tmp_path / "lyco.safetensors", "lokr", CASES[2][1])
    t = load_file(src)
    save_file(t, src, metadata={"ss_network_module": "lycoris.kohya",
                                "ss_network_args": json.dumps({"algo": "lokr", "factor": "4"})})
    for to in ("kohya", "comfy"):
        out = str(tmp_path / f"keep_{to}.safetensors")
        assert main(["convert", src, "-o", out, "--to", to, "--keep-algo", "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["converted"] == [] and rep["keep_algo"] is True
        kept = load_file(out)
        assert any(".lokr_w1" in k for k in kept) and not any(".lora_down" in k for k in kept)
        meta = read_lora(out).metadata
        assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == "lokr"
        got = dense_deltas(read_lora(out))
        assert all(rel(got[Target("transformer", n)], w) <= 1e-6 for n, w in expected.items())
    # default: plain factors, and the metadata no longer claims LyCORIS (other network args are kept)
    plain = str(tmp_path / "plain.safetensors")
    assert main(["convert", src, "-o", plain, "--to", "kohya", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {c["module"]: (c["from"], c["rank"]) for c in rep["converted"]}["transformer:double_blocks.0.img_attn.proj"] \
        == ("lokr", 8)     # lokr_w1 4x4 full (inner 4) ⊗ lokr_w2 8x2·2x8 (rank 2)
    meta = read_lora(plain).metadata
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert json.loads(meta["ss_network_args"]) == {"factor": "4"}
    # diffusers cannot carry LyCORIS keys at all
    with pytest.raises(UsageError, match="cannot carry"):
        convert(src, str(tmp_path / "d.safetensors"), "diffusers", keep_algo=True)
    assert main(["convert", src, "-o", str(tmp_path / "d.safetensors"), "--to", "diffusers", "--keep-algo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop --keep-algo" in err[0] and not (tmp_path / "d.safetensors").exists()


@pytest.mark.oracle
def test_exact_rank_larger_than_dense_is_refused_naming_the_flags(tmp_path, capsys) -> None:
    """Balanced full-full LoKr on a square weight: exact plain rank 4·8 = 32 = full, 32·(32+32) > 32·32 numbers."""
    kwargs = dict(lora_dim=4, alpha=2, factor=4, full_matrix=True)
    mods = {"double_blocks.0.img_attn.proj": (H, H), "double_blocks.0.img_attn.qkv": (3 * H, H)}
    src, expected, per = lycoris_file(tmp_path / "big.safetensors", "lokr", kwargs, modules=mods)
    assert tuple(per["double_blocks.0.img_attn.proj"]["lokr_w1"].shape) == (4, 4)
    for to in TARGETS:
        out = tmp_path / f"{to}.safetensors"
        assert main(["convert", src, "-o", str(out), "--to", to]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "more numbers than its dense weight" in err[0], err
        assert "--keep-algo" in err[0] and "--allow-lossy --lossy-rank N" in err[0]
        assert not out.exists()
    with pytest.raises(LossyConversionError) as exc:
        convert(src, str(tmp_path / "k.safetensors"), "kohya")
    assert set(exc.value.modules) == {"transformer:double_blocks.0.img_attn.proj", "transformer:double_blocks.0.img_attn.qkv"}
    # the named ways out work: keep the algorithm, or SVD at a chosen rank (error reported)
    assert main(["convert", src, "-o", str(tmp_path / "keep.safetensors"), "--to", "comfy", "--keep-algo"]) == 0
    assert any(".lokr_w2" in k for k in load_file(str(tmp_path / "keep.safetensors")))
    report = convert(src, str(tmp_path / "svd.safetensors"), "diffusers", allow_lossy=True, lossy_rank=4)
    assert report.lossy and all(0 < e < 1 for _, e in report.lossy)


@pytest.mark.oracle
def test_bf16_plain_factors_round_and_say_so(tmp_path) -> None:
    """The face-splitting product multiplies source values, which bf16 cannot hold exactly: refused by default
    (naming --dtype fp32 / --keep-algo / --allow-lossy); --dtype fp32 is exact; --keep-algo keeps the bytes."""
    src, expected, _ = lycoris_file(tmp_path / "bf16.safetensors", "loha", CASES[0][1], dtype=torch.bfloat16)
    with pytest.raises(LossyConversionError, match="bfloat16 rounds") as exc:
        convert(src, str(tmp_path / "k.safetensors"), "kohya")
    assert "--dtype fp32" in str(exc.value) and "--keep-algo" in str(exc.value)
    assert not (tmp_path / "k.safetensors").exists()
    convert(src, str(tmp_path / "k32.safetensors"), "kohya", dtype=torch.float32)
    got = dense_deltas(read_lora(str(tmp_path / "k32.safetensors")))
    assert all(rel(got[Target("transformer", n)], w) <= 1e-6 for n, w in expected.items())
    report = convert(src, str(tmp_path / "kl.safetensors"), "kohya", allow_lossy=True)
    assert {m for m, _ in report.lossy} == {f"transformer:{n}" for n in MODULES}
    assert all(1e-6 < e < 1e-2 for _, e in report.lossy), report.lossy       # bf16 rounding, measured
    assert {v.dtype for k, v in load_file(str(tmp_path / "kl.safetensors")).items()
            if not k.endswith(".alpha")} == {torch.bfloat16}
    convert(src, str(tmp_path / "keep.safetensors"), "kohya", keep_algo=True)
    kept, orig = load_file(str(tmp_path / "keep.safetensors")), load_file(src)
    assert all(torch.equal(kept[k], v) for k, v in orig.items() if not k.endswith(".alpha"))


# ---------------------------------------------------------------------------------------------
# Item 3: what diffusers drops is said, never silent
# ---------------------------------------------------------------------------------------------

def _bias_and_t5_file(path) -> tuple[str, dict[str, torch.Tensor]]:
    """kohya keys (LyCORIS ``bypass``/full-module naming, ``lycoris/modules/full.py`` writes ``diff_b``): a bias-only
    ``diff_b`` on the fused img qkv (split into to_q/k/v ``.diff_b`` for diffusers), a LoRA with a ``diff_b`` on
    img_in (written as PEFT ``lora_B.bias``, which diffusers applies), and a T5 LoRA (``lora_te3_``)."""
    g = torch.Generator().manual_seed(5)
    qkv, t5, img = "lora_unet_double_blocks_0_img_attn_qkv", "lora_te3_encoder_block_0_layer_0_SelfAttention_q", \
        "lora_unet_img_in"
    t = {f"{img}.lora_down.weight": torch.randn(2, 16, generator=g), f"{img}.lora_up.weight": torch.randn(H, 2, generator=g),
         f"{img}.alpha": torch.tensor(2.0), f"{img}.diff_b": torch.randn(H, generator=g),
         f"{qkv}.diff_b": torch.randn(3 * H, generator=g),
         f"{t5}.lora_down.weight": torch.randn(2, 28, generator=g), f"{t5}.lora_up.weight": torch.randn(32, 2, generator=g),
         f"{t5}.alpha": torch.tensor(2.0)}
    save_file(t, str(path))
    return str(path), t


def test_diffusers_output_warns_what_its_loader_drops(tmp_path, capsys) -> None:
    src, _ = _bias_and_t5_file(tmp_path / "in.safetensors")
    report = convert(src, str(tmp_path / "d.safetensors"), "diffusers")
    written = load_file(str(tmp_path / "d.safetensors"))
    assert "transformer.transformer_blocks.0.attn.to_q.diff_b" in written
    assert any(k.startswith("text_encoder_2.") for k in written)
    assert len(report.warnings) == 2
    diff_b = next(w for w in report.warnings if "diff_b" in w)
    assert "diffusers' FLUX loader" in diff_b and "3 bias diff(s)" in diff_b and "lost for diffusers" in diff_b
    assert "transformer.x_embedder.lora_B.bias" in written         # a LoRA's bias: diffusers applies it
    t5 = next(w for w in report.warnings if "T5" in w)
    assert "text_encoder_2." in t5 and "drops the T5-XXL part" in t5
    # the CLI lists them in --json and exits 1 (written, but partial for that consumer)
    assert main(["convert", src, "-o", str(tmp_path / "d2.safetensors"), "--to", "diffusers", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["warnings"] == report.warnings
    # kohya/comfy consumers read both: no warning
    for to in ("kohya", "comfy"):
        assert convert(src, str(tmp_path / f"{to}.safetensors"), to).warnings == []


def test_merge_and_resize_to_diffusers_warn_too(tmp_path) -> None:
    from lorakit.ops.merging import merge
    from lorakit.ops.resizing import resize

    src, _ = _bias_and_t5_file(tmp_path / "in.safetensors")
    rep = merge([(src, 1.0)], str(tmp_path / "m.safetensors"), to="diffusers")
    assert any("diff_b" in w and "diffusers' FLUX loader" in w for w in rep.warnings)
    assert any("drops the T5-XXL part" in w for w in rep.warnings)
    rep = resize(src, str(tmp_path / "r.safetensors"), rank=1, to="diffusers")
    assert any("diff_b" in w and "diffusers' FLUX loader" in w for w in rep.warnings)
    assert any("drops the T5-XXL part" in w for w in rep.warnings)


@pytest.mark.oracle
def test_diffusers_really_drops_split_bias_diffs(tmp_path) -> None:
    """The warning's claim, checked on diffusers 0.42.1: the lorakit diffusers file's ``.diff_b`` keys change no
    bias of the tiny FLUX transformer (only the LoRA weight delta is applied)."""
    pytest.importorskip("diffusers")
    from test_oracle_diffusers import tiny_transformer

    src, _ = _bias_and_t5_file(tmp_path / "in.safetensors")
    out = str(tmp_path / "d.safetensors")
    convert(src, out, "diffusers")
    state = {k: v for k, v in load_file(out).items() if k.startswith("transformer.")}
    model = tiny_transformer(seed=2)
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    model.load_lora_adapter(state, prefix="transformer", adapter_name="lk")
    model.fuse_lora(lora_scale=1.0, adapter_names=["lk"])
    fused = model.state_dict()
    changed = set()
    for k, v in base.items():
        kk = k if k in fused else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        if not torch.equal(fused[kk], v):
            changed.add(k)
    # the LoRA and its lora_B.bias applied; the split to_q/k/v .diff_b (bias diffs without a LoRA) dropped
    assert changed == {"x_embedder.weight", "x_embedder.bias"}
