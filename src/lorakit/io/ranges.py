"""Byte-range primitives for streaming whole tensors between files: positioned reads into and writes from
reusable tensor buffers, kernel-side copies with a checked fallback, and read-ahead hints for cold disks. Every
byte count is checked: a short read is a changed or truncated input, never zeros."""

from __future__ import annotations

from typing import TYPE_CHECKING

import os


from lorakit.errors import InputFileError, OutputError
from lorakit.io.header import TensorInfo

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch

READ_AHEAD = 256 << 20   # bytes announced to the kernel beyond the current read (keeps a cold disk streaming)


def read_ahead(fd: int, offset: int, n: int, ahead: dict[int, int]) -> None:
    """Ask the kernel to start reading ``READ_AHEAD`` bytes past this read: the pipeline holds only a few chunks,
    so without it a cold read stalls whenever compute is behind (measured: a cold SDXL bake 30 s → 18 s)."""
    want = offset + n + READ_AHEAD
    start = max(offset, ahead.get(fd, 0))
    if want > start and hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, start, want - start, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        ahead[fd] = want


def pread_into(fd: int, buf: torch.Tensor, n: int, offset: int, info: TensorInfo) -> None:
    """Read ``n`` bytes at ``offset`` into the (CPU, contiguous) tensor buffer ``buf``; a short file is an error."""
    view = buf.numpy().data[:n]     # the array's memoryview (numpy's stubs lack __buffer__ before 3.12)
    done = 0
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise InputFileError(f"file ended while reading tensor {info.name!r} (truncated?).", path=info.file)
        done += got


def pwrite_from(fd: int, buf: torch.Tensor, n: int, offset: int, path: str) -> None:
    """Write the first ``n`` bytes of the tensor buffer ``buf`` at ``offset`` (in 1 GiB pieces)."""
    view = buf.numpy().data[:n]
    done = 0
    try:
        while done < n:
            done += os.pwrite(fd, view[done:done + (1 << 30)], offset + done)
    except OSError as exc:
        raise OutputError(f"write failed ({exc.strerror or exc}); nothing was published.", path=path,
                          hint="check free disk space and permissions.") from None


def copy_range(src: int, dst: int, n: int, src_off: int, dst_off: int, path: str, *,
                src_path: str = "") -> None:
    """Kernel-side copy (no user-space buffers); falls back to pread/pwrite. Short copies are errors."""
    done = 0
    try:
        while done < n:
            try:
                got = os.copy_file_range(src, dst, n - done, src_off + done, dst_off + done)
            except OSError as exc:
                if exc.errno in (18, 22, 38, 95) and done == 0:   # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP
                    copy_slow(src, dst, n, src_off, dst_off, src_path or path)
                    return
                raise
            if got <= 0:
                raise InputFileError(f"input file ended {n - done} bytes early during a copy (truncated or changed "
                                     "while lorakit read it?); nothing was published.", path=src_path or path)
            done += got
    except OSError as exc:
        raise OutputError(f"write failed ({exc.strerror or exc}); nothing was published.", path=path,
                          hint="check free disk space and permissions.") from None


def copy_slow(src: int, dst: int, n: int, src_off: int, dst_off: int, path: str = "") -> None:
    """pread/pwrite copy; every byte count is checked (a short read is a changed input, never zeros)."""
    step = 16 << 20
    off = 0
    while off < n:
        data = os.pread(src, min(step, n - off), src_off + off)
        if not data:
            raise InputFileError(f"input file ended {n - off} bytes early during a copy (truncated or changed while "
                                 "lorakit read it?); nothing was published.", path=path or None)
        view, done = memoryview(data), 0
        while done < len(view):
            wrote = os.pwrite(dst, view[done:], dst_off + off + done)
            if wrote <= 0:
                raise OSError(28, "no byte written")
            done += wrote
        off += len(data)
