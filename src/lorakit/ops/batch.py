"""One batch runner for every command that works file by file (inspect, doctor, convert, resize, meta, scan).

Inputs are files, folders and glob patterns (:func:`expand_inputs`); a folder that *is* one model (a sharded
checkpoint with its ``*.safetensors.index.json``) stays one item. Every item runs through a *task*: a picklable
function ``task(item) -> Record`` that never raises for a bad file — :func:`guarded` turns a
:class:`~lorakit.errors.LorakitError` into an error record (its exit code) and any other exception into an
``internal error`` record (exit 70), so one bad file never stops the rest. :func:`run_batch` runs the tasks in
this process or, with ``jobs > 1``, in a pool of worker processes with at most ``jobs`` files in flight (memory
stays that of ``jobs`` single-file runs), streams the records back in completion order to ``on_record`` and folds
their exit codes into the run's: the worst wins.
"""

from __future__ import annotations

import glob
import os
import stat
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import LorakitError, OutputError, UsageError
from lorakit.io.reader import INDEX_SUFFIX, PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, find_index
from lorakit.ops.executors import pool_map
from lorakit.progress import Progress
from lorakit.progress import report as report_progress

WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES + (".gguf",)
GLOB_CHARS = set("*?[")
INTERNAL_ERROR = 70

OK, WARNING, ERROR = "ok", "warning", "error"


@dataclass
class Item:
    """One unit of a batch: the input path and, for writing commands, where its output goes."""

    path: str
    output: str | None = None


@dataclass
class Record:
    """The result of one item: ``status`` (``ok``, ``warning``, ``error``, or a command's own verdict such as
    doctor's ``PARTIAL``), its exit code, a one-line summary, the command's report (``result``) and, for an
    error, its type and message."""

    file: str
    status: str
    exit_code: int
    summary: str = ""
    output: str | None = None
    result: Any = None
    error: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "status": self.status, "exit_code": self.exit_code,
                               "summary": self.summary}
        if self.output is not None:
            out["output"] = self.output
        if self.error is not None:
            out["error"] = self.error
        if self.result is not None:
            out["result"] = self.result
        return out


@dataclass
class BatchReport:
    """Every record of a run (in input order) and the run's exit code (the worst record's)."""

    records: list[Record] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return max((r.exit_code for r in self.records), default=0)

    def counts(self) -> dict[str, int]:
        return dict(Counter(r.status for r in self.records))

    def to_json(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "counts": self.counts(), "files": [r.to_json() for r in self.records]}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def is_model_folder(path: str) -> bool:
    """A folder that is one model: it holds a ``*.safetensors.index.json`` (a sharded checkpoint)."""
    try:
        return os.path.isdir(path) and find_index(path) is not None
    except OSError:
        return False


def _folder_files(folder: str, recursive: bool) -> Iterator[str]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    subdirs = []
    for e in entries:
        try:
            mode = e.stat(follow_symlinks=True).st_mode
        except OSError:
            continue
        if stat.S_ISDIR(mode):
            subdirs.append(e.path)
        elif stat.S_ISREG(mode) and e.name.lower().endswith(WEIGHT_SUFFIXES) and not e.name.endswith(INDEX_SUFFIX):
            yield e.path
    if recursive:
        for d in subdirs:
            if is_model_folder(d):
                yield d
            else:
                yield from _folder_files(d, recursive)


def folder_files(folder: str, *, recursive: bool = False) -> list[str]:
    """The weight files directly in ``folder`` (sorted; with ``recursive`` also in its subfolders)."""
    return list(_folder_files(folder, recursive))


def expand_inputs(paths: Sequence[str | os.PathLike[str]], *, recursive: bool = False) -> list[tuple[str, str]]:
    """(item path, root) for every input: a file as given, a folder's weight files (sorted; with ``recursive``
    also its subfolders'), a model folder (sharded checkpoint) as one item, a glob pattern's matches. A path that
    does not exist is kept (its task reports it). ``root`` is the folder the item was found under (for keeping
    relative names in an output folder), else the item's own folder. Duplicates are dropped."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(p: str, root: str) -> None:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            out.append((p, root))

    for raw in paths:
        p = os.fspath(raw)
        if not os.path.exists(p) and GLOB_CHARS & set(p):
            for hit in sorted(glob.glob(p, recursive=recursive)):
                if os.path.isdir(hit) and not is_model_folder(hit):
                    for f in _folder_files(hit, recursive):
                        add(f, hit)
                else:
                    add(hit, os.path.dirname(hit))
            continue
        if os.path.isdir(p) and not is_model_folder(p):
            for f in _folder_files(p, recursive):
                add(f, p)
            continue
        add(p, os.path.dirname(p))
    return out


def is_batch(paths: Sequence[str], *, recursive: bool = False) -> bool:
    """Whether a command's inputs are a batch (several inputs, a glob, a folder of files, ``--recursive``)
    rather than the single file (or model folder) the command has always taken."""
    if len(paths) != 1 or recursive:
        return True
    p = paths[0]
    if not os.path.exists(p) and GLOB_CHARS & set(p):
        return True
    if os.path.isdir(p) and not is_model_folder(p):
        singles = [x for x in os.listdir(p) if x.endswith(SAFETENSORS_SUFFIXES)]
        return len(singles) != 1     # exactly one .safetensors: the folder names that file, as before
    return False


def plan_outputs(found: Sequence[tuple[str, str]], outdir: str | None, *, suffix: str | None = None) -> list[Item]:
    """Items with their output paths: ``outdir`` + the name relative to the item's root (names kept; a
    ``suffix`` replaces the extension). Two items that would write one output are refused up front."""
    if outdir is None:
        return [Item(p) for p, _ in found]
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise OutputError("with several inputs -o names a folder, and this is a file.", path=outdir,
                          hint="pass -o OUTDIR (created if missing).")
    items: list[Item] = []
    taken: dict[str, str] = {}
    for p, root in found:
        rel = os.path.relpath(p, root) if root else os.path.basename(p)
        if rel.startswith(os.pardir):
            rel = os.path.basename(p)
        if suffix is not None:
            rel = os.path.splitext(rel)[0] + suffix
        out = os.path.join(outdir, rel)
        key = os.path.normpath(out)
        if key in taken:
            raise UsageError(f"{taken[key]} and {p} would both be written to {out}.",
                             hint="give the inputs distinct names, or run them into separate output folders.")
        taken[key] = p
        items.append(Item(p, out))
    return items


def prepare_output(item: Item) -> None:
    """Create the folder an item's output goes to (inside the output folder)."""
    if item.output:
        os.makedirs(os.path.dirname(item.output) or ".", exist_ok=True)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

Task = Callable[[Item], Record]


def error_record(item: Item, exc: BaseException) -> Record:
    """The record of a task that raised: a LorakitError's message and exit code, else an internal error."""
    if isinstance(exc, LorakitError):
        summary = exc.message + (f" Fix: {exc.hint}" if exc.hint else "")
        return Record(item.path, ERROR, exc.exit_code, " ".join(summary.split()),
                      error={"type": type(exc).__name__, "message": str(exc)})
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    at = f" at {where[0].filename.rsplit(os.sep, 1)[-1]}:{where[0].lineno}" if where else ""
    message = f"internal error: {type(exc).__name__}: {exc}{at} (this is a bug; please report it)"
    return Record(item.path, ERROR, INTERNAL_ERROR, message.replace("\n", " "),
                  error={"type": type(exc).__name__, "message": message})


@dataclass(frozen=True)
class Guarded:
    """A task wrapped so that it never raises for one file (picklable: it runs in worker processes)."""

    task: Task

    def __call__(self, item: Item) -> Record:
        try:
            prepare_output(item)
            return self.task(item)
        except KeyboardInterrupt:
            raise
        except Exception as exc:   # one bad file never stops the rest: every failure becomes its record
            return error_record(item, exc)


def guarded(task: Task) -> Guarded:
    """``task`` turned into one that returns an error record instead of raising."""
    return task if isinstance(task, Guarded) else Guarded(task)


def iter_records(task: Task, items: Sequence[Item], *, jobs: int = 1) -> Iterator[tuple[int, Record]]:
    """(input index, record) in completion order; ``jobs > 1`` runs them in worker processes with at most
    ``jobs`` items in flight (a worker that dies gives that item an error record)."""
    return pool_map(guarded(task), items, jobs=jobs, on_failure=error_record)


def run_batch(task: Task, items: Sequence[Item], *, jobs: int = 1, progress: Progress | None = None,
              on_record: Callable[[Record], None] | None = None) -> BatchReport:
    """Run ``task`` on every item (see the module docstring); ``on_record`` sees each record as it completes,
    ``progress(done, total, file)`` follows the batch. The report holds the records in input order."""
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: give at least 1.")
    out: list[Record | None] = [None] * len(items)
    for n, (i, record) in enumerate(iter_records(task, items, jobs=jobs), 1):
        out[i] = record
        if on_record is not None:
            on_record(record)
        report_progress(progress, n, len(items), items[i].path)
    return BatchReport([r for r in out if r is not None])
