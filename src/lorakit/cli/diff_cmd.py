"""lorakit diff A B [--json]"""

from __future__ import annotations

import argparse

from lorakit.ops.diffing import diff, format_report
from lorakit.progress import terminal_progress
from lorakit.cli.common import add_json, add_pickle, emit_json

HELP = "compare two LoRAs (or two base models): modules, ranks, alphas, relative size and cosine per module/block"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``diff`` subcommand to the parser."""
    p = sub.add_parser("diff", help=HELP, description=HELP + ". LoRAs are compared on native targets (a kohya file "
                       "and its diffusers conversion compare equivalent) without forming ΔW; models are compared "
                       "tensor by tensor in bounded memory, every component they hold (UNet, text encoders), fused "
                       "and transposed tensors in native orientation. Totals per block (FLUX.1 double_blocks.N, SD "
                       "UNet IN04/M00/OUT05, text-encoder layers) and per component. Files of two architectures are "
                       "refused. Exit 0 when equivalent, 1 when different.")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--from", dest="from_format", default=None, metavar="FORMAT",
                   help="force the LoRA format of both inputs instead of detecting it")
    p.add_argument("--modules", action="store_true", help="also print every module's ratio and cosine")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw ‖ΔA‖, ‖ΔB‖ and their cosine per block of the architecture (two LoRAs; needs "
                        "lorakit[plot])")
    add_json(p)
    add_pickle(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``lorakit diff`` and print its report; exit 0 when equivalent, 1 when different."""
    if args.plot:
        from lorakit.ops.plots import require_matplotlib
        require_matplotlib()
    rep = diff(args.a, args.b, allow_pickle=args.allow_pickle, from_format=args.from_format,
               progress=terminal_progress("diff", enabled=not args.json))
    if args.plot:
        if rep.kind != "lora":
            from lorakit.errors import UsageError
            raise UsageError("--plot draws two LoRAs; these are base models.")
        from lorakit.ops.plots import diff_figure, save_figure
        save_figure(diff_figure(rep.to_json()), args.plot)
    if args.json:
        emit_json(rep.to_json())
    else:
        print(format_report(rep))
        if args.modules:
            for name, e in rep.modules.items():
                cos = "n/a" if e["cosine"] is None else f"{e['cosine']:+.6f}"
                print(f"  {name}  |A|/|B| {e['ratio']:.6g}  cos {cos}")
    return 0 if rep.equivalent else 1
