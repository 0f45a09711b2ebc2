"""Bounded memory: the peak RSS of a bake does not grow with the number of tensors in the base.

Two bases with the same per-tensor shapes (hidden 256), one with 10× the blocks (≈ 14 MB vs ≈ 140 MB of
bf16 weights), each baked with a LoRA on every block module in a fresh subprocess; the high-water marks
(VmHWM) must agree within a margin far below the size difference.
"""

from __future__ import annotations

import json

import pytest

from peak_rss import measure_bake

SCRIPT = r"""
import json, sys, torch
import lorakit
from lorakit.samples.synthetic import write_base, write_sdscripts_lora
params, folder = json.loads(sys.argv[1]), sys.argv[2]
base, lora, out = folder + "/base.safetensors", folder + "/lora.safetensors", folder + "/out.safetensors"
if sys.argv[3] == "make":
    write_base(base, params, dtype=torch.bfloat16, fill="zeros")
    write_sdscripts_lora(lora, params, rank=4, dtype=torch.bfloat16, clip=None)
    sys.exit(0)
"""


def _bake_peak(tmp_path, name: str, blocks: int) -> dict[str, int]:
    folder = tmp_path / name
    folder.mkdir()
    params = {"H": 256, "M": 1024, "IN": 16, "OUT": 16, "CTX": 24, "VEC": 20, "T": 8, "D": 32,
              "double": blocks, "single": blocks, "guidance": 1, "modulation": 1}
    return measure_bake(SCRIPT, json.dumps(params), str(folder))


def test_peak_rss_does_not_grow_with_tensor_count(tmp_path):
    small = _bake_peak(tmp_path, "small", 2)
    big = _bake_peak(tmp_path, "big", 20)
    assert big["changed"] >= 9 * small["changed"]
    grown = big["bytes"] - small["bytes"]
    assert grown > 100 << 20                     # the big base really is bigger (≈ 140 MB more)
    extra = big["peak"] - small["peak"]
    assert extra < 24 << 20, f"peak RSS grew by {extra / 2**20:.1f} MiB for {grown / 2**20:.0f} MiB more model"
