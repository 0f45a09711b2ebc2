"""lorakit extract: known low-rank differences are recovered, whatever the layouts of the two models."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from lorakit.base.checkpoint import open_base
from lorakit.cli.main import main as cli
from lorakit.errors import ArchitectureError, KeyMappingError, NotALoraError, UsageError
from lorakit.ops.extraction import decompose, extract, fro_sq
from lorakit.formats import read_lora
from lorakit.io import open_weights, save_tensors
from lorakit.layouts import FLUX1, expand
from lorakit.lora.linalg import randomized_svd
from lorakit.lora.model import dense_deltas
from lorakit.samples.synthetic import TINY_FLUX, write_aitoolkit_lora, write_base

COMPONENT = FLUX1.components["transformer"]


# ---------------------------------------------------------------------------------------------
# Building models with known differences
# ---------------------------------------------------------------------------------------------

def native_tensors(tmp_path, params=TINY_FLUX) -> dict[str, torch.Tensor]:
    """Base tensors by native (BFL) name: ``module.weight``, ``module.bias`` and loose parameters."""
    path = write_base(tmp_path / "native-template.safetensors", params)
    with open_weights(path) as f:
        return {k: f.get(k).clone() for k in f.keys()}


def low_rank_deltas(params=TINY_FLUX, rank: int = 3, seed: int = 5, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in expand(COMPONENT, params):
        r = min(rank, m.out, m.inp)
        out[m.name] = (torch.randn(m.out, r, generator=g) @ torch.randn(r, m.inp, generator=g)) * scale
    return out


def write_model(path, native: dict[str, torch.Tensor], layout: str = "bfl", *, prefix: str = "",
                params=TINY_FLUX, dtype: torch.dtype = torch.float32) -> str:
    """Write native tensors in a layout: diffusers splits fused weights and swaps norm_out halves."""
    path = os.fspath(path)
    if layout == "bfl":
        save_tensors(path, {prefix + k: v.to(dtype).contiguous() for k, v in native.items()}, {"format": "pt"})
        return path
    template = write_base(path + ".template", params, layout=layout, fill="zeros")
    with open_weights(template) as f:
        base = open_base(f)
        tensors = {}
        for key, slot in base.slots.items():
            src = native[f"{slot.module}.{slot.param}"] if slot.module is not None else native[slot.param]
            t = src[slot.rows[0]:slot.rows[1]] if slot.rows else src
            if slot.swap:
                h = t.shape[0] // 2
                t = torch.cat([t[h:], t[:h]])
            tensors[prefix + key] = t.to(dtype).contiguous()
    os.remove(template)
    save_tensors(path, tensors, {"format": "pt"})
    return path


def tuned_from(native: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor],
               bias_deltas: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    out = dict(native)
    for mod, d in deltas.items():
        out[f"{mod}.weight"] = native[f"{mod}.weight"] + d
    for mod, b in (bias_deltas or {}).items():
        out[f"{mod}.bias"] = native[f"{mod}.bias"] + b
    return out


def rel_errors(lora_path, deltas: dict[str, torch.Tensor]) -> dict[str, float]:
    dense = {t.module: d for t, d in dense_deltas(read_lora(lora_path)).items()}
    assert set(dense) == set(deltas)
    return {m: float((dense[m] - d).norm() / d.norm()) for m, d in deltas.items()}


@pytest.fixture()
def pair(tmp_path):
    native = native_tensors(tmp_path)
    deltas = low_rank_deltas()
    return native, deltas


# ---------------------------------------------------------------------------------------------
# Recovery
# ---------------------------------------------------------------------------------------------

def test_known_low_rank_difference_is_recovered(tmp_path, pair):
    native, deltas = pair
    a = write_model(tmp_path / "orig.safetensors", native)
    b = write_model(tmp_path / "tuned.safetensors", tuned_from(native, deltas))
    rep = extract(a, b, tmp_path / "lora.safetensors", rank=3, oversample=4)
    assert rep.method == "randomized_svd" and {m.svd for m in rep.modules} == {"randomized"}
    assert len(rep.modules) == len(deltas) and not rep.skipped and not rep.unpaired
    errs = rel_errors(tmp_path / "lora.safetensors", deltas)
    assert max(errs.values()) <= 1e-4
    assert all(m.relative_error <= 1e-4 and m.retained_energy >= 1 - 1e-8 and m.rank == 3 for m in rep.modules)


LAYOUTS = [("bfl", ""), ("diffusers", ""), ("bfl", "model.diffusion_model.")]


@pytest.mark.parametrize("lo", LAYOUTS, ids=lambda x: x[0] + ("-comfy" if x[1] else ""))
@pytest.mark.parametrize("lt", LAYOUTS, ids=lambda x: x[0] + ("-comfy" if x[1] else ""))
def test_layouts_give_the_same_lora(tmp_path, pair, lo, lt):
    native, deltas = pair
    bias = {"final_layer.adaLN_modulation.1": torch.linspace(-1, 1, 2 * TINY_FLUX["H"]) * 1e-3,
            "single_blocks.0.linear1": torch.linspace(0, 1, 3 * TINY_FLUX["H"] + TINY_FLUX["M"]) * 1e-3}
    tuned = tuned_from(native, deltas, bias)
    ref_o = write_model(tmp_path / "ref_o.safetensors", native)
    ref_t = write_model(tmp_path / "ref_t.safetensors", tuned)
    extract(ref_o, ref_t, tmp_path / "ref.safetensors", rank=3, oversample=4, include_bias=True)
    o = write_model(tmp_path / "o.safetensors", native, lo[0], prefix=lo[1])
    t = write_model(tmp_path / "t.safetensors", tuned, lt[0], prefix=lt[1])
    rep = extract(o, t, tmp_path / "x.safetensors", rank=3, oversample=4, include_bias=True)
    assert not rep.unpaired and sorted(rep.bias_modules) == sorted(bias)
    with open_weights(tmp_path / "ref.safetensors") as fr, open_weights(tmp_path / "x.safetensors") as fx:
        assert fr.keys() == fx.keys()
        for k in fr.keys():
            assert torch.equal(fr.get(k), fx.get(k)), k
    model = read_lora(tmp_path / "x.safetensors")
    for p in model.patches:
        if p.target.module in bias:
            torch.testing.assert_close(p.bias, bias[p.target.module], rtol=0, atol=1e-7)


def test_diffusers_sharded_folder_input(tmp_path, pair):
    native, deltas = pair
    single = write_model(tmp_path / "t.safetensors", tuned_from(native, deltas), "diffusers")
    folder = tmp_path / "transformer"
    folder.mkdir()
    with open_weights(single) as f:
        keys = f.keys()
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
        weight_map = {}
        for i, part in enumerate(halves):
            name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
            save_tensors(folder / name, {k: f.get(k) for k in part}, {"format": "pt"})
            weight_map.update({k: name for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    o = write_model(tmp_path / "o.safetensors", native)
    rep = extract(o, folder, tmp_path / "lora.safetensors", rank=3, oversample=4)
    assert rep.tuned_layout == "diffusers"
    assert max(rel_errors(tmp_path / "lora.safetensors", deltas).values()) <= 1e-4
    prov = json.loads(open_weights(tmp_path / "lora.safetensors").metadata["lorakit.provenance"])
    sizes = [i["size"] for i in prov["inputs"]]
    assert sizes[0] == os.path.getsize(o) and sizes[1] == sum(
        os.path.getsize(folder / n) for n in os.listdir(folder) if n.endswith(".safetensors"))


@pytest.mark.parametrize("fmt", ["kohya", "comfy", "diffusers"])
def test_output_formats_hold_the_same_delta(tmp_path, pair, fmt):
    native, deltas = pair
    o = write_model(tmp_path / "o.safetensors", native)
    t = write_model(tmp_path / "t.safetensors", tuned_from(native, deltas))
    rep = extract(o, t, tmp_path / "lora.safetensors", rank=3, oversample=4, to=fmt)
    assert read_lora(tmp_path / "lora.safetensors").format == fmt and rep.format == fmt
    assert max(rel_errors(tmp_path / "lora.safetensors", deltas).values()) <= 1e-4


def test_alpha_is_stored_and_the_delta_kept(tmp_path, pair):
    native, deltas = pair
    o = write_model(tmp_path / "o.safetensors", native)
    t = write_model(tmp_path / "t.safetensors", tuned_from(native, deltas))
    extract(o, t, tmp_path / "lora.safetensors", rank=3, oversample=4, alpha=1.5)
    with open_weights(tmp_path / "lora.safetensors") as f:
        alphas = {float(f.get(k)) for k in f.keys() if k.endswith(".alpha")}
        assert alphas == {1.5} and f.metadata["ss_network_alpha"] == "1.5"
    assert max(rel_errors(tmp_path / "lora.safetensors", deltas).values()) <= 1e-4


def test_bf16_output_dtype_by_default_follows_the_tuned_model(tmp_path, pair):
    native, deltas = pair
    o = write_model(tmp_path / "o.safetensors", native, dtype=torch.bfloat16)
    tuned = {k: v.to(torch.bfloat16).float() for k, v in tuned_from(native, deltas).items()}
    t = write_model(tmp_path / "t.safetensors", tuned, dtype=torch.bfloat16)
    rep = extract(o, t, tmp_path / "lora.safetensors", rank=3, oversample=4)
    assert rep.dtype == "bfloat16"
    with open_weights(tmp_path / "lora.safetensors") as f:
        assert {f.infos[k].dtype for k in f.keys() if not k.endswith(".alpha")} == {"BF16"}
    rep32 = extract(o, t, tmp_path / "lora32.safetensors", rank=3, dtype=torch.float32)
    assert rep32.dtype == "float32"


# ---------------------------------------------------------------------------------------------
# Decomposition quality, dynamic rank, exactness of the reported errors
# ---------------------------------------------------------------------------------------------

def decaying(m: int, n: int, tau: float = 6.0, noise: float = 1e-4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
    s = torch.exp(-torch.arange(min(m, n), dtype=torch.float32) / tau)
    return (u * s) @ v.T + noise * torch.randn(m, n, generator=g), s


@pytest.mark.parametrize("shape", [(320, 96), (96, 320)])
def test_randomized_is_within_one_percent_of_the_optimal_truncation(shape):
    d, _ = decaying(*shape)
    k = 16
    fast = decompose(d, k, seed=3)
    best = decompose(d, k, exact=True)
    assert fast.svd == "randomized" and best.svd == "exact"
    actual = math.sqrt(fro_sq(d - fast.up @ fast.down) / fro_sq(d))
    optimal = math.sqrt(fro_sq(d - best.up @ best.down) / fro_sq(d))
    assert actual <= 1.01 * optimal
    assert fast.relative_error == pytest.approx(actual, rel=1e-3)     # the report is the true error
    assert best.relative_error == pytest.approx(optimal, rel=1e-3)


def test_randomized_svd_needs_its_power_iterations():
    """The quality test above can fail: without power iterations or oversampling the error is worse."""
    d, _ = decaying(320, 96, tau=30.0, noise=1e-2)
    k = 16
    u, s, vh = randomized_svd(d, k, oversample=0, niter=0, seed=3)
    crude = math.sqrt(fro_sq(d - (u[:, :k] * s[:k]) @ vh[:k]) / fro_sq(d))
    optimal = decompose(d, k, exact=True).relative_error
    assert crude > 1.01 * optimal


def test_extract_exact_vs_randomized_on_a_decaying_spectrum(tmp_path):
    native = native_tensors(tmp_path)
    deltas = {}
    for i, m in enumerate(expand(COMPONENT, TINY_FLUX)):
        d, _ = decaying(m.out, m.inp, tau=2.0, seed=i)
        deltas[m.name] = d * 0.01
    o = write_model(tmp_path / "o.safetensors", native)
    t = write_model(tmp_path / "t.safetensors", tuned_from(native, deltas))
    fast = extract(o, t, tmp_path / "fast.safetensors", rank=4, oversample=4)
    best = extract(o, t, tmp_path / "best.safetensors", rank=4, exact=True)
    assert {m.svd for m in best.modules} == {"exact"} and "randomized" in {m.svd for m in fast.modules}
    worst = {m.module: m.relative_error for m in best.modules}
    for m in fast.modules:
        assert m.relative_error <= 1.01 * worst[m.module] + 1e-7, m.module
    actual = rel_errors(tmp_path / "fast.safetensors", deltas)
    for m in fast.modules:
        assert m.relative_error == pytest.approx(actual[m.module], rel=1e-3, abs=1e-6)


def test_dynamic_rank_keeps_the_documented_ranks(tmp_path):
    """Every module gets singular values 1, 1/2, 1/4, … (8 of them): sv_ratio:5 keeps s > 0.2 → 3,
    sv_fro:0.995 keeps 99.5 % of the norm, i.e. 99.0025 % of the energy (energies 1, 1/4, 1/16 …: three values
    hold 98.4 %, four 99.6 %) → 4, sv_fro:0.99 → 3, sv_cumulative:0.9 → 4."""
    native = native_tensors(tmp_path)
    s = torch.tensor([2.0 ** -i for i in range(8)])
    g = torch.Generator().manual_seed(1)
    deltas = {}
    for m in expand(COMPONENT, TINY_FLUX):
        n = min(8, m.out, m.inp)
        u, _ = torch.linalg.qr(torch.randn(m.out, n, generator=g))
        v, _ = torch.linalg.qr(torch.randn(m.inp, n, generator=g))
        deltas[m.name] = (u * s[:n]) @ v.T
    o = write_model(tmp_path / "o.safetensors", native)
    t = write_model(tmp_path / "t.safetensors", tuned_from(native, deltas))
    expected = {"sv_ratio:5": 3, "sv_fro:0.995": 4, "sv_fro:0.99": 3, "sv_cumulative:0.9": 4}
    energy4 = sum(4.0 ** -i for i in range(4)) / sum(4.0 ** -i for i in range(8))
    for spec, k in expected.items():
        for exact in (False, True):
            rep = extract(o, t, tmp_path / f"{spec.replace(':', '_')}{exact}.safetensors", dynamic=spec, rank=16,
                          oversample=4, exact=exact)
            assert {m.rank for m in rep.modules} == {k}, (spec, exact)
        # the cap wins when it is lower
        rep = extract(o, t, tmp_path / "capped.safetensors", dynamic=spec, rank=2, oversample=4)
        assert {m.rank for m in rep.modules} == {2}
    rep = extract(o, t, tmp_path / "fro.safetensors", dynamic="sv_fro:0.995", rank=16, oversample=4)
    assert all(m.retained_energy == pytest.approx(energy4, abs=1e-6) for m in rep.modules)
    assert json.loads(open_weights(tmp_path / "fro.safetensors").metadata["lorakit.provenance"])["dynamic"] \
        == "sv_fro:0.995"


def test_sv_fro_measures_energy_against_the_whole_difference():
    """With randomized SVD only rank+oversample values are known; sv_fro must still use ‖D‖_F²."""
    d, _ = decaying(200, 120, tau=20.0, noise=0.0)
    exact = decompose(d, 40, dynamic=("sv_fro", 0.9), exact=True)
    fast = decompose(d, 40, dynamic=("sv_fro", 0.9), oversample=4)
    assert fast.svd == "randomized" and fast.rank == exact.rank
    assert exact.retained_energy >= 0.81 - 1e-6 and fast.retained_energy >= 0.81 - 1e-6


# ---------------------------------------------------------------------------------------------
# Skipping, biases, loose parameters, errors
# ---------------------------------------------------------------------------------------------

def test_unchanged_modules_are_skipped_and_counted(tmp_path, pair):
    native, deltas = pair
    changed = {k: v for i, (k, v) in enumerate(deltas.items()) if i % 3 == 0}
    small = {k: torch.full_like(v, 1e-3) for i, (k, v) in enumerate(deltas.items()) if i % 3 == 1}
    o = write_model(tmp_path / "o.safetensors", native)
    t = write_model(tmp_path / "t.safetensors", tuned_from(native, {**changed, **small}))
    rep = extract(o, t, tmp_path / "a.safetensors", rank=3, oversample=4)
    assert sorted(m.module for m in rep.modules) == sorted([*changed, *small])
    assert len(rep.skipped) == len(deltas) - len(changed) - len(small)
    rep = extract(o, t, tmp_path / "b.safetensors", rank=3, oversample=4, min_diff=2e-3)
    assert sorted(m.module for m in rep.modules) == sorted(changed)
    assert len(rep.skipped) == len(deltas) - len(changed)
    assert {t.module for t in dense_deltas(read_lora(tmp_path / "b.safetensors"))} == set(changed)


def test_identical_models_are_an_error(tmp_path, pair):
    native, _ = pair
    o = write_model(tmp_path / "o.safetensors", native)
    t = write_model(tmp_path / "t.safetensors", native, "diffusers")
    with pytest.raises(UsageError, match="identical"):
        extract(o, t, tmp_path / "x.safetensors", rank=4)
    assert not (tmp_path / "x.safetensors").exists()


def test_bias_and_norm_differences_are_reported(tmp_path, pair):
    native, deltas = pair
    tuned = tuned_from(native, deltas, {"img_in": torch.ones(TINY_FLUX["H"]) * 1e-2})
    norm = "double_blocks.0.img_attn.norm.query_norm.scale"
    tuned[norm] = native[norm] + 0.5
    o = write_model(tmp_path / "o.safetensors", native)
    t = write_model(tmp_path / "t.safetensors", tuned, "diffusers")
    rep = extract(o, t, tmp_path / "a.safetensors", rank=3, oversample=4)
    assert rep.bias_differences == ["img_in"] and not rep.bias_modules
    assert [d["name"] for d in rep.loose_differences] == [norm]
    assert rep.loose_differences[0]["max_abs_diff"] == pytest.approx(0.5)
    assert any("--include-bias" in w for w in rep.warnings) and any("norm" in w for w in rep.warnings)
    with open_weights(tmp_path / "a.safetensors") as f:
        assert not any(k.endswith("diff_b") for k in f.keys())
    rep = extract(o, t, tmp_path / "b.safetensors", rank=3, oversample=4, include_bias=True, to="diffusers")
    assert rep.bias_modules == ["img_in"]
    model = read_lora(tmp_path / "b.safetensors")
    (p,) = [p for p in model.patches if p.target.module == "img_in"]
    torch.testing.assert_close(p.bias.float(), torch.ones(TINY_FLUX["H"]) * 1e-2, rtol=1e-6, atol=1e-8)
    rep = extract(o, t, tmp_path / "c.safetensors", rank=3, include_norms=True)   # written (see test_norms.py)
    assert rep.loose_written == [norm]


def test_bias_only_difference_is_written(tmp_path, pair):
    native, _ = pair
    o = write_model(tmp_path / "o.safetensors", native)
    t = write_model(tmp_path / "t.safetensors", tuned_from(native, {}, {"txt_in": torch.ones(TINY_FLUX["H"])}))
    rep = extract(o, t, tmp_path / "a.safetensors", rank=3, include_bias=True)
    assert not rep.modules and rep.bias_modules == ["txt_in"]
    with open_weights(tmp_path / "a.safetensors") as f:
        assert f.keys() == ["lora_unet_txt_in.diff_b"]


def test_mismatched_models_are_refused(tmp_path, pair):
    native, _ = pair
    o = write_model(tmp_path / "o.safetensors", native)
    schnell = write_base(tmp_path / "schnell.safetensors", dict(TINY_FLUX, guidance=0))
    with pytest.raises(ArchitectureError, match="guidance"):
        extract(o, schnell, tmp_path / "x.safetensors", rank=4)
    wider = write_base(tmp_path / "wider.safetensors", dict(TINY_FLUX, H=48))
    with pytest.raises(ArchitectureError, match="H: 32 vs 48"):
        extract(o, wider, tmp_path / "x.safetensors", rank=4)
    lora = write_aitoolkit_lora(tmp_path / "lora.safetensors")
    with pytest.raises(NotALoraError):
        extract(o, lora, tmp_path / "x.safetensors", rank=4)


def test_incomplete_modules_are_reported_unpaired(tmp_path, pair):
    native, deltas = pair
    t = write_model(tmp_path / "t.safetensors", tuned_from(native, deltas), "diffusers")
    with open_weights(t) as f:
        keep = {k: f.get(k) for k in f.keys() if k != "single_transformer_blocks.1.attn.to_k.weight"}
    save_tensors(tmp_path / "t2.safetensors", keep, {})
    o = write_model(tmp_path / "o.safetensors", native)
    rep = extract(o, tmp_path / "t2.safetensors", tmp_path / "x.safetensors", rank=3, oversample=4)
    assert rep.unpaired == ["single_blocks.1.linear1 (weight rows incomplete in TUNED)"]
    assert len(rep.modules) == len(deltas) - 1


def test_pairing_nothing_is_an_error(tmp_path, monkeypatch, pair):
    native, deltas = pair
    o = write_model(tmp_path / "o.safetensors", native)
    t = write_model(tmp_path / "t.safetensors", tuned_from(native, deltas))
    import lorakit.ops.extraction.pairing as ex
    monkeypatch.setattr(ex, "covered", lambda slots, rows: False)
    with pytest.raises(KeyMappingError, match="paired"):
        extract(o, t, tmp_path / "x.safetensors", rank=3)


@pytest.mark.parametrize("kwargs,match", [
    ({}, "no rank"), ({"rank": 0}, "at least 1"), ({"rank": 4, "to": "peft"}, "cannot write"),
    ({"rank": 4, "alpha": -1.0}, "alpha"), ({"dynamic": "sv_bogus:3"}, "dynamic"),
    ({"rank": 4, "min_diff": -1.0}, "min-diff"),
])
def test_bad_options_are_usage_errors(tmp_path, pair, kwargs, match):
    native, _ = pair
    o = write_model(tmp_path / "o.safetensors", native)
    with pytest.raises(UsageError, match=match):
        extract(o, o, tmp_path / "x.safetensors", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error(tmp_path, pair):
    native, deltas = pair
    o = write_model(tmp_path / "o.safetensors", native)
    with pytest.raises(UsageError, match="CUDA"):
        extract(o, o, tmp_path / "x.safetensors", rank=4, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_same_delta(tmp_path, pair):
    native, deltas = pair
    o = write_model(tmp_path / "o.safetensors", native)
    t = write_model(tmp_path / "t.safetensors", tuned_from(native, deltas))
    rep = extract(o, t, tmp_path / "lora.safetensors", rank=3, oversample=4, device="cuda")
    assert rep.device.startswith("cuda")
    assert max(rel_errors(tmp_path / "lora.safetensors", deltas).values()) <= 1e-4


def test_output_may_not_overwrite_an_input(tmp_path, pair):
    from lorakit.errors import OutputError
    native, deltas = pair
    o = write_model(tmp_path / "o.safetensors", native)
    t = write_model(tmp_path / "t.safetensors", tuned_from(native, deltas))
    with pytest.raises(OutputError):
        extract(o, t, t, rank=3)


# ---------------------------------------------------------------------------------------------
# Determinism and CLI
# ---------------------------------------------------------------------------------------------

def test_two_runs_are_byte_identical(tmp_path, pair):
    native, deltas = pair
    noisy = {k: v + 1e-4 * torch.randn(v.shape, generator=torch.Generator().manual_seed(9))
             for k, v in deltas.items()}
    o = write_model(tmp_path / "o.safetensors", native)
    t = write_model(tmp_path / "t.safetensors", tuned_from(native, noisy), "diffusers")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for sub in ("a", "b"):
        extract(o, t, tmp_path / sub / "lora.safetensors", rank=3, oversample=4, seed=7)
    assert (tmp_path / "a" / "lora.safetensors").read_bytes() == (tmp_path / "b" / "lora.safetensors").read_bytes()
    extract(o, t, tmp_path / "lora.safetensors", rank=3, oversample=4, seed=8)
    with open_weights(tmp_path / "a" / "lora.safetensors") as fa, open_weights(tmp_path / "lora.safetensors") as fb:
        assert any(not torch.equal(fa.get(k), fb.get(k)) for k in fa.keys() if not k.endswith(".alpha"))


def test_cli_json_report_and_aliases(tmp_path, pair, capsys):
    native, deltas = pair
    o = write_model(tmp_path / "o.safetensors", native)
    t = write_model(tmp_path / "t.safetensors", tuned_from(native, deltas))
    rc = cli(["extract", str(o), str(t), "--save_to", str(tmp_path / "x.safetensors"), "--dim", "3",
              "--oversample", "4", "--save_precision", "fp16", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["dtype"] == "float16" and rep["rank"] == 3 and len(rep["modules"]) == len(deltas)
    assert {"module", "rank", "retained_energy", "relative_error", "max_abs_diff"} <= set(rep["modules"][0])
    rc = cli(["extract", str(o), str(t), "-o", str(tmp_path / "y.safetensors"), "--dynamic_method", "sv_fro",
              "--dynamic_param", "0.999", "--rank", "8", "--exact"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "modules extracted" in err and "exact_svd" in err
    assert cli(["extract", str(o), str(t), "-o", str(tmp_path / "z.safetensors")]) == 2
    assert "no rank given" in capsys.readouterr().err
    assert cli(["extract", str(o), str(t), "-o", str(tmp_path / "z.safetensors"), "--rank", "2",
                "--include-norms"]) == 0     # nothing to write for the norms here (none changed)


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path):
    import subprocess
    import sys
    bench = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_extract.py")
    proc = subprocess.run([sys.executable, bench, "--scale", "16", "--dir", str(tmp_path)], capture_output=True,
                          text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "extrapolated to 19+38 blocks" in proc.stdout and "exact/randomized time ratio" in proc.stdout
