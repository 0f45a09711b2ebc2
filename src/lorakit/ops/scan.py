"""``lorakit scan``: what every file of a library is, by content, with hashes, an index and duplicate groups.

:func:`scan_file` is pure — a path in, a JSON-able record out, never raising, nothing but that file read — so it
runs unchanged in this process, a local process pool or a cluster engine's workers (:mod:`lorakit.ops.executors`).
Per file: the container from its magic bytes (:mod:`lorakit.io.sniff`; a ``.safetensors`` that holds a pickle is
reported), for pickles the globals they would import, listed without unpickling (:mod:`lorakit.io.pickle_scan`);
for safetensors the header only: kind (LoRA / base model / text encoder / VAE / other), architecture, variant,
format, adapters, ranks/alphas, coverage, trigger words and base model from the metadata (``inspect``'s reading);
and with ``hashes`` the whole file once for SHA-256, AutoV2, AutoV3, plus the stored ``sshs_model_hash`` checked
against the tensors.

:func:`scan_library` keeps the records in a SQLite index (:mod:`lorakit.ops.scan_index`) keyed by path, size,
mtime and inode, so a rescan reads only files that changed; it groups duplicates by content hash and summarises.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from lorakit.errors import ArchitectureError, FormatError, LorakitError, NotALoraError
from lorakit.io.pickle_scan import DANGEROUS, UNKNOWN, scan_pickle
from lorakit.io.sniff import EMPTY, GGUF, PICKLES, SAFETENSORS, TRUNCATED_SAFETENSORS, extension_mismatch, sniff

LORA, BASE_MODEL, TEXT_ENCODER, VAE, OTHER = "LoRA", "base model", "text encoder", "VAE", "other"
OK, WARNING, ERROR, DANGER = "ok", "warning", "error", "dangerous"
SCANNER = 1        # the record layout's version: records of another version are rescanned, never reused
CSV_FIELDS = ("path", "status", "container", "kind", "architecture", "variant", "format", "adapters", "modules",
              "ranks", "alphas", "base_model", "trigger_words", "size", "sha256", "autov2", "autov3",
              "sshs_model_hash", "problems")


def file_key(path: str) -> tuple[int, int, int]:
    """(size, mtime_ns, inode): what the index compares to tell an unchanged file."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def _coverage_summary(components: dict[str, Any]) -> dict[str, str]:
    return {c["label"]: (f"{c['present']}/{c['total']}" if c["total"] is not None else f"{c['present']}/?")
            for c in components.values() if c["present"]}


def _lora_fields(r: dict[str, Any]) -> dict[str, Any]:
    meta = r.get("metadata") or {}
    return {"kind": LORA, "architecture": r["architecture"], "architecture_label": r["architecture_label"],
            "variant": r["variant"], "format": r["format"], "also_fits": r.get("also_fits") or [],
            "adapters": r["adapters"], "modules": r["modules"], "ranks": {str(k): v for k, v in r["ranks"].items()},
            "alphas": {str(k): v for k, v in r["alphas"].items()}, "dtype": r["dtype"],
            "coverage": _coverage_summary(r["components"]), "trigger_words": meta.get("trigger_words") or [],
            "base_model": meta.get("base_model"), "title": meta.get("title"), "trainer": meta.get("trainer"),
            "unknown_key_count": r["unknown_key_count"], "stored_hashes": r.get("stored_hashes") or {}}


def _model_fields(path: str) -> dict[str, Any]:
    """Kind and architecture of a safetensors file that is not a LoRA of a registered format (base model, text
    encoder, VAE, a LoRA of an unsupported architecture, other)."""
    from lorakit.base.checkpoint import open_base
    from lorakit.io import open_weights
    from lorakit.layouts.file_kinds import file_kind
    with open_weights(path) as f:
        keys = f.keys()
        try:
            base = open_base(f)
        except NotALoraError:       # LoRA-shaped keys of no registered architecture/format
            return {"kind": LORA, "architecture": None, "tensors": len(keys)}
        except LorakitError:
            fk = file_kind(keys)
            return {"kind": fk.kind if fk else OTHER, "architecture": None, "tensors": len(keys)}
        spec = base.arch.spec
        held = base.components()
        roles = {spec.components[c].role for c in held}
        return {"kind": BASE_MODEL if "denoiser" in roles else TEXT_ENCODER, "architecture": base.arch.name,
                "architecture_label": spec.label, "variant": base.variant, "layout": base.layout,
                "components": held, "tensors": len(keys), "passthrough_tensors": len(base.passthrough)}


def _hash_fields(path: str, container: str, stored_sshs: str | None) -> dict[str, Any]:
    from lorakit.io.hashes import file_digests
    d = file_digests(path)
    out: dict[str, Any] = {"sha256": d["sha256"], "autov2": d["autov2"]}
    if container == SAFETENSORS:
        out["autov3"] = d["autov3"]
    if stored_sshs is not None:
        from lorakit.io import open_weights
        from lorakit.io.hashes import sshs_hashes_of
        with open_weights(path) as f:
            model_hash, _ = sshs_hashes_of(f)
        out["sshs_model_hash"] = model_hash
        out["sshs_current"] = stored_sshs.lower() == model_hash
    return out


def scan_file(path: str, *, hashes: bool = True) -> dict[str, Any]:
    """The scan record of one file (see the module docstring). Pure and total: every failure is in the record
    (``status`` ``error`` with ``error``), nothing is written, nothing is unpickled."""
    p = os.path.abspath(path)
    rec: dict[str, Any] = {"path": p, "status": OK, "kind": None, "problems": [], "scanner": SCANNER}
    try:
        size, mtime_ns, inode = file_key(p)
        rec.update(size=size, mtime_ns=mtime_ns, inode=inode)
        got = sniff(p)
    except OSError as exc:
        rec.update(status=ERROR, error={"type": "InputFileError", "message": f"cannot read ({exc.strerror})"})
        return rec
    rec["container"] = got.container
    note = extension_mismatch(p, got.container)
    if note:
        rec["problems"].append(note)
    stored_sshs = None
    try:
        if got.container in PICKLES:
            ps = scan_pickle(p)
            rec["kind"] = OTHER
            rec["pickle"] = ps.to_json()
            rec["problems"].extend(ps.problems)
            if ps.verdict == DANGEROUS:
                rec["problems"].append("pickle imports dangerous globals: " + ", ".join(ps.dangerous))
            elif ps.verdict == UNKNOWN:
                rec["problems"].append("pickle imports globals outside the tensor-rebuilding set: "
                                       + ", ".join(g for g, r in ps.globals.items() if r == UNKNOWN))
        elif got.container == SAFETENSORS:
            from lorakit.ops.inspection import inspect_lora
            try:
                r = inspect_lora(p)
                rec.update(_lora_fields(r))
                stored_sshs = r.get("stored_hashes", {}).get("sshs_model_hash")
                if r["unknown_key_count"]:
                    rec["problems"].append(f"{r['unknown_key_count']} keys not understood")
            except NotALoraError:
                rec.update(_model_fields(p))
            except (FormatError, ArchitectureError) as exc:     # keys no registered LoRA reading explains
                rec.update(_model_fields(p))
                if rec["kind"] in (LORA, OTHER):
                    rec["problems"].append(str(exc))
        elif got.container == TRUNCATED_SAFETENSORS:
            rec["kind"] = OTHER
            raise_truncated(p, got.header_bytes or 0, rec.get("size", 0))
        elif got.container == GGUF:
            rec["kind"] = OTHER
            rec["problems"].append("GGUF file: kind and architecture not read by scan")
        else:       # empty, or content of no weight format: corrupt (its name promised a weight file)
            from lorakit.errors import InputFileError
            rec["kind"] = OTHER
            raise InputFileError("empty file." if got.container == EMPTY else
                                 "not a weight file: its first bytes are no safetensors header, pickle, zip or GGUF "
                                 "(corrupt or truncated?).", path=p)
    except LorakitError as exc:     # the record names the file: the message does not repeat it
        message = exc.message + (f" Fix: {exc.hint}" if exc.hint else "")
        rec.update(status=ERROR, error={"type": type(exc).__name__, "message": " ".join(message.split())})
    except Exception as exc:   # a bug must not stop a library scan: the record says so
        rec.update(status=ERROR, error={"type": type(exc).__name__, "message": f"internal error: {exc}"})
    if hashes:
        try:
            rec.update(_hash_fields(p, rec.get("container", ""), stored_sshs if rec["status"] != ERROR else None))
            if rec.get("sshs_current") is False:
                rec["problems"].append("stored sshs_model_hash does not match the tensors (lorakit meta --rehash)")
        except (LorakitError, OSError) as exc:
            rec["problems"].append(f"hashing failed: {exc}")
    if rec["status"] != ERROR:
        if rec.get("pickle", {}).get("verdict") == DANGEROUS:
            rec["status"] = DANGER
        elif rec["problems"]:
            rec["status"] = WARNING
    return rec


def raise_truncated(path: str, header: int, size: int) -> None:
    """Raise the HeaderError of a safetensors file whose header runs past its end."""
    from lorakit.errors import HeaderError
    raise HeaderError(f"truncated: the header claims {header} bytes, the file has {size}.", path=path)


# ---------------------------------------------------------------------------------------------
# A library: index, executors, duplicates, summary
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScanTask:
    """:func:`scan_file` with its options, picklable for worker processes and cluster workers."""

    hashes: bool = True

    def __call__(self, path: str) -> dict[str, Any]:
        return scan_file(path, hashes=self.hashes)


@dataclass
class ScanReport:
    """Every file's record (in input order), how many were read vs taken from the index, removed index
    entries, duplicate groups (same SHA-256) and the summary."""

    records: list[dict[str, Any]] = field(default_factory=list)
    read: int = 0
    reused: int = 0
    removed: int = 0
    duplicates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """2 when a file is dangerous or unreadable, 1 when some have problems, else 0."""
        statuses = {r["status"] for r in self.records}
        return 2 if statuses & {ERROR, DANGER} else 1 if WARNING in statuses else 0

    def summary(self) -> dict[str, Any]:
        def count(key: str) -> dict[str, int]:
            return dict(Counter(str(r.get(key) or "-") for r in self.records).most_common())
        problems = [{"path": r["path"], "status": r["status"],
                     "problems": ([r["error"]["message"]] if r.get("error") else []) + r["problems"]}
                    for r in self.records if r["status"] != OK]
        return {"files": len(self.records), "read": self.read, "from_index": self.reused,
                "removed_from_index": self.removed, "bytes": sum(r.get("size", 0) for r in self.records),
                "status": count("status"), "kind": count("kind"), "architecture": count("architecture"),
                "format": count("format"), "container": count("container"),
                "duplicate_groups": len(self.duplicates),
                "duplicate_files": sum(len(g["paths"]) for g in self.duplicates), "problems": problems}

    def to_json(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "summary": self.summary(), "duplicates": self.duplicates,
                "files": self.records}


def duplicate_groups(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Files with the same SHA-256 (two or more), largest groups first; each group's paths sorted."""
    by: dict[str, list[str]] = {}
    size: dict[str, int] = {}
    for r in records:
        if r.get("sha256"):
            by.setdefault(r["sha256"], []).append(r["path"])
            size[r["sha256"]] = r.get("size", 0)
    groups = [{"sha256": h, "size": size[h], "paths": sorted(ps)} for h, ps in by.items() if len(ps) > 1]
    return sorted(groups, key=lambda g: (-len(g["paths"]), g["paths"][0]))


def reusable(record: dict[str, Any], *, hashes: bool) -> bool:
    """Whether an indexed record of an unchanged file answers this scan: the same record layout, and its hashes
    when the scan wants hashes."""
    return record.get("scanner") == SCANNER and (not hashes or "sha256" in record or record["status"] == ERROR)


def _failed_record(path: str, exc: BaseException) -> dict[str, Any]:
    return {"path": os.path.abspath(path), "status": ERROR, "problems": [], "scanner": SCANNER,
            "error": {"type": type(exc).__name__, "message": f"worker failed: {exc}"}}


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def scan_library(paths: Sequence[str | os.PathLike[str]], *, index: str | os.PathLike[str] | None = None,
                 hashes: bool = True, recursive: bool = True, executor: str = "local", jobs: int = 1,
                 address: str | None = None, on_record: Callable[[dict[str, Any]], None] | None = None,
                 on_read: Callable[[str], None] | None = None,
                 progress: Callable[[int, int, str], None] | None = None) -> ScanReport:
    """Scan files, folders and globs (folders recursively by default). With ``index``, files whose (size, mtime,
    inode) match their indexed record are not read again (``on_read(path)`` is called for each file that is), and
    index entries under the scanned folders whose files are gone are removed. ``on_record`` sees every record:
    first those taken from the index, then the others as they complete (any executor)."""
    from lorakit.ops.batch import expand_inputs, folder_files
    from lorakit.ops.executors import run_map
    from lorakit.ops.scan_index import ScanIndex
    found = []
    for p, _ in expand_inputs(paths, recursive=recursive):
        if os.path.isdir(p):    # a sharded model: a scan records its files one by one (each has its hashes)
            found += [os.path.abspath(f) for f in folder_files(p)]
        else:
            found.append(os.path.abspath(p))
    roots = [os.path.abspath(os.fspath(p)) for p in paths if os.path.isdir(p)]
    ix = ScanIndex(index) if index is not None else None
    report = ScanReport()
    try:
        known = ix.known() if ix is not None else {}
        todo: list[str] = []
        reused: dict[str, dict[str, Any]] = {}
        for p in found:
            try:
                key = file_key(p)
            except OSError:
                todo.append(p)      # its record says why it cannot be read
                continue
            old = next(ix.records([p]), None) if ix is not None and known.get(p) == key else None
            if old is not None and reusable(old, hashes=hashes):
                reused[p] = old
            else:
                todo.append(p)
        if ix is not None:
            pending = set(todo)
            gone = [p for p in known if _under(p, roots) and p not in reused and p not in pending
                    and not os.path.exists(p)]
            report.removed = ix.remove(gone)
        for p in found:
            if p in reused and on_record is not None:
                on_record(reused[p])
        done = len(reused)
        fresh: dict[str, dict[str, Any]] = {}
        task = ScanTask(hashes=hashes)
        for n, (i, rec) in enumerate(run_map(task, todo, executor=executor, jobs=jobs, address=address,
                                             on_failure=_failed_record), 1):
            if on_read is not None:
                on_read(todo[i])
            fresh[todo[i]] = rec
            if ix is not None:
                ix.put(rec)
                if n % 500 == 0:
                    ix.commit()
            if on_record is not None:
                on_record(rec)
            done += 1
            if progress is not None:
                progress(done, len(found), todo[i])
        report.records = [reused[p] if p in reused else fresh[p] for p in found]
        report.read, report.reused = len(fresh), len(reused)
        report.duplicates = duplicate_groups(report.records)
    finally:
        if ix is not None:
            ix.close()
    return report


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def jsonl_line(record: dict[str, Any]) -> str:
    """One record as a JSONL line (keys sorted: the same record gives the same line from any executor)."""
    return json.dumps(record, sort_keys=True, default=str) + "\n"


def csv_row(record: dict[str, Any]) -> dict[str, str]:
    """The flat CSV columns of a record (dicts and lists joined)."""
    def flat(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, dict):
            return ";".join(f"{k}:{x}" for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return ";".join(str(x) for x in v)
        return str(v)
    row = {k: flat(record.get(k)) for k in CSV_FIELDS}
    if record.get("error"):
        row["problems"] = ";".join([record["error"]["message"], *record["problems"]])
    return row


def write_csv(records: Iterable[dict[str, Any]], out: IO[str]) -> None:
    """Every record as a CSV row under :data:`CSV_FIELDS`."""
    w = csv.DictWriter(out, fieldnames=list(CSV_FIELDS))
    w.writeheader()
    for r in records:
        w.writerow(csv_row(r))


def format_summary(report: ScanReport) -> str:
    """The summary table printed at the end of a scan."""
    s = report.summary()
    lines = [f"{s['files']} files, {s['bytes'] / 1e9:.2f} GB: {s['read']} read, {s['from_index']} from the index"
             + (f", {s['removed_from_index']} gone files removed from the index" if s["removed_from_index"] else "")]
    for title in ("status", "kind", "architecture", "format", "container"):
        lines.append(f"  {title:<13}" + ", ".join(f"{k} {v}" for k, v in s[title].items()))
    if report.duplicates:
        lines.append(f"  duplicates   {s['duplicate_groups']} groups, {s['duplicate_files']} files "
                     f"({sum((len(g['paths']) - 1) * g['size'] for g in report.duplicates) / 1e6:.1f} MB redundant)")
        for g in report.duplicates[:5]:
            lines.append(f"    {g['sha256'][:12]} ×{len(g['paths'])}: " + ", ".join(g["paths"][:3])
                         + (" …" if len(g["paths"]) > 3 else ""))
    if s["problems"]:
        lines.append(f"  problems     {len(s['problems'])} files")
        for pr in s["problems"][:20]:
            lines.append(f"    {pr['status'].upper():<9} {pr['path']}: {'; '.join(pr['problems'])[:300]}")
        if len(s["problems"]) > 20:
            lines.append(f"    … and {len(s['problems']) - 20} more (--jsonl / --csv / --report list them all)")
    return "\n".join(lines)
