"""Full-size FLUX.1-dev name and shape mapping, without weights.

LoRA fixtures are header-only (sparse) safetensors files built from the reference shape files, so no
full-size tensor is ever generated here except the LoRA factors written by the emitter (rank 1).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lorakit.formats import emit, load, parse
from lorakit.io import open_weights
from lorakit.samples.synthetic import base_tensors, full_flux_params, iter_split_modules

from reference import header_only, reference_shapes

REF = reference_shapes()
BFL_JSON, DIFF_JSON = REF / "flux1-dev-bfl.json", REF / "flux1-dev-diffusers.json"
pytestmark = pytest.mark.skipif(not BFL_JSON.exists(), reason="reference shape files not available")

RANK = 1


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads(path.read_text())["params"].items()}


def _linears(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    return {k[: -len(".weight")]: v for k, v in shapes.items() if k.endswith(".weight") and len(v) == 2}


def clip_l_modules() -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(12):
        p = f"text_model.encoder.layers.{i}."
        for s in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[p + "self_attn." + s] = (768, 768)
        out[p + "mlp.fc1"], out[p + "mlp.fc2"] = (3072, 768), (768, 3072)
    return out


def t5_modules() -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(24):
        p = f"encoder.block.{i}."
        for s in "qkvo":
            out[p + "layer.0.SelfAttention." + s] = (4096, 4096)
        out[p + "layer.1.DenseReluDense.wi_0"] = out[p + "layer.1.DenseReluDense.wi_1"] = (10240, 4096)
        out[p + "layer.1.DenseReluDense.wo"] = (4096, 10240)
    return out


def lora_entries(modules: dict[str, tuple[int, int]], stem, down: str, up: str) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for name, (o, i) in modules.items():
        out[f"{stem(name)}.{down}"] = (RANK, i)
        out[f"{stem(name)}.{up}"] = (o, RANK)
    return out


def _modules_of(tensors: dict[str, torch.Tensor], down: str, up: str) -> dict[str, tuple[int, int]]:
    mods = {}
    for k, t in tensors.items():
        if k.endswith("." + up):
            stem = k[: -len(up) - 1]
            mods[stem] = (int(t.shape[0]), int(tensors[f"{stem}.{down}"].shape[1]))
    return mods


def test_base_tensors_reproduce_shape_files() -> None:
    p = full_flux_params()
    bfl = {t.name: tuple(t.shape) for t in base_tensors(p, "bfl")}
    diff = {t.name: tuple(t.shape) for t in base_tensors(p, "diffusers")}
    assert len(bfl) == 780 and bfl == _shapes(BFL_JSON)
    assert len(diff) == 1160 and diff == _shapes(DIFF_JSON)


def test_sdscripts_fullsize_lora_maps_to_bfl_and_diffusers(tmp_path) -> None:
    bfl = _linears(_shapes(BFL_JSON))
    unet = {k: v for k, v in bfl.items() if not k.startswith("final_layer.")}   # sd-scripts never targets it
    blocks = [k for k in unet if k.startswith(("double_blocks.", "single_blocks."))]
    assert len(blocks) == 304 and len(unet) == 312
    clip, t5 = clip_l_modules(), t5_modules()
    assert len(clip) == 72 and len(t5) == 168
    entries: dict[str, tuple[int, ...]] = {}
    for prefix, mods in (("lora_unet_", unet), ("lora_te1_", clip), ("lora_te3_", t5)):
        entries.update(lora_entries(mods, lambda n, p=prefix: p + n.replace(".", "_"), "lora_down.weight",
                                    "lora_up.weight"))
        for n in mods:
            entries[prefix + n.replace(".", "_") + ".alpha"] = ()
    path = header_only(tmp_path / "sdscripts.safetensors", entries, {"ss_network_module": "networks.lora_flux"})
    assert os.stat(path).st_blocks * 512 < 1 << 20        # really header-only on disk

    with open_weights(path) as f:
        parsed = parse(f)
        assert parsed.format == "kohya" and parsed.unknown_keys == []
        assert parsed.arch.variant == "dev"
        assert parsed.arch.params["transformer"]["H"] == 3072
        by_comp: dict[str, dict[str, tuple[int, int]]] = {}
        for e in parsed.entries:
            by_comp.setdefault(e.component, {})[e.target] = (e.shapes["up"][0], e.shapes["down"][1])
        assert by_comp == {"transformer": unet, "clip_l": clip, "t5": t5}
        model = load(parsed)

    result = emit(model, "diffusers")
    got = _modules_of(result.tensors, "lora_A.weight", "lora_B.weight")
    diff = _linears(_shapes(DIFF_JSON))
    want = {"transformer." + k: v for k, v in diff.items() if k not in ("proj_out", "norm_out.linear")}
    want.update({"text_encoder." + k: v for k, v in clip.items()})
    want.update({"text_encoder_2." + k: v for k, v in t5.items()})
    assert len(want) == 502 + 72 + 168
    assert got == want
    kohya = emit(model, "kohya")
    assert set(kohya.tensors) == set(entries)
    assert all(tuple(kohya.tensors[k].shape) == s for k, s in entries.items())


def test_every_diffusers_linear_maps_to_bfl_and_back(tmp_path) -> None:
    diff = _linears(_shapes(DIFF_JSON))
    bfl = _linears(_shapes(BFL_JSON))
    assert len(diff) == 504 and len(bfl) == 314
    entries = lora_entries(diff, lambda n: "transformer." + n, "lora_A.weight", "lora_B.weight")
    path = header_only(tmp_path / "diffusers.safetensors", entries)
    with open_weights(path) as f:
        parsed = parse(f)
        assert parsed.format == "diffusers" and parsed.unknown_keys == []
        # every split module lands on a BFL weight; its row windows tile that weight exactly
        windows: dict[str, list[tuple[int, int]]] = {}
        for e in parsed.entries:
            assert e.target in bfl, e.file_module
            model_rows = parsed.arch.module_map("transformer")[e.target].out
            a = e.match.alias
            if a.rows is None:
                windows.setdefault(e.target, []).append((0, model_rows))
            else:
                from lorakit.layouts import evaluate
                s = evaluate(a.rows[0], parsed.arch.params["transformer"])
                windows.setdefault(e.target, []).append((s, s + evaluate(a.rows[1], parsed.arch.params["transformer"])))
        assert set(windows) == set(bfl)
        for target, ws in windows.items():
            ws.sort()
            assert ws[0][0] == 0 and ws[-1][1] == bfl[target][0], target
            assert all(a[1] == b[0] for a, b in zip(ws, ws[1:])), target
        model = load(parsed)
    kohya = _modules_of(emit(model, "kohya").tensors, "lora_down.weight", "lora_up.weight")
    assert kohya == {"lora_unet_" + k.replace(".", "_"): v for k, v in bfl.items()}
    comfy = _modules_of(emit(model, "comfy").tensors, "lora_down.weight", "lora_up.weight")
    assert comfy == {"diffusion_model." + k: v for k, v in bfl.items()}
    back = _modules_of(emit(model, "diffusers").tensors, "lora_A.weight", "lora_B.weight")
    assert back == {"transformer." + k: v for k, v in diff.items()}


@pytest.mark.oracle
def test_meta_device_diffusers_model_matches_layout() -> None:
    diffusers = pytest.importorskip("diffusers")
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():
        model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                                 attention_head_dim=128, num_attention_heads=24,
                                                 joint_attention_dim=4096, pooled_projection_dim=768,
                                                 guidance_embeds=True)
    linears = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    predicted = {name: (out, inp) for name, out, inp in iter_split_modules(full_flux_params())}
    assert len(linears) == 504
    assert linears == predicted
