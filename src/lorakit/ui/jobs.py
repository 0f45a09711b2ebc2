"""Long library calls run in a worker thread, with progress and cancellation (no UI toolkit here).

A :class:`Job` passes the library's ``progress(done, total, item)`` hook to the call and raises
:class:`lorakit.errors.Interrupted` from that hook once :meth:`Job.cancel` was called: the operation stops at
its next progress step and, as on Ctrl-C, its output (written to a temporary file and renamed only when
complete) is never published. A :class:`JobBoard` keeps the running job of each browser session and tab so
that a Cancel button can reach it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from lorakit.errors import Interrupted, LorakitError
from lorakit.progress import Progress

T = TypeVar("T")

CANCELLED = "cancelled; no output was written."


def one_line(exc: BaseException) -> str:
    """What the UI shows for an exception: the library's one-line message with its fix, never a traceback."""
    if isinstance(exc, LorakitError):
        return f"error: {exc}"
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return f"internal error: {text} (this is a bug; please report it with the inputs that caused it)"


@dataclass
class Snapshot:
    """A job's state at one moment: ``done`` of ``total`` units, the current item, and the outcome."""

    done: int = 0
    total: int = 0
    item: str = ""
    finished: bool = False
    cancelled: bool = False
    error: str | None = None

    @property
    def fraction(self) -> float | None:
        return min(1.0, self.done / self.total) if self.total > 0 else None


class Job(Generic[T]):
    """One library call running in a daemon thread. ``call(progress)`` must pass ``progress`` to the library."""

    def __init__(self, call: Callable[[Progress], T]) -> None:
        self._call = call
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._state = Snapshot()
        self.result: T | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Job[T]":
        self._thread.start()
        return self

    def _progress(self, done: int, total: int, item: str = "") -> None:
        if self._cancel.is_set() and done < total:   # at done == total the work is complete: let it finish
            raise Interrupted(CANCELLED)
        with self._lock:
            self._state.done, self._state.total, self._state.item = int(done), int(total), str(item or "")

    def _run(self) -> None:
        error: str | None = None
        cancelled = False
        try:
            self.result = self._call(self._progress)
        except Interrupted:
            cancelled = True
        except KeyboardInterrupt:   # pragma: no cover - the server is shutting down
            cancelled = True
        except BaseException as exc:  # noqa: BLE001 - shown to the user in one line
            error = one_line(exc)
        with self._lock:
            self._state.finished, self._state.cancelled, self._state.error = True, cancelled, error

    def cancel(self) -> None:
        """Ask the job to stop at its next progress step."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(**vars(self._state))

    def wait(self, timeout: float | None = None) -> Snapshot:
        self._thread.join(timeout)
        return self.snapshot()

    def poll(self, interval: float = 0.1) -> Iterator[Snapshot]:
        """Snapshots every ``interval`` seconds until the job finishes (the last one is the finished state)."""
        while True:
            snap = self.snapshot()
            yield snap
            if snap.finished:
                return
            time.sleep(interval)


class JobBoard:
    """The running job per (session, tab): what a Cancel button cancels."""

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, str], Job[Any]] = {}
        self._lock = threading.Lock()

    def put(self, session: str, tab: str, job: Job[Any]) -> None:
        with self._lock:
            self._jobs[(session, tab)] = job

    def get(self, session: str, tab: str) -> Job[Any] | None:
        with self._lock:
            return self._jobs.get((session, tab))

    def cancel(self, session: str, tab: str) -> bool:
        """Cancel the session's running job on ``tab``; False when none runs."""
        job = self.get(session, tab)
        if job is None or job.snapshot().finished:
            return False
        job.cancel()
        return True

    def drop(self, session: str, tab: str, job: Job[Any]) -> None:
        with self._lock:
            if self._jobs.get((session, tab)) is job:
                del self._jobs[(session, tab)]
