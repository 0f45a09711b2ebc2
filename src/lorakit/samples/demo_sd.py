"""Demo steps for SDXL (run by :mod:`lorakit.samples.demo`): a tiny SDXL-shaped single-file checkpoint (UNet + CLIP-L +
OpenCLIP-G + a VAE tensor) and a kohya LoRA on attention, a 3×3 conv and both text encoders; inspect, convert to
diffusers and back, bake into the checkpoint in one pass."""

from __future__ import annotations

import os

import torch

from lorakit import bake, convert, inspect
from lorakit.formats import read_lora
from lorakit.ops.inspection import format_report
from lorakit.layouts import resolve
from lorakit.lora.model import dense_deltas
from lorakit.samples.synthetic import PASSTHROUGH_SD, TINY_SD, TINY_TE, write_arch_lora, write_checkpoint

MODULES = [("unet", "input_blocks.4.1.transformer_blocks.1.attn1.to_q"),
           ("unet", "input_blocks.4.1.transformer_blocks.0.attn2.to_k"),
           ("unet", "input_blocks.1.0.in_layers.2"),                       # a 3×3 conv (LoCon)
           ("clip_l", "text_model.encoder.layers.0.self_attn.q_proj"),
           ("clip_g", "transformer.resblocks.1.attn"),                      # OpenCLIP's fused q/k/v
           ("clip_g", "text_projection")]                                   # stored transposed in the checkpoint


def _step(text: str) -> None:
    print(f"\n== {text}")


def run_sd(folder: str) -> None:
    """The SDXL steps on files generated into ``folder``."""
    p = lambda name: os.path.join(folder, name)  # noqa: E731
    arch = resolve("sdxl")
    sizes = {"unet": TINY_SD["sdxl"], "clip_l": TINY_TE["clip_l"], "clip_g": TINY_TE["clip_g"]}
    _step(f"SDXL: a tiny SDXL-shaped checkpoint (model channels {TINY_SD['sdxl']['C']}) and a kohya LoRA")
    base = write_checkpoint(p("tiny_sdxl_base.safetensors"), arch, sizes, dtype=torch.float16, extra=PASSTHROUGH_SD)
    lora = write_arch_lora(p("sdxl_kohya.safetensors"), arch, sizes, MODULES, rank=4, alpha=2.0)
    print(f"  {base}\n  {lora}")
    _step(f"lorakit inspect {lora}")
    print(format_report(inspect(lora)))
    _step("lorakit convert: kohya (SGM names, lora_te2_ HF names) -> diffusers (unet./text_encoder_2., q/k/v split)")
    out = p("sdxl_as_diffusers.safetensors")
    r = convert(lora, out, to="diffusers")
    a, b = dense_deltas(read_lora(lora)), dense_deltas(read_lora(out))
    worst = max(float((b[t] - a[t]).norm() / a[t].norm()) for t in a)
    print(f"  {r.modules_in} modules -> {r.modules_out} modules; max relative error of ΔW: {worst:.2e}")
    _step("lorakit bake tiny_sdxl_base sdxl_kohya:0.8 -o baked (UNet and both text encoders in one pass)")
    br = bake(base, [(lora, 0.8)], p("sdxl_baked.safetensors"), progress=False)
    print(f"  {br.changed} of {br.tensors} tensors changed, {br.copied} copied untouched (VAE included)")
