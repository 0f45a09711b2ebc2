"""Differential tests against diffusers 0.42.1 / PEFT on tiny SD1.5- and SDXL-shaped models (offline).

1. lorakit's SD1/SDXL layouts name exactly the Linear/Conv2d modules of diffusers' ``UNet2DConditionModel``
   (SD1.5 and SDXL structure, tiny widths) and of transformers' ``CLIPTextModel(WithProjection)``.
2. A hand-written LoRA (per-module alphas, attention, proj_in/proj_out, 3×3 LoCon, time/label embeddings,
   CLIP q_proj/fc1, OpenCLIP text_projection) converted by ``lorakit convert --to kohya`` loads through
   ``StableDiffusion(XL)Pipeline.load_lora_weights``; after ``fuse_lora()`` every weight is ``W + ΔW`` with ΔW
   computed by the test from the factors it wrote, and equal to lorakit's ``dense_deltas`` mapped through the
   layout; every other weight is unchanged.
3. A PEFT SDXL UNet adapter with conv targets and rank/alpha patterns, saved by
   ``StableDiffusionXLPipeline.save_lora_weights`` with its adapter metadata, read by lorakit, gives PEFT's own
   ``merge_and_unload()`` weights.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.cli import main
from lorakit.formats import read_lora
from lorakit.layouts import evaluate, expand, resolve
from lorakit.lora.model import Target, dense_deltas

pytestmark = pytest.mark.oracle

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,  # noqa: E402
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.utils import convert_state_dict_to_diffusers  # noqa: E402
from diffusers.utils import logging as dlogging  # noqa: E402
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

C = 8                       # model channels of the tiny UNets (real: 320)
RANK = 4
CLIP_L = {"D": 768, "FF": 32, "layers": 2}      # CLIP-L width is what tells SD1's encoder from SD2's: kept real
CLIP_G = {"D": 32, "FF": 40, "layers": 2}       # bigG's sizes are free in lorakit: tiny
# lorakit size parameters of the tiny models (context widths and SDXL's ADM input as in the real models)
PARAMS = {
    "sd1": {"unet": {"C": C, "CTX": 768, "IN": 4, "OUT": 4}, "clip_l": CLIP_L},
    "sdxl": {"unet": {"C": C, "CTX": 2048, "ADM": 2816, "IN": 4, "OUT": 4}, "clip_l": CLIP_L, "clip_g": CLIP_G},
}
# diffusers pipeline folder of each lorakit component, and the naming its diffusers module names are in
FOLDER = {"unet": "unet", "clip_l": "text_encoder", "clip_g": "text_encoder_2"}
NAMING = {"unet": "diffusers", "clip_l": "native", "clip_g": "diffusers"}

# --------------------------------------------------------------------------------------------------
# tiny models (diffusers / transformers configs; nothing downloaded)
# --------------------------------------------------------------------------------------------------


def tiny_unet(arch: str, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=4)
    if arch == "sd1":       # v1-inference.yaml: 4 levels, attention on the first three, 1×1 conv proj_in/out
        unet = UNet2DConditionModel(
            **common, block_out_channels=(C, 2 * C, 4 * C, 4 * C),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=4, use_linear_projection=False)
    else:                   # sd_xl_base.yaml: 3 levels, transformer depth 0/2/10, Linear proj, text_time ADM
        unet = UNet2DConditionModel(
            **common, block_out_channels=(C, 2 * C, 4 * C),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(2, 4, 8),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=2816)
    return unet.eval()


def _clip_config(sizes: Mapping[str, int], **extra: int) -> CLIPTextConfig:
    return CLIPTextConfig(hidden_size=sizes["D"], intermediate_size=sizes["FF"], num_hidden_layers=sizes["layers"],
                          num_attention_heads=2, vocab_size=64, max_position_embeddings=8, bos_token_id=0,
                          eos_token_id=1, pad_token_id=1, **extra)


def tiny_text_encoders(arch: str, seed: int = 0) -> dict[str, torch.nn.Module]:
    """diffusers folder -> tiny encoder: CLIP-L (hidden 768) and, for SDXL, bigG with a projection."""
    torch.manual_seed(seed)
    encoders: dict[str, torch.nn.Module] = {"text_encoder": CLIPTextModel(_clip_config(CLIP_L)).eval()}
    if arch == "sdxl":
        encoders["text_encoder_2"] = CLIPTextModelWithProjection(
            _clip_config(CLIP_G, projection_dim=CLIP_G["D"])).eval()
    return encoders


def tiny_pipeline(arch: str, seed: int = 0):
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
                        layers_per_block=1)
    sched = EulerDiscreteScheduler(steps_offset=1)
    te = tiny_text_encoders(arch, seed)
    unet = tiny_unet(arch, seed)
    if arch == "sd1":
        return StableDiffusionPipeline(vae=vae, text_encoder=te["text_encoder"], tokenizer=None, unet=unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te["text_encoder"], text_encoder_2=te["text_encoder_2"],
                                     tokenizer=None, tokenizer_2=None, unet=unet, scheduler=sched)


def checkpoint_name(model: torch.nn.Module, name: str) -> str:
    """A module's name as checkpoints and LoRAs spell it. transformers 5's ``CLIPTextModel`` has no ``text_model``
    wrapper module any more (``CLIPTextModelWithProjection`` still has), yet its checkpoints keep the prefix."""
    if isinstance(model, CLIPTextModel) and not name.startswith("text_model."):
        return "text_model." + name
    return name


def weight_modules(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every Linear / Conv2d of a model with its weight shape (norms and embeddings are not LoRA targets)."""
    return {checkpoint_name(model, n): tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


# --------------------------------------------------------------------------------------------------
# the layout as a diffusers-name table
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """Where a diffusers module lands in lorakit: native module and its row window; ΔW shape."""

    native: str
    rows: tuple[int, int]
    shape: tuple[int, ...]


def layout_places(arch: str, component: str) -> dict[str, Place]:
    """diffusers module name -> Place, from lorakit's layout (ModuleSpec.native and its diffusers alias)."""
    params = PARAMS[arch][component]
    places = {}
    for cm in expand(resolve(arch).components[component], params):
        for alias in cm.spec.names(NAMING[component]):
            name = alias.template.format(i=cm.index) if cm.index is not None else alias.template
            if alias.rows is None:
                rows = (0, cm.out)
            else:
                start = evaluate(alias.rows[0], params)
                rows = (start, start + evaluate(alias.rows[1], params))
            places[name] = Place(cm.name, rows, (rows[1] - rows[0], cm.inp, *cm.kernel))
    return places


def lorakit_deltas(path, arch: str, *, layout_shapes: bool = False) -> dict[tuple[str, str], torch.Tensor]:
    """(diffusers folder, diffusers module) -> ΔW from lorakit's ``dense_deltas`` of the file at ``path``.

    ``layout_shapes`` hands ``dense_deltas`` the target shapes (from the layout) instead of letting it look each
    one up: that look-up re-expands the whole component per target (``ArchInstance.module_map``), which costs
    ~10 s for the ~600 targets of the PEFT test."""
    model = read_lora(path)
    assert model.arch.name == arch and not model.unknown_keys
    shapes = {Target(comp, cm.name): cm.shape for comp in PARAMS[arch]
              for cm in expand(resolve(arch).components[comp], PARAMS[arch][comp])} if layout_shapes else None
    dense = dense_deltas(model, shapes)
    out = {}
    for comp in PARAMS[arch]:
        for name, place in layout_places(arch, comp).items():
            delta = dense.get(Target(comp, place.native))
            if delta is not None:
                out[(FOLDER[comp], name)] = delta[place.rows[0]:place.rows[1]]
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max()) / max(1e-12, float(want.double().abs().max()))


# --------------------------------------------------------------------------------------------------
# 1. layout coverage
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_layout_names_every_weight_module(arch: str) -> None:
    models: dict[str, torch.nn.Module] = {"unet": tiny_unet(arch), **tiny_text_encoders(arch)}
    for comp in PARAMS[arch]:
        actual = weight_modules(models[FOLDER[comp]])
        predicted = {n: p.shape for n, p in layout_places(arch, comp).items()}
        assert sorted(set(actual) - set(predicted)) == [], f"{arch}/{comp}: modules the layout lacks"
        assert sorted(set(predicted) - set(actual)) == [], f"{arch}/{comp}: layout modules diffusers lacks"
        assert predicted == actual, f"{arch}/{comp}: shapes"


# --------------------------------------------------------------------------------------------------
# 2. lorakit --to kohya -> diffusers load_lora_weights + fuse_lora
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mod:
    """A module of the hand-written LoRA: diffusers folder, diffusers/HF name, single-file name, ΔW shape."""

    folder: str
    diffusers: str
    native: str
    shape: tuple[int, ...]


_U, _TE, _TE2 = "unet", "text_encoder", "text_encoder_2"
SD1_MODS = (
    Mod(_U, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q", (C, C)),
    Mod(_U, "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
        "input_blocks.2.1.transformer_blocks.0.attn2.to_k", (C, 768)),
    Mod(_U, "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
        "input_blocks.4.1.transformer_blocks.0.attn2.to_v", (2 * C, 768)),
    Mod(_U, "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "middle_block.1.transformer_blocks.0.attn1.to_out.0", (4 * C, 4 * C)),
    Mod(_U, "up_blocks.1.attentions.2.proj_in", "output_blocks.5.1.proj_in", (4 * C, 4 * C, 1, 1)),
    Mod(_U, "up_blocks.3.attentions.0.proj_out", "output_blocks.9.1.proj_out", (C, C, 1, 1)),
    Mod(_U, "down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2", (C, C, 3, 3)),
    Mod(_U, "down_blocks.1.resnets.0.time_emb_proj", "input_blocks.4.0.emb_layers.1", (2 * C, 4 * C)),
    Mod(_U, "up_blocks.1.resnets.0.conv_shortcut", "output_blocks.3.0.skip_connection", (4 * C, 8 * C, 1, 1)),
    Mod(_U, "up_blocks.2.upsamplers.0.conv", "output_blocks.8.2.conv", (2 * C, 2 * C, 3, 3)),
    Mod(_TE, "text_model.encoder.layers.1.self_attn.q_proj", "text_model.encoder.layers.1.self_attn.q_proj",
        (768, 768)),
    Mod(_TE, "text_model.encoder.layers.0.mlp.fc1", "text_model.encoder.layers.0.mlp.fc1", (CLIP_L["FF"], 768)),
    Mod(_TE, "text_model.encoder.layers.0.self_attn.out_proj", "text_model.encoder.layers.0.self_attn.out_proj",
        (768, 768)),
)
SDXL_MODS = (
    Mod(_U, "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
        "input_blocks.4.1.transformer_blocks.1.attn1.to_q", (2 * C, 2 * C)),
    Mod(_U, "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k",
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k", (4 * C, 2048)),
    Mod(_U, "mid_block.attentions.0.transformer_blocks.5.attn2.to_v",
        "middle_block.1.transformer_blocks.5.attn2.to_v", (4 * C, 2048)),
    Mod(_U, "up_blocks.0.attentions.2.transformer_blocks.3.attn1.to_out.0",
        "output_blocks.2.1.transformer_blocks.3.attn1.to_out.0", (4 * C, 4 * C)),
    Mod(_U, "up_blocks.1.attentions.1.proj_in", "output_blocks.4.1.proj_in", (2 * C, 2 * C)),
    Mod(_U, "down_blocks.2.attentions.0.proj_out", "input_blocks.7.1.proj_out", (4 * C, 4 * C)),
    Mod(_U, "down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2", (C, C, 3, 3)),
    Mod(_U, "up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv", (4 * C, 4 * C, 3, 3)),
    Mod(_U, "add_embedding.linear_1", "label_emb.0.0", (4 * C, 2816)),
    Mod(_U, "conv_in", "input_blocks.0.0", (C, 4, 3, 3)),
    Mod(_TE, "text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.q_proj",
        (768, 768)),
    Mod(_TE, "text_model.encoder.layers.1.self_attn.out_proj", "text_model.encoder.layers.1.self_attn.out_proj",
        (768, 768)),
    Mod(_TE2, "text_model.encoder.layers.0.self_attn.q_proj", "transformer.resblocks.0.attn", (32, 32)),
    Mod(_TE2, "text_model.encoder.layers.1.self_attn.v_proj", "transformer.resblocks.1.attn", (32, 32)),
    Mod(_TE2, "text_model.encoder.layers.1.self_attn.out_proj", "transformer.resblocks.1.attn.out_proj", (32, 32)),
    Mod(_TE2, "text_projection", "text_projection", (32, 32)),
)
MODS = {"sd1": SD1_MODS, "sdxl": SDXL_MODS}
# Every text encoder above has an out_proj LoRA: diffusers 0.42.1 needs one to read kohya text-encoder attention
# LoRAs at all (see test_diffusers_drops_text_encoder_attention_without_out_proj).

# How the test spells its input (deliberately not kohya's output naming, so the conversion has to rename):
# SD1 as ComfyUI (single-file LDM names), SDXL as OneTrainer's legacy kohya export (diffusers names).
COMFY = {_U: "diffusion_model.", _TE: "text_encoders.clip_l.transformer.", _TE2: "text_encoders.clip_g.transformer."}
LEGACY = {_U: "lora_unet_", _TE: "lora_te1_", _TE2: "lora_te2_"}


def input_stem(arch: str, mod: Mod) -> str:
    if arch == "sd1":
        return COMFY[mod.folder] + (mod.native if mod.folder == _U else mod.diffusers)
    return LEGACY[mod.folder] + mod.diffusers.replace(".", "_")


# α per module index: "uniform" (one α ≠ r, as kohya trains) or "per_module" (all different, scales 0.25, 0.5, …)
ALPHAS = {"uniform": lambda i: 2.0, "per_module": lambda i: 1.0 + i}


def write_input(path, arch: str, alphas: str = "per_module", mods: tuple[Mod, ...] | None = None
                ) -> tuple[dict[tuple[str, str], torch.Tensor], dict[tuple[str, str], float]]:
    """Write the hand LoRA; return (folder, diffusers name) -> ΔW = up·down·α/r computed here, and -> α."""
    gen = torch.Generator().manual_seed(11)
    tensors, expected, alpha_of = {}, {}, {}
    for i, mod in enumerate(MODS[arch] if mods is None else mods):
        out, rest = mod.shape[0], mod.shape[1:]
        down = torch.randn(RANK, *rest, generator=gen) / float(torch.tensor(rest).prod()) ** 0.5
        up = torch.randn(out, RANK, *([1, 1] if len(rest) == 3 else []), generator=gen) * 0.1
        alpha = ALPHAS[alphas](i)
        stem = input_stem(arch, mod)
        tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                    f"{stem}.alpha": torch.tensor(alpha)}
        key = (mod.folder, mod.diffusers)
        expected[key] = (up.flatten(1).double() @ down.flatten(1).double() * (alpha / RANK)).reshape(mod.shape)
        alpha_of[key] = alpha
    save_file(tensors, str(path))
    return expected, alpha_of


def model_weights(pipe) -> dict[tuple[str, str], torch.Tensor]:
    """(folder, module) -> weight of every Linear/Conv2d of the pipeline's UNet and text encoders (PEFT-wrapped
    modules report their base layer's weight, which ``fuse_lora`` changed)."""
    out = {}
    for folder in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, folder, None)
        if model is None:
            continue
        for name, m in model.named_modules():
            if isinstance(m, BaseTunerLayer):
                out[(folder, checkpoint_name(model, name))] = m.get_base_layer().weight.detach().clone()
            elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ".base_layer" not in name \
                    and ".lora_" not in name:
                out[(folder, checkpoint_name(model, name))] = m.weight.detach().clone()
    return out


def lora_modules(pipe) -> Iterator[tuple[str, str, BaseTunerLayer]]:
    for folder in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, folder, None)
        for name, m in (model.named_modules() if model is not None else ()):
            if isinstance(m, BaseTunerLayer) and m.lora_A:
                yield folder, checkpoint_name(model, name), m


def loses_kohya_alpha(folder: str, name: str) -> bool:
    """Modules whose own kohya α diffusers 0.42.1 drops (they get the adapter's ``lora_alpha``, the most frequent
    α of their component). Its kohya converter renames attention LoRAs to the old processor spelling and builds
    the α keys from that: UNet ``…attn1.processor.to_q_lora.down.weight`` (``_get_alpha_name`` in
    ``loaders/lora_conversion_utils.py``) and text-encoder ``…self_attn`` (``get_peft_kwargs`` in
    ``utils/peft_utils.py`` cuts the last name part), so the ``alpha_pattern`` entries match no module (PEFT warns
    "alpha_pattern keys did not match any targeted module"). Convolutions, proj_in/proj_out, embeddings, MLPs and
    ``text_projection`` keep their α. Files with one α everywhere (what kohya trains) are unaffected."""
    if folder == "unet":
        return name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))
    return ".self_attn." in name


@pytest.mark.parametrize("alphas", list(ALPHAS))
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_lorakit_kohya_loads_and_fuses_in_diffusers(tmp_path, caplog, arch: str, alphas: str) -> None:
    src, out = tmp_path / "in.safetensors", tmp_path / "kohya.safetensors"
    expected, alpha_of = write_input(src, arch, alphas)
    assert main(["convert", str(src), "--to", "kohya", "-o", str(out)]) == 0
    assert read_lora(out).format == "kohya"

    pipe = tiny_pipeline(arch, seed=1)
    base = model_weights(pipe)
    dlogging.enable_propagation()
    try:
        caplog.set_level(logging.WARNING)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(out), adapter_name="lk")
    finally:
        dlogging.disable_propagation()
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    problems += [str(w.message) for w in caught if any(s in str(w.message).lower() for s in ("lora", "key"))]
    # no key dropped or unexpected; with per-module α only PEFT's notice about the α patterns diffusers misnamed
    assert [p for p in problems if not p.startswith("The following alpha_pattern keys did not match")] == []
    assert bool(problems) == (alphas == "per_module")

    # every module of the file, convs included, became a PEFT layer scaled α/r (see loses_kohya_alpha)
    injected = {(f, n): m for f, n, m in lora_modules(pipe)}
    assert set(injected) == set(expected)
    fallback = {f: getattr(pipe, f).peft_config["lk"].lora_alpha for f in {f for f, _ in expected}}
    diffusers_alpha = {k: fallback[k[0]] if alphas == "per_module" and loses_kohya_alpha(*k) else a
                       for k, a in alpha_of.items()}
    assert any(diffusers_alpha[k] != alpha_of[k] for k in alpha_of) == (alphas == "per_module")
    for key, layer in injected.items():
        assert layer.scaling["lk"] == pytest.approx(diffusers_alpha[key] / RANK), key

    pipe.fuse_lora(lora_scale=1.0, adapter_names=["lk"])
    fused = model_weights(pipe)
    assert set(fused) == set(base)
    ours = lorakit_deltas(out, arch)
    for key, w0 in base.items():
        got = fused[key].double() - w0.double()
        mine = ours.get(key)
        if key not in expected:
            assert torch.equal(fused[key], w0), key       # nothing else touched
            assert mine is None or not mine.any(), key      # (rows of a fused OpenCLIP in_proj lorakit left 0)
            continue
        assert rel_err(mine.reshape(got.shape), expected[key]) <= 1e-6, key     # lorakit reads what was written
        want = expected[key] * (diffusers_alpha[key] / alpha_of[key])
        assert rel_err(got, want) <= 1e-5, key                                 # diffusers applies it


def test_diffusers_drops_text_encoder_attention_without_out_proj(tmp_path, caplog) -> None:
    """A diffusers 0.42.1 limitation, not lorakit's: its kohya converter spells text-encoder attention LoRAs the
    old way (``…self_attn.to_q_lora.down.weight``), and ``_load_lora_into_text_encoder`` recognises that spelling
    only by a ``to_out_lora`` key. Without an out_proj LoRA but with an MLP one (``lora_linear_layer``) the state
    dict is taken as new-style, ``to_q_lora`` is never renamed and transformers reports it UNEXPECTED: the q_proj
    LoRA is dropped and only fc1 is injected. (With attention LoRAs only, the load raises "Could not
    automatically infer state dict type".)"""
    src, out = tmp_path / "in.safetensors", tmp_path / "kohya.safetensors"
    mods = tuple(m for m in SD1_MODS if m.folder == _U or not m.diffusers.endswith("out_proj"))
    write_input(src, "sd1", "uniform", mods)
    assert main(["convert", str(src), "--to", "kohya", "-o", str(out)]) == 0
    pipe = tiny_pipeline("sd1")
    dlogging.enable_propagation()
    try:
        caplog.set_level(logging.WARNING)
        pipe.load_lora_weights(str(out), adapter_name="lk")
    finally:
        dlogging.disable_propagation()
    injected = {n for f, n, _ in lora_modules(pipe) if f == _TE}
    assert injected == {"text_model.encoder.layers.0.mlp.fc1"}
    assert "encoder.layers.1.self_attn.to_q_lora.down.weight" in caplog.text and "UNEXPECTED" in caplog.text


def test_kohya_names_written_for_diffusers(tmp_path) -> None:
    """The kohya spelling lorakit writes: SD1 UNet in diffusers names, SDXL UNet in SGM names, text encoders
    under lora_te_ (SD1) / lora_te1_ + lora_te2_ (SDXL); conv downs 4-D."""
    stems = {}
    for arch in ("sd1", "sdxl"):
        src, out = tmp_path / f"{arch}-in.safetensors", tmp_path / f"{arch}.safetensors"
        write_input(src, arch, "uniform")
        assert main(["convert", str(src), "--to", "kohya", "-o", str(out)]) == 0
        stems[arch] = load_file(str(out))
    assert stems["sd1"]["lora_unet_down_blocks_0_resnets_1_conv1.lora_down.weight"].shape == (RANK, C, 3, 3)
    assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj.alpha" in stems["sd1"]
    assert "lora_unet_output_blocks_2_2_conv.lora_up.weight" in stems["sdxl"]
    assert "lora_unet_label_emb_0_0.alpha" in stems["sdxl"]
    assert "lora_te2_text_projection.lora_down.weight" in stems["sdxl"]
    assert "lora_te2_text_model_encoder_layers_1_self_attn_v_proj.lora_up.weight" in stems["sdxl"]


# --------------------------------------------------------------------------------------------------
# 3. PEFT-saved SDXL LoRA with conv targets -> lorakit, against PEFT's merge_and_unload
# --------------------------------------------------------------------------------------------------

PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in"]
RANK_PATTERN = {"down_blocks.0.resnets.0.conv1": 2, "up_blocks.0.attentions.1.proj_in": 3}
ALPHA_PATTERN = {"down_blocks.0.resnets.0.conv1": 6, "mid_block.attentions.0.transformer_blocks.3.attn2.to_k": 1,
                 "up_blocks.1.resnets.2.conv2": 16}


def test_peft_saved_sdxl_lora_matches_merge_and_unload(tmp_path) -> None:
    unet = tiny_unet("sdxl", seed=2)
    base = {n: w.detach().clone() for n, w in unet.state_dict().items()}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, init_lora_weights=False,
                        rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN)
    model = get_peft_model(unet, config)
    gen = torch.Generator().manual_seed(5)
    scales = {}
    with torch.no_grad():
        for name, m in model.base_model.model.named_modules():
            if isinstance(m, BaseTunerLayer) and "default" in m.lora_B:
                w = m.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=gen) * 0.1)
                scales[name] = m.scaling["default"]
    # the patterns took effect in PEFT (so a reader ignoring them would fail below)
    assert scales["down_blocks.0.resnets.0.conv1"] == pytest.approx(3.0)
    assert scales["up_blocks.0.attentions.1.proj_in"] == pytest.approx(8 / 3)
    assert scales["up_blocks.1.resnets.2.conv2"] == pytest.approx(4.0)
    assert scales["mid_block.attentions.0.transformer_blocks.3.attn2.to_k"] == pytest.approx(0.25)

    state = get_peft_model_state_dict(model)
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    StableDiffusionXLPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=convert_state_dict_to_diffusers(state),
                                                unet_lora_adapter_metadata=meta)
    path = tmp_path / "pytorch_lora_weights.safetensors"

    merged = model.merge_and_unload().state_dict()
    ours = lorakit_deltas(path, "sdxl", layout_shapes=True)
    assert {n for _, n in ours} == set(scales)
    for key, w0 in base.items():
        name = key.removesuffix(".weight")
        got = merged[key].double() - w0.double()
        if ("unet", name) not in ours:
            assert torch.equal(merged[key], w0), key
            continue
        want = ours[("unet", name)].reshape(got.shape)
        assert rel_err(want, got) <= 1e-5, name
