"""SD1.x / SDXL UNet layouts against full-size reference key lists and diffusers' own code, without weights.

Expected values come from outside lorakit: the reference shape files (single-file LDM/SGM checkpoints and
diffusers UNets), the Linear/Conv2d counts of shapes/README.md, diffusers 0.42.1's single-file converter
(``convert_ldm_unet_checkpoint``, run on meta tensors) and ``UNet2DConditionModel`` built on the meta device
from the LDM yaml values written out below.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lorakit.layouts import ComponentSpec, ConcreteModule, NameIndex, evaluate, expand, solve, symbols
from lorakit.layouts.sd_unet import SD1_UNET, SDXL_UNET

from reference import reference_shapes


REF = reference_shapes()
UNET_PREFIX = "model.diffusion_model."
pytestmark = pytest.mark.skipif(not (REF / "sd15-single-file-ldm.json").exists(),
                                reason="reference shape files not available")


@dataclass(frozen=True)
class Case:
    spec: ComponentSpec
    single_file: str
    diffusers: str
    linear: int          # shapes/README.md "Useful facts": Linear / Conv2d module counts
    conv: int
    unet_params: Mapping[str, object]   # the LDM yaml's unet_config.params
    vae_ch_mult: tuple[int, ...]
    lbw_blocks: int      # input (= output) blocks: LoRA Block Weight's IN00-IN11 (SD1) / IN00-IN08 (SDXL)


# v1-inference.yaml and sd_xl_base.yaml (unet_config / network_config params), written out by hand
SD15_LDM = {"in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8, "transformer_depth": 1,
            "context_dim": 768, "use_linear_in_transformer": False}
SDXL_SGM = {"in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2],
            "num_res_blocks": 2, "channel_mult": [1, 2, 4], "num_head_channels": 64,
            "transformer_depth": [1, 2, 10], "context_dim": 2048, "use_linear_in_transformer": True,
            "num_classes": "sequential", "adm_in_channels": 2816}

CASES = {
    "sd15": Case(SD1_UNET, "sd15-single-file-ldm.json", "sd15-unet-diffusers.json", 184, 98, SD15_LDM,
                 (1, 2, 4, 4), 12),
    "sdxl": Case(SDXL_UNET, "sdxl-single-file-sgm.json", "sdxl-unet-diffusers.json", 743, 51, SDXL_SGM,
                 (1, 2, 4, 4), 9),
}
PARAMS = pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))

_CACHE: dict[str, dict[str, tuple[int, ...]]] = {}


def _shapes(file: str, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a reference file, keys under ``prefix`` only (prefix stripped)."""
    if file not in _CACHE:
        _CACHE[file] = {k: tuple(v) for k, v in json.loads((REF / file).read_text())["params"].items()}
    return {k[len(prefix):]: v for k, v in _CACHE[file].items() if k.startswith(prefix)}


def _weights(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape for every 2-D (Linear) or 4-D (Conv2d) ``*.weight``."""
    return {k[: -len(".weight")]: v for k, v in shapes.items() if k.endswith(".weight") and len(v) in (2, 4)}


def _modules(case: Case, **sizes: int) -> list[ConcreteModule]:
    return list(expand(case.spec, {**case.spec.presets[0].params, **sizes}))


def _diffusers_name(m: ConcreteModule) -> str:
    (alias,) = m.spec.names("diffusers")
    assert alias.rows is None and not alias.swap_halves
    return alias.template


# ---------------------------------------------------------------------------------------------------------
# The reference key lists
# ---------------------------------------------------------------------------------------------------------

@PARAMS
def test_native_names_and_shapes_are_the_single_file_unet(case: Case) -> None:
    mods = _modules(case)
    names = [m.name for m in mods]
    assert len(names) == len(set(names))
    declared = {m.name: m.shape for m in mods}
    assert declared == _weights(_shapes(case.single_file, UNET_PREFIX))


@PARAMS
def test_diffusers_names_and_shapes_are_the_diffusers_unet(case: Case) -> None:
    mods = _modules(case)
    names = [_diffusers_name(m) for m in mods]
    assert len(names) == len(set(names))
    assert {_diffusers_name(m): m.shape for m in mods} == _weights(_shapes(case.diffusers))


@PARAMS
def test_biases_exist_exactly_when_declared(case: Case) -> None:
    native, diff = _shapes(case.single_file, UNET_PREFIX), _shapes(case.diffusers)
    for m in _modules(case):
        assert (m.name + ".bias" in native) is m.bias, m.name
        assert (_diffusers_name(m) + ".bias" in diff) is m.bias, m.name
        if m.bias:
            assert native[m.name + ".bias"] == diff[_diffusers_name(m) + ".bias"] == (m.out,)
    # the other way round: every 2-D/4-D module of the file that has a bias is declared with one
    weights = _weights(native)
    assert {k[: -len(".bias")] for k in native if k.endswith(".bias") and k[: -len(".bias")] in weights} == \
        {m.name for m in _modules(case) if m.bias}


@PARAMS
def test_module_counts(case: Case) -> None:
    mods = _modules(case)
    assert sum(1 for m in mods if not m.kernel) == case.linear
    assert sum(1 for m in mods if len(m.kernel) == 2) == case.conv
    assert len(mods) == len(_weights(_shapes(case.single_file, UNET_PREFIX))) == len(_weights(_shapes(case.diffusers)))


@PARAMS
@pytest.mark.parametrize("flat", [False, True], ids=["dotted", "kohya"])
def test_native_diffusers_native_is_a_bijection(case: Case, flat: bool) -> None:
    native_ix = NameIndex(case.spec, "native", flat=flat)
    diff_ix = NameIndex(case.spec, "diffusers", flat=flat)
    mods = _modules(case)
    to_diff = {}
    for m in mods:
        hit = native_ix.match(native_ix.name_of(m.spec, m.spec.names("native")[0], None))
        assert hit is not None and hit.native == m.name
        (alias,) = m.spec.names("diffusers")
        to_diff[m.name] = diff_ix.name_of(m.spec, alias, None)
    assert len(set(to_diff.values())) == len(mods)           # injective (also when kohya-flattened)
    for native, diffusers in to_diff.items():
        back = diff_ix.match(diffusers)
        assert back is not None and back.native == native
    assert native_ix.match("input_blocks.0.0.bias") is None and diff_ix.match("conv_norm_out") is None


# ---------------------------------------------------------------------------------------------------------
# Sizes, groups, presets
# ---------------------------------------------------------------------------------------------------------

@PARAMS
def test_sizes_are_solved_from_the_file_shapes(case: Case) -> None:
    """The expressions use the named sizes (no literal widths): solving them from the file gives the preset."""
    shapes = _weights(_shapes(case.single_file, UNET_PREFIX))
    eqs = []
    for spec in case.spec.modules:
        shape = shapes[spec.native]
        eqs += [(spec.out, shape[0]), (spec.inp, shape[1])] + list(zip(spec.kernel, shape[2:]))
    sizes = solve(eqs, {})
    preset = case.spec.presets[0]
    assert sizes == dict(preset.params)
    assert all(evaluate(e, sizes) == v for e, v in eqs)
    assert set().union(*(symbols(e) for e, _ in eqs)) == set(preset.params)
    assert {k: preset.params[k] for k in case.spec.fixed} == dict(case.spec.fixed)
    assert preset.params["C"] == 320 and "C" not in case.spec.fixed and preset.varies == ("IN",)


def _expected_group(native: str) -> str:
    for pattern, fmt in ((r"input_blocks\.(\d+)\.", "IN{:02d}"), (r"output_blocks\.(\d+)\.", "OUT{:02d}")):
        m = re.match(pattern, native)
        if m:
            return fmt.format(int(m.group(1)))
    return {"middle_block": "M00", "time_embed": "embed", "label_emb": "embed", "out": "out"}[native.split(".")[0]]


@PARAMS
def test_groups_are_lora_block_weight_ids(case: Case) -> None:
    mods = _modules(case)
    for m in mods:
        assert m.group == _expected_group(m.name), m.name
    groups = {m.group for m in mods}
    assert set(case.spec.group_labels) == groups
    assert len({g for g in groups if g.startswith("IN")}) == len({g for g in groups if g.startswith("OUT")}) \
        == case.lbw_blocks
    labels = case.spec.group_labels
    assert labels["IN04"] == "input block 4" and labels["M00"] == "middle block"
    assert labels["OUT05"] == "output block 5" and labels["embed"] == "time/label embeddings"
    assert labels["out"] == "output conv"


def test_sd1_and_sdxl_specs() -> None:
    assert (SD1_UNET.name, SD1_UNET.role, SD1_UNET.label) == ("unet", "denoiser", "SD1.x UNet")
    assert (SDXL_UNET.name, SDXL_UNET.role, SDXL_UNET.label) == ("unet", "denoiser", "SDXL UNet")
    assert SD1_UNET.namings == SDXL_UNET.namings == ("native", "diffusers")
    assert [p.name for p in SD1_UNET.presets] == ["sd1"] and [p.name for p in SDXL_UNET.presets] == ["sdxl"]
    assert dict(SD1_UNET.fixed) == {"CTX": 768}
    assert dict(SDXL_UNET.fixed) == {"CTX": 2048, "ADM": 2816}
    assert all(m.repeat is None and m.requires is None for m in SD1_UNET.modules + SDXL_UNET.modules)


# ---------------------------------------------------------------------------------------------------------
# diffusers' own code as the oracle
# ---------------------------------------------------------------------------------------------------------

def _meta_checkpoint(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def _original_config(case: Case, unet_params: Mapping[str, object]) -> dict[str, object]:
    """An LDM/SGM yaml as a dict: only the parts diffusers' config builder reads."""
    return {"model": {"params": {"unet_config": {"params": dict(unet_params)},
                                 "first_stage_config": {"params": {"ddconfig": {"ch_mult": list(case.vae_ch_mult)}}}}}}


@pytest.mark.oracle
@PARAMS
def test_diffusers_single_file_converter_agrees(case: Case) -> None:
    """Every native -> diffusers pair is what diffusers' single-file converter does with that tensor."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    ckpt = _meta_checkpoint(_shapes(case.single_file))          # the whole single file, all components
    config = create_unet_diffusers_config_from_ldm(_original_config(case, case.unet_params), ckpt)
    converted = convert_ldm_unet_checkpoint(ckpt, config)
    diff = _shapes(case.diffusers)
    assert {k: tuple(v.shape) for k, v in converted.items()} == diff   # the converter ran to completion
    for m in _modules(case):
        d = _diffusers_name(m)
        assert converted[d + ".weight"] is ckpt[UNET_PREFIX + m.name + ".weight"], m.name
        if m.bias:
            assert converted[d + ".bias"] is ckpt[UNET_PREFIX + m.name + ".bias"], m.name


# A small UNet of each structure on the meta device: other sizes than the preset's (C 32, IN 9, ADM 40, CTX 24;
# for SDXL CTX 1280, the refiner's width: diffusers' config builder tells SDXL by a context of 2048 or 1280),
# so a size written as a literal, or as a wrong multiple, shows up.
SMALL = {"C": 32, "IN": 9, "OUT": 4, "ADM": 40}
SMALL_CTX = {"sd1": 24, "sdxl": 1280}


@pytest.mark.oracle
@PARAMS
def test_expressions_scale_like_diffusers_unet(case: Case) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    sizes = {**SMALL, "CTX": SMALL_CTX[case.spec.presets[0].name]}
    small = {**case.unet_params, "model_channels": sizes["C"], "context_dim": sizes["CTX"],
             "in_channels": sizes["IN"], "out_channels": sizes["OUT"]}
    if "adm_in_channels" in small:
        small["adm_in_channels"] = sizes["ADM"]
    if "num_head_channels" in small:
        small["num_head_channels"] = 16
    ckpt = _meta_checkpoint(_shapes(case.single_file))          # only tells the builder the model type
    config = create_unet_diffusers_config_from_ldm(_original_config(case, small), ckpt)
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    actual = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            actual[name] = (tuple(mod.weight.shape), mod.bias is not None)
    declared = {_diffusers_name(m): (m.shape, m.bias) for m in _modules(case, **sizes)}
    assert declared == actual
