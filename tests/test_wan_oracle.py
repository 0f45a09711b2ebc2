"""Differential tests against diffusers 0.42.1 / PEFT 0.21.2 on a tiny ``WanTransformer3DModel`` (and a Wan 2.2-style
``WanPipeline`` with two of them).

(a) a LoRA saved by ``WanPipeline.save_lora_weights`` (Linear layers and the Conv3d ``patch_embedding``) is read by
    lorakit with the deltas PEFT merges; (b) lorakit's ``--to diffusers`` output of a combined Wan 2.2 expert pair
    (``--split-experts``) loads with ``load_lora_weights`` (the low-noise file with ``load_into_transformer_2=True``)
    with no key left over, and ``fuse_lora`` gives exactly what ``lorakit bake`` writes for the pair.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.cli import main
from lorakit.formats import read_lora
from lorakit.lora.model import Target, dense_deltas

pytestmark = pytest.mark.oracle

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from diffusers import WanPipeline, WanTransformer3DModel  # noqa: E402
from diffusers.utils import logging as dlogging  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
              text_dim=24, freq_dim=8, ffn_dim=64, num_layers=2, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", rope_max_seq_len=32)

# diffusers -> original Wan module names (shapes/README.md "Native layouts"), written out here
_RENAMES = [(r"^condition_embedder\.time_embedder\.linear_1$", "time_embedding.0"),
            (r"^condition_embedder\.time_embedder\.linear_2$", "time_embedding.2"),
            (r"^condition_embedder\.time_proj$", "time_projection.1"),
            (r"^condition_embedder\.text_embedder\.linear_1$", "text_embedding.0"),
            (r"^condition_embedder\.text_embedder\.linear_2$", "text_embedding.2"),
            (r"^proj_out$", "head.head"), (r"^patch_embedding$", "patch_embedding"),
            (r"^blocks\.(\d+)\.attn1\.to_(q|k|v)$", r"blocks.\1.self_attn.\2"),
            (r"^blocks\.(\d+)\.attn1\.to_out\.0$", r"blocks.\1.self_attn.o"),
            (r"^blocks\.(\d+)\.attn2\.to_(q|k|v)$", r"blocks.\1.cross_attn.\2"),
            (r"^blocks\.(\d+)\.attn2\.to_out\.0$", r"blocks.\1.cross_attn.o"),
            (r"^blocks\.(\d+)\.ffn\.net\.0\.proj$", r"blocks.\1.ffn.0"),
            (r"^blocks\.(\d+)\.ffn\.net\.2$", r"blocks.\1.ffn.2")]


def native(name: str) -> str:
    for pat, repl in _RENAMES:
        if re.match(pat, name):
            return re.sub(pat, repl, name)
    raise AssertionError(name)


def tiny(seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**CONFIG).eval()


def weight_modules(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d))]


def test_read_diffusers_saved_wan_lora(tmp_path) -> None:
    model = tiny(0)
    targets = weight_modules(model)
    assert "patch_embedding" in targets
    config = LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False,
                        rank_pattern={"blocks.1.ffn.net.2": 2}, alpha_pattern={"proj_out": 12})
    model.add_adapter(config, adapter_name="default")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _n, m in model.named_modules():
            if isinstance(m, BaseTunerLayer) and "default" in getattr(m, "lora_B", {}):
                w = m.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=gen) * 0.1)
    sd = get_peft_model_state_dict(model, adapter_name="default")
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    WanPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=sd, transformer_lora_adapter_metadata=meta)
    lk = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert lk.arch.name == "wan" and lk.format == "diffusers" and lk.unknown_keys == []
    deltas = dense_deltas(lk)
    checked = 0
    for name, m in model.named_modules():
        if not (isinstance(m, BaseTunerLayer) and "default" in getattr(m, "lora_A", {})):
            continue
        want = m.get_delta_weight("default").detach().float()
        got = deltas[Target("transformer", native(name))]
        assert got.shape == want.shape, name
        assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max()), name
        checked += 1
    assert checked == len(targets)


def _combined_native(path) -> None:
    """An AI-Toolkit combined Wan 2.2 file (Wan names, lora_A/lora_B) on every Linear and the Conv3d of both experts,
    with kohya-style alphas on some modules (scales 0.5 / 1 / 2)."""
    gen = torch.Generator().manual_seed(7)
    t: dict[str, torch.Tensor] = {}
    shapes = {n: tuple(p.shape) for n, p in tiny(0).state_dict().items()}
    for expert in ("transformer_1", "transformer_2"):
        for k, (name, shape) in enumerate((n[: -len(".weight")], s) for n, s in shapes.items()
                                          if n.endswith(".weight") and len(s) in (2, 5)):
            stem = f"diffusion_model.{expert}.{native(name)}"
            r = 2
            t[stem + ".lora_A.weight"] = torch.randn(r, *shape[1:], generator=gen) / shape[1] ** 0.5
            t[stem + ".lora_B.weight"] = torch.randn(shape[0], r, *([1] * (len(shape) - 2)), generator=gen) * 0.1
    save_file(t, str(path))


def test_lorakit_diffusers_pair_loads_into_both_transformers_and_fuses_to_bake(tmp_path, caplog) -> None:
    src = tmp_path / "combined.safetensors"
    _combined_native(src)
    assert main(["convert", str(src), "-o", str(tmp_path / "lk.safetensors"), "--to", "diffusers",
                 "--split-experts"]) == 0
    high, low = tmp_path / "lk_high_noise.safetensors", tmp_path / "lk_low_noise.safetensors"

    t1, t2 = tiny(1), tiny(2)
    bases = {}
    for name, m in (("high_noise_model", t1), ("low_noise_model", t2)):
        bases[name] = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(bases[name]))
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=t1, transformer_2=t2)
    dlogging.enable_propagation()
    try:
        caplog.set_level(logging.INFO)
        pipe.load_lora_weights(str(high), adapter_name="lk")
        pipe.load_lora_weights(str(low), adapter_name="lk", load_into_transformer_2=True)
    finally:
        dlogging.disable_propagation()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    for model, path in ((t1, high), (t2, low)):
        file_keys = {k[len("transformer."):] for k in load_file(str(path))}
        loaded = set(get_peft_model_state_dict(model, adapter_name="lk"))
        assert loaded == file_keys                        # no key left over, none missing
        injected = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and "lk" in m.lora_A}
        assert injected == set(weight_modules(tiny(0)))

    pipe.fuse_lora(components=["transformer", "transformer_2"], lora_scale=1.0, adapter_names=["lk"])
    out_h, out_l = tmp_path / "high_baked.safetensors", tmp_path / "low_baked.safetensors"
    assert main(["bake", str(bases["high_noise_model"]), str(src), "-o", str(out_h),
                 "--low-noise", str(bases["low_noise_model"]), "--low-noise-out", str(out_l)]) == 0
    for model, baked in ((t1, out_h), (t2, out_l)):
        fused = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
        mine = load_file(str(baked))
        assert set(fused) == set(mine)
        for k, v in mine.items():
            assert float((fused[k].float() - v.float()).abs().max()) <= 1e-6, k
