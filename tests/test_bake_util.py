"""Helpers for the bake tests (no tests here): synthetic bases in every layout, LoRAs, expected weights.

Expected weights are computed independently of the bake engine: from lorakit's dense deltas (or raw
factors) added to the base in fp32, then mapped back to the base file's layout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.base.checkpoint import open_base
from lorakit.formats import read_lora
from lorakit.io import open_weights
from lorakit.layouts import FLUX1, expand
from lorakit.lora.model import dense_deltas
from lorakit.samples.synthetic import TINY_CLIP, TINY_FLUX, TINY_T5, lora_factors, write_base

TRANSFORMER = FLUX1.components["transformer"]
SHARDS = ("diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors")
INDEX = "diffusion_pytorch_model.safetensors.index.json"
COMFY_EXTRA = {"first_stage_model.decoder.conv_in.weight": (4, 3, 3, 3),
               "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": (10, 8)}


def swap(t: torch.Tensor) -> torch.Tensor:
    h = t.shape[0] // 2
    return torch.cat([t[h:], t[:h]])


# ------------------------------------------------------------------------------------------------
# Bases
# ------------------------------------------------------------------------------------------------

def make_base(folder, layout: str, params: Mapping[str, int] = TINY_FLUX, dtype: torch.dtype = torch.float32,
              seed: int = 0, metadata: Mapping[str, str] | None = None) -> str:
    """A base in layout bfl | comfy | diffusers | sharded; returns the path to pass to bake."""
    folder = str(folder)
    if layout in ("bfl", "diffusers"):
        path = os.path.join(folder, f"base_{layout}.safetensors")
        write_base(path, params, layout=layout, dtype=dtype, seed=seed)
        if metadata:
            save_file(load_file(path), path, metadata={"format": "pt", **metadata})
        return path
    if layout == "comfy":
        src = make_base(folder, "bfl", params, dtype, seed)
        tensors = {"model.diffusion_model." + k: v for k, v in load_file(src).items()}
        g = torch.Generator().manual_seed(seed + 99)
        for k, shape in COMFY_EXTRA.items():
            tensors[k] = torch.randn(shape, generator=g).to(torch.float16)
        path = os.path.join(folder, "base_comfy.safetensors")
        save_file(tensors, path, metadata={"format": "pt", **(metadata or {})})
        os.unlink(src)
        return path
    if layout == "sharded":
        src = make_base(folder, "diffusers", params, dtype, seed)
        tensors = load_file(src)
        os.unlink(src)
        out = os.path.join(folder, "base_sharded")
        os.makedirs(out)
        keys = sorted(tensors)
        parts = {SHARDS[0]: keys[::2], SHARDS[1]: keys[1::2]}
        wmap = {}
        for shard, ks in parts.items():
            save_file({k: tensors[k] for k in ks}, os.path.join(out, shard), metadata={"format": "pt"})
            wmap.update({k: shard for k in ks})
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        with open(os.path.join(out, INDEX), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, fh)
        with open(os.path.join(out, "config.json"), "w") as fh:
            json.dump({"_class_name": "FluxTransformer2DModel"}, fh)
        return out
    raise ValueError(layout)


def read_all(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a file or sharded folder, read with the reference safetensors package."""
    if os.path.isdir(path):
        with open(os.path.join(path, INDEX)) as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for s in shards:
            out.update(load_file(os.path.join(path, s)))
        return out
    return load_file(path)


def metadata_of(path: str) -> dict[str, str]:
    if os.path.isdir(path):
        path = os.path.join(path, SHARDS[0])
    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


def native_state(path: str) -> dict[str, torch.Tensor]:
    """fp32 native (BFL) tensors ``module.weight``/``module.bias``/loose name, rebuilt from any layout."""
    tensors = read_all(path)
    with open_weights(path) as f:
        bm = open_base(f)
        mods = bm.arch.module_map("transformer")
        out: dict[str, torch.Tensor] = {}
        for k, s in bm.slots.items():
            t = tensors[k].float()
            if s.module is None:
                out[s.param] = t
                continue
            m = mods[s.module]
            full = out.setdefault(f"{s.module}.{s.param}",
                                  torch.full((m.out, m.inp) if s.param == "weight" else (m.out,), float("nan")))
            a, b = s.rows or (0, m.out)
            full[a:b] = swap(t) if s.swap else t
    return out


def expected_native(base: str, loras: Iterable[tuple[str, float]]) -> dict[str, torch.Tensor]:
    """base + Σ w·ΔW (and Σ w·Δbias) in native space, from lorakit's dense deltas (strength 1)."""
    nat = {k: v.clone() for k, v in native_state(base).items()}
    for path, w in loras:
        model = read_lora(path)
        for target, d in dense_deltas(model).items():
            if target.component == "transformer":
                nat[f"{target.module}.weight"] += w * d.reshape(nat[f"{target.module}.weight"].shape)
        for p in model.patches:
            if p.target.component == "transformer" and p.bias is not None:
                b = nat[f"{p.target.module}.bias"]
                a0, a1 = p.rows or (0, b.shape[0])
                b[a0:a1] += w * p.bias.float()
    return nat


# ------------------------------------------------------------------------------------------------
# LoRAs
# ------------------------------------------------------------------------------------------------

def write_kohya_all(path: str, params: Mapping[str, int] = TINY_FLUX, *, rank: int = 4, alpha: float = 2.0,
                    seed: int = 3, dtype: torch.dtype = torch.float32, modules: Iterable[str] | None = None,
                    diff_b: Iterable[str] = (), dora: Iterable[str] = (), clip: Mapping[str, int] | None = None,
                    t5: Mapping[str, int] | None = None, metadata: Mapping[str, str] | None = None) -> str:
    """An sd-scripts-style LoRA over every transformer module (embedders and final layer included)."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    wanted = set(modules) if modules is not None else None
    comps = [("lora_unet_", TRANSFORMER, params)]
    if clip:
        comps.append(("lora_te1_", FLUX1.components["clip_l"], clip))
    if t5:
        comps.append(("lora_te3_", FLUX1.components["t5"], t5))
    for prefix, comp, p in comps:
        for m in expand(comp, p):
            if comp is TRANSFORMER and wanted is not None and m.name not in wanted:
                continue
            stem = prefix + m.name.replace(".", "_")
            down, up = lora_factors(m.out, m.inp, rank, g, dtype)
            tensors[f"{stem}.lora_down.weight"] = down
            tensors[f"{stem}.lora_up.weight"] = up
            tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
            if m.name in set(diff_b):
                tensors[f"{stem}.diff_b"] = (torch.randn(m.out, generator=g) * 0.01).to(dtype)
            if m.name in set(dora):
                tensors[f"{stem}.dora_scale"] = (torch.rand(m.out, 1, generator=g) + 0.5).to(dtype)
    meta = {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            **(metadata or {})}
    save_file(tensors, path, metadata=meta)
    return path


def write_te_file(path: str, component: str, params: Mapping[str, int], *, prefix: str = "", seed: int = 5,
                  dtype: torch.dtype = torch.float32) -> str:
    """A tiny CLIP-L / T5 encoder file with HF names (plus a tensor no LoRA touches)."""
    g = torch.Generator().manual_seed(seed)
    comp = FLUX1.components[component]
    tensors: dict[str, torch.Tensor] = {}
    for m in expand(comp, params):
        tensors[prefix + m.name + ".weight"] = (torch.randn(m.out, m.inp, generator=g) * 0.05).to(dtype)
        if m.bias:
            tensors[prefix + m.name + ".bias"] = (torch.randn(m.out, generator=g) * 0.05).to(dtype)
    extra = "text_model.embeddings.token_embedding.weight" if component == "clip_l" else "shared.weight"
    tensors[prefix + extra] = torch.randn(10, params["D"], generator=g).to(dtype)
    save_file(tensors, path)
    return path


__all__ = ["TINY_FLUX", "TINY_CLIP", "TINY_T5", "make_base", "read_all", "metadata_of", "native_state",
           "expected_native", "write_kohya_all", "write_te_file", "swap", "SHARDS", "INDEX", "COMFY_EXTRA"]
