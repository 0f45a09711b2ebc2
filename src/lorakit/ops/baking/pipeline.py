"""The three-stage thread pipeline (read → compute → write) with pooled buffers: memory bounded by the chunk size."""

from __future__ import annotations

from typing import TYPE_CHECKING

import collections
import math
import os
import queue
import threading
import time
from collections.abc import Callable


from lorakit.dtypes import itemsize, torch_dtype
from lorakit.io.ranges import copy_range, pread_into, pwrite_from, read_ahead
from lorakit.io.writer import SLOW_WRITE_HOOK
from lorakit.ops.baking.compute import Compute
from lorakit.ops.baking.tasks import Task
from lorakit.progress import Progress

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch


DEFAULT_CHUNK_BYTES = 16 << 20        # one pipeline chunk (source or output bytes, whichever is larger)


POOL = 3                              # buffers per pipeline stage


WRITEBACK_LAG = 4                     # written ranges kept in the page cache before they are dropped


class _Stop(Exception):
    pass


class ByteProgress:
    """Byte counts from the pipeline's threads, forwarded to the caller's progress callback."""

    def __init__(self, total: int, callback: Progress | None) -> None:
        self.total, self.callback = max(1, total), callback
        self.done = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        if self.callback is None:
            return
        with self.lock:
            self.done += n
            self.callback(min(self.done, self.total), self.total, "")

    def close(self) -> None:
        if self.callback is not None:
            self.callback(self.total, self.total, "")


class StageTimes:
    """Seconds each stage spent in its own work (each counter is written by one thread only): ``read``
    (pread of tensors to compute), ``compute`` (fp32 add and cast), ``write`` (pwrite of computed chunks), ``copy``
    (copy_file_range of untouched tensors), ``wait_read``/``wait_write`` (the compute thread idle, waiting for the
    reader / for the writer to take a chunk). The stages overlap, so the sum exceeds the wall time; the largest
    busy stage is the bottleneck."""

    def __init__(self) -> None:
        self.read = self.compute = self.write = self.copy = self.wait_read = self.wait_write = 0.0

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


class Pipeline:
    def __init__(self, tasks: list[Task], device: torch.device, chunk_bytes: int, progress: ByteProgress) -> None:
        self.tasks, self.device, self.chunk_bytes, self.progress = tasks, device, chunk_bytes, progress
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.q_read: queue.Queue = queue.Queue(maxsize=POOL)
        self.q_write: queue.Queue = queue.Queue(maxsize=POOL)
        need = [t for t in tasks if t.compute]
        self.buf_size = min(chunk_bytes, max((_chunk_bytes(t, *next(t.chunks(chunk_bytes))) for t in need), default=0))
        self.rpool: queue.Queue = queue.Queue()
        self.wpool: queue.Queue = queue.Queue()
        for _ in range(POOL if need else 0):
            self.rpool.put(torch.empty(self.buf_size, dtype=torch.uint8))
            self.wpool.put(torch.empty(self.buf_size, dtype=torch.uint8))
        self.fds: dict[str, int] = {}
        self.written: collections.deque[tuple[int, int, int]] = collections.deque()
        self.remaining = {id(t): sum(1 for _ in t.chunks(chunk_bytes)) for t in need}
        self.times = StageTimes()

    # -- helpers ---------------------------------------------------------------------------
    def _get(self, q: queue.Queue):
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue

    def _put(self, q: queue.Queue, item: object) -> None:
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _buffer(self, pool: queue.Queue, nbytes: int) -> tuple[torch.Tensor, bool]:
        """A pooled buffer, or a one-off one for a chunk larger than the pool's (whole-tensor DoRA)."""
        if nbytes > self.buf_size:
            return torch.empty(nbytes, dtype=torch.uint8), False
        return self._get(pool), True

    def _fd(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self.fds[path] = fd
        return fd

    def _writeback(self, fd: int, offset: int, n: int) -> None:
        """Start writing a range back to disk now and drop it from the cache a few ranges later.

        Streams the output to disk while the bake runs (instead of piling up dirty pages that throttle
        the writer and make the final fsync long) and leaves the page cache to the rest of the system.
        """
        if not hasattr(os, "posix_fadvise") or n <= 0:
            return
        try:
            os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)     # dirty pages: starts writeback
            self.written.append((fd, offset, n))
            while len(self.written) > WRITEBACK_LAG:
                old = self.written.popleft()
                os.posix_fadvise(*old, os.POSIX_FADV_DONTNEED)           # clean by now: dropped
        except OSError:
            pass

    def _thread(self, fn: Callable[[], None]) -> threading.Thread:
        def body() -> None:
            try:
                fn()
            except _Stop:
                pass
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.errors.append(exc)
                self.stop.set()
        t = threading.Thread(target=body, daemon=True)
        t.start()
        return t

    # -- stages ----------------------------------------------------------------------------
    def _reader(self) -> None:
        ahead: dict[int, int] = {}      # fd -> end of the range already announced to the kernel
        for task in self.tasks:
            if not task.compute:
                self._put(self.q_read, (task, 0, 0, None, False))
                continue
            isz, per = itemsize(task.info.dtype), task.row_elems
            for j0, j1 in task.chunks(self.chunk_bytes):
                n = (j1 - j0) * per * isz
                buf, pooled = self._buffer(self.rpool, n)
                fd, offset = self._fd(task.info.file), task.info.start + j0 * per * isz
                read_ahead(fd, offset, n, ahead)
                t0 = time.perf_counter()
                pread_into(fd, buf, n, offset, task.info)
                self.times.read += time.perf_counter() - t0
                self._put(self.q_read, (task, j0, j1, buf, pooled))
        self._put(self.q_read, None)

    def _writer(self) -> None:
        while True:
            item = self._get(self.q_write)
            if item is None:
                return
            task, j0, j1, buf, pooled = item
            w = task.out.writer(task.key)
            dst = w.offsets[task.key][0]
            if SLOW_WRITE_HOOK:   # test hook (as in SafetensorsWriter.write): makes kill-mid-bake tests deterministic
                time.sleep(SLOW_WRITE_HOOK)
            if buf is None:
                t0 = time.perf_counter()
                copy_range(self._fd(task.info.file), w.fd, task.info.nbytes, task.info.start, dst, w.path,
                            src_path=task.info.file)
                self._writeback(w.fd, dst, task.info.nbytes)
                self.times.copy += time.perf_counter() - t0
                w.written.add(task.key)
                self.progress.add(task.info.nbytes)
                continue
            osz, per = itemsize(task.out_code), task.row_elems
            n = (j1 - j0) * per * osz
            t0 = time.perf_counter()
            pwrite_from(w.fd, buf, n, dst + j0 * per * osz, w.path)
            self._writeback(w.fd, dst + j0 * per * osz, n)
            self.times.write += time.perf_counter() - t0
            if pooled:
                self.wpool.put(buf)
            self.remaining[id(task)] -= 1
            if self.remaining[id(task)] == 0:
                w.written.add(task.key)
            self.progress.add((j1 - j0) * per * itemsize(task.info.dtype))

    def run(self) -> None:
        compute = Compute(self.device, self.chunk_bytes)
        threads = [self._thread(self._reader), self._thread(self._writer)]
        try:
            times = self.times
            while True:
                t0 = time.perf_counter()
                item = self._get(self.q_read)
                times.wait_read += time.perf_counter() - t0
                if item is None:
                    self._put(self.q_write, None)
                    break
                task, j0, j1, buf, pooled = item
                if buf is None:
                    self._put(self.q_write, item)
                    continue
                src_dt, out_dt = torch_dtype(task.info.dtype), torch_dtype(task.out_code)
                shape = (j1 - j0, *task.info.shape[1:]) if task.info.shape else ()
                n_in = math.prod(shape) * itemsize(task.info.dtype)
                n_out = math.prod(shape) * itemsize(task.out_code)
                t0 = time.perf_counter()
                obuf, opooled = self._buffer(self.wpool, n_out)
                t1 = time.perf_counter()
                times.wait_write += t1 - t0
                src = buf[:n_in].view(src_dt).view(shape)
                dst = obuf[:n_out].view(out_dt).view(shape)
                if task.info.shape:
                    compute.run(task, j0, j1, src, dst)
                else:
                    dst.copy_(src)
                if pooled:
                    self.rpool.put(buf)
                if j1 == task.rows or not task.info.shape:
                    for u in {id(u): u for u in (*task.additive, *task.doras)}.values():
                        u.done()
                t2 = time.perf_counter()
                times.compute += t2 - t1
                self._put(self.q_write, (task, j0, j1, obuf, opooled))
                times.wait_write += time.perf_counter() - t2
            for t in threads:
                while t.is_alive():
                    t.join(0.1)
        except BaseException as exc:
            self.stop.set()
            for t in threads:
                t.join()
            if isinstance(exc, _Stop) and self.errors:   # a worker failed first: report its error
                raise self.errors[0] from None
            raise
        finally:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()
        if self.errors:
            raise self.errors[0]


def _chunk_bytes(task: Task, j0: int, j1: int) -> int:
    per = task.row_elems * max(itemsize(task.info.dtype), itemsize(task.out_code))
    return (j1 - j0) * per
