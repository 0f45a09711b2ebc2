"""The scan index: one SQLite table of scan records keyed by absolute path, with the (size, mtime_ns, inode) the
file had when it was read. A record is reused while its file still has that key; anything else is rescanned."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from typing import Any

from lorakit.errors import OutputError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    sha256 TEXT,
    scanned_at REAL NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_sha256 ON files (sha256);
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class ScanIndex:
    """A scan index file (created when missing). ``with ScanIndex(path) as ix: …`` commits on exit."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise OutputError("the index's folder does not exist.", path=self.path)
        try:
            self.db = sqlite3.connect(self.path)
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT value FROM info WHERE key='schema'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO info VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise OutputError(f"index schema {row[0]} is not lorakit's ({SCHEMA_VERSION}).", path=self.path,
                                  hint="pass a new --index file.")
        except sqlite3.DatabaseError as exc:
            raise OutputError(f"not a lorakit scan index ({exc}).", path=self.path,
                              hint="pass a new --index file.") from None

    def known(self) -> dict[str, tuple[int, int, int]]:
        """path -> (size, mtime_ns, inode) of every indexed file."""
        return {p: (s, m, i) for p, s, m, i in self.db.execute("SELECT path, size, mtime_ns, inode FROM files")}

    def records(self, paths: Iterable[str]) -> Iterator[dict[str, Any]]:
        """The stored records of ``paths`` (those indexed)."""
        for p in paths:
            row = self.db.execute("SELECT record FROM files WHERE path=?", (p,)).fetchone()
            if row is not None:
                yield json.loads(row[0])

    def put(self, record: dict[str, Any]) -> None:
        """Store (or replace) one file's record; a record without a file key (unreadable file) is dropped."""
        if "size" not in record:
            self.remove([record["path"]])
            return
        self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (record["path"], record["size"], record["mtime_ns"], record["inode"], record.get("sha256"),
                         time.time(), json.dumps(record, sort_keys=True)))

    def remove(self, paths: Iterable[str]) -> int:
        n = 0
        for p in paths:
            n += self.db.execute("DELETE FROM files WHERE path=?", (p,)).rowcount
        return n

    def commit(self) -> None:
        self.db.commit()

    def close(self) -> None:
        self.db.commit()
        self.db.close()

    def __enter__(self) -> "ScanIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
