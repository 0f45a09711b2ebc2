"""``python -m lorakit.samples.demo [FOLDER]``: generate sample LoRAs, inspect them and convert them.

FOLDER (default ``demo-out``) is created; an existing one must be empty, else the demo refuses (exit 2)
and touches nothing: it never removes or replaces files it did not create.

Everything is synthetic (tiny FLUX- and SDXL-shaped models generated from the layout data); nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from lorakit import convert, inspect
from lorakit.errors import LorakitError, OutputError
from lorakit.formats import read_lora
from lorakit.ops.inspection import format_report
from lorakit.lora.model import dense_deltas
from lorakit.samples.synthetic import TINY_FLUX, write_aitoolkit_lora, write_base, write_sdscripts_lora


def _step(text: str) -> None:
    print(f"\n== {text}")


def _max_rel_error(a_path: str, b_path: str) -> float:
    a, b = dense_deltas(read_lora(a_path)), dense_deltas(read_lora(b_path))
    assert set(a) == set(b), "converted file covers other modules"
    return max(float((b[t] - a[t]).norm() / a[t].norm()) for t in a)


def prepare_folder(folder: str) -> None:
    """Create ``folder`` for the demo's files; refuse one that exists and is not empty (nothing there is
    ever removed or replaced: the demo only writes into a folder holding nothing of anyone else's)."""
    try:
        os.mkdir(folder)
        return
    except FileExistsError:
        pass
    except OSError as exc:
        raise OutputError(f"cannot create the demo folder ({exc.strerror}).", path=folder,
                          hint="create its parent folder first, or choose another folder.") from None
    if not os.path.isdir(folder) or os.path.islink(folder):
        raise OutputError("exists and is not a folder; the demo writes only into a new or empty folder.",
                          path=folder, hint="choose another folder, e.g. python -m lorakit.samples.demo demo-out-2.")
    if os.listdir(folder):
        raise OutputError("folder is not empty; the demo writes only into a new or empty folder and never "
                          "removes or replaces files it did not create.", path=folder,
                          hint="choose another folder, e.g. python -m lorakit.samples.demo demo-out-2, or empty this one.")


def main(folder: str = "demo-out") -> int:
    """Run the demo in ``folder`` (created; an existing one must be empty)."""
    prepare_folder(folder)
    p = lambda name: os.path.join(folder, name)  # noqa: E731
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
    from lorakit.samples.demo_sd import run_sd
    run_sd(folder)
    print(f"\nDone. Files are in {folder}/")
    return 0


def _extra_steps(folder: str, ait: str, kohya: str, base: str) -> None:
    """Merge/bake/extract steps, run when those capabilities are installed."""
    try:
        from lorakit.samples.demo_more import run_more
    except ImportError:
        return
    run_more(folder, ait, kohya, base)


def cli(argv: list[str] | None = None) -> int:
    """``python -m lorakit.samples.demo [FOLDER]``; exit 2 with one line when FOLDER cannot be used."""
    parser = argparse.ArgumentParser(
        prog="python -m lorakit.samples.demo",
        description="Generate sample LoRAs for tiny synthetic FLUX- and SDXL-shaped models, then inspect, convert, "
                    "merge, bake, extract and resize them. Files are written into FOLDER, which is created; an existing "
                    "FOLDER must be empty (the demo never removes or replaces files it did not create).")
    parser.add_argument("folder", nargs="?", default="demo-out", metavar="FOLDER",
                        help="a new or empty folder for the demo's files (default: demo-out)")
    args = parser.parse_args(argv)
    try:
        return main(args.folder)
    except LorakitError as exc:
        print(f"lorakit demo: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(cli())
