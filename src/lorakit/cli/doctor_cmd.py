"""lorakit doctor LORA… [--base BASE] [--text-encoder TE]… [--json]"""

from __future__ import annotations

import argparse

from lorakit.ops.diagnose import doctor, format_report
from lorakit.layouts import available, resolve
from lorakit.cli.batch_cli import add_batch
from lorakit.cli.common import add_json, add_pickle, emit_json, say
from lorakit.errors import UsageError
from lorakit.ops.batch import expand_inputs
from lorakit.progress import terminal_progress

HELP = "diagnose LoRAs: will they apply (to this base), and if not, why and how to fix it"


def _layouts() -> str:
    """The registered architectures' denoisers and the layouts their bases come in (help text from the layouts)."""
    return "; ".join(f"{a.denoiser.label}" + (f" {a.base_layouts}" if a.base_layouts else "")
                     for a in (resolve(n) for n in available()))


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``doctor`` subcommand to the parser."""
    p = sub.add_parser("doctor", help=HELP, description=HELP + ". Reads every LoRA tensor (NaN/Inf, all-zero ups, "
                       "extreme α/rank, odd dtypes, stale hashes); with --base also checks which modules apply and "
                       "why the others do not (wrong architecture such as an SDXL LoRA on SD 1.5, variants such as "
                       "inpainting or Fill, derived models such as Pony or Illustrious named by metadata). Verdicts: OK (exit 0), PARTIAL (exit 1), WILL NOT APPLY or INVALID "
                       "(exit 2); the worst verdict sets the exit code.")
    p.add_argument("loras", nargs="+", metavar="LORA", help="LoRA file(s), folders of them, glob patterns")
    p.add_argument("--base", default=None, metavar="BASE",
                   help="base checkpoint of any supported architecture (" + _layouts() + "; a file or a sharded "
                        "folder); every component it holds (the UNet and text encoders of an SDXL single file) is "
                        "checked")
    p.add_argument("--text-encoder", dest="text_encoders", action="append", default=[], metavar="TE",
                   help="text-encoder checkpoint (CLIP-L, OpenCLIP ViT-H/bigG, T5-XXL; native or HF names) to check "
                        "the LoRA's text-encoder modules against, when the base does not hold it (repeatable)")
    p.add_argument("--from", dest="from_format", default=None, metavar="FORMAT",
                   help="force the LoRA format instead of detecting it")
    p.add_argument("--strict", action="store_true", help="exit 1 when an OK LoRA has warnings")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw, per block of the architecture, the modules that apply, will not apply, or were not "
                        "checked (one LoRA; needs lorakit[plot])")
    add_batch(p)
    add_json(p)
    add_pickle(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``lorakit doctor`` and print its verdicts; the worst verdict sets the exit code."""
    # an input that expands to nothing (an empty folder) is diagnosed itself: its verdict says why
    loras = [p for p, _ in expand_inputs(args.loras, recursive=args.recursive)] or list(args.loras)
    if args.plot:
        if len(loras) != 1:
            raise UsageError("--plot draws one LoRA; give one file.")
        from lorakit.ops.plots import require_matplotlib
        require_matplotlib()
    if args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: give at least 1.")
    report = doctor(loras, args.base, text_encoders=args.text_encoders, allow_pickle=args.allow_pickle,
                    from_format=args.from_format, jobs=args.jobs,
                    progress=terminal_progress("doctor", enabled=not args.json) if len(loras) > 1 else None)
    if args.plot:
        from lorakit.ops.plots import doctor_figure, save_figure
        save_figure(doctor_figure(report.loras[0].to_json()), args.plot)
    if args.json:
        emit_json(report.to_json())
    else:
        print(format_report(report))
        if args.plot:
            say(f"drew what applies per block to {args.plot}")
    code = report.exit_code
    if args.strict and code == 0 and any(d.warnings for d in report.loras):
        code = 1
    return code
