"""Differential tests against diffusers 0.42.1 / PEFT 0.21.2 on a tiny Flux2Transformer2DModel.

(a) a LoRA saved by diffusers' own ``Flux2Pipeline.save_lora_weights`` is read by lorakit with the dense deltas
    PEFT's ``get_delta_weight`` gives; (b) lorakit's ``--to diffusers`` output of a kohya (BFL-named, fused) file
    loads through ``Flux2Pipeline.lora_state_dict`` + ``load_lora_adapter`` with no key left over, and
    ``fuse_lora`` gives exactly what ``lorakit bake`` writes into the same base (saved in diffusers layout).
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from lorakit.cli import main
from lorakit.formats import read_lora
from lorakit.layouts import FLUX2, NameIndex, evaluate, expand
from lorakit.lora.model import Target, dense_deltas

pytestmark = pytest.mark.oracle

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from diffusers import Flux2Pipeline, Flux2Transformer2DModel  # noqa: E402
from diffusers.utils import logging as dlogging  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

# lorakit sizes of the diffusers configs below
CONFIGS = {
    "dev": (dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=8,
                 axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True),
            {"H": 32, "M": 96, "IN": 16, "OUT": 16, "CTX": 24, "T": 8, "D": 16, "double": 2, "single": 2,
             "guidance": 1}),
    "klein": (dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=3, joint_attention_dim=40, timestep_guidance_channels=8,
                   axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False),
              {"H": 48, "M": 144, "IN": 16, "OUT": 16, "CTX": 40, "T": 8, "D": 16, "double": 1, "single": 2,
               "guidance": 0}),
}
COMP = FLUX2.components["transformer"]
_INDEX = NameIndex(COMP, "diffusers", flat=False)


def tiny_transformer(variant: str, seed: int = 0) -> Flux2Transformer2DModel:
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(**CONFIGS[variant][0]).eval()


def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def to_native(name: str, params: dict) -> tuple[str, tuple[int, int], bool]:
    """diffusers module -> (native module, row window, swapped halves), through the layout."""
    m = _INDEX.match(name)
    assert m is not None, name
    if m.alias.rows is None:
        rows = (0, evaluate(m.spec.out, params))
    else:
        s = evaluate(m.alias.rows[0], params)
        rows = (s, s + evaluate(m.alias.rows[1], params))
    return m.native, rows, m.alias.swap_halves


def native_rows(delta: torch.Tensor, rows: tuple[int, int], swap: bool) -> torch.Tensor:
    part = delta[rows[0]:rows[1]]
    if swap:
        h = part.shape[0] // 2
        part = torch.cat([part[h:], part[:h]])
    return part


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_layout_matches_tiny_model(variant: str) -> None:
    model = tiny_transformer(variant)
    params = CONFIGS[variant][1]
    predicted = {}
    for cm in expand(COMP, params):
        for alias in cm.spec.names("diffusers"):
            name = alias.template.format(i=cm.index) if cm.index is not None else alias.template
            rows = cm.out if alias.rows is None else evaluate(alias.rows[1], params)
            predicted[name + ".weight"] = (rows, cm.inp)
    for p in COMP.params:
        for i in range(params[p.repeat]) if p.repeat else [None]:
            predicted[p.aliases["diffusers"].format(i=i)] = (params["D"],)
    assert predicted == {n: tuple(t.shape) for n, t in model.state_dict().items()}    # no bias anywhere


# ---------------------------------------------------------------------------------------------
# (a) diffusers-saved LoRA -> lorakit
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(CONFIGS))
def test_read_diffusers_saved_lora(tmp_path, variant: str) -> None:
    model = tiny_transformer(variant)
    params = CONFIGS[variant][1]
    targets = linear_names(model)
    config = LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False,
                        rank_pattern={"single_transformer_blocks.1.attn.to_qkv_mlp_proj": 2,
                                      "transformer_blocks.0.attn.to_k": 3},
                        alpha_pattern={"transformer_blocks.0.attn.to_q": 2, "norm_out.linear": 12,
                                       "single_transformer_blocks.1.attn.to_qkv_mlp_proj": 5})
    model.add_adapter(config, adapter_name="default")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, BaseTunerLayer) and "default" in getattr(m, "lora_B", {}):
                m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=gen) * 0.1)
    sd = get_peft_model_state_dict(model, adapter_name="default")
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    Flux2Pipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=sd, transformer_lora_adapter_metadata=meta)
    path = tmp_path / "pytorch_lora_weights.safetensors"

    lk = read_lora(path)
    assert lk.format == "diffusers" and lk.unknown_keys == [] and lk.arch.name == "flux2"
    deltas = dense_deltas(lk)
    checked = 0
    for name, m in model.named_modules():
        if not (isinstance(m, BaseTunerLayer) and "default" in getattr(m, "lora_A", {})):
            continue
        want = m.get_delta_weight("default").detach().float()
        native, rows, swap = to_native(name, params)
        got = native_rows(deltas[Target("transformer", native)], rows, swap)
        assert got.shape == want.shape, name
        assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max()), name
        checked += 1
    assert checked == len(targets)


# ---------------------------------------------------------------------------------------------
# (b) lorakit --to diffusers -> diffusers load + fuse == lorakit bake
# ---------------------------------------------------------------------------------------------

def _kohya_file(path, params: dict) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for n, cm in enumerate(expand(COMP, params)):
        stem = "lora_unet_" + cm.name.replace(".", "_")
        tensors[stem + ".lora_down.weight"] = torch.randn(4, cm.inp, generator=gen) / cm.inp ** 0.5
        tensors[stem + ".lora_up.weight"] = torch.randn(cm.out, 4, generator=gen) * 0.1
        tensors[stem + ".alpha"] = torch.tensor((2.0, 3.0, 8.0)[n % 3])   # scales 0.5, 0.75, 2
    assert "lora_unet_final_layer_adaLN_modulation_1.alpha" in tensors
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora_flux_2"})


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_lorakit_diffusers_output_loads_and_fuses_to_bake(tmp_path, caplog, variant: str) -> None:
    from safetensors.torch import load_file, save_file

    params = CONFIGS[variant][1]
    src, out = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    _kohya_file(src, params)
    assert main(["convert", str(src), "-o", str(out), "--to", "diffusers"]) == 0
    state = load_file(str(out))
    file_modules = {k.split(".lora_")[0][len("transformer."):] for k in state}

    model = tiny_transformer(variant, seed=1)
    base_path = tmp_path / "base.safetensors"
    save_file({n: p.detach().contiguous() for n, p in model.state_dict().items()}, str(base_path))
    baked_path = tmp_path / "baked.safetensors"
    assert main(["bake", str(base_path), str(src), "-o", str(baked_path)]) == 0
    baked = load_file(str(baked_path))

    dlogging.enable_propagation()
    try:
        caplog.set_level(logging.INFO)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sd, meta = Flux2Pipeline.lora_state_dict(str(out), return_lora_metadata=True)
            assert set(sd) == set(state)                    # diffusers' FLUX.2 converters leave it as it is
            model.load_lora_adapter(sd, prefix="transformer", adapter_name="lk", metadata=meta)
    finally:
        dlogging.disable_propagation()
    bad = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    bad += [str(w.message) for w in caught if "lora" in str(w.message).lower() or "key" in str(w.message).lower()]
    assert bad == []
    injected = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and "lk" in m.lora_A}
    assert injected == file_modules == set(linear_names(tiny_transformer(variant)))
    model.fuse_lora(lora_scale=1.0, adapter_names=["lk"])
    model.unload_lora()
    fused = model.state_dict()
    assert set(fused) == set(baked)
    deltas = dense_deltas(read_lora(src))
    for key, value in fused.items():
        assert float((value - baked[key]).abs().max()) <= 1e-6 * max(1.0, float(value.abs().max())), key
        name = key[: -len(".weight")]
        if name in injected:     # and the change is the LoRA's own ΔW at that module's rows
            native, rows, swap = to_native(name, params)
            want = native_rows(deltas[Target("transformer", native)], rows, swap)
            got = baked[key] - load_file(str(base_path))[key]
            assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), key


# ---------------------------------------------------------------------------------------------
# (c) diffusers' own FLUX.2 converters as oracles for the BFL spellings
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["aitoolkit", "comfy_lokr_fused", "fal"])
def test_diffusers_converted_bfl_file_reads_the_same_but_for_the_final_layer(tmp_path, style: str) -> None:
    """``Flux2Pipeline.lora_state_dict`` renames a BFL-named file (LoRA: split q/k/v; LoKr: fused ``to_qkv`` /
    ``to_added_qkv``, α baked into ``lokr_w1``; fal's ``base_model.model.``) to diffusers names. lorakit reads the
    converted file as the same ΔW everywhere except ``final_layer.adaLN_modulation.1``: diffusers 0.42.1's LoRA
    converters map it to ``norm_out.linear`` without the [shift; scale] -> [scale; shift] swap its checkpoint
    converter does, so diffusers applies those rows exchanged (the FLUX.2 portability note)."""
    from safetensors.torch import save_file

    from test_flux2_formats import write_lora

    src = tmp_path / "bfl.safetensors"
    want = write_lora(src, "dev", style)
    converted = Flux2Pipeline.lora_state_dict(str(src))
    assert all(k.startswith("transformer.") for k in converted)
    if style == "comfy_lokr_fused":
        assert any(".attn.to_qkv.lokr_" in k for k in converted) and any(".to_added_qkv." in k for k in converted)
    out = tmp_path / "converted.safetensors"
    save_file({k: v.contiguous() for k, v in converted.items()}, str(out))
    model = read_lora(out)
    assert model.format == "diffusers" and model.unknown_keys == []
    got = dense_deltas(model)
    assert {t.module for t in got} == set(want)
    for name, w in want.items():
        d = got[Target("transformer", name)]
        if name == "final_layer.adaLN_modulation.1":
            h = w.shape[0] // 2
            w = torch.cat([w[h:], w[:h]])      # what diffusers' unswapped mapping means for the BFL rows
        assert float((d - w).abs().max()) <= 1e-6 * float(w.abs().max()), name


def test_diffusers_kohya_converter_drops_what_the_portability_note_says(tmp_path, caplog) -> None:
    from safetensors.torch import save_file

    from test_flux2_formats import write_lora

    src = tmp_path / "kohya.safetensors"
    want = write_lora(src, "dev", "kohya")
    dlogging.enable_propagation()
    try:
        caplog.set_level(logging.WARNING)
        converted = Flux2Pipeline.lora_state_dict(str(src))
    finally:
        dlogging.disable_propagation()
    assert any("Unsupported keys" in r.getMessage() for r in caplog.records)
    out = tmp_path / "converted.safetensors"
    save_file({k: v.clone().contiguous() for k, v in converted.items()}, str(out))   # A is shared by q, k, v
    got = dense_deltas(read_lora(out))
    dropped = set(want) - {t.module for t in got}
    assert dropped == {"double_stream_modulation_img.lin", "double_stream_modulation_txt.lin",
                       "single_stream_modulation.lin", "guidance_in.in_layer", "guidance_in.out_layer",
                       "final_layer.adaLN_modulation.1"}
    note = next(n for n in FLUX2.portability if n.format == "kohya")     # doctor's note names these groups
    spec_groups = {s.native: s.group for s in COMP.modules}
    assert {spec_groups[m] for m in dropped} - {"embedders"} <= set(note.groups)
    for t, d in got.items():
        w = want[t.module]
        assert float((d - w).abs().max()) <= 1e-6 * float(w.abs().max()), t.module


def test_diffusers_loads_nothing_of_a_comfy_spelled_file(tmp_path, caplog) -> None:
    """lorakit's ``--to comfy`` (ComfyUI's ``diffusion_model.`` + lora_down/lora_up) is for ComfyUI: diffusers'
    FLUX.2 loader routes it to its kohya converter and keeps no key, which the comfy portability note says."""
    from test_flux2_formats import write_lora

    src, comfy = tmp_path / "k.safetensors", tmp_path / "comfy.safetensors"
    write_lora(src, "klein", "kohya")
    assert main(["convert", str(src), "--to", "comfy", "-o", str(comfy)]) == 0
    assert Flux2Pipeline.lora_state_dict(str(comfy)) == {}
    assert any("lora_down" in n.note and n.layout == "diffusers" for n in FLUX2.portability if n.format == "comfy")
