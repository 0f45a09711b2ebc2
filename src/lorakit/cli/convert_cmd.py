"""lorakit convert IN -o OUT --to {kohya,diffusers,comfy}"""

from __future__ import annotations

import argparse

from lorakit.ops.conversion import ConvertReport, convert
from lorakit.formats import WRITABLE, formats
from lorakit.progress import terminal_progress
from lorakit.cli.batch_cli import add_batch, batch_items, batch_mode, run_cli_batch
from lorakit.cli.common import add_arch, add_dtype, add_json, add_output, add_pickle, dtype_arg, emit_json, say, status

HELP = "convert a LoRA between formats, exactly"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``convert`` subcommand to the parser."""
    p = sub.add_parser("convert", help=HELP, description=HELP + ". Reads " + ", ".join(f.name for f in formats())
                       + "; writes " + ", ".join(WRITABLE) + ". Fused/split weights (OpenCLIP's in_proj rows), "
                       "alpha and swapped halves (FLUX.1's final layer) are converted losslessly; anything that would "
                       "lose precision stops unless --allow-lossy is given.")
    p.add_argument("inputs", nargs="+", metavar="IN",
                   help="LoRA file; several files, folders and glob patterns run as a batch into -o OUTDIR (names "
                        "kept, a line or JSON record per file, exit = the worst); with --join-experts, the "
                        "single-expert files of one LoRA (Wan 2.2: high-noise and low-noise) joined into one -o file")
    add_output(p, required=False)
    add_batch(p)
    p.add_argument("--to", required=True, choices=WRITABLE, help="target format")
    p.add_argument("--from", dest="from_format", default=None, choices=[f.name for f in formats()],
                   help="force the input format instead of detecting it")
    add_arch(p)
    add_dtype(p)
    p.add_argument("--allow-lossy", action="store_true",
                   help="re-factor modules the target cannot hold exactly (SVD) and report their error")
    p.add_argument("--lossy-rank", type=int, default=None, metavar="N",
                   help="rank cap for --allow-lossy re-factoring (default: exact numerical rank)")
    p.add_argument("--keep-algo", action="store_true",
                   help="keep LoHa/LoKr/Tucker LoCon modules as LyCORIS keys (kohya, comfy) instead of writing them as "
                        "exact plain LoRA factors (the default)")
    p.add_argument("--allow-partial", action="store_true", help="convert even if some keys are not understood")
    p.add_argument("--join-experts", action="store_true",
                   help="the inputs are single-expert files of one LoRA (Wan 2.2 A14B: *_high_noise, *_low_noise), "
                        "joined into one combined file (--to aitoolkit), not a batch")
    p.add_argument("--split-experts", action="store_true",
                   help="paired experts (Wan 2.2 A14B): write one file per expert, OUT_high_noise / OUT_low_noise")
    p.add_argument("--expert", default=None, metavar="NAME",
                   help="the expert a single-expert input is for (high_noise, low_noise, or a component name) when "
                        "neither its file name nor its metadata says")
    p.add_argument("--dry-run", action="store_true", help="plan and report, write nothing")
    add_json(p)
    add_pickle(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``lorakit convert`` and print its report; returns the exit code."""
    if args.join_experts:
        r = convert(args.inputs, args.output, args.to, dtype=dtype_arg(args), allow_lossy=args.allow_lossy,
                    lossy_rank=args.lossy_rank, allow_partial=args.allow_partial, allow_pickle=args.allow_pickle,
                    from_format=args.from_format, dry_run=args.dry_run, keep_algo=args.keep_algo, arch=args.arch,
                    progress=terminal_progress("convert", enabled=not args.json), split_experts=args.split_experts)
        return _report(args, r)
    if batch_mode(args, args.inputs):
        from lorakit.ops.batch_tasks import ConvertTask
        task = ConvertTask(args.to, dtype=dtype_arg(args), allow_lossy=args.allow_lossy, lossy_rank=args.lossy_rank,
                           allow_partial=args.allow_partial, allow_pickle=args.allow_pickle,
                           from_format=args.from_format, dry_run=args.dry_run, keep_algo=args.keep_algo,
                           arch=args.arch)
        items = batch_items(args, args.inputs, writing=not args.dry_run, suffix=".safetensors")
        return run_cli_batch(args, task, items, "convert")
    r = convert(args.inputs[0], args.output, args.to, dtype=dtype_arg(args), allow_lossy=args.allow_lossy,
                lossy_rank=args.lossy_rank, allow_partial=args.allow_partial, allow_pickle=args.allow_pickle,
                from_format=args.from_format, dry_run=args.dry_run, keep_algo=args.keep_algo, arch=args.arch,
                progress=terminal_progress("convert", enabled=not args.json), split_experts=args.split_experts,
                expert=args.expert)
    return _report(args, r)


def _report(args: argparse.Namespace, r: ConvertReport) -> int:
    """Print one conversion's report; returns the exit code."""
    if args.json:
        emit_json(r.to_json())
        return status(r.unknown_keys, r.warnings)
    verb = "would write" if r.dry_run else "wrote"
    say(f"{r.input}: {r.source_format} → {r.target_format} ({r.architecture}, {r.variant}); {r.modules_in} modules in, "
        f"{r.modules_out} out, {r.tensors_out} tensors ({r.dtype}); {verb} {', '.join(r.outputs) or '-'}")
    if r.rounding is not None:
        say(f"  storing the factors as {r.dtype} adds up to {r.rounding[1]:.2e} relative error ({r.rounding[0]}); "
            "--dtype fp32 keeps them exact")
    if r.converted:
        by: dict[tuple[str, int], int] = {}
        for _, algo, rank in r.converted:
            by[(algo, rank)] = by.get((algo, rank), 0) + 1
        groups = ", ".join(f"{n} {algo} → rank {rank}" for (algo, rank), n in sorted(by.items()))
        keep = "" if r.target_format == "diffusers" else "; --keep-algo keeps them as LyCORIS keys"
        say(f"  {len(r.converted)} LyCORIS module(s) written as plain LoRA factors, exactly ({groups}; per module "
            f"in --json{keep})")
    for m, e in r.lossy:
        say(f"  LOSSY {m}: relative error {e:.3e}")
    for n in r.notes:
        say(f"  note: {n}")
    for w in r.warnings:
        say(f"  warning: {w}")
    if r.unknown_keys:
        say(f"  skipped {len(r.unknown_keys)} keys not understood (--allow-partial)")
    return status(r.unknown_keys, r.warnings)
