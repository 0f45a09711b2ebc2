"""Progress on a terminal: one small bar on stderr, shown only when that stream is a TTY.

The library never prints progress by itself: long operations (merge, bake, extract, resize, convert,
diff) take an optional ``progress`` callback ``(done, total, item)``; the CLI decides whether to pass
a :class:`ProgressBar` (never with ``--json``, never when stderr is not a terminal).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

Progress = Callable[[int, int, str], None]
"""``progress(done, total, item)``: ``done`` of ``total`` units finished, ``item`` names the current one."""


def is_tty(stream: object) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes and captured test output)."""
    try:
        return bool(getattr(stream, "isatty", lambda: False)())
    except (OSError, ValueError):   # a closed stream
        return False


class ProgressBar:
    """A one-line progress bar, redrawn at most every ``interval`` seconds and erased when done.

    ``unit="bytes"`` shows GB and GB/s; otherwise counts. Disabled (a no-op) unless ``stream`` (default
    stderr) is a terminal. Thread-safe: bake reports from its reader and writer threads.
    """

    def __init__(self, label: str, stream: TextIO | None = None, *, unit: str = "items", width: int = 24,
                 interval: float = 0.2) -> None:
        self.label, self.unit, self.width, self.interval = label, unit, width, interval
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = is_tty(self.stream)
        self.t0 = time.perf_counter()
        self.last = -1.0
        self.shown = 0
        self.lock = threading.Lock()

    def __call__(self, done: int, total: int, item: str = "") -> None:
        if not self.enabled or total <= 0:
            return
        with self.lock:
            now = time.perf_counter()
            if done >= total:
                self.close()
                return
            if now - self.last < self.interval:
                return
            self.last = now
            frac = min(1.0, max(0.0, done / total))
            fill = int(self.width * frac)
            el = max(1e-9, now - self.t0)
            if self.unit == "bytes":
                amount = f"{done / 1e9:.2f}/{total / 1e9:.2f} GB {done / el / 1e9:.2f} GB/s"
            else:
                amount = f"{done}/{total}"
            eta = f" ETA {el * (total - done) / done:.0f}s" if done > 0 else ""
            line = f"{self.label} [{'#' * fill}{'.' * (self.width - fill)}] {frac * 100:3.0f}% {amount}{eta}"
            if item:
                line += f" {item[:40]}"
            pad = " " * max(0, self.shown - len(line))
            self.shown = len(line)
            self.stream.write("\r" + line + pad)
            self.stream.flush()

    def close(self) -> None:
        """Erase the bar (nothing was drawn: nothing is written)."""
        if self.enabled and self.shown:
            self.stream.write("\r" + " " * self.shown + "\r")
            self.stream.flush()
            self.shown = 0


def terminal_progress(label: str, *, enabled: bool = True, unit: str = "items",
                      stream: TextIO | None = None) -> ProgressBar | None:
    """The CLI's choice: a :class:`ProgressBar` when ``enabled`` and the stream (stderr) is a terminal, else None."""
    stream = stream if stream is not None else sys.stderr
    if not enabled or not is_tty(stream):
        return None
    return ProgressBar(label, stream, unit=unit)


def report(progress: Progress | None, done: int, total: int, item: str = "") -> None:
    """Call ``progress`` if given (the library's one-line hook)."""
    if progress is not None:
        progress(done, total, item)
