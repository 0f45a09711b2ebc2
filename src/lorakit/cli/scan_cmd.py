"""lorakit scan PATH… [--index FILE] [--jsonl OUT] [--csv OUT] [--report FILE.html] [--executor local|dask]"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from lorakit.cli.common import add_json, emit_json, say
from lorakit.ops.executors import EXECUTORS
from lorakit.progress import terminal_progress

HELP = "scan a LoRA library: what every file is (by content), hashes, dangerous pickles, duplicates"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``scan`` subcommand to the parser."""
    p = sub.add_parser("scan", help=HELP, description=HELP + ". Per file: the container from its magic bytes (a "
                       "pickle named .safetensors is reported), the globals a pickle would import (listed without "
                       "unpickling; os.system, eval, subprocess … flagged), kind (LoRA, base model, text encoder, "
                       "VAE, other), architecture, variant, format, adapters, ranks/alphas, coverage, trigger words "
                       "and base model (safetensors: header only), SHA-256/AutoV2/AutoV3 and the stored "
                       "sshs_model_hash checked. With --index a rescan reads only files whose size, mtime or inode "
                       "changed. Exit 2 when a file is dangerous or unreadable, 1 when some have problems.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files, folders (scanned recursively) or glob patterns")
    p.add_argument("--index", default=None, metavar="FILE", help="SQLite index to read and update (created if missing)")
    p.add_argument("--jsonl", default=None, metavar="OUT", help="write every record as a JSON line ('-': stdout)")
    p.add_argument("--csv", default=None, metavar="OUT", help="write every record as a CSV row")
    p.add_argument("--report", default=None, metavar="FILE.html",
                   help="write a self-contained HTML page of the library (table + charts; needs lorakit[plot])")
    p.add_argument("--no-hashes", dest="hashes", action="store_false",
                   help="header only: skip reading whole files for SHA-256/AutoV2/AutoV3 (no duplicate groups)")
    p.add_argument("--no-recursive", dest="recursive", action="store_false", help="do not descend into subfolders")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local (this process, or --jobs worker processes) or dask (a Dask cluster: --address, "
                        "else a local one of --jobs workers)")
    p.add_argument("--address", default=None, metavar="ADDR", help="Dask scheduler address (tcp://host:8786)")
    p.add_argument("-j", "--jobs", type=int, default=1, metavar="N", help="worker processes (default 1)")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``lorakit scan``; returns 2 for dangerous/unreadable files, 1 for files with problems, else 0."""
    from lorakit.ops.scan import format_summary, jsonl_line, scan_library, write_csv
    from lorakit.io.textout import atomic_text
    out = atomic_text(args.jsonl) if args.jsonl and args.jsonl != "-" else None
    jsonl: TextIO | None = sys.stdout if args.jsonl == "-" else out

    def stream(record: dict[str, Any]) -> None:
        if jsonl is not None:
            jsonl.write(jsonl_line(record))
    if args.report:     # refuse before scanning when the extra is missing
        from lorakit.ops.plots import require_matplotlib
        require_matplotlib()
    try:
        report = scan_library(args.paths, index=args.index, hashes=args.hashes, recursive=args.recursive,
                              executor=args.executor, jobs=args.jobs, address=args.address,
                              on_record=stream if jsonl is not None else None,
                              progress=terminal_progress("scan", enabled=not args.json))
    except BaseException:
        if out is not None:
            out.discard()
        raise
    if out is not None:
        out.close()
    if args.csv:
        with atomic_text(args.csv) as out:
            write_csv(report.records, out)
    if args.report:
        from lorakit.ops.scan_report import write_report
        write_report(report, args.report)
    if args.json:
        emit_json(report.to_json())
    elif args.jsonl != "-":
        print(format_summary(report))
    else:
        say(format_summary(report))
    return report.exit_code
