"""Batch options (several files, folders, globs; ``--recursive``, ``--jobs``) and the batch's printing, shared by
the commands that work file by file. The batching itself is the library's (:mod:`lorakit.ops.batch`)."""

from __future__ import annotations

import argparse

from lorakit.cli.common import emit_json, say
from lorakit.errors import InputFileError, UsageError
from lorakit.ops.batch import Item, Task, expand_inputs, is_batch, plan_outputs, run_batch
from lorakit.ops.batch_tasks import format_line, format_summary
from lorakit.progress import terminal_progress


def add_batch(p: argparse.ArgumentParser) -> None:
    """Add ``--recursive`` and ``--jobs`` to a command that takes several files, folders and globs."""
    p.add_argument("-r", "--recursive", action="store_true",
                   help="also take the weight files in subfolders of the folders given (and ** in globs)")
    p.add_argument("-j", "--jobs", type=int, default=1, metavar="N",
                   help="process N files at a time in separate processes (default 1; memory is that of N "
                        "single-file runs)")


def batch_mode(args: argparse.Namespace, paths: list[str]) -> bool:
    """Whether the inputs are a batch (several, a glob, a folder of files, --recursive) — else the single-file
    behaviour every command has always had."""
    return is_batch(paths, recursive=args.recursive)


def batch_items(args: argparse.Namespace, paths: list[str], *, writing: bool, suffix: str | None = None) -> list[Item]:
    """The batch's items; for a writing command ``-o`` is the output folder (names kept) and is required unless
    the command writes in place or only plans (``writing=False``)."""
    found = expand_inputs(paths, recursive=args.recursive)
    if not found:
        raise InputFileError(f"no weight files found in {', '.join(paths)} (a folder without a "
                             "*.safetensors.index.json is taken as a folder of files).",
                         hint="pass files, folders holding .safetensors/.ckpt/.pt/.bin/.gguf files, or glob patterns"
                              " (quoted); --recursive also looks in subfolders.")
    outdir = getattr(args, "output", None)
    if writing and outdir is None:
        raise UsageError("several inputs need -o OUTDIR (an output folder; the file names are kept).")
    return plan_outputs(found, outdir, suffix=suffix)


def run_cli_batch(args: argparse.Namespace, task: Task, items: list[Item], label: str) -> int:
    """Run the batch, print a line per file as it completes (or one JSON report at the end) and a summary;
    returns the worst exit code."""
    progress = terminal_progress(label, enabled=not args.json)
    report = run_batch(task, items, jobs=args.jobs, progress=progress,
                       on_record=None if args.json else (lambda r: print(format_line(r), flush=True)))
    if args.json:
        emit_json({"command": label, **report.to_json()})
    else:
        say(format_summary(report.counts(), len(report.records), report.exit_code))
    return report.exit_code
