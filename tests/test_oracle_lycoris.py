"""Differential tests against lycoris-lora 4.1.3: LoHa/LoKr files saved from LyCORIS's own modules read as
the delta LyCORIS's forward pass applies (its forward is the ground truth; ``get_diff_weight`` double-scales,
math.md §9)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lorakit.formats import read_lora
from lorakit.lora.model import Target, dense_deltas

lycoris_loha = pytest.importorskip("lycoris.modules.loha")
lycoris_lokr = pytest.importorskip("lycoris.modules.lokr")

pytestmark = pytest.mark.oracle

H, M = 32, 128   # tiny FLUX sizes (hidden, MLP)
MODULES = {"double_blocks.0.img_attn.proj": (H, H), "single_blocks.0.linear1": (3 * H + M, H),
           "double_blocks.1.img_mlp.2": (H, M)}
# companions so the layout sizes (H, M) are determined from the file
COMPANIONS = {"double_blocks.0.img_attn.qkv": (3 * H, H)}


def _forward_delta(module: torch.nn.Module, lin: torch.nn.Linear) -> torch.Tensor:
    x = torch.eye(lin.in_features)
    with torch.no_grad():
        return (module(x) - F.linear(x, lin.weight, lin.bias)).T


def _randomise(module: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith("org_"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


CASES = [
    ("loha", dict(lora_dim=4, alpha=2)),
    ("loha", dict(lora_dim=4, alpha=2, rs_lora=True)),
    ("lokr", dict(lora_dim=4, alpha=2, factor=4)),
    ("lokr", dict(lora_dim=4, alpha=3, factor=4, decompose_both=True)),
    ("lokr", dict(lora_dim=4, alpha=2, factor=4, full_matrix=True)),
]


@pytest.mark.parametrize("algo, kwargs", CASES, ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
                                                       for a, kw in CASES])
def test_lycoris_modules_read_as_their_forward_delta(tmp_path, algo: str, kwargs: dict) -> None:
    gen = torch.Generator().manual_seed(7)
    cls = lycoris_loha.LohaModule if algo == "loha" else lycoris_lokr.LokrModule
    tensors: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    for native, (out, inp) in {**MODULES, **COMPANIONS}.items():
        stem = "lora_unet_" + native.replace(".", "_")
        lin = torch.nn.Linear(inp, out)
        module = cls(stem, lin, multiplier=1.0, **kwargs)
        _randomise(module, gen)
        module.apply_to()
        expected[native] = _forward_delta(module, lin)
        for key, value in module.state_dict().items():
            if key.startswith("org_"):
                continue
            tensors[f"{stem}.{key}"] = value.detach().clone().contiguous()
    path = tmp_path / f"{algo}.safetensors"
    save_file(tensors, str(path))
    model = read_lora(str(path))
    assert model.format == "kohya" and model.adapter_kinds() == [algo]
    got = dense_deltas(model)
    for native, want in expected.items():
        d = got[Target("transformer", native)]
        err = float((d - want).norm() / want.norm())
        assert err <= 1e-5, f"{native}: relative error {err:.2e} against LyCORIS's forward pass"
