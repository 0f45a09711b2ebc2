"""Differential tests against diffusers 0.42.1 / PEFT 0.21.2 on a tiny FluxTransformer2DModel.

(a) a LoRA saved by diffusers' own ``FluxPipeline.save_lora_weights`` is read by lorakit with the dense deltas
    PEFT's ``get_delta_weight`` gives; (b) lorakit's ``--to diffusers`` output loads into diffusers with no
    dropped key and ``fuse_lora`` produces lorakit's deltas applied to the base.
"""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

from lorakit.cli import main
from lorakit.formats import read_lora
from lorakit.layouts import FLUX1, NameIndex, evaluate, expand
from lorakit.lora.model import Target, dense_deltas

pytestmark = pytest.mark.oracle

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: E402
from diffusers.utils import logging as dlogging  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

# lorakit sizes of the diffusers config below (time projection width is fixed at 256 in diffusers).
PARAMS = {"H": 32, "M": 128, "IN": 16, "OUT": 16, "CTX": 24, "VEC": 20, "T": 256, "D": 16, "double": 2,
          "single": 2, "guidance": 1, "modulation": 1}
COMP = FLUX1.components["transformer"]


def tiny_transformer(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                   pooled_projection_dim=20, axes_dims_rope=(4, 6, 6), guidance_embeds=True)
    return model.eval()


def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


_INDEX = NameIndex(COMP, "diffusers", flat=False)


def to_native(name: str) -> tuple[str, tuple[int, int], bool]:
    """diffusers module -> (native module, row window, swapped halves), through the layout."""
    m = _INDEX.match(name)
    assert m is not None, name
    out = evaluate(m.spec.out, PARAMS)
    if m.alias.rows is None:
        rows = (0, out)
    else:
        s = evaluate(m.alias.rows[0], PARAMS)
        rows = (s, s + evaluate(m.alias.rows[1], PARAMS))
    return m.native, rows, m.alias.swap_halves


def native_rows(delta: torch.Tensor, rows: tuple[int, int], swap: bool) -> torch.Tensor:
    part = delta[rows[0]:rows[1]]
    if swap:
        h = part.shape[0] // 2
        part = torch.cat([part[h:], part[:h]])
    return part


def test_layout_matches_tiny_model_linears() -> None:
    model = tiny_transformer()
    mods = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    predicted = {}
    for cm in expand(COMP, PARAMS):
        for alias in cm.spec.names("diffusers"):
            name = alias.template.format(i=cm.index) if cm.index is not None else alias.template
            rows = cm.out if alias.rows is None else evaluate(alias.rows[1], PARAMS)
            predicted[name] = (rows, cm.inp)
    assert predicted == {n: tuple(m.weight.shape) for n, m in mods.items()}


# ---------------------------------------------------------------------------------------------
# (a) diffusers-saved LoRA -> lorakit
# ---------------------------------------------------------------------------------------------

def test_read_diffusers_saved_lora(tmp_path) -> None:
    model = tiny_transformer()
    targets = linear_names(model)
    config = LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False,
                        rank_pattern={"single_transformer_blocks.1.proj_mlp": 2, "transformer_blocks.0.attn.to_k": 3},
                        alpha_pattern={"transformer_blocks.0.attn.to_q": 2, "norm_out.linear": 12,
                                       "single_transformer_blocks.1.proj_mlp": 5})
    model.add_adapter(config, adapter_name="default")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, BaseTunerLayer) and "default" in getattr(m, "lora_B", {}):
                m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=gen) * 0.1)
    sd = get_peft_model_state_dict(model, adapter_name="default")
    meta = config.to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    FluxPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=sd, transformer_lora_adapter_metadata=meta)
    path = tmp_path / "pytorch_lora_weights.safetensors"

    lk = read_lora(path)
    assert lk.format == "diffusers" and lk.unknown_keys == []
    deltas = dense_deltas(lk)
    checked = 0
    for name, m in model.named_modules():
        if not (isinstance(m, BaseTunerLayer) and "default" in getattr(m, "lora_A", {})):
            continue
        want = m.get_delta_weight("default").detach().float()
        native, rows, swap = to_native(name)
        got = native_rows(deltas[Target("transformer", native)], rows, swap)
        assert got.shape == want.shape, name
        assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max()), name
        checked += 1
    assert checked == len(targets)


# ---------------------------------------------------------------------------------------------
# (b) lorakit --to diffusers -> diffusers load_lora_adapter + fuse_lora
# ---------------------------------------------------------------------------------------------

def _kohya_file(path) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for n, cm in enumerate(expand(COMP, PARAMS)):
        stem = "lora_unet_" + cm.name.replace(".", "_")
        r = 4
        tensors[stem + ".lora_down.weight"] = torch.randn(r, cm.inp, generator=gen) / cm.inp ** 0.5
        tensors[stem + ".lora_up.weight"] = torch.randn(cm.out, r, generator=gen) * 0.1
        tensors[stem + ".alpha"] = torch.tensor((2.0, 3.0, 8.0)[n % 3])   # scales 0.5, 0.75, 2
    names = {k.rsplit(".", 2)[0] for k in tensors}
    assert "lora_unet_final_layer_adaLN_modulation_1" in names and "lora_unet_single_blocks_0_linear1" in names
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora_flux"})


@pytest.mark.parametrize("with_metadata", [True, False])
def test_lorakit_diffusers_output_loads_and_fuses(tmp_path, capsys, caplog, with_metadata: bool) -> None:
    src, out = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    _kohya_file(src)
    assert main(["convert", str(src), "-o", str(out), "--to", "diffusers"]) == 0
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(out))
    with safe_open(str(out), "pt") as fh:
        file_meta = fh.metadata()
    file_modules = {k.split(".lora_")[0][len("transformer."):] for k in state}

    model = tiny_transformer(seed=1)
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    dlogging.enable_propagation()
    try:
        caplog.set_level(logging.INFO)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if with_metadata:
                sd, meta = FluxPipeline.lora_state_dict(str(out), return_lora_metadata=True)
                assert meta == json.loads(file_meta["lora_adapter_metadata"])
                model.load_lora_adapter(sd, prefix="transformer", adapter_name="lk", metadata=meta)
            else:
                model.load_lora_adapter(dict(state), prefix="transformer", adapter_name="lk")
    finally:
        dlogging.disable_propagation()
    bad = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    bad += [str(w.message) for w in caught if "lora" in str(w.message).lower() or "key" in str(w.message).lower()]
    assert bad == []
    injected = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and "lk" in m.lora_A}
    assert injected == file_modules
    assert injected == set(linear_names(tiny_transformer()))   # every Linear of the model got its LoRA
    for n, m in model.named_modules():
        if n in injected:
            assert m.scaling["lk"] == pytest.approx(1.0)       # the scale lives in the factors

    model.fuse_lora(lora_scale=1.0, adapter_names=["lk"])
    fused = model.state_dict()
    deltas = dense_deltas(read_lora(src))
    for name in injected:
        key = name + ".base_layer.weight" if name + ".base_layer.weight" in fused else name + ".weight"
        got = fused[key].float() - base[name + ".weight"].float()
        native, rows, swap = to_native(name)
        want = native_rows(deltas[Target("transformer", native)], rows, swap)
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), name
        bkey = key.replace(".weight", ".bias")
        if bkey in fused:
            assert torch.equal(fused[bkey], base[name + ".bias"]), name
