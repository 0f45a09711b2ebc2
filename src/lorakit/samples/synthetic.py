"""Tiny synthetic FLUX.1/FLUX.2-shaped models and LoRAs, generated from the layout data.

Used by the demo, the tests and the benchmarks. Nothing here downloads anything; every tensor comes
from a seeded generator so that files are reproducible byte for byte.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from lorakit.dtypes import dtype_code
from lorakit.io import SafetensorsWriter, save_tensors
from lorakit.layouts import FLUX1, Alias, ArchSpec, expand, expand_params

TINY_FLUX: dict[str, int] = {"H": 32, "M": 128, "IN": 16, "OUT": 16, "CTX": 24, "VEC": 20, "T": 8, "D": 16,
                             "double": 2, "single": 2, "guidance": 1, "modulation": 1}
# Tiny FLUX.2 transformers from the same layout data: dev-shaped (guidance embedder, 2 + 2 blocks) and Klein-shaped
# (no guidance embedder, 1 + 2 blocks, 3 heads); the MLP is 3×hidden as in every FLUX.2 release
TINY_FLUX2: dict[str, dict[str, int]] = {
    "dev": {"H": 32, "M": 96, "IN": 16, "OUT": 16, "CTX": 24, "T": 8, "D": 16, "double": 2, "single": 2,
            "guidance": 1},
    "klein": {"H": 48, "M": 144, "IN": 16, "OUT": 16, "CTX": 40, "T": 8, "D": 16, "double": 1, "single": 2,
              "guidance": 0},
}
TINY_CLIP: dict[str, int] = {"D": 24, "FF": 48, "layers": 2}
TINY_T5: dict[str, int] = {"D": 28, "INNER": 32, "FF": 40, "blocks": 2}
# Qwen-Image and Z-Image transformers with the same layout data at toy sizes (2 heads of 16; the diffusers classes
# accept them: QwenImageTransformer2DModel(in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
# num_attention_heads=2, joint_attention_dim=24), ZImageTransformer2DModel(in_channels=4, dim=32, n_layers=2,
# n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=20))
TINY_QWEN: dict[str, int] = {"H": 32, "M": 128, "IN": 16, "OUT": 16, "CTX": 24, "T": 256, "D": 16, "blocks": 2}
TINY_ZIMAGE: dict[str, int] = {"H": 32, "M": 85, "IN": 16, "OUT": 16, "T": 32, "F": 256, "TM": 1024, "CAP": 20,
                               "D": 16, "layers": 2, "noise": 1, "context": 1}


def full_flux_params(guidance: bool = True) -> dict[str, int]:
    """The FLUX.1-dev sizes from the layout preset."""
    p = dict(FLUX1.components["transformer"].presets[0].params)
    p.update(guidance=int(guidance), modulation=1)
    return p


@dataclass(frozen=True)
class BaseTensor:
    name: str
    shape: tuple[int, ...]


def base_tensors(params: Mapping[str, int], layout: str = "bfl", arch: ArchSpec = FLUX1) -> list[BaseTensor]:
    """Every tensor of a FLUX transformer in BFL or diffusers naming, derived from the layout."""
    comp = arch.components["transformer"]
    out: list[BaseTensor] = []
    for m in expand(comp, params):
        names: list[tuple[str, tuple[int, int], Alias | None]]
        if layout == "bfl":
            names = [(m.name, (m.out, m.inp), None)]
        else:
            names = []
            for alias in m.spec.names("diffusers"):
                name = alias.template.format(i=m.index) if m.index is not None else alias.template
                rows = m.out if alias.rows is None else _size(alias.rows[1], params)
                names.append((name, (rows, m.inp), alias))
        for name, shape, _ in names:
            out.append(BaseTensor(name + ".weight", shape))
            if m.bias:
                out.append(BaseTensor(name + ".bias", (shape[0],)))
    for p in expand_params(comp, params):
        name = p.name if layout == "bfl" else p.spec.aliases["diffusers"].format(i=p.index)
        out.append(BaseTensor(name, p.shape))
    return out


def _size(expr: str, params: Mapping[str, int]) -> int:
    from lorakit.layouts import evaluate
    return evaluate(expr, params)


def write_base(path: str | os.PathLike[str], params: Mapping[str, int] = TINY_FLUX, *, layout: str = "bfl",
               dtype: torch.dtype = torch.float32, seed: int = 0, prefix: str = "",
               fill: str = "randn", arch: ArchSpec = FLUX1) -> str:
    """Write a base model tensor by tensor (bounded memory, any size); ``layout`` "bfl" = the native names;
    ``arch``: FLUX.1, FLUX.2 or another architecture with a ``transformer`` component."""
    gen = torch.Generator().manual_seed(seed)
    specs = base_tensors(params, layout, arch)
    entries = [(prefix + t.name, dtype_code(dtype), t.shape) for t in specs]
    with SafetensorsWriter(path, entries, {"format": "pt"}) as w:
        for t in specs:
            if fill == "randn":
                value = (torch.randn(t.shape, generator=gen) * 0.05).to(dtype)
            else:
                value = torch.zeros(t.shape, dtype=dtype)
            w.write(prefix + t.name, value)
    return os.fspath(path)


def lora_factors(out: int, inp: int, rank: int, gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random (down, up) factors of one module."""
    down = (torch.randn(rank, inp, generator=gen) / inp ** 0.5).to(dtype)
    up = (torch.randn(out, rank, generator=gen) * 0.05).to(dtype)
    return down, up


def iter_split_modules(params: Mapping[str, int], arch: ArchSpec = FLUX1) -> Iterator[tuple[str, int, int]]:
    """(diffusers module name, out, in) of every split Linear of the transformer."""
    comp = arch.components["transformer"]
    for m in expand(comp, params):
        for alias in m.spec.names("diffusers"):
            name = alias.template.format(i=m.index) if m.index is not None else alias.template
            rows = m.out if alias.rows is None else _size(alias.rows[1], params)
            yield name, rows, m.inp


def write_aitoolkit_lora(path: str | os.PathLike[str], params: Mapping[str, int] = TINY_FLUX, *, rank: int = 4,
                         seed: int = 1, dtype: torch.dtype = torch.float32, blocks_only: bool = True) -> str:
    """An AI-Toolkit-style FLUX LoRA: diffusers names with ``transformer.`` prefix, no alpha (scale 1)."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, out, inp in iter_split_modules(params):
        if blocks_only and "blocks." not in name:
            continue
        down, up = lora_factors(out, inp, rank, gen, dtype)
        tensors[f"transformer.{name}.lora_A.weight"] = down
        tensors[f"transformer.{name}.lora_B.weight"] = up
    return save_tensors(path, tensors, {"format": "pt", "software": '{"name": "ai-toolkit (synthetic)"}'})


def write_sdscripts_lora(path: str | os.PathLike[str], params: Mapping[str, int] = TINY_FLUX, *, rank: int = 4,
                         alpha: float = 2.0, seed: int = 2, dtype: torch.dtype = torch.float32,
                         clip: Mapping[str, int] | None = TINY_CLIP) -> str:
    """An sd-scripts-style FLUX LoRA: fused BFL names flattened under ``lora_unet_``, ``.alpha`` per module."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    comps = [("lora_unet_", FLUX1.components["transformer"], params)]
    if clip:
        comps.append(("lora_te1_", FLUX1.components["clip_l"], clip))
    for prefix, comp, p in comps:
        for m in expand(comp, p):
            if comp.name == "transformer" and "blocks." not in m.name:
                continue
            stem = prefix + m.name.replace(".", "_")
            down, up = lora_factors(m.out, m.inp, rank, gen, dtype)
            tensors[f"{stem}.lora_down.weight"] = down
            tensors[f"{stem}.lora_up.weight"] = up
            tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
    meta = {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": "flux1", "ss_output_name": "synthetic"}
    return save_tensors(path, tensors, meta)


# ---------------------------------------------------------------------------------------------
# Any registered architecture: single-file checkpoints from the layout data
# ---------------------------------------------------------------------------------------------

TINY_SD: dict[str, dict[str, int]] = {
    # model channels shrunk; the widths that tell the SD models apart (context, label embedding, CLIP-L) kept
    "sd1": {"C": 16, "CTX": 768, "IN": 4, "OUT": 4},
    "sdxl": {"C": 16, "CTX": 2048, "ADM": 2816, "IN": 4, "OUT": 4},
}
TINY_TE: dict[str, dict[str, int]] = {"clip_l": {"D": 768, "FF": 96, "layers": 2},
                                      "clip_g": {"D": 64, "FF": 128, "layers": 2}}
PASSTHROUGH_SD = (("first_stage_model.decoder.conv_in.weight", (8, 4, 3, 3)),
                  ("first_stage_model.decoder.conv_in.bias", (8,)))


def checkpoint_tensors(arch: ArchSpec, sizes: Mapping[str, Mapping[str, int]], *,
                       prefixes: Mapping[str, str] | None = None) -> list[BaseTensor]:
    """Every weight/bias tensor of the given components in native (single-file) naming, each under its
    container prefix (the architecture's first container for the component unless ``prefixes`` says), with the
    layout's tensor names (``in_proj_weight``) and stored orientation (a transposed ``text_projection``)."""
    out: list[BaseTensor] = []
    for comp_name, params in sizes.items():
        comp = arch.components[comp_name]
        prefix = (prefixes or {}).get(comp_name)
        if prefix is None:
            prefix = next(c.prefix for c in arch.containers if c.component == comp_name)
        for m in expand(comp, params):
            shape = (m.inp, m.out) if m.spec.transpose else m.shape
            out.append(BaseTensor(prefix + m.spec.tensor_name(m.name, m.spec.weight), shape))
            if m.bias:
                out.append(BaseTensor(prefix + m.spec.tensor_name(m.name, m.spec.bias_param), (m.out,)))
        for p in expand_params(comp, params):
            out.append(BaseTensor(prefix + p.name, p.shape))
    return out


def write_checkpoint(path: str | os.PathLike[str], arch: ArchSpec, sizes: Mapping[str, Mapping[str, int]], *,
                     dtype: torch.dtype = torch.float32, seed: int = 0, fill: str = "randn",
                     extra: tuple[tuple[str, tuple[int, ...]], ...] = (),
                     prefixes: Mapping[str, str] | None = None) -> str:
    """A single-file checkpoint of ``arch`` (e.g. an SDXL-shaped UNet + CLIP-L + OpenCLIP-G, and ``extra``
    passthrough tensors such as VAE keys), written tensor by tensor (bounded memory, any size)."""
    gen = torch.Generator().manual_seed(seed)
    specs = checkpoint_tensors(arch, sizes, prefixes=prefixes) + [BaseTensor(n, s) for n, s in extra]
    entries = [(t.name, dtype_code(dtype), t.shape) for t in specs]
    with SafetensorsWriter(path, entries, {"format": "pt"}) as w:
        for t in specs:
            value = (torch.randn(t.shape, generator=gen) * 0.05).to(dtype) if fill == "randn" else \
                torch.zeros(t.shape, dtype=dtype)
            w.write(t.name, value)
    return os.fspath(path)


def write_arch_lora(path: str | os.PathLike[str], arch: ArchSpec, sizes: Mapping[str, Mapping[str, int]],
                    modules: list[tuple[str, str]], *, fmt: str = "kohya", rank: int = 4, alpha: float | None = None,
                    seed: int = 1, dtype: torch.dtype = torch.float32) -> str:
    """A LoRA for ``arch`` on the given (component, native module) pairs, written in ``fmt`` by lorakit's own
    writer (seeded factors; conv modules get 4-D downs). For samples and benchmarks; tests spell files by hand."""
    from lorakit.lora.adapters import LoRA
    from lorakit.formats import emit
    from lorakit.lora.model import ArchInstance, LoraModel, Patch, Target

    gen = torch.Generator().manual_seed(seed)
    instance = ArchInstance(arch, {c: dict(p) for c, p in sizes.items()})
    patches = []
    for comp, native in modules:
        m = instance.module_map(comp)[native]
        down = (torch.randn(rank, m.inp, *m.kernel, generator=gen) / (m.inp ** 0.5)).to(dtype)
        up = (torch.randn(m.out, rank, *([1] * len(m.kernel)), generator=gen) * 0.05).to(dtype)
        patches.append(Patch(Target(comp, native), LoRA(alpha=alpha, down=down, up=up)))
    result = emit(LoraModel(instance, patches, fmt), fmt)
    save_tensors(path, result.tensors, {"ss_base_model_version": arch.stamp.version(arch.default_variant)}
                 if arch.stamp.ss_version else None)
    return os.fspath(path)


# ---------------------------------------------------------------------------------------------
# Wan 2.1 / 2.2: tiny transformers (and expert pairs) in Wan or diffusers naming, from the layout data
# ---------------------------------------------------------------------------------------------

# hidden 32 (2 heads of 16), FFN 64, 4 latent channels (head 4·4 rows), 2 blocks; I2V: image width 20, 8 channels
TINY_WAN: dict[str, int] = {"H": 32, "FF": 64, "IN": 4, "HEAD": 16, "TEXT": 24, "T": 8, "blocks": 2, "i2v": 0}
TINY_WAN_I2V: dict[str, int] = {**TINY_WAN, "IN": 8, "IMG": 20, "i2v": 1}


def component_tensors(arch: ArchSpec, component: str, params: Mapping[str, int], *, naming: str = "native",
                      prefix: str = "") -> list[BaseTensor]:
    """Every weight/bias/loose tensor of one component in a naming (split aliases: one tensor per row window)."""
    comp = arch.components[component]
    out: list[BaseTensor] = []
    for m in expand(comp, params):
        if naming == "native":
            shape = (m.inp, m.out) if m.spec.transpose else m.shape
            out.append(BaseTensor(prefix + m.spec.tensor_name(m.name, m.spec.weight), shape))
            if m.bias:
                out.append(BaseTensor(prefix + m.spec.tensor_name(m.name, m.spec.bias_param), (m.out,)))
            continue
        for alias in m.spec.names(naming):
            name = alias.template.format(i=m.index) if m.index is not None else alias.template
            rows = m.out if alias.rows is None else _size(alias.rows[1], params)
            out.append(BaseTensor(f"{prefix}{name}.weight", (rows, m.inp, *m.kernel)))
            if m.bias:
                out.append(BaseTensor(f"{prefix}{name}.bias", (rows,)))
    for p in expand_params(comp, params):
        name = p.name if naming == "native" else p.spec.aliases[naming].format(i=p.index)
        out.append(BaseTensor(prefix + name, p.shape))
    return out


def write_component(path: str | os.PathLike[str], arch: ArchSpec, component: str, params: Mapping[str, int], *,
                    naming: str = "native", prefix: str = "", dtype: torch.dtype = torch.float32,
                    seed: int = 0) -> str:
    """A checkpoint of one component (e.g. one Wan expert), tensor by tensor (bounded memory, any size)."""
    gen = torch.Generator().manual_seed(seed)
    specs = component_tensors(arch, component, params, naming=naming, prefix=prefix)
    entries = [(t.name, dtype_code(dtype), t.shape) for t in specs]
    with SafetensorsWriter(path, entries, {"format": "pt"}) as w:
        for t in specs:
            w.write(t.name, (torch.randn(t.shape, generator=gen) * 0.05).to(dtype))
    return os.fspath(path)


def write_wan_pair(folder: str | os.PathLike[str], params: Mapping[str, int] = TINY_WAN, *,
                   naming: str = "native") -> tuple[str, str]:
    """A tiny Wan 2.2 A14B-style pair: ``high_noise_model.safetensors``, ``low_noise_model.safetensors``."""
    from lorakit.layouts import WAN
    high = write_component(os.path.join(folder, "high_noise_model.safetensors"), WAN, "transformer", params,
                           naming=naming, seed=10)
    low = write_component(os.path.join(folder, "low_noise_model.safetensors"), WAN, "transformer", params,
                          naming=naming, seed=11)
    return high, low
