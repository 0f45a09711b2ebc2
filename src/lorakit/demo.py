"""``python -m lorakit.demo [FOLDER]``: generate sample LoRAs, inspect them and convert them.

Everything is synthetic (a tiny FLUX-shaped model generated from the layout data); nothing is
downloaded.
"""

from __future__ import annotations

import os
import sys

import torch

from . import convert, inspect
from .formats import read_lora
from .inspection import format_report
from .model import dense_deltas
from .synthetic import TINY_FLUX, write_aitoolkit_lora, write_base, write_sdscripts_lora


def _step(text: str) -> None:
    print(f"\n== {text}")


def _max_rel_error(a_path: str, b_path: str) -> float:
    a, b = dense_deltas(read_lora(a_path)), dense_deltas(read_lora(b_path))
    assert set(a) == set(b), "converted file covers other modules"
    return max(float((b[t] - a[t]).norm() / a[t].norm()) for t in a)


def main(folder: str = "demo-out") -> int:
    os.makedirs(folder, exist_ok=True)
    p = lambda name: os.path.join(folder, name)  # noqa: E731
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            os.unlink(p(name))
    _step(f"generating samples in {folder}/ (tiny FLUX: hidden {TINY_FLUX['H']}, "
          f"{TINY_FLUX['double']}+{TINY_FLUX['single']} blocks)")
    ait = write_aitoolkit_lora(p("aitoolkit_style.safetensors"), rank=4, seed=1)
    kohya = write_sdscripts_lora(p("sdscripts_style.safetensors"), rank=8, alpha=4.0, seed=2)
    base = write_base(p("tiny_flux_base.safetensors"), dtype=torch.bfloat16)
    print(f"  {ait}\n  {kohya}\n  {base}")

    for path in (ait, kohya):
        _step(f"lorakit inspect {path}")
        print(format_report(inspect(path)))

    _step("lorakit convert: AI-Toolkit (split diffusers names) -> kohya (fused BFL names)")
    r = convert(ait, p("aitoolkit_as_kohya.safetensors"), to="kohya")
    print(f"  {r.modules_in} split modules -> {r.modules_out} fused modules; max relative error of ΔW: "
          f"{_max_rel_error(ait, p('aitoolkit_as_kohya.safetensors')):.2e}")
    _step("lorakit convert: sd-scripts (kohya) -> diffusers (alpha folded into the factors)")
    r = convert(kohya, p("sdscripts_as_diffusers.safetensors"), to="diffusers")
    print(f"  {r.modules_in} modules -> {r.modules_out} modules; max relative error of ΔW: "
          f"{_max_rel_error(kohya, p('sdscripts_as_diffusers.safetensors')):.2e}")
    _step("lorakit convert: back again, diffusers -> kohya (the original rank is recovered)")
    convert(p("sdscripts_as_diffusers.safetensors"), p("roundtrip_kohya.safetensors"), to="kohya")
    print(format_report(inspect(p("roundtrip_kohya.safetensors"))))
    print(f"  max relative error against the original: "
          f"{_max_rel_error(kohya, p('roundtrip_kohya.safetensors')):.2e}")
    _extra_steps(folder, ait, kohya, base)
    print(f"\nDone. Files are in {folder}/")
    return 0


def _extra_steps(folder: str, ait: str, kohya: str, base: str) -> None:
    """Merge/bake/extract steps, run when those capabilities are installed."""
    try:
        from .demo_more import run_more
    except ImportError:
        return
    run_more(folder, ait, kohya, base)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
