"""Text and byte outputs (JSONL, CSV, HTML, PNG) written like every lorakit output: into a temporary file in
the target's folder, renamed into place when complete, removed if the run fails."""

from __future__ import annotations

import io
import os

from lorakit.errors import OutputError
from lorakit.io.tempfiles import create_temp_file


def _normal_mode(fd: int) -> None:
    mask = os.umask(0o022)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)     # the temporary file is made 0600; outputs get normal permissions


class AtomicText(io.TextIOWrapper):
    """A UTF-8 text file that appears at ``path`` only on :meth:`close` (``with`` commits unless it raised)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.target = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.target))
        if not os.path.isdir(folder):
            raise OutputError("the output's folder does not exist.", path=self.target)
        fd, self.temp = create_temp_file(folder, os.path.basename(self.target))
        _normal_mode(fd)
        super().__init__(os.fdopen(fd, "wb"), encoding="utf-8", newline="")
        self.done = False

    def close(self) -> None:
        if self.done:
            return
        self.done = True
        super().close()
        os.replace(self.temp, self.target)

    def discard(self) -> None:
        """Drop what was written; the target is left as it was."""
        if self.done:
            return
        self.done = True
        super().close()
        try:
            os.unlink(self.temp)
        except OSError:
            pass

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.discard()
        else:
            self.close()


def atomic_text(path: str | os.PathLike[str]) -> AtomicText:
    """A text output committed on close (see :class:`AtomicText`)."""
    return AtomicText(path)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        raise OutputError("the output's folder does not exist.", path=target)
    fd, temp = create_temp_file(folder, os.path.basename(target))
    _normal_mode(fd)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
