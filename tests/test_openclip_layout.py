"""OpenCLIP (SDXL bigG, SD2 ViT-H) and CLIP-L text-encoder layouts against real checkpoint key lists and
diffusers' own single-file converter.

Expected names and shapes come from the reference shape files (sd-mecha's SDXL / SD 1.5 key lists, the
diffusers ``text_encoder(_2)`` models), from diffusers 0.42.1 ``convert_open_clip_checkpoint`` run on tiny
random OpenCLIP-shaped state dicts, and from hand-counted numbers; never from lorakit.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch

from lorakit.layouts import NameIndex, evaluate, expand
from lorakit.layouts.base import Alias, ComponentSpec, ConcreteModule
from lorakit.layouts.openclip import OPENCLIP_G, OPENCLIP_H
from lorakit.layouts.text_encoders import CLIP_L

from reference import reference_shapes

Shapes = dict[str, tuple[int, ...]]


REF = reference_shapes()
SDXL, SD15 = REF / "sdxl-single-file-sgm.json", REF / "sd15-single-file-ldm.json"
TE2_DIFFUSERS, CLIP_L_DIFFUSERS = REF / "sdxl-text-encoder-2-diffusers.json", REF / "clip-l-text-encoder-diffusers.json"

# Hand-written facts (OpenCLIP / transformers module definitions), not lorakit's numbers.
BIGG = {"D": 1280, "FF": 5120, "layers": 32}
VIT_H = {"D": 1024, "FF": 4096, "layers": 24}
VIT_L = {"D": 768, "FF": 3072, "layers": 12}
# 2-D tensors that are embedding tables, not Linear weights (per side, relative to the container prefix)
OPENCLIP_EMBEDDINGS = {"token_embedding.weight", "positional_embedding"}
HF_EMBEDDINGS = {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"}


@cache
def _shapes(path: Path) -> Shapes:
    if not path.exists():
        pytest.skip(f"reference shape file {path.name} not available")
    return {k: tuple(v) for k, v in json.loads(path.read_text())["params"].items()}


def _under(shapes: Shapes, prefix: str) -> Shapes:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _two_d(shapes: Shapes) -> set[str]:
    return {k for k, v in shapes.items() if len(v) == 2}


def _window(alias: Alias, mod: ConcreteModule, sizes: dict[str, int]) -> tuple[int, int]:
    """(start, stop) rows of the native weight that an alias addresses."""
    if alias.rows is None:
        return 0, mod.out
    start = evaluate(alias.rows[0], sizes)
    return start, start + evaluate(alias.rows[1], sizes)


def _alias_name(alias: Alias, mod: ConcreteModule) -> str:
    return alias.template.format(i=mod.index) if mod.index is not None else alias.template


def _check_native(comp: ComponentSpec, sizes: dict[str, int], shapes: Shapes) -> None:
    """Every 2-D non-embedding tensor is exactly one module's weight, shapes as declared, biases as declared."""
    mods = list(expand(comp, sizes))
    weights: dict[str, tuple[int, ...]] = {}
    for m in mods:
        key = m.spec.tensor_name(m.name, m.spec.weight)
        assert key not in weights, key
        weights[key] = (m.inp, m.out) if m.spec.transpose else (m.out, m.inp)
        bias = m.spec.tensor_name(m.name, m.spec.bias_param)
        if m.spec.bias:
            assert shapes.get(bias) == (m.out,), bias
        else:
            assert bias not in shapes and f"{m.name}.bias" not in shapes, bias
    assert set(weights) == _two_d(shapes) - OPENCLIP_EMBEDDINGS
    assert OPENCLIP_EMBEDDINGS <= _two_d(shapes)
    assert {k: shapes[k] for k in weights} == weights


def _check_diffusers(comp: ComponentSpec, sizes: dict[str, int], shapes: Shapes) -> dict[str, tuple[str, int, int]]:
    """Every 2-D non-embedding diffusers weight is exactly one alias; row windows tile each fused weight.
    Returns diffusers module -> (native module, start, stop)."""
    to_native: dict[str, tuple[str, int, int]] = {}
    for m in expand(comp, sizes):
        windows = []
        for alias in m.spec.names("diffusers"):
            name = _alias_name(alias, m)
            start, stop = _window(alias, m, sizes)
            assert name not in to_native, name
            to_native[name] = (m.name, start, stop)
            windows.append((start, stop))
            assert shapes.get(f"{name}.weight") == (stop - start, m.inp), name
            if m.spec.bias:
                assert shapes.get(f"{name}.bias") == (stop - start,), name
            else:
                assert f"{name}.bias" not in shapes, name
        windows.sort()
        assert windows, m.name
        assert windows[0][0] == 0 and windows[-1][1] == m.out, (m.name, windows)
        assert all(a[1] == b[0] for a, b in zip(windows, windows[1:])), (m.name, windows)   # no gap, no overlap
        assert sum(b - a for a, b in windows) == m.out
    assert {f"{n}.weight" for n in to_native} == _two_d(shapes) - HF_EMBEDDINGS
    assert HF_EMBEDDINGS <= _two_d(shapes)
    return to_native


def _check_lookup(comp: ComponentSpec, to_native: dict[str, tuple[str, int, int]], sizes: dict[str, int]) -> None:
    """lorakit's name lookup agrees: each diffusers name resolves to its native module and row window, and
    (native module, window) pairs are distinct (a bijection at module/row-window level)."""
    assert len(set(to_native.values())) == len(to_native)
    diff, native = NameIndex(comp, "diffusers", flat=False), NameIndex(comp, "native", flat=False)
    modules = {m.name: m for m in expand(comp, sizes)}
    for name, (target, start, stop) in to_native.items():
        hit = diff.match(name)
        assert hit is not None and hit.native == target, name
        assert _window(hit.alias, modules[target], sizes) == (start, stop), name
        back = native.match(target)
        assert back is not None and back.spec is hit.spec and back.index == hit.index
    assert {t for t, _, _ in to_native.values()} == set(modules)


# ----------------------------------------------------------------------------------------------
# Full size, names and shapes only
# ----------------------------------------------------------------------------------------------

def test_openclip_components_are_declared_as_briefed() -> None:
    assert (OPENCLIP_G.name, OPENCLIP_G.role, OPENCLIP_G.label) == ("clip_g", "te2", "OpenCLIP ViT-bigG")
    assert (OPENCLIP_H.name, OPENCLIP_H.role, OPENCLIP_H.label) == ("clip_h", "te1", "OpenCLIP ViT-H")
    assert {p.name: dict(p.params) for p in OPENCLIP_G.presets} == {"clip-g": BIGG}
    assert {p.name: dict(p.params) for p in OPENCLIP_H.presets} == {"clip-h": VIT_H}
    for comp, sizes in ((OPENCLIP_G, BIGG), (OPENCLIP_H, VIT_H)):
        assert comp.namings == ("native", "diffusers") and comp.counts == ("layers",)
        assert dict(comp.fixed) == ({"D": sizes["D"]} if comp.name == "clip_h" else {})
        assert all(s.group in comp.group_labels for s in comp.modules)


def test_sdxl_bigg_native_names_and_shapes() -> None:
    shapes = _under(_shapes(SDXL), "conditioner.embedders.1.model.")
    mods = list(expand(OPENCLIP_G, BIGG))
    assert len(mods) == 32 * 4 + 1                       # attn, out_proj, c_fc, c_proj per block + projection
    _check_native(OPENCLIP_G, BIGG, shapes)
    assert shapes["transformer.resblocks.0.attn.in_proj_weight"] == (3 * 1280, 1280)   # the fused q/k/v


def test_sdxl_bigg_diffusers_names_tile_and_map_both_ways() -> None:
    shapes = _shapes(TE2_DIFFUSERS)
    to_native = _check_diffusers(OPENCLIP_G, BIGG, shapes)
    assert len(to_native) == 32 * 6 + 1
    assert to_native["text_model.encoder.layers.5.self_attn.k_proj"] == (
        "transformer.resblocks.5.attn", 1280, 2560)
    assert to_native["text_projection"] == ("text_projection", 0, 1280)
    _check_lookup(OPENCLIP_G, to_native, BIGG)


def test_sd2_vit_h_names_match_diffusers_sd2_ignore_list() -> None:
    """No SD2 key list is stored; diffusers' converter lists SD2's last block and projection by full key."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    prefix = "cond_stage_model.model."
    ignored = {k[len(prefix):] for k in sfu.SD_2_TEXT_ENCODER_KEYS_TO_IGNORE}
    last = [m for m in expand(OPENCLIP_H, VIT_H) if m.index == VIT_H["layers"] - 1]
    names = {m.spec.tensor_name(m.name, m.spec.weight) for m in last}
    names |= {m.spec.tensor_name(m.name, m.spec.bias_param) for m in last}
    block = {k for k in ignored if k.startswith("transformer.")}
    assert names == {k for k in block if ".ln_" not in k}       # the ignore list also names ln_1 / ln_2
    assert ignored - block == {"text_projection"}                 # SD2 has one, diffusers drops it (not in clip_h)
    assert sfu.LDM_OPEN_CLIP_TEXT_PROJECTION_DIM == VIT_H["D"]
    assert all(m.spec.names("diffusers") for m in expand(OPENCLIP_H, VIT_H))


@pytest.mark.parametrize("path, prefix", [(SDXL, "conditioner.embedders.0.transformer."),
                                          (SD15, "cond_stage_model.transformer."),
                                          (CLIP_L_DIFFUSERS, "")])
def test_clip_l_names_every_linear(path: Path, prefix: str) -> None:
    """CLIP-L's module names (``text_model.…``) are the same under each container prefix."""
    shapes = _under(_shapes(path), prefix)
    weights = {}
    for m in expand(CLIP_L, VIT_L):
        weights[m.spec.tensor_name(m.name, m.spec.weight)] = (m.out, m.inp)
        assert shapes.get(m.spec.tensor_name(m.name, m.spec.bias_param)) == (m.out,), m.name
    assert len(weights) == 12 * 6
    assert set(weights) == _two_d(shapes) - HF_EMBEDDINGS
    assert {k: shapes[k] for k in weights} == weights


# ----------------------------------------------------------------------------------------------
# Values: diffusers' own converter on tiny random OpenCLIP state dicts
# ----------------------------------------------------------------------------------------------

TINY = {"D": 8, "FF": 16, "layers": 2}
VOCAB, POSITIONS = 11, 5


def _tiny_openclip(comp: ComponentSpec, prefix: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A random state dict with OpenCLIP's key set (hand-written, not from the layout) at TINY sizes."""
    d, ff = TINY["D"], TINY["FF"]
    sd: dict[str, tuple[int, ...]] = {"token_embedding.weight": (VOCAB, d), "positional_embedding": (POSITIONS, d),
                                      "ln_final.weight": (d,), "ln_final.bias": (d,), "logit_scale": ()}
    if comp is OPENCLIP_G:
        sd["text_projection"] = (d, d)
    for i in range(TINY["layers"]):
        b = f"transformer.resblocks.{i}."
        sd.update({b + "attn.in_proj_weight": (3 * d, d), b + "attn.in_proj_bias": (3 * d,),
                   b + "attn.out_proj.weight": (d, d), b + "attn.out_proj.bias": (d,),
                   b + "mlp.c_fc.weight": (ff, d), b + "mlp.c_fc.bias": (ff,),
                   b + "mlp.c_proj.weight": (d, ff), b + "mlp.c_proj.bias": (d,)})
        for ln in ("ln_1", "ln_2"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = (d,), (d,)
    return {prefix + k: torch.randn(s, generator=gen) for k, s in sd.items()}


def _tiny_hf(projection: bool) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=TINY["D"], intermediate_size=TINY["FF"],
                                      num_hidden_layers=TINY["layers"], num_attention_heads=2,
                                      max_position_embeddings=POSITIONS, projection_dim=TINY["D"],
                                      hidden_act="gelu")
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(cfg)


@pytest.mark.oracle
@pytest.mark.parametrize("comp, prefix", [(OPENCLIP_G, "conditioner.embedders.1.model."),
                                          (OPENCLIP_H, "cond_stage_model.model.")],
                         ids=["sdxl-bigG", "sd2-vit-h"])
def test_diffusers_converter_agrees_with_layout(comp: ComponentSpec, prefix: str) -> None:
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    gen = torch.Generator().manual_seed(7)
    ckpt = _tiny_openclip(comp, prefix, gen)
    model = _tiny_hf(projection=comp is OPENCLIP_G)
    out = sfu.convert_open_clip_checkpoint(model, ckpt, prefix=prefix)

    covered: set[str] = set()
    for m in expand(comp, TINY):
        native_w = ckpt[prefix + m.spec.tensor_name(m.name, m.spec.weight)]
        delta_layout = native_w.T if m.spec.transpose else native_w          # out × in, as ΔW has it
        assert tuple(delta_layout.shape) == (m.out, m.inp), m.name
        native_b = ckpt.get(prefix + m.spec.tensor_name(m.name, m.spec.bias_param)) if m.spec.bias else None
        for alias in m.spec.names("diffusers"):
            name = _alias_name(alias, m)
            start, stop = _window(alias, m, TINY)
            assert torch.equal(out[name + ".weight"], delta_layout[start:stop]), name
            covered.add(name + ".weight")
            if native_b is not None:
                assert torch.equal(out[name + ".bias"], native_b[start:stop]), name
                covered.add(name + ".bias")
    two_d = {k for k, v in out.items() if v.dim() == 2}
    assert {k for k in covered if k.endswith(".weight")} == two_d - HF_EMBEDDINGS
    assert {k for k in covered if k.endswith(".bias")} == {
        k for k in out if k.endswith(".bias") and "layer_norm" not in k}

    # the converter's output is the transformers model's own state dict, and its Linear modules are our aliases
    # (transformers 5's CLIPTextModel has no ``text_model`` wrapper; diffusers strips that prefix for it)
    wrap = "" if hasattr(model, "text_model") else "text_model."
    missing, unexpected = model.load_state_dict({k.removeprefix(wrap): v for k, v in out.items()}, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    linears = {f"{wrap}{n}.weight": tuple(mod.weight.shape) for n, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear)}
    assert linears == {k: tuple(out[k].shape) for k in two_d - HF_EMBEDDINGS}
