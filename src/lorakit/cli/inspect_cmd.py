"""lorakit inspect FILE [--json] [--deep]"""

from __future__ import annotations

import argparse

from lorakit.ops.inspection import format_report, inspect_lora
from lorakit.cli.common import add_arch, add_json, add_pickle, emit_json

HELP = "show what a LoRA is: format, architecture, coverage, ranks, alphas, metadata"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` subcommand to the parser."""
    p = sub.add_parser("inspect", help=HELP, description=HELP + ". Plain inspect reads only the header "
                       "(and the alpha scalars); --hashes reads the whole file for its hashes; --deep also reads "
                       "every tensor (and shows the hashes).")
    p.add_argument("files", nargs="+", metavar="FILE", help="LoRA file(s): .safetensors/.sft, or a sharded folder")
    p.add_argument("--deep", action="store_true",
                   help="also read tensors: NaN/Inf, all-zero ups, delta norms (implies --hashes)")
    p.add_argument("--hashes", action="store_true",
                   help="also compute hashes (reads the whole file): SHA-256, AutoV2, AutoV3, sshs_model_hash, "
                        "sshs_legacy_hash, and whether the hashes stored in the header are current")
    p.add_argument("--from", dest="from_format", default=None, metavar="FORMAT",
                   help="force the input format instead of detecting it")
    add_arch(p)
    add_json(p)
    add_pickle(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``lorakit inspect`` and print its report; exit 1 when some keys are not understood."""
    reports = [inspect_lora(f, deep=args.deep, allow_pickle=args.allow_pickle, from_format=args.from_format,
                            hashes=args.hashes, arch=args.arch)
               for f in args.files]
    if args.json:
        emit_json(reports[0] if len(reports) == 1 else reports)
    else:
        print("\n\n".join(format_report(r) for r in reports))
    return 1 if any(r["unknown_key_count"] for r in reports) else 0
