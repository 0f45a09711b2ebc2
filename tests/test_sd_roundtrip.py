"""SD1.5 and SDXL LoRAs (conv layers, fused OpenCLIP attention, transposed-storage text projection) read from
every producer spelling and written to every writable format, with dense deltas checked against values the
test computes itself from the factors it wrote (never from lorakit)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

from lorakit.formats import emit, read_lora
from lorakit.lora.model import dense_deltas

RANK = 4


@dataclass(frozen=True)
class Mod:
    """One LoRA module as the test spells it: component, diffusers/HF name, single-file (native) name, the
    native weight it lands in (and its rows), ΔW shape."""

    component: str
    diffusers: str
    native: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None       # row window of the native (fused) weight


SD1_MODULES = (
    Mod("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q", (320, 320)),
    Mod("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k", (320, 768)),
    Mod("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0", (320, 320)),
    Mod("unet", "down_blocks.0.attentions.0.proj_in", "input_blocks.1.1.proj_in", (320, 320, 1, 1)),
    Mod("unet", "down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2", (320, 320, 3, 3)),
    Mod("unet", "up_blocks.1.resnets.0.conv_shortcut", "output_blocks.3.0.skip_connection", (1280, 2560, 1, 1)),
    Mod("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
        "middle_block.1.transformer_blocks.0.ff.net.2", (1280, 5120)),
    Mod("clip_l", "text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.q_proj",
        (768, 768)),
)
SDXL_MODULES = (
    Mod("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
        "input_blocks.4.1.transformer_blocks.1.attn1.to_q", (640, 640)),
    Mod("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
        "input_blocks.4.1.transformer_blocks.0.attn2.to_v", (640, 2048)),
    Mod("unet", "down_blocks.1.attentions.0.proj_in", "input_blocks.4.1.proj_in", (640, 640)),
    Mod("unet", "down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2", (320, 320, 3, 3)),
    Mod("unet", "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv", (640, 640, 3, 3)),
    Mod("clip_l", "text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.q_proj",
        (768, 768)),
    # OpenCLIP-G: HF q/v projections are row windows of the fused in_proj (3 × 1280 rows)
    Mod("clip_g", "text_model.encoder.layers.0.self_attn.q_proj", "transformer.resblocks.0.attn", (1280, 1280),
        rows=(0, 1280)),
    Mod("clip_g", "text_model.encoder.layers.0.self_attn.v_proj", "transformer.resblocks.0.attn", (1280, 1280),
        rows=(2560, 3840)),
    Mod("clip_g", "text_projection", "text_projection", (1280, 1280)),
)
ARCHS = {"sd1": SD1_MODULES, "sdxl": SDXL_MODULES}

# kohya: SD1 UNets in diffusers names (sd-scripts original_unet.py), SDXL UNets in SGM names
KOHYA_TE = {"sd1": {"clip_l": "lora_te_"}, "sdxl": {"clip_l": "lora_te1_", "clip_g": "lora_te2_"}}
COMFY_TE = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer."}
DIFFUSERS_TE = {"sd1": {"clip_l": "text_encoder."}, "sdxl": {"clip_l": "text_encoder.", "clip_g": "text_encoder_2."}}
OLD_PROCESSOR = {"attn1.to_q": "attn1.processor.to_q_lora", "attn2.to_k": "attn2.processor.to_k_lora",
                 "attn1.to_out.0": "attn1.processor.to_out_lora", "attn2.to_v": "attn2.processor.to_v_lora"}


def factors(mod: Mod, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out, rest = mod.shape[0], mod.shape[1:]
    if len(rest) == 3:       # a convolution: down (r, in, k, k), up (out, r, 1, 1)
        return torch.randn(RANK, *rest, generator=g), torch.randn(out, RANK, 1, 1, generator=g)
    return torch.randn(RANK, *rest, generator=g), torch.randn(out, RANK, generator=g)


def flat(name: str) -> str:
    return name.replace(".", "_")


def spelled(arch: str, fmt: str, mod: Mod) -> tuple[str, str, str, bool] | None:
    """(module key stem, down suffix, up suffix, carries alpha) of ``mod`` in producer format ``fmt``."""
    kohya = ("lora_down.weight", "lora_up.weight", True)
    peft = ("lora_A.weight", "lora_B.weight", False)
    unet = mod.component == "unet"
    if fmt == "kohya":
        stem = ("lora_unet_" + flat(mod.native if arch == "sdxl" else mod.diffusers)) if unet else \
            KOHYA_TE[arch][mod.component] + flat(mod.diffusers)
        return (stem, *kohya)
    if fmt == "onetrainer_legacy":   # OneTrainer LEGACY_LORA: diffusers names under kohya prefixes
        stem = ("lora_unet_" + flat(mod.diffusers)) if unet else KOHYA_TE[arch][mod.component] + flat(mod.diffusers)
        return (stem, *kohya)
    if fmt == "comfy":
        stem = ("diffusion_model." + mod.native) if unet else COMFY_TE[mod.component] + mod.diffusers
        return (stem, *kohya)
    if fmt == "diffusers":
        return (("unet." + mod.diffusers) if unet else DIFFUSERS_TE[arch][mod.component] + mod.diffusers, *peft)
    if fmt == "diffusers_old":
        for tail, old in OLD_PROCESSOR.items():
            if unet and mod.diffusers.endswith(tail):
                return ("unet." + mod.diffusers[: -len(tail)] + old, "down.weight", "up.weight", False)
        stem = ("unet." + mod.diffusers) if unet else DIFFUSERS_TE[arch][mod.component] + mod.diffusers
        return (stem, "lora.down.weight", "lora.up.weight", False)
    if fmt == "peft":
        return ("base_model.model." + mod.diffusers, *peft) if unet else None
    if fmt == "lycoris":
        return ("lycoris_" + flat(mod.diffusers), *kohya) if unet else None
    if fmt == "bfl":        # OneTrainer ORIGINAL: bare single-file names, lora_A/lora_B + alpha
        return (mod.native, "lora_A.weight", "lora_B.weight", True) if unet else None
    if fmt == "diffsynth":
        return (mod.diffusers, *peft) if unet else None
    raise AssertionError(fmt)


READ_FORMATS = ("kohya", "onetrainer_legacy", "comfy", "diffusers", "diffusers_old", "peft", "lycoris", "bfl",
                "diffsynth")
EXPECTED_FORMAT = {"onetrainer_legacy": "kohya"}


def write_lora(path, arch: str, fmt: str) -> dict[tuple[str, str, tuple[int, int] | None], torch.Tensor]:
    """Write the architecture's modules in ``fmt``; return the expected ΔW per (component, native, rows)."""
    tensors: dict[str, torch.Tensor] = {}
    expected = {}
    for i, mod in enumerate(ARCHS[arch]):
        spell = spelled(arch, fmt, mod)
        if spell is None:
            continue
        stem, dn, up_name, has_alpha = spell
        down, up = factors(mod, seed=10 * i + len(fmt))
        alpha = float(RANK) / 2 + i          # a different alpha per module (≠ rank)
        tensors[f"{stem}.{dn}"] = down
        tensors[f"{stem}.{up_name}"] = up
        scale = alpha / RANK if has_alpha else 1.0
        if has_alpha:
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
        expected[(mod.component, mod.native, mod.rows)] = (up.flatten(1).double() @ down.flatten(1).double() * scale) \
            .reshape(mod.shape)
    save_file(tensors, str(path))
    return expected


def native_deltas(model) -> dict[tuple[str, str, tuple[int, int] | None], torch.Tensor]:
    """ΔW per (component, native, rows) from a read model: the rows of the fused weight each expected window covers."""
    dense = dense_deltas(model)
    return {(t.component, t.module): d for t, d in dense.items()}


def check(model, arch: str, expected) -> None:
    dense = native_deltas(model)
    assert model.arch.name == arch
    assert not model.unknown_keys
    for (comp, native, rows), want in expected.items():
        got = dense[(comp, native)]
        if rows is not None:
            got = got[rows[0]:rows[1]]
        assert got.shape == want.shape, (comp, native)
        err = float((got.double() - want).abs().max()) / max(1e-12, float(want.abs().max()))
        assert err <= 1e-6, (comp, native, err)
    touched = {(c, n) for c, n, _ in expected}
    assert set(dense) == touched


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("fmt", READ_FORMATS)
def test_read_every_spelling(tmp_path, arch: str, fmt: str) -> None:
    path = tmp_path / f"{arch}-{fmt}.safetensors"
    expected = write_lora(path, arch, fmt)
    model = read_lora(path)
    assert model.format == EXPECTED_FORMAT.get(fmt, fmt)
    check(model, arch, expected)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("src", ("kohya", "comfy", "diffusers", "diffusers_old"))
@pytest.mark.parametrize("dst", ("kohya", "comfy", "diffusers"))
def test_every_read_format_to_every_write_format(tmp_path, arch: str, src: str, dst: str) -> None:
    path = tmp_path / "in.safetensors"
    expected = write_lora(path, arch, src)
    model = read_lora(path)
    result = emit(model, dst)
    out = tmp_path / "out.safetensors"
    save_file({k: v.contiguous() for k, v in result.tensors.items()}, str(out))
    again = read_lora(out)
    assert again.format == dst
    check(again, arch, expected)


def test_written_spellings_are_the_producers(tmp_path) -> None:
    """What lorakit writes is what each consumer reads: kohya SDXL in SGM names with lora_te1_/lora_te2_, kohya
    SD1 in diffusers names with lora_te_, diffusers with unet./text_encoder_2. and HF q/v projections (split out
    of OpenCLIP's fused in_proj), comfy under diffusion_model. and text_encoders.clip_g.transformer."""
    names = {}
    for arch in ARCHS:
        path = tmp_path / f"{arch}.safetensors"
        write_lora(path, arch, "kohya")
        model = read_lora(path)
        for fmt in ("kohya", "comfy", "diffusers"):
            names[(arch, fmt)] = set(emit(model, fmt).tensors)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight" in names[("sdxl", "kohya")]
    assert "lora_te2_text_model_encoder_layers_0_self_attn_v_proj.lora_up.weight" in names[("sdxl", "kohya")]
    assert "lora_te2_text_projection.alpha" in names[("sdxl", "kohya")]
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in names[("sd1", "kohya")]
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in names[("sd1", "kohya")]
    assert "unet.down_blocks.1.attentions.0.proj_in.lora_A.weight" in names[("sdxl", "diffusers")]
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in names[("sdxl", "diffusers")]
    assert "diffusion_model.output_blocks.5.2.conv.lora_up.weight" in names[("sdxl", "comfy")]
    assert ("text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.v_proj.lora_down.weight"
            in names[("sdxl", "comfy")])
    assert not any("k_proj" in n for n in names[("sdxl", "kohya")])    # no part the LoRA did not have


def test_conv_factor_shapes_survive(tmp_path) -> None:
    """A 3×3 LoCon keeps its 4-D down (r, in, 3, 3) and 1×1 up in kohya and diffusers output."""
    path = tmp_path / "sd1.safetensors"
    write_lora(path, "sd1", "kohya")
    model = read_lora(path)
    kohya = emit(model, "kohya").tensors
    assert tuple(kohya["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape) == (RANK, 320, 3, 3)
    assert tuple(kohya["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape) == (320, RANK, 1, 1)
    diff = emit(model, "diffusers").tensors
    assert tuple(diff["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"].shape) == (RANK, 320, 1, 1)
    assert math.isclose(float(kohya["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]), RANK / 2 + 4)


def test_sdxl_lora_with_sd1_cross_attention_width_is_not_sd1(tmp_path) -> None:
    """Names shared by SD1.5 and SDXL (down_blocks.1.attentions.0.transformer_blocks.0): the cross-attention
    input width (2048 vs 768) decides."""
    t = {}
    for stem, (o, i) in (("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", (640, 2048)),
                         ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (640, 640))):
        t[stem + ".lora_A.weight"] = torch.zeros(2, i)
        t[stem + ".lora_B.weight"] = torch.ones(o, 2)
    save_file(t, str(tmp_path / "x.safetensors"))
    assert read_lora(tmp_path / "x.safetensors").arch.name == "sdxl"
    t["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"] = torch.zeros(2, 768)
    save_file(t, str(tmp_path / "y.safetensors"))
    assert read_lora(tmp_path / "y.safetensors").arch.name == "sd1"
