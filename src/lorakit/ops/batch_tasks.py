"""The per-file tasks the batch runner (:mod:`lorakit.ops.batch`) runs for each command: small frozen dataclasses
holding the command's options (picklable, so they run unchanged in worker processes), called with one
:class:`~lorakit.ops.batch.Item` and returning its :class:`~lorakit.ops.batch.Record`. A task may raise a
LorakitError for a bad file; the runner turns it into that file's error record."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from lorakit.ops.batch import ERROR, OK, WARNING, Item, Record


def _status(problems: bool) -> tuple[str, int]:
    return (WARNING, 1) if problems else (OK, 0)


def inspect_summary(r: dict[str, Any]) -> str:
    """One line for an inspect report: format, architecture, variant, adapters, modules, ranks."""
    ranks = ",".join(str(k) for k in r["ranks"]) or "-"
    return (f"{r['format']} {'/'.join(r['adapters']) or '-'} for {r['architecture']} ({r['variant']}), "
            f"{r['modules']} modules, rank {ranks}"
            + (f", {r['unknown_key_count']} keys not understood" if r["unknown_key_count"] else ""))


@dataclass(frozen=True)
class InspectTask:
    deep: bool = False
    hashes: bool = False
    allow_pickle: bool = False
    from_format: str | None = None
    arch: str | None = None
    strength: bool = False

    def __call__(self, item: Item) -> Record:
        from lorakit.ops.inspection import inspect_lora
        r = inspect_lora(item.path, deep=self.deep, hashes=self.hashes, allow_pickle=self.allow_pickle,
                         from_format=self.from_format, arch=self.arch)
        if self.strength:
            from lorakit.ops.strength import block_strength
            r["strength"] = block_strength(item.path, allow_pickle=self.allow_pickle, from_format=self.from_format,
                                           arch=self.arch)
        status, code = _status(bool(r["unknown_key_count"]))
        return Record(item.path, status, code, inspect_summary(r), result=r)


_BASES: dict[tuple[Any, ...], Any] = {}


@dataclass(frozen=True)
class DoctorTask:
    base: str | None = None
    text_encoders: tuple[str, ...] = ()
    allow_pickle: bool = False
    from_format: str | None = None
    strict: bool = False

    def _context(self) -> tuple[Any, dict[str, Any]]:
        """The base and text encoders, opened once per process (header only) and kept for the next files."""
        key = (self.base, self.text_encoders, self.allow_pickle)
        got = _BASES.get(key)
        if got is None:
            from lorakit.base.checkpoint import open_base
            from lorakit.io import open_weights
            from lorakit.ops.diagnose import open_text_encoder
            base = None
            if self.base is not None:
                bf = open_weights(self.base, allow_pickle=self.allow_pickle)
                try:
                    base = open_base(bf)
                except BaseException:
                    bf.close()
                    raise
            encoders = {}
            for te_path in self.text_encoders:
                te = open_text_encoder(te_path, allow_pickle=self.allow_pickle,
                                       arch_name=base.arch.name if base is not None else None)
                encoders[te.component] = te
            got = _BASES[key] = (base, encoders)
        return got

    def __call__(self, item: Item) -> Record:
        from lorakit.ops.diagnose import diagnose
        base, encoders = self._context()
        d = diagnose(item.path, base, encoders=encoders, allow_pickle=self.allow_pickle,
                     from_format=self.from_format)
        code = d.exit_code
        if self.strict and code == 0 and d.warnings:
            code = 1
        return Record(item.path, d.verdict, code, d.summary, result=d.to_json(),
                      error=d.error if d.error and code >= 2 else None)


@dataclass(frozen=True)
class ConvertTask:
    to: str
    dtype: Any = None
    allow_lossy: bool = False
    lossy_rank: int | None = None
    allow_partial: bool = False
    allow_pickle: bool = False
    from_format: str | None = None
    dry_run: bool = False
    keep_algo: bool = False
    arch: str | None = None

    def __call__(self, item: Item) -> Record:
        from lorakit.ops.conversion import convert
        output = item.output
        if output is not None and not output.endswith((".safetensors", ".sft")):
            output = os.path.splitext(output)[0] + ".safetensors"
        r = convert(item.path, None if self.dry_run else output, self.to, dtype=self.dtype,
                    allow_lossy=self.allow_lossy, lossy_rank=self.lossy_rank, allow_partial=self.allow_partial,
                    allow_pickle=self.allow_pickle, from_format=self.from_format, dry_run=self.dry_run,
                    keep_algo=self.keep_algo, arch=self.arch)
        status, code = _status(bool(r.unknown_keys or r.warnings))
        verb = "would write" if r.dry_run else "wrote"
        return Record(item.path, status, code, f"{r.source_format} → {r.target_format} ({r.architecture}); "
                      f"{r.modules_in} modules in, {r.modules_out} out; {verb} {r.output or '-'}",
                      output=r.output, result=r.to_json())


@dataclass(frozen=True)
class ResizeTask:
    rank: int | None = None
    conv_rank: int | None = None
    dynamic: str | None = None
    verify: bool = False
    to: str | None = None
    dtype: Any = None
    allow_pickle: bool = False
    allow_partial: bool = False
    dry_run: bool = False

    def __call__(self, item: Item) -> Record:
        from lorakit.ops.resizing import resize
        r = resize(item.path, None if self.dry_run else item.output, rank=self.rank, conv_rank=self.conv_rank,
                   dynamic=self.dynamic, verify=self.verify, to=self.to, dtype=self.dtype,
                   allow_pickle=self.allow_pickle, allow_partial=self.allow_partial, dry_run=self.dry_run)
        status, code = _status(bool(r.unknown_keys or r.warnings))
        ranks_out = sorted({m.rank_out for m in r.modules})
        verb = "would write" if r.dry_run else "wrote"
        return Record(item.path, status, code, f"{len(r.modules)} modules → rank "
                      f"{','.join(map(str, ranks_out)) or '-'}; {verb} {r.output or '-'}", output=r.output,
                      result=r.to_json())


@dataclass(frozen=True)
class MetaTask:
    """``meta`` per file: show (default), ``check`` (audit), or edit (any of set/delete/copy_from/rehash)."""

    check: bool = False
    set_items: tuple[tuple[str, str], ...] = ()
    delete: tuple[str, ...] = field(default_factory=tuple)
    copy_from: str | None = None
    rehash: bool = False

    @property
    def editing(self) -> bool:
        return bool(self.set_items or self.delete or self.copy_from or self.rehash)

    def __call__(self, item: Item) -> Record:
        from lorakit.ops.metaedit import audit_lora_metadata, edit_metadata, read_metadata
        if self.check:
            problems = audit_lora_metadata(item.path)
            status, code = _status(bool(problems))
            return Record(item.path, status, code, "; ".join(problems) or "metadata consistent",
                          result={"file": item.path, "problems": problems})
        if not self.editing:
            meta = read_metadata(item.path, nested=True)
            return Record(item.path, OK, 0, f"{len(meta)} metadata keys", result=meta)
        r = edit_metadata(item.path, set_items=list(self.set_items), delete=list(self.delete),
                          copy_from=self.copy_from, output=item.output, rehash=self.rehash)
        where = "in place" if r.in_place else f"to {r.output}"
        return Record(item.path, OK, 0, f"{len(r.changed)} key(s) set, {len(r.removed)} removed"
                      + (f", recomputed {', '.join(r.rehashed)}" if r.rehashed else "") + f"; written {where}",
                      output=r.output, result=r.to_json())


def format_line(record: Record) -> str:
    """The one line a batch prints per file."""
    tag = {OK: "OK", WARNING: "WARN", ERROR: "ERROR"}.get(record.status, record.status)
    return f"{tag:<5} {record.file}: {record.summary}"


def format_summary(counts: dict[str, int], total: int, exit_code: int) -> str:
    """The batch's closing line: how many files ended how, and the exit code."""
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"{total} file(s): {parts or 'none'}; exit {exit_code}"
