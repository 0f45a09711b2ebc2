"""Options shared by several commands (sd-scripts spellings included)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lorakit.dtypes import parse_dtype
from lorakit.errors import UsageError
from lorakit.ops.recipes import WeightedInput


def add_dtype(p: argparse.ArgumentParser, default_help: str = "keep the input's dtype") -> None:
    """Add ``--dtype`` (and sd-scripts' ``--save_precision``) to a command."""
    p.add_argument("--dtype", "--save-precision", "--save_precision", dest="dtype", default=None, metavar="DTYPE",
                   help=f"output dtype: keep, fp32/float, fp16, bf16, fp8_e4m3fn, fp8_e5m2 (default: {default_help})")


def add_json(p: argparse.ArgumentParser) -> None:
    """Add ``--json`` (a machine-readable report on stdout) to a command."""
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON report on stdout")


def add_arch(p: argparse.ArgumentParser) -> None:
    """Add ``--arch`` (read the LoRA as this registered architecture instead of detecting it)."""
    from lorakit.layouts import available
    p.add_argument("--arch", default=None, choices=available(), metavar="ARCH",
                   help="read the input as this architecture instead of detecting it (" + ", ".join(available())
                        + "); for files whose keys fit several, e.g. a CLIP-L-only LoRA")


def add_pickle(p: argparse.ArgumentParser) -> None:
    """Add ``--allow-pickle`` to a command."""
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .ckpt/.pt/.bin files (loaded with torch.load(weights_only=True))")


def add_output(p: argparse.ArgumentParser, required: bool = True) -> None:
    """Add ``-o/--output`` (and sd-scripts' ``--save_to``) to a command."""
    p.add_argument("-o", "--output", "--save-to", "--save_to", dest="output", required=required, metavar="OUT",
                   help="output file (written to a temporary file and renamed into place when complete)")


def dtype_arg(args: argparse.Namespace):
    """The torch dtype ``--dtype`` names (None: keep the input's)."""
    return parse_dtype(getattr(args, "dtype", None))


def emit_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON on stdout."""
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def status(*problems: object) -> int:
    """The exit code of a writing command: 1 when its report has anything partial (skipped or unapplied
    items, keys not understood, warnings), else 0. Refusals raise a LorakitError (exit 2) instead."""
    return 1 if any(problems) else 0


def say(text: str) -> None:
    """Human-readable progress and summaries go to stderr when --json owns stdout."""
    print(text, file=sys.stderr)


def add_models(p: argparse.ArgumentParser) -> None:
    """sd-scripts' ``--models A B --ratios 0.3 0.7`` spelling, next to ``A:0.3 B:0.7``."""
    p.add_argument("--models", nargs="+", default=None, metavar="LORA", help="LoRAs (sd-scripts spelling)")
    p.add_argument("--ratios", nargs="+", type=float, default=None, metavar="W",
                   help="weights for --models, linear strengths (sd-scripts spelling)")


def models_inputs(args: argparse.Namespace) -> list[WeightedInput]:
    """The LoRAs given as sd-scripts' ``--models``/``--ratios``."""
    if args.models:
        ratios = args.ratios or [1.0] * len(args.models)
        if len(ratios) != len(args.models):
            raise UsageError(f"{len(args.models)} --models but {len(ratios)} --ratios.",
                             hint="give one ratio per model.")
        return [WeightedInput(m, r) for m, r in zip(args.models, ratios)]
    if args.ratios:
        raise UsageError("--ratios needs --models.", hint="or write each LoRA as PATH:WEIGHT.")
    return []
