"""Differential tests against diffusers 0.42.1 / PEFT 0.21.2 on tiny QwenImageTransformer2DModel and
ZImageTransformer2DModel configs.

(a) a LoRA saved by diffusers' own ``QwenImagePipeline`` / ``ZImagePipeline.save_lora_weights`` (PEFT factors,
    α from the saved adapter metadata) is read by lorakit, and lorakit's bake into the model's own state dict
    equals PEFT's merged weights; (b) lorakit's ``--to diffusers`` output of a musubi / ComfyUI LoRA loads with
    ``load_lora_weights`` with no key left over, and diffusers' ``fuse_lora`` gives lorakit's bake.
The diffusers ⇄ native name map of Z-Image is typed out here (README of the reference shapes), not taken from
lorakit's layout.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.cli import main
from lorakit.formats import read_lora

pytestmark = pytest.mark.oracle

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from diffusers import (QwenImagePipeline, QwenImageTransformer2DModel, ZImagePipeline,  # noqa: E402
                       ZImageTransformer2DModel)
from diffusers.utils import logging as dlogging  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

H = 32


def tiny_qwen(seed: int = 0) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                       axes_dims_rope=(4, 6, 6)).eval()


def tiny_zimage(seed: int = 0) -> ZImageTransformer2DModel:
    torch.manual_seed(seed)
    return ZImageTransformer2DModel(in_channels=4, dim=H, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                    cap_feat_dim=20, axes_dims=[8, 4, 4], axes_lens=[64, 32, 32]).eval()


FAMILIES = {"qwen-image": (tiny_qwen, QwenImagePipeline), "z-image": (tiny_zimage, ZImagePipeline)}


def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _base_file(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return state


def _bake(base: Path, lora: Path, out: Path) -> dict[str, torch.Tensor]:
    assert main(["bake", str(base), str(lora), "-o", str(out), "--no-progress"]) == 0
    return load_file(str(out))


# ---------------------------------------------------------------------------------------------
# (a) diffusers-saved LoRA -> lorakit read + bake == PEFT merge
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_diffusers_saved_lora_bakes_to_peft_merge(tmp_path, family: str) -> None:
    make, pipeline = FAMILIES[family]
    model = make()
    base = _base_file(model, tmp_path / "base.safetensors")
    targets = linear_names(model)
    first, second = targets[3], targets[-2]
    config = LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False,
                        rank_pattern={first: 2}, alpha_pattern={first: 5, second: 12})
    model.add_adapter(config, adapter_name="default")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BaseTunerLayer) and "default" in getattr(m, "lora_B", {}):
                m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=gen) * 0.1)
    sd = get_peft_model_state_dict(model, adapter_name="default")
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    pipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=sd, transformer_lora_adapter_metadata=meta)
    path = tmp_path / "pytorch_lora_weights.safetensors"

    lk = read_lora(path, allow_partial=False)
    assert (lk.format, lk.arch.spec.name) == ("diffusers", family)
    baked = _bake(tmp_path / "base.safetensors", path, tmp_path / "baked.safetensors")
    assert set(baked) == set(base)

    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge(adapter_names=["default"])
    merged = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert set(merged) == set(base)
    changed = 0
    for k, want in merged.items():
        got = baked[k].float()
        tol = 1e-6 * max(1.0, float(want.abs().max()))
        assert float((got - want.float()).abs().max()) <= tol, k
        changed += not torch.equal(want, base[k])
    assert changed == len(targets)      # every Linear weight moved (biases do not)


# ---------------------------------------------------------------------------------------------
# (b) lorakit --to diffusers -> load_lora_weights + fuse_lora == lorakit bake
# ---------------------------------------------------------------------------------------------

def _factors(out: int, inp: int, gen: torch.Generator, r: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(r, inp, generator=gen) / inp ** 0.5, torch.randn(out, r, generator=gen) * 0.1


def musubi_qwen_file(model: torch.nn.Module, path: Path) -> None:
    """musubi-tuner spelling: every Linear, ``lora_unet_`` + the diffusers name flattened, ``.alpha``."""
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for n, (name, m) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)):
        stem = "lora_unet_" + name.replace(".", "_")
        tensors[stem + ".lora_down.weight"], tensors[stem + ".lora_up.weight"] = _factors(*m.weight.shape, gen)
        tensors[stem + ".alpha"] = torch.tensor((2.0, 3.0, 8.0)[n % 3])
    assert "lora_unet_transformer_blocks_1_txt_mlp_net_0_proj.lora_down.weight" in tensors
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora_qwen_image"})


# ComfyUI NextDiT name -> diffusers names (fused rows split in order), from the reference shapes README
def _comfy_zimage(model: torch.nn.Module) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in linear_names(model):
        if name.endswith((".attention.to_k", ".attention.to_v")):
            continue
        if name.endswith(".attention.to_q"):
            block = name[: -len(".attention.to_q")]
            out[block + ".attention.qkv"] = [block + ".attention." + s for s in ("to_q", "to_k", "to_v")]
        elif name.endswith(".attention.to_out.0"):
            out[name[: -len(".to_out.0")] + ".out"] = [name]
        elif name.startswith("all_x_embedder.2-1"):
            out["x_embedder"] = [name]
        elif name.startswith("all_final_layer.2-1."):
            out["final_layer." + name[len("all_final_layer.2-1."):]] = [name]
        else:
            out[name] = [name]
    return out


def comfy_zimage_file(model: torch.nn.Module, path: Path) -> None:
    """ComfyUI spelling: ``diffusion_model.`` + NextDiT names, fused ``attention.qkv`` with one LoRA."""
    gen = torch.Generator().manual_seed(8)
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    tensors = {}
    for n, (native, parts) in enumerate(_comfy_zimage(model).items()):
        out = sum(shapes[p][0] for p in parts)
        stem = "diffusion_model." + native
        tensors[stem + ".lora_down.weight"], tensors[stem + ".lora_up.weight"] = _factors(out, shapes[parts[0]][1], gen)
        tensors[stem + ".alpha"] = torch.tensor((2.0, 3.0, 8.0)[n % 3])
    assert "diffusion_model.layers.1.attention.qkv.lora_up.weight" in tensors
    save_file(tensors, str(path))


WRITERS = {"qwen-image": musubi_qwen_file, "z-image": comfy_zimage_file}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lorakit_diffusers_output_loads_and_fuses_to_bake(tmp_path, caplog, family: str) -> None:
    make, pipeline_cls = FAMILIES[family]
    model = make(seed=1)
    base = _base_file(model, tmp_path / "base.safetensors")
    src, out = tmp_path / "src.safetensors", tmp_path / "diffusers.safetensors"
    WRITERS[family](model, src)
    assert read_lora(src, allow_partial=False).arch.spec.name == family
    assert main(["convert", str(src), "-o", str(out), "--to", "diffusers"]) == 0
    baked = _bake(tmp_path / "base.safetensors", src, tmp_path / "baked.safetensors")

    state = load_file(str(out))
    file_modules = {k.split(".lora_")[0][len("transformer."):] for k in state}
    pipe = pipeline_cls(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=model)
    dlogging.enable_propagation()
    try:
        caplog.set_level(logging.INFO)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sd = pipeline_cls.lora_state_dict(str(out))
            assert set(sd) == set(state)          # the pipeline's reader converts nothing away
            pipe.load_lora_weights(str(out), adapter_name="lk")
    finally:
        dlogging.disable_propagation()
    bad = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    bad += [str(w.message) for w in caught if "lora" in str(w.message).lower() or "key" in str(w.message).lower()]
    assert bad == []
    injected = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and "lk" in m.lora_A}
    assert injected == file_modules == set(linear_names(make()))

    pipe.fuse_lora(lora_scale=1.0, adapter_names=["lk"])
    fused = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert set(fused) == set(base) == set(baked)
    for k, want in baked.items():
        got = fused[k].float()
        assert float((got - want.float()).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max())), k
    assert sum(not torch.equal(baked[k], base[k]) for k in base) == len(injected)
    # and both are the source file's deltas, placed by the hand-typed name map
    expected = HAND_DELTAS[family](load_file(str(src)), make())
    assert set(expected) == injected
    for name, want in expected.items():
        got = fused[name + ".weight"].float() - base[name + ".weight"].float()
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), name


def _delta(t: dict[str, torch.Tensor], stem: str) -> torch.Tensor:
    down, up = t[stem + ".lora_down.weight"].float(), t[stem + ".lora_up.weight"].float()
    return up @ down * (float(t[stem + ".alpha"]) / down.shape[0])


def _qwen_deltas(t: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: _delta(t, "lora_unet_" + name.replace(".", "_")) for name in linear_names(model)}


def _zimage_deltas(t: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for native, parts in _comfy_zimage(model).items():
        full = _delta(t, "diffusion_model." + native)
        for k, name in enumerate(parts):
            out[name] = full[k * full.shape[0] // len(parts):(k + 1) * full.shape[0] // len(parts)]
    return out


HAND_DELTAS = {"qwen-image": _qwen_deltas, "z-image": _zimage_deltas}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_synthetic_sizes_are_the_tiny_diffusers_models(family: str) -> None:
    """The synthetic generators' tiny sizes describe exactly the tiny diffusers configs used here."""
    from lorakit.layouts import resolve
    from lorakit.samples.synthetic import TINY_QWEN, TINY_ZIMAGE, base_tensors

    sizes = {"qwen-image": TINY_QWEN, "z-image": TINY_ZIMAGE}[family]
    predicted = {t.name: tuple(t.shape) for t in base_tensors(sizes, "diffusers", resolve(family))}
    model = FAMILIES[family][0]()
    assert predicted == {k: tuple(v.shape) for k, v in model.state_dict().items()}
