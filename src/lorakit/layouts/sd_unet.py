"""SD1.x and SDXL UNet layout data: single-file (LDM / SGM ``openaimodel``) names as native, diffusers
``UNet2DConditionModel`` names as the ``diffusers`` alias. Nothing is fused, so every alias is a plain rename.

Both UNets come from one builder fed with structural data (:class:`UNetStructure`): channel multiplier,
transformer depth and res-block count per level, the middle block's transformer depth, whether
``proj_in``/``proj_out`` are 1×1 convolutions or Linear, and whether an ADM label embedding exists.

Sizes: ``C`` model channels (time embedding ``4*C``), ``CTX`` cross-attention width, ``IN``/``OUT`` latent
channels, ``ADM`` SDXL's label-embedding input. Groups are LoRA-Block-Weight block ids: ``IN00``… for
``input_blocks.N`` (``IN00`` = conv_in), ``M00`` for the middle block, ``OUT00``… for ``output_blocks.N``,
``embed`` for time/label embeddings, ``out`` for the output convolution. Norms are not modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lorakit.layouts.base import Alias, ComponentSpec, Expr, ModuleSpec, Preset

CONV3: tuple[Expr, ...] = ("3", "3")
CONV1: tuple[Expr, ...] = ("1", "1")
LINEAR: tuple[Expr, ...] = ()


@dataclass(frozen=True)
class UNetStructure:
    """The shape of an ``openaimodel`` UNet. A level has attention exactly when its depth is non-zero."""

    mult: tuple[int, ...]            # channel multiplier per level (width = mult * C)
    depth: tuple[int, ...]           # transformer blocks per attention, per level (0: no attention)
    mid_depth: int                   # transformer blocks in the middle block's attention
    res: int                         # res blocks per level on the way down (one more on the way up)
    proj_kernel: tuple[Expr, ...]    # proj_in/proj_out: CONV1 (SD1) or LINEAR (SDXL, use_linear_in_transformer)
    adm: bool                        # label_emb (SDXL's pooled-text + size conditioning)


def _ch(k: int) -> Expr:
    """``k`` times the model channels as a size expression."""
    return "C" if k == 1 else f"{k}*C"


class _Builder:
    """Collects module specs and group labels in network order."""

    def __init__(self) -> None:
        self.modules: list[ModuleSpec] = []
        self.labels: dict[str, str] = {}

    def group(self, group: str, label: str) -> str:
        self.labels.setdefault(group, label)
        return group

    def add(self, native: str, diffusers: str, out: Expr, inp: Expr, group: str, *,
            kernel: tuple[Expr, ...] = LINEAR, bias: bool = True) -> None:
        self.modules.append(ModuleSpec(native, out, inp, group, aliases={"diffusers": (Alias(diffusers),)},
                                       bias=bias, kernel=kernel))

    def resnet(self, native: str, diffusers: str, k_in: int, k_out: int, group: str) -> None:
        """``ResBlock`` (LDM) / ``ResnetBlock2D`` (diffusers) from ``k_in*C`` to ``k_out*C`` channels."""
        n, d = native + ".", diffusers + "."
        self.add(n + "in_layers.2", d + "conv1", _ch(k_out), _ch(k_in), group, kernel=CONV3)
        self.add(n + "emb_layers.1", d + "time_emb_proj", _ch(k_out), "4*C", group)
        self.add(n + "out_layers.3", d + "conv2", _ch(k_out), _ch(k_out), group, kernel=CONV3)
        if k_in != k_out:
            self.add(n + "skip_connection", d + "conv_shortcut", _ch(k_out), _ch(k_in), group, kernel=CONV1)

    def attention(self, native: str, diffusers: str, k: int, depth: int, proj: tuple[Expr, ...],
                  group: str) -> None:
        """``SpatialTransformer`` / ``Transformer2DModel`` of width ``k*C`` with ``depth`` blocks."""
        w = _ch(k)
        self.add(native + ".proj_in", diffusers + ".proj_in", w, w, group, kernel=proj)
        for t in range(depth):
            tb = f".transformer_blocks.{t}."
            n, d = native + tb, diffusers + tb
            for attn, kv in (("attn1", w), ("attn2", "CTX")):
                for proj_name, inp in (("to_q", w), ("to_k", kv), ("to_v", kv)):
                    self.add(n + f"{attn}.{proj_name}", d + f"{attn}.{proj_name}", w, inp, group, bias=False)
                self.add(n + f"{attn}.to_out.0", d + f"{attn}.to_out.0", w, w, group)
            self.add(n + "ff.net.0.proj", d + "ff.net.0.proj", _ch(8 * k), w, group)   # GEGLU: 2 × 4·width
            self.add(n + "ff.net.2", d + "ff.net.2", w, _ch(4 * k), group)
        self.add(native + ".proj_out", diffusers + ".proj_out", w, w, group, kernel=proj)


def build_unet(label: str, s: UNetStructure, presets: tuple[Preset, ...],
               fixed: Mapping[str, int]) -> ComponentSpec:
    """The ``unet`` component of an ``openaimodel`` UNet with structure ``s``."""
    b = _Builder()
    emb = b.group("embed", "time/label embeddings")
    b.add("time_embed.0", "time_embedding.linear_1", "4*C", "C", emb)
    b.add("time_embed.2", "time_embedding.linear_2", "4*C", "4*C", emb)
    if s.adm:
        b.add("label_emb.0.0", "add_embedding.linear_1", "4*C", "ADM", emb)
        b.add("label_emb.0.2", "add_embedding.linear_2", "4*C", "4*C", emb)

    # down path; `skips` = channel multiple of every input block's output, popped by the up path
    b.add("input_blocks.0.0", "conv_in", "C", "IN", b.group("IN00", "input block 0"), kernel=CONV3)
    skips, ch, n, last = [1], 1, 1, len(s.mult) - 1
    for lvl, (mult, depth) in enumerate(zip(s.mult, s.depth, strict=True)):
        for r in range(s.res):
            g = b.group(f"IN{n:02d}", f"input block {n}")
            b.resnet(f"input_blocks.{n}.0", f"down_blocks.{lvl}.resnets.{r}", ch, mult, g)
            if depth:
                b.attention(f"input_blocks.{n}.1", f"down_blocks.{lvl}.attentions.{r}", mult, depth,
                            s.proj_kernel, g)
            ch = mult
            skips.append(ch)
            n += 1
        if lvl != last:
            g = b.group(f"IN{n:02d}", f"input block {n}")
            b.add(f"input_blocks.{n}.0.op", f"down_blocks.{lvl}.downsamplers.0.conv", _ch(ch), _ch(ch), g,
                  kernel=CONV3)
            skips.append(ch)
            n += 1

    mid = b.group("M00", "middle block")
    b.resnet("middle_block.0", "mid_block.resnets.0", ch, ch, mid)
    b.attention("middle_block.1", "mid_block.attentions.0", ch, s.mid_depth, s.proj_kernel, mid)
    b.resnet("middle_block.2", "mid_block.resnets.1", ch, ch, mid)

    # up path: up_blocks.0 is the deepest level; res+1 res blocks each, taking the concatenated skip
    n = 0
    for up, lvl in enumerate(reversed(range(len(s.mult)))):
        mult, depth = s.mult[lvl], s.depth[lvl]
        for r in range(s.res + 1):
            g = b.group(f"OUT{n:02d}", f"output block {n}")
            b.resnet(f"output_blocks.{n}.0", f"up_blocks.{up}.resnets.{r}", ch + skips.pop(), mult, g)
            ch = mult
            if depth:
                b.attention(f"output_blocks.{n}.1", f"up_blocks.{up}.attentions.{r}", mult, depth,
                            s.proj_kernel, g)
            if lvl and r == s.res:
                b.add(f"output_blocks.{n}.{2 if depth else 1}.conv", f"up_blocks.{up}.upsamplers.0.conv",
                      _ch(ch), _ch(ch), g, kernel=CONV3)
            n += 1

    b.add("out.2", "conv_out", "OUT", _ch(ch), b.group("out", "output conv"), kernel=CONV3)
    return ComponentSpec(name="unet", label=label, modules=tuple(b.modules), namings=("native", "diffusers"),
                         group_labels=b.labels, presets=presets, role="denoiser", fixed=dict(fixed))


# SD 1.x (v1-inference.yaml): channel_mult 1,2,4,4; attention_resolutions 4,2,1 (levels 0-2); depth 1;
# context_dim 768; proj_in/proj_out 1×1 convolutions.
SD1_STRUCTURE = UNetStructure(mult=(1, 2, 4, 4), depth=(1, 1, 1, 0), mid_depth=1, res=2, proj_kernel=CONV1,
                              adm=False)
# SDXL base (sd_xl_base.yaml): channel_mult 1,2,4; transformer_depth 0,2,10; context_dim 2048;
# use_linear_in_transformer; adm_in_channels 2816.
SDXL_STRUCTURE = UNetStructure(mult=(1, 2, 4), depth=(0, 2, 10), mid_depth=10, res=2, proj_kernel=LINEAR,
                               adm=True)

# SD 2.x (v2-inference.yaml): SD1's levels with use_linear_in_transformer (Linear proj_in/proj_out) and the
# OpenCLIP-H context width 1024.
SD2_STRUCTURE = UNetStructure(mult=(1, 2, 4, 4), depth=(1, 1, 1, 0), mid_depth=1, res=2, proj_kernel=LINEAR,
                              adm=False)

# ``fixed``: the sizes that tell the UNets apart (context width; SDXL's label embedding). Model channels are 320
# in all three, so they decide nothing and are left free (the suite's tiny UNets use other widths).
_SD1_FIXED = {"CTX": 768}
_SD2_FIXED = {"CTX": 1024}
_SDXL_FIXED = {"CTX": 2048, "ADM": 2816}

SD1_UNET = build_unet("SD1.x UNet", SD1_STRUCTURE,
                      (Preset("sd1", {**_SD1_FIXED, "C": 320, "IN": 4, "OUT": 4}, varies=("IN",)),), _SD1_FIXED)
SD2_UNET = build_unet("SD2.x UNet", SD2_STRUCTURE,
                      (Preset("sd2", {**_SD2_FIXED, "C": 320, "IN": 4, "OUT": 4}, varies=("IN",)),), _SD2_FIXED)
SDXL_UNET = build_unet("SDXL UNet", SDXL_STRUCTURE,
                       (Preset("sdxl", {**_SDXL_FIXED, "C": 320, "IN": 4, "OUT": 4}, varies=("IN",)),), _SDXL_FIXED)

__all__ = ["SD1_UNET", "SD2_UNET", "SDXL_UNET", "SD2_STRUCTURE", "UNetStructure", "build_unet", "SD1_STRUCTURE", "SDXL_STRUCTURE"]
