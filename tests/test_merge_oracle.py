"""Differential tests of lorakit merge against PEFT 0.21.2 (add_weighted_adapter and utils.merge_utils).

The PEFT models are tiny trees of ``nn.Linear`` named like the FLUX modules: native (BFL, fused) names for
sd-scripts inputs, diffusers (split) names for AI-Toolkit inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lorakit
from lorakit.formats import read_lora
from lorakit.io import open_weights
from lorakit.ops.merging import combine_dense, module_seed
from lorakit.lora.model import dense_deltas
from lorakit.samples.synthetic import TINY_FLUX, iter_split_modules, write_aitoolkit_lora, write_sdscripts_lora

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.utils import merge_utils  # noqa: E402

pytestmark = pytest.mark.oracle


def _tree(shapes: dict[str, tuple[int, int]]) -> nn.Module:
    root = nn.Module()
    for name, (out, inp) in shapes.items():
        cur = root
        parts = name.split(".")
        for p in parts[:-1]:
            if not hasattr(cur, p):
                cur.add_module(p, nn.Module())
            cur = getattr(cur, p)
        cur.add_module(parts[-1], nn.Linear(inp, out, bias=False))
    return root


def _kohya_factors(path: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, int]:
    """native module name -> (down, up), and the file's alpha and rank (sd-scripts synthetic: one of each)."""
    model = read_lora(path)
    out = {p.target.module: (p.adapter.down, p.adapter.up) for p in model.patches}
    first = model.patches[0].adapter
    return out, float(first.alpha), first.rank


def _peft_model(inputs: list[tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, int]]):
    names = sorted(inputs[0][0])
    shapes = {n: (inputs[0][0][n][1].shape[0], inputs[0][0][n][0].shape[1]) for n in names}
    model = None
    for i, (factors, alpha, rank) in enumerate(inputs):
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names)
        if model is None:
            model = get_peft_model(_tree(shapes), cfg, adapter_name=f"in{i}")
        else:
            model.add_adapter(f"in{i}", cfg)
        for n in names:
            layer = model.base_model.model.get_submodule(n)
            down, up = factors[n]
            layer.lora_A[f"in{i}"].weight.data.copy_(down)
            layer.lora_B[f"in{i}"].weight.data.copy_(up)
    return model, names


@pytest.fixture
def kohya_pair(tmp_path):
    one = write_sdscripts_lora(tmp_path / "one.safetensors", rank=4, alpha=2.0, seed=21, clip=None)
    two = write_sdscripts_lora(tmp_path / "two.safetensors", rank=8, alpha=8.0, seed=22, clip=None)
    return str(one), str(two)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("combination,method,rank", [("cat", "concat", None), ("svd", "svd", 6)])
def test_add_weighted_adapter_native_modules(kohya_pair, tmp_path, combination, method, rank):
    weights = [0.3, -0.7]
    model, names = _peft_model([_kohya_factors(p) for p in kohya_pair])
    model.base_model.add_weighted_adapter(["in0", "in1"], weights, "merged", combination_type=combination,
                                          svd_rank=rank, svd_clamp=None)
    out = str(tmp_path / f"{method}.safetensors")
    lorakit.merge(list(zip(kohya_pair, weights)), out, method=method, rank=rank)
    ours = {t.module: d for t, d in dense_deltas(read_lora(out)).items()}
    assert set(ours) == set(names)
    for n in names:
        theirs = model.base_model.model.get_submodule(n).get_delta_weight("merged")
        assert _rel(ours[n], theirs) < (1e-6 if method == "concat" else 1e-4), n


def test_add_weighted_adapter_cat_on_split_diffusers_modules(tmp_path):
    """AI-Toolkit inputs (split q/k/v) merged by lorakit on fused native targets, written back split."""
    a = str(write_aitoolkit_lora(tmp_path / "a.safetensors", rank=4, seed=31))
    b = str(write_aitoolkit_lora(tmp_path / "b.safetensors", rank=8, seed=32))
    inputs = []
    for path, rank in ((a, 4), (b, 8)):
        with open_weights(path) as f:
            factors = {k[len("transformer."):-len(".lora_A.weight")]: (f.get(k), f.get(k.replace("lora_A", "lora_B")))
                       for k in f.keys() if k.endswith("lora_A.weight")}
        inputs.append((factors, float(rank), rank))
    model, names = _peft_model(inputs)
    model.base_model.add_weighted_adapter(["in0", "in1"], [0.3, 0.7], "merged", combination_type="cat")
    out = str(tmp_path / "m.safetensors")
    lorakit.merge([(a, 0.3), (b, 0.7)], out, to="diffusers")
    with open_weights(out) as f:
        for n in names:
            theirs = model.base_model.model.get_submodule(n).get_delta_weight("merged")
            ours = f.get(f"transformer.{n}.lora_B.weight").double() @ f.get(f"transformer.{n}.lora_A.weight").double()
            assert _rel(ours, theirs) < 1e-6, n
    assert set(names) == {n for n, _, _ in iter_split_modules(TINY_FLUX) if "blocks." in n}


# ---------------------------------------------------------------------------------------------
# ties / dare against PEFT's merge_utils on the dense per-module deltas
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,sign", [("ties", "total"), ("ties", "frequency"), ("dare_linear", "total"),
                                         ("dare_ties", "frequency")])
def test_combine_dense_is_bitwise_peft(method, sign):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(24, 16, generator=g) for _ in range(3)]
    weights = [0.5, -0.3, 1.2]
    w = torch.tensor(weights)
    if method == "ties":
        theirs = merge_utils.ties(tensors, w, 0.4, sign)
    else:
        torch.manual_seed(1234)
        theirs = merge_utils.dare_linear(tensors, w, 0.4) if method == "dare_linear" else \
            merge_utils.dare_ties(tensors, w, 0.4, sign)
    gen = torch.Generator().manual_seed(1234)
    ours = combine_dense(tensors, weights, method, density=0.4, majority_sign=sign, generator=gen)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_dense_methods_match_peft_on_real_files(kohya_pair, tmp_path, method):
    weights, density, seed = [0.6, 0.9], 0.5, 5
    out = str(tmp_path / f"{method}.safetensors")
    lorakit.merge(list(zip(kohya_pair, weights)), out, method=method, density=density, rank=10_000,
                  seed=seed if method.startswith("dare") else None,
                  majority_sign="frequency" if method == "dare_ties" else None)
    ours = dense_deltas(read_lora(out))
    inputs = [dense_deltas(read_lora(p)) for p in kohya_pair]
    w = torch.tensor(weights)
    for target, got in ours.items():
        tensors = [d[target] for d in inputs]
        if method == "ties":
            ref = merge_utils.ties(tensors, w, density, "total")
        else:
            torch.manual_seed(module_seed(seed, str(target)))
            ref = merge_utils.dare_linear(tensors, w, density) if method == "dare_linear" else \
                merge_utils.dare_ties(tensors, w, density, "frequency")
        assert _rel(got, ref) < 1e-5, target


def test_ties_default_rank_truncates_like_peft_svd_variant(kohya_pair, tmp_path):
    """Default output rank = the largest input rank (PEFT's svd_rank default), truncation = top-k SVD."""
    out = str(tmp_path / "ties.safetensors")
    lorakit.merge([(kohya_pair[0], 1.0), (kohya_pair[1], 1.0)], out, method="ties", density=0.7)
    inputs = [dense_deltas(read_lora(p)) for p in kohya_pair]
    for target, got in dense_deltas(read_lora(out)).items():
        dense = merge_utils.ties([d[target] for d in inputs], torch.tensor([1.0, 1.0]), 0.7, "total")
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        assert _rel(got, (u[:, :8] * s[:8]) @ vh[:8]) < 1e-4, target
