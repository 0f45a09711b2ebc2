"""A toy two-component architecture declared only in tests, and writers for its base checkpoints and LoRAs.

``toy`` has a ``unet`` denoiser (a 3×3 conv ``conv_in``, an enumerated list of Linear projections
``blocks.{b}.sub.{t}.proj`` over two indices, a 1×1 conv ``mid.skip``, a Linear ``head``) and a ``te`` text
encoder (role te1) with OpenCLIP-style fused attention (``layers.{i}.attn.in_proj_weight``/``in_proj_bias``,
split q/k/v row windows in the "diffusers" naming) and a ``text_projection`` stored in × out (``x @ P``).
A single-file base holds the unet under ``model.diffusion_model.``, the te under ``cond.te.`` and a VAE-like
``first_stage.`` that no component claims.

Sizes and shapes are written out by hand here (``SIZES``); the writers use ``safetensors`` directly, not lorakit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import pytest
import torch

from lorakit.layouts.base import Alias, ArchSpec, ComponentSpec, Container, ModuleSpec, Rule

SIZES = {"C": 8, "IN": 4, "OUT": 6, "D": 12, "P": 10, "layers": 2}
BLOCKS, SUBS = 2, 3

UNET_PREFIX = "model.diffusion_model."
TE_PREFIX = "cond.te."
VAE_PREFIX = "first_stage."


def _unet_modules() -> Iterator[ModuleSpec]:
    yield ModuleSpec("conv_in", "C", "IN", "io", kernel=("3", "3"), aliases={"diffusers": (Alias("conv_in"),)})
    for b in range(BLOCKS):
        for t in range(SUBS):
            yield ModuleSpec(f"blocks.{b}.sub.{t}.proj", "C", "C", "blocks",
                             aliases={"diffusers": (Alias(f"down_blocks.{b}.attentions.{t}.proj"),)})
    yield ModuleSpec("mid.skip", "C", "C", "mid", kernel=("1", "1"), aliases={"diffusers": (Alias("mid_block.skip"),)})
    yield ModuleSpec("head", "OUT", "C", "io", aliases={"diffusers": (Alias("proj_out"),)})


UNET = ComponentSpec(name="unet", label="toy UNet", modules=tuple(_unet_modules()), namings=("native", "diffusers"),
                     role="denoiser")

_L = "layers.{i}."
TE = ComponentSpec(
    name="te", label="toy text encoder", role="te1", namings=("native", "diffusers"), counts=("layers",),
    modules=(
        ModuleSpec(_L + "attn", "3*D", "D", "layers", repeat="layers", weight="in_proj_weight",
                   bias_param="in_proj_bias",
                   aliases={"diffusers": (Alias(_L + "self_attn.q_proj", ("0", "D")),
                                          Alias(_L + "self_attn.k_proj", ("D", "D")),
                                          Alias(_L + "self_attn.v_proj", ("2*D", "D")))}),
        ModuleSpec(_L + "attn.out_proj", "D", "D", "layers", repeat="layers",
                   aliases={"diffusers": (Alias(_L + "self_attn.out_proj"),)}),
        ModuleSpec("text_projection", "P", "D", "proj", weight="", transpose=True, bias=False,
                   aliases={"diffusers": (Alias("text_projection"),)}),
    ),
)

TOY = ArchSpec(
    name="toy", label="Toy", components={"unet": UNET, "te": TE},
    rules={"kohya": (Rule("lora_unet_", "unet", ("diffusers", "native"), True),
                     Rule("lora_te1_", "te", ("diffusers",), True)),
           "comfy": (Rule("diffusion_model.", "unet", ("native", "diffusers"), False),
                     Rule("text_encoders.te.", "te", ("diffusers",), False))},
    containers=(Container("unet", UNET_PREFIX, ("native",), folder="unet"),
                Container("te", TE_PREFIX, ("native",), folder="text_encoder")),
    named_by=("toy",),
)


@pytest.fixture
def toy_arch(monkeypatch: pytest.MonkeyPatch) -> ArchSpec:
    """Register ``toy`` for one test (the registry is restored afterwards)."""
    import lorakit.layouts as layouts

    monkeypatch.setitem(layouts._ARCHS, TOY.name, TOY)
    return TOY


# ----------------------------------------------------------------------------------------------
# Shapes by hand (checkpoint tensor shapes: text_projection is stored in × out)
# ----------------------------------------------------------------------------------------------

def unet_shapes(s: Mapping[str, int] = SIZES) -> dict[str, tuple[int, ...]]:
    c = s["C"]
    out = {"conv_in.weight": (c, s["IN"], 3, 3), "conv_in.bias": (c,)}
    for b in range(BLOCKS):
        for t in range(SUBS):
            out[f"blocks.{b}.sub.{t}.proj.weight"] = (c, c)
            out[f"blocks.{b}.sub.{t}.proj.bias"] = (c,)
    out["mid.skip.weight"] = (c, c, 1, 1)
    out["mid.skip.bias"] = (c,)
    out["head.weight"] = (s["OUT"], c)
    out["head.bias"] = (s["OUT"],)
    return out


def te_shapes(s: Mapping[str, int] = SIZES) -> dict[str, tuple[int, ...]]:
    d = s["D"]
    out: dict[str, tuple[int, ...]] = {"embed.weight": (20, d)}     # not a module: passthrough inside te
    for i in range(s["layers"]):
        out[f"layers.{i}.attn.in_proj_weight"] = (3 * d, d)
        out[f"layers.{i}.attn.in_proj_bias"] = (3 * d,)
        out[f"layers.{i}.attn.out_proj.weight"] = (d, d)
        out[f"layers.{i}.attn.out_proj.bias"] = (d,)
    out["text_projection"] = (d, s["P"])
    return out


VAE_SHAPES = {"first_stage.decoder.conv.weight": (3, 4, 3, 3), "first_stage.decoder.conv.bias": (3,),
              "first_stage.encoder.conv.weight": (8, 3, 3, 3)}


def base_tensors(gen: torch.Generator, *, te: bool = True,
                 fp16: Iterable[str] = ("head.weight",)) -> dict[str, torch.Tensor]:
    """A single-file toy base: unet (fp32, with ``fp16`` unet keys in fp16), te (fp16, unless ``te`` is false),
    VAE-like ``first_stage.`` tensors (fp32) that no component claims."""
    half = set(fp16)
    out: dict[str, torch.Tensor] = {}
    for k, shape in unet_shapes().items():
        out[UNET_PREFIX + k] = torch.randn(shape, generator=gen).to(torch.float16 if k in half else torch.float32)
    if te:
        for k, shape in te_shapes().items():
            out[TE_PREFIX + k] = torch.randn(shape, generator=gen).to(torch.float16)
    for k, shape in VAE_SHAPES.items():
        out[k] = torch.randn(shape, generator=gen)
    return out


def write_base(path: str, gen: torch.Generator, **kw: object) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    tensors = base_tensors(gen, **kw)  # type: ignore[arg-type]
    save_file(tensors, path)
    return tensors


# ----------------------------------------------------------------------------------------------
# A kohya LoRA for the toy (diffusers names, flattened)
# ----------------------------------------------------------------------------------------------

# kohya module name -> (ΔW shape out × in[×k×k], rank, alpha)
def lora_modules(s: Mapping[str, int] = SIZES) -> dict[str, tuple[tuple[int, ...], int, float]]:
    c, d = s["C"], s["D"]
    return {
        "lora_unet_conv_in": ((c, s["IN"], 3, 3), 2, 1.0),   # conv 3×3: down [r, in, 3, 3], up [out, r, 1, 1]
        "lora_unet_mid_block_skip": ((c, c, 1, 1), 3, 6.0),            # conv 1×1
        "lora_unet_down_blocks_1_attentions_2_proj": ((c, c), 4, 2.0),   # Linear, second index pair
        "lora_te1_layers_1_self_attn_q_proj": ((d, d), 2, 3.0),        # q rows of the fused in_proj
        "lora_te1_text_projection": ((s["P"], d), 3, 1.5),              # stored transposed in the base
    }


def lora_tensors(gen: torch.Generator, modules: Mapping[str, tuple[tuple[int, ...], int, float]] | None = None
                 ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, (shape, r, alpha) in (modules or lora_modules()).items():
        tail = shape[2:]
        out[f"{name}.lora_down.weight"] = torch.randn((r, shape[1], *tail), generator=gen)
        out[f"{name}.lora_up.weight"] = torch.randn((shape[0], r, *([1] * len(tail))), generator=gen) * 0.1
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def write_lora(path: str, gen: torch.Generator,
               modules: Mapping[str, tuple[tuple[int, ...], int, float]] | None = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    tensors = lora_tensors(gen, modules)
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora"})
    return tensors


def delta(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """ΔW = (α/r)·up@down of one kohya module, reshaped to ``out × in[×k×k]`` (fp32, by hand)."""
    down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
    r = down.shape[0]
    scale = float(tensors[f"{name}.alpha"]) / r
    return (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(up.shape[0], *down.shape[1:]) * scale
