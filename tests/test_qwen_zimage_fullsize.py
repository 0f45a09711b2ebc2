"""Full-size Qwen-Image and Z-Image name and shape mapping, without weights.

LoRAs and bases are header-only (sparse) safetensors files built from the reference shape files; every Linear of
each family goes native ⇄ diffusers and back, Z-Image's fused ``attention.qkv`` included. The only tensors made
are the rank-1 factors the emitter writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit.base.checkpoint import open_base
from lorakit.formats import emit, load, parse
from lorakit.io import open_weights
from lorakit.layouts import resolve
from lorakit.samples.synthetic import base_tensors

from reference import header_only, reference_shapes

REF = reference_shapes()
QWEN, ZDIFF, ZCOMFY = REF / "qwen-image-diffusers.json", REF / "z-image-diffusers.json", REF / "z-image-comfy.json"
pytestmark = pytest.mark.skipif(not (QWEN.exists() and ZDIFF.exists() and ZCOMFY.exists()),
                                reason="reference shape files not available")


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads(path.read_text())["params"].items()}


def _linears(path: Path) -> dict[str, tuple[int, int]]:
    return {k[: -len(".weight")]: v for k, v in _shapes(path).items() if k.endswith(".weight") and len(v) == 2}


def lora_file(path: Path, modules: dict[str, tuple[int, int]], stem, kohya: bool) -> str:
    down, up = ("lora_down.weight", "lora_up.weight") if kohya else ("lora_A.weight", "lora_B.weight")
    entries: dict[str, tuple[int, ...]] = {}
    for name, (o, i) in modules.items():
        entries[f"{stem(name)}.{down}"], entries[f"{stem(name)}.{up}"] = (1, i), (o, 1)
        if kohya:
            entries[f"{stem(name)}.alpha"] = ()
    return header_only(path, entries)


def written(tensors: dict[str, torch.Tensor], down: str, up: str) -> dict[str, tuple[int, int]]:
    return {k[: -len(up) - 1]: (int(t.shape[0]), int(tensors[k[: -len(up)] + down].shape[1]))
            for k, t in tensors.items() if k.endswith("." + up)}


def flat(name: str) -> str:
    return name.replace(".", "_")


@pytest.mark.parametrize("arch,layout,path", [("qwen-image", "bfl", QWEN), ("qwen-image", "diffusers", QWEN),
                                              ("z-image", "bfl", ZCOMFY), ("z-image", "diffusers", ZDIFF)])
def test_layout_reproduces_the_shape_files(arch: str, layout: str, path: Path) -> None:
    spec = resolve(arch)
    params = dict(spec.denoiser.presets[0].params)
    got = {t.name: tuple(t.shape) for t in base_tensors(params, layout, spec)}
    assert got == _shapes(path)


def test_linear_counts() -> None:
    assert len(_linears(QWEN)) == 846 and len(_linears(ZDIFF)) == 276 and len(_linears(ZCOMFY)) == 208


def _roundtrip(path: str, fmt: str, family: str) -> object:
    with open_weights(path) as f:
        parsed = parse(f)
        assert (parsed.format, parsed.arch.spec.name, parsed.unknown_keys) == (fmt, family, [])
        assert parsed.arch.variant == "base"
        return parsed, load(parsed)


def test_qwen_every_linear_maps_through_every_format(tmp_path) -> None:
    lin = _linears(QWEN)
    parsed, model = _roundtrip(lora_file(tmp_path / "musubi.safetensors", lin, lambda n: "lora_unet_" + flat(n), True),
                               "kohya", "qwen-image")
    assert parsed.arch.params["transformer"]["H"] == 3072 and parsed.arch.params["transformer"]["blocks"] == 60
    assert {e.target for e in parsed.entries} == set(lin)
    kw = ("lora_down.weight", "lora_up.weight")
    assert written(emit(model, "diffusers").tensors, "lora_A.weight", "lora_B.weight") == \
        {"transformer." + k: v for k, v in lin.items()}
    assert written(emit(model, "comfy").tensors, *kw) == {"diffusion_model." + k: v for k, v in lin.items()}
    assert written(emit(model, "kohya").tensors, *kw) == {"lora_unet_" + flat(k): v for k, v in lin.items()}


def _diff_to_comfy(name: str) -> tuple[str, int]:
    """By hand (reference README): diffusers -> (ComfyUI name, row block index)."""
    for k, s in enumerate(("to_q", "to_k", "to_v")):
        if name.endswith(".attention." + s):
            return name[: -len(s)] + "qkv", k
    if name.endswith(".attention.to_out.0"):
        return name[: -len("to_out.0")] + "out", 0
    return name.replace("all_x_embedder.2-1", "x_embedder").replace("all_final_layer.2-1", "final_layer"), 0


def test_zimage_every_diffusers_linear_maps_to_comfy_and_back(tmp_path) -> None:
    diff, comfy = _linears(ZDIFF), _linears(ZCOMFY)
    parsed, model = _roundtrip(lora_file(tmp_path / "d.safetensors", diff, lambda n: "transformer." + n, False),
                               "diffusers", "z-image")
    p = parsed.arch.params["transformer"]
    assert (p["H"], p["layers"], p["noise"], p["context"]) == (3840, 30, 2, 2)
    # every split module lands on its ComfyUI weight at the hand-typed row block; the blocks tile it
    windows: dict[str, list[tuple[int, int]]] = {}
    for e in parsed.entries:
        native, k = _diff_to_comfy(e.file_module[len("transformer."):])
        assert e.target == native, e.file_module
        rows = diff[e.file_module[len("transformer."):]][0]
        from lorakit.formats.parse import row_window
        win = row_window(e.match.alias, p) or (0, comfy[native][0])
        assert win == (k * rows, (k + 1) * rows), e.file_module
        windows.setdefault(native, []).append(win)
    assert set(windows) == set(comfy)
    for native, ws in windows.items():
        ws.sort()
        assert ws[0][0] == 0 and ws[-1][1] == comfy[native][0] and all(a[1] == b[0] for a, b in zip(ws, ws[1:]))
    kw = ("lora_down.weight", "lora_up.weight")
    assert written(emit(model, "comfy").tensors, *kw) == {"diffusion_model." + k: v for k, v in comfy.items()}
    assert written(emit(model, "kohya").tensors, *kw) == {"lora_unet_" + flat(k): v for k, v in diff.items()}
    assert written(emit(model, "diffusers").tensors, "lora_A.weight", "lora_B.weight") == \
        {"transformer." + k: v for k, v in diff.items()}


def test_zimage_every_comfy_linear_maps_to_diffusers(tmp_path) -> None:
    diff, comfy = _linears(ZDIFF), _linears(ZCOMFY)
    parsed, model = _roundtrip(lora_file(tmp_path / "c.safetensors", comfy, lambda n: "diffusion_model." + n, True),
                               "comfy", "z-image")
    assert {e.target for e in parsed.entries} == set(comfy)
    assert written(emit(model, "diffusers").tensors, "lora_A.weight", "lora_B.weight") == \
        {"transformer." + k: v for k, v in diff.items()}


@pytest.mark.parametrize("path,prefix,arch,layout", [
    (QWEN, "", "qwen-image", "native"), (QWEN, "model.diffusion_model.", "qwen-image", "native"),
    (ZCOMFY, "model.diffusion_model.", "z-image", "native"), (ZDIFF, "", "z-image", "diffusers"),
    (REF / "flux1-dev-diffusers.json", "", "flux1", "diffusers")])
def test_fullsize_bases_are_told_apart(tmp_path, path: Path, prefix: str, arch: str, layout: str) -> None:
    base = header_only(tmp_path / "base.safetensors", {prefix + k: v for k, v in _shapes(path).items()})
    with open_weights(base) as f:
        bm = open_base(f)
        assert (bm.arch.spec.name, bm.layout, bm.prefix) == (arch, layout, prefix)
        assert bm.passthrough == []
