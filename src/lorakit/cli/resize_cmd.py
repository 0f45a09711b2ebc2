"""lorakit resize IN -o OUT (--rank N | --conv-rank M | --dynamic METHOD:PARAM) [--verify]"""

from __future__ import annotations

import argparse

from lorakit.formats import WRITABLE
from lorakit.cli.batch_cli import add_batch, batch_items, batch_mode, run_cli_batch
from lorakit.cli.common import add_dtype, add_json, add_output, add_pickle, dtype_arg, emit_json, say, status
from lorakit.progress import terminal_progress
from lorakit.cli.extract_cmd import add_dynamic, dynamic_arg

HELP = "lower a LoRA's rank by the exact optimal truncation"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``resize`` subcommand to the parser."""
    p = sub.add_parser(
        "resize", help=HELP,
        description=HELP + " (SVD of the factors through small QR cores; LoHa/LoKr/Full are densified and come out "
        "as LoRA). Strength is preserved (alpha rescaled with the rank). Modules already at or below the rank are "
        "kept as they are (when every module already meets the target the deltas are written unchanged and the "
        "report says so, exit 0); split parts (diffusers q/k/v) are resized separately. Every module's retained energy "
        "is reported; --verify re-reads the output and reports its error against the input.")
    p.add_argument("inputs", nargs="+", metavar="IN",
                   help="LoRA file; several files, folders and glob patterns run as a batch into -o OUTDIR (names "
                        "kept, a line or JSON record per file, exit = the worst)")
    add_output(p, required=False)
    add_batch(p)
    p.add_argument("--rank", "--new-rank", "--new_rank", "--dim", dest="rank", type=int, default=None, metavar="N",
                   help="new rank (the cap with --dynamic)")
    p.add_argument("--conv-rank", "--conv_rank", "--new-conv-rank", "--new_conv_rank", "--conv-dim", "--conv_dim",
                   dest="conv_rank", type=int, default=None, metavar="M",
                   help="new rank of convolutions (SD1.5/SDXL LoCon, 1×1 included, as sd-scripts' resize_lora "
                        "--new_conv_rank; default --rank); given alone, Linear modules are kept unchanged")
    add_dynamic(p)
    p.add_argument("--verify", action="store_true",
                   help="re-read the output and report its relative error per target against the input")
    p.add_argument("--to", default=None, choices=WRITABLE, help="output format (default: the input's format)")
    p.add_argument("--allow-partial", action="store_true", help="resize even if some keys are not understood")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan per module (rank in → rank out, retained energy), write nothing")
    add_dtype(p)
    add_json(p)
    add_pickle(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``lorakit resize`` and print its report; returns the exit code."""
    from lorakit.ops.resizing import resize
    if batch_mode(args, args.inputs):
        from lorakit.ops.batch_tasks import ResizeTask
        task = ResizeTask(rank=args.rank, conv_rank=args.conv_rank, dynamic=dynamic_arg(args), verify=args.verify,
                          to=args.to, dtype=dtype_arg(args), allow_pickle=args.allow_pickle,
                          allow_partial=args.allow_partial, dry_run=args.dry_run)
        items = batch_items(args, args.inputs, writing=not args.dry_run, suffix=".safetensors")
        return run_cli_batch(args, task, items, "resize")
    r = resize(args.inputs[0], args.output, rank=args.rank, conv_rank=args.conv_rank, dynamic=dynamic_arg(args),
               verify=args.verify, to=args.to,
               dtype=dtype_arg(args), allow_pickle=args.allow_pickle, allow_partial=args.allow_partial,
               progress=terminal_progress("resize", enabled=not args.json), dry_run=args.dry_run)
    code = status(r.unknown_keys, r.warnings)
    if args.json:
        emit_json(r.to_json())
        return code
    if r.dry_run:
        for m in r.modules:
            print(f"{m.module}: rank {m.rank_in} → {m.rank_out} ({m.path}), retained energy {m.retained_energy:.6f}")
    ranks_in = sorted({m.rank_in for m in r.modules if m.rank_in is not None})
    ranks_out = sorted({m.rank_out for m in r.modules})
    worst = r.worst
    mean = sum(m.retained_energy for m in r.modules) / len(r.modules) if r.modules else 1.0
    say(f"{r.input}: {r.source_format} → {r.target_format}; {len(r.modules)} modules, ranks {_span(ranks_in)} → "
        f"{_span(ranks_out)}; mean retained energy {mean:.4f}"
        + (f", worst relative error {worst.relative_error:.3e} ({worst.module})" if worst else "")
        + (f"; would write {r.output or '-'}" if r.dry_run else f"; wrote {r.output} ({r.tensors_out} tensors, {r.dtype})"))
    for n in r.notes:
        say(f"  note: {n}")
    if r.worst_rounding is not None:
        say(f"  storing the new factors as {r.dtype} adds up to {r.worst_rounding.rounding_error:.2e} relative error "
            f"({r.worst_rounding.module}) on top of the truncation; --dtype fp32 keeps them exact")
    if r.verified is not None:
        say(f"  verified: max relative error of the written file vs the input {r.max_verify_error:.3e} "
            f"over {len(r.verified)} targets")
    for w in r.warnings:
        say(f"  warning: {w}")
    if r.unknown_keys:
        say(f"  skipped {len(r.unknown_keys)} keys not understood (--allow-partial)")
    return code


def _span(values: list[int]) -> str:
    if not values:
        return "-"
    return str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}"
