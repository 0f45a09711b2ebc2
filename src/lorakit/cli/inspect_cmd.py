"""lorakit inspect FILE [--json] [--deep]"""

from __future__ import annotations

import argparse

from lorakit.ops.inspection import format_report
from lorakit.cli.batch_cli import add_batch, batch_items, batch_mode, run_cli_batch
from lorakit.cli.common import add_arch, add_json, add_pickle, emit_json, say
from lorakit.errors import UsageError

HELP = "show what a LoRA is: format, architecture, coverage, ranks, alphas, metadata"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` subcommand to the parser."""
    p = sub.add_parser("inspect", help=HELP, description=HELP + ". Plain inspect reads only the header "
                       "(and the alpha scalars); --hashes reads the whole file for its hashes; --deep also reads "
                       "every tensor (and shows the hashes).")
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="LoRA file(s): .safetensors/.sft or a sharded folder; several files, folders of files and "
                        "glob patterns run as a batch (a line or JSON record per file, exit = the worst)")
    p.add_argument("--deep", action="store_true",
                   help="also read tensors: NaN/Inf, all-zero ups, delta norms (implies --hashes)")
    p.add_argument("--hashes", action="store_true",
                   help="also compute hashes (reads the whole file): SHA-256, AutoV2, AutoV3, sshs_model_hash, "
                        "sshs_legacy_hash, and whether the hashes stored in the header are current")
    p.add_argument("--from", dest="from_format", default=None, metavar="FORMAT",
                   help="force the input format instead of detecting it")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw the strength per block (‖ΔW‖ per module from the factors, totalled per block of the "
                        "architecture) to FILE.png/.svg/.pdf; also adds the numbers to the report as 'strength' "
                        "(needs lorakit[plot])")
    p.add_argument("--strength", action="store_true",
                   help="add the strength per module/block to the report without drawing it")
    add_batch(p)
    add_arch(p)
    add_json(p)
    add_pickle(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``lorakit inspect`` and print its report; exit 1 when some keys are not understood."""
    from lorakit.ops.batch_tasks import InspectTask
    task = InspectTask(deep=args.deep, hashes=args.hashes, allow_pickle=args.allow_pickle,
                       from_format=args.from_format, arch=args.arch, strength=args.strength or bool(args.plot))
    if batch_mode(args, args.files):
        if args.plot:
            raise UsageError("--plot draws one LoRA; give one file (--strength adds the numbers per file).")
        return run_cli_batch(args, task, batch_items(args, args.files, writing=False), "inspect")
    if args.plot:
        from lorakit.ops.plots import require_matplotlib
        require_matplotlib()
    from lorakit.ops.batch import Item
    r = task(Item(args.files[0])).result
    if args.plot:
        from lorakit.ops.plots import save_figure, strength_figure
        save_figure(strength_figure(r["strength"]), args.plot)
    if args.json:
        emit_json(r)
    else:
        print(format_report(r))
        if args.plot:
            say(f"drew the strength of {len(r['strength']['blocks'])} blocks to {args.plot}")
    return 1 if r["unknown_key_count"] else 0
