"""Full-size FLUX.2 (dev, Klein 4B, Klein 9B) name and shape mapping without weights.

The expected names and shapes come from ``shared/reference/shapes/flux2-*.json`` (diffusers 0.42.1 models on the
meta device, cross-checked against diffusers' converter and BFL's ``Flux2``). LoRA fixtures are header-only
safetensors files (their data section is a hole), so only the rank-1 factors the emitter writes are real tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit.formats import emit, load, parse
from lorakit.io import open_weights
from lorakit.layouts import FLUX2, evaluate
from lorakit.samples.synthetic import base_tensors

from reference import header_only, reference_shapes

REF = reference_shapes()
VARIANTS = {"dev": "flux2-dev", "klein-4b": "flux2-klein-4b", "klein-9b": "flux2-klein-9b"}
COUNTS = {"dev": (203, 171), "klein-4b": (109, 89), "klein-9b": (153, 121)}    # 2-D weights: diffusers, BFL
pytestmark = pytest.mark.skipif(not (REF / "flux2-dev-bfl.json").exists(), reason="reference shape files not available")


def _shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((REF / name).read_text())["params"].items()}


def _linears(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    return {k[: -len(".weight")]: v for k, v in shapes.items() if k.endswith(".weight") and len(v) == 2}


def lora_entries(modules: dict[str, tuple[int, int]], stem, down: str, up: str) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for name, (o, i) in modules.items():
        out[f"{stem(name)}.{down}"], out[f"{stem(name)}.{up}"] = (1, i), (o, 1)
    return out


def _modules_of(tensors: dict[str, torch.Tensor], down: str, up: str) -> dict[str, tuple[int, int]]:
    return {k[: -len(up) - 1]: (int(t.shape[0]), int(tensors[k[: -len(up) - 1] + "." + down].shape[1]))
            for k, t in tensors.items() if k.endswith("." + up)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layout_reproduces_the_shape_files(variant: str) -> None:
    comp = FLUX2.components["transformer"]
    params = dict(next(p for p in comp.presets if p.name == VARIANTS[variant]).params)
    params["guidance"] = int(variant == "dev")
    for layout in ("bfl", "diffusers"):
        want = _shapes(f"{VARIANTS[variant]}-{layout}.json")
        got = {t.name: tuple(t.shape) for t in base_tensors(params, layout, FLUX2)}
        assert got == want, layout
    assert (len(_linears(_shapes(f"{VARIANTS[variant]}-diffusers.json"))),
            len(_linears(_shapes(f"{VARIANTS[variant]}-bfl.json")))) == COUNTS[variant]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_diffusers_linear_maps_to_bfl_and_back(tmp_path, variant: str) -> None:
    diff = _linears(_shapes(f"{VARIANTS[variant]}-diffusers.json"))
    bfl = _linears(_shapes(f"{VARIANTS[variant]}-bfl.json"))
    path = header_only(tmp_path / "d.safetensors", lora_entries(diff, lambda n: "transformer." + n,
                                                                 "lora_A.weight", "lora_B.weight"))
    with open_weights(path) as f:
        parsed = parse(f)
        assert parsed.format == "diffusers" and parsed.unknown_keys == []
        assert (parsed.arch.name, parsed.arch.variant) == ("flux2", variant)
        params = parsed.arch.params["transformer"]
        windows: dict[str, list[tuple[int, int]]] = {}
        for e in parsed.entries:
            assert e.target in bfl, e.file_module
            a = e.match.alias
            if a.rows is None:
                windows.setdefault(e.target, []).append((0, bfl[e.target][0]))
            else:
                s = evaluate(a.rows[0], params)
                windows.setdefault(e.target, []).append((s, s + evaluate(a.rows[1], params)))
            assert a.swap_halves == (e.target == "final_layer.adaLN_modulation.1")
        assert set(windows) == set(bfl)
        for target, ws in windows.items():        # the windows tile each BFL weight exactly
            ws.sort()
            assert ws[0][0] == 0 and ws[-1][1] == bfl[target][0], target
            assert all(x[1] == y[0] for x, y in zip(ws, ws[1:])), target
        fused = {t: len(ws) for t, ws in windows.items() if len(ws) > 1}
        n_double = params["double"]
        assert fused == {f"double_blocks.{i}.{s}_attn.qkv": 3 for i in range(n_double) for s in ("img", "txt")}
        model = load(parsed)
    assert _modules_of(emit(model, "kohya").tensors, "lora_down.weight", "lora_up.weight") == \
        {"lora_unet_" + k.replace(".", "_"): v for k, v in bfl.items()}
    assert _modules_of(emit(model, "comfy").tensors, "lora_down.weight", "lora_up.weight") == \
        {"diffusion_model." + k: v for k, v in bfl.items()}
    assert _modules_of(emit(model, "diffusers").tensors, "lora_A.weight", "lora_B.weight") == \
        {"transformer." + k: v for k, v in diff.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_bfl_linear_maps_to_diffusers(tmp_path, variant: str) -> None:
    diff = _linears(_shapes(f"{VARIANTS[variant]}-diffusers.json"))
    bfl = _linears(_shapes(f"{VARIANTS[variant]}-bfl.json"))
    entries = lora_entries(bfl, lambda n: "lora_unet_" + n.replace(".", "_"), "lora_down.weight", "lora_up.weight")
    path = header_only(tmp_path / "k.safetensors", entries)
    with open_weights(path) as f:
        parsed = parse(f)
        assert parsed.format == "kohya" and parsed.unknown_keys == []
        assert (parsed.arch.name, parsed.arch.variant) == ("flux2", variant)
        assert {e.target: (e.shapes["up"][0], e.shapes["down"][1]) for e in parsed.entries} == bfl
        model = load(parsed)
    assert _modules_of(emit(model, "diffusers").tensors, "lora_A.weight", "lora_B.weight") == \
        {"transformer." + k: v for k, v in diff.items()}


def test_variants_from_one_module(tmp_path) -> None:
    # the hidden size alone names the variant (BFL attention projection: H × H)
    for variant, h in (("dev", 6144), ("klein-4b", 3072), ("klein-9b", 4096)):
        mlp = {"double_blocks.0.img_mlp.0": (6 * h, h)}
        path = header_only(tmp_path / f"{variant}.safetensors",
                           lora_entries(mlp, lambda n: "diffusion_model." + n, "lora_A.weight", "lora_B.weight"))
        with open_weights(path) as f:
            parsed = parse(f)
        assert (parsed.arch.name, parsed.arch.variant) == ("flux2", variant)


def test_klein_4b_txt_in_is_not_flux1(tmp_path) -> None:
    # 3072 wide like FLUX.1, but txt_in reads 7680 features (FLUX.1: T5's 4096): not a FLUX.1 reading (Qwen-Image,
    # 3072 wide with a txt_in too, fits these two keys as well; metadata or registration order picks between them)
    entries = lora_entries({"txt_in": (3072, 7680), "double_blocks.0.img_attn.proj": (3072, 3072)},
                           lambda n: "lora_unet_" + n.replace(".", "_"), "lora_down.weight", "lora_up.weight")
    path = header_only(tmp_path / "txt.safetensors", entries)
    with open_weights(path) as f:
        parsed = parse(f)
    assert (parsed.arch.name, parsed.arch.variant) == ("flux2", "klein-4b")
    assert "FLUX.1" not in parsed.detection.also_fits


def test_base_checkpoints_are_recognised(tmp_path) -> None:
    from lorakit.base.checkpoint import open_base

    for variant, stem in VARIANTS.items():
        for layout, prefix in (("bfl", "model.diffusion_model."), ("diffusers", "")):
            shapes = {prefix + k: v for k, v in _shapes(f"{stem}-{layout}.json").items()}
            path = header_only(tmp_path / f"{variant}-{layout}.safetensors", shapes)
            with open_weights(path) as f:
                base = open_base(f)
                assert (base.arch.name, base.arch.variant) == ("flux2", variant), (variant, layout)
                assert base.passthrough == []
                assert base.arch.params["transformer"]["guidance"] == int(variant == "dev")
