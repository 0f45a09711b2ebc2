"""Streaming, atomic safetensors writer.

The header is planned from names, dtypes and shapes before any data is written; tensors may then
arrive in any order and are written at their planned offsets. Everything goes to a temporary file in
the target folder, which is fsynced and renamed into place only when every tensor has been written.
Any failure (disk full, interrupt, exception) removes the temporary file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import hashlib
import math
import os
import stat
import time
from collections.abc import Iterable, Mapping, Sequence


from lorakit.dtypes import dtype_code, itemsize
from lorakit.errors import OutputError, UsageError
from lorakit.io.header import MAX_HEADER_BYTES, MAX_TENSORS, build_header, serialisation_order
from lorakit.io.tempfiles import clean_stale_temps, create_temp_file

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch

_MAX_CHUNK = 1 << 30
# test hook: seconds to sleep per written tensor (makes interrupt-mid-write tests deterministic); 0 normally
SLOW_WRITE_HOOK = float(os.environ.get("LORAKIT_TEST_SLOW_WRITE") or 0)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without copying when it is already contiguous."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data     # its memoryview (numpy's stubs lack __buffer__ before 3.12)


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file (same real path, or the same inode through another link)."""
    a, b = os.fspath(a), os.fspath(b)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def resolve_output(out: str | os.PathLike[str]) -> str:
    """The file an output path will replace: ``out`` itself, or the regular file a symlink names.

    Refuses anything that exists and is not a regular file (FIFO, device, socket, dangling link): writing
    there would replace a special file with a regular one. A symlink to a regular file is followed, so
    the link stays and its target receives the new content (as ``cp`` or a shell redirection would).
    """
    out = os.fspath(out)
    if not os.path.lexists(out):
        return out
    try:
        st = os.stat(out)
    except OSError:
        raise OutputError("output path is a symbolic link to nothing (dangling link).", path=out,
                          hint="remove the link or choose another -o path.") from None
    if stat.S_ISDIR(st.st_mode):
        raise OutputError("output path is a folder.", path=out, hint="give a file name ending in .safetensors.")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
                else "a block device" if stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "not a regular file")
        raise OutputError(f"output path exists and is {kind}; lorakit only replaces regular files.", path=out,
                          hint="choose a regular file path for -o.")
    return os.path.realpath(out) if os.path.islink(out) else out


def check_output_path(out: str, inputs: Iterable[str | os.PathLike[str]] = ()) -> str:
    """Refuse an output that would replace any file an input reads, or whose folder cannot take it.

    Each input counts with every file it reads (an index's shards, a PEFT adapter's config: see
    :func:`~lorakit.io.reader.input_files`). Returns the path to write (a symlink's target, see
    :func:`resolve_output`).
    """
    from lorakit.io.reader import input_files

    out = os.fspath(out)
    target = resolve_output(out)
    real = os.path.realpath(target)
    for given in inputs:
        given = os.fspath(given)
        for inp in input_files(given):
            same = same_file(inp, target)
            if not same and os.path.isdir(inp) and real.startswith(os.path.realpath(inp) + os.sep):
                same = True
            if same:
                what = repr(given) if inp == given else f"{inp!r} (read as part of input {given!r})"
                raise OutputError(f"output path is the same as input {what}; lorakit never overwrites its inputs.",
                                  path=out, hint="choose another -o path.")
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        raise OutputError("output folder does not exist.", path=out, hint=f"create {folder!r} first.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError("output folder is not writable.", path=out)
    return target


class SafetensorsWriter:
    """Plan-first writer. Use as a context manager; ``commit()`` (or a clean exit) publishes the file."""

    def __init__(self, path: str | os.PathLike[str], entries: Sequence[tuple[str, str, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None, *, inputs: Iterable[str | os.PathLike[str]] = ()) -> None:
        self.path = check_output_path(os.fspath(path), inputs)
        plan = [(n, code, tuple(int(d) for d in shape)) for n, code, shape in entries]
        names = [n for n, _, _ in plan]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise UsageError(f"internal plan has duplicate tensor names: {dup[:5]}")
        if len(plan) > MAX_TENSORS:   # never write what the reader would refuse
            raise OutputError(f"the file would hold {len(plan)} tensors, more than the {MAX_TENSORS} lorakit reads; "
                              "nothing was written.", path=self.path)
        self.plan = {n: (code, shape) for n, code, shape in plan}
        self.header, ranges = build_header(plan, dict(metadata) if metadata is not None else None)
        if len(self.header) - 8 > MAX_HEADER_BYTES:
            raise OutputError(f"the header would be {len(self.header) - 8} bytes, over the {MAX_HEADER_BYTES}-byte "
                              "limit that lorakit and safetensors read; nothing was written.", path=self.path,
                              hint="drop large metadata values (e.g. --delete 'ss_tag_frequency') or tensors.")
        self.offsets = {n: (len(self.header) + b, len(self.header) + e) for n, (b, e) in ranges.items()}
        self.size = len(self.header) + (max((e for _, e in ranges.values()), default=0))
        self.written: set[str] = set()
        self.tmp = ""
        self.fd = -1
        folder = os.path.dirname(os.path.abspath(self.path))
        clean_stale_temps(folder)
        try:
            fd, self.tmp = create_temp_file(folder, os.path.basename(self.path))
        except OSError as exc:
            raise OutputError(f"cannot create a temporary file ({exc.strerror}).", path=self.path) from None
        self.fd = fd
        try:
            os.fchmod(fd, 0o666 & ~_umask())   # the temporary file is made 0600; outputs get normal permissions
            self._pwrite(memoryview(self.header), 0)
            os.ftruncate(self.fd, self.size)
        except BaseException:
            self.abort()
            raise

    @property
    def order(self) -> list[str]:
        return [n for n, _, _ in serialisation_order([(n, c, s) for n, (c, s) in self.plan.items()])]

    def _pwrite(self, data: memoryview, offset: int) -> None:
        done = 0
        try:
            while done < len(data):
                n = os.pwrite(self.fd, data[done: done + _MAX_CHUNK], offset + done)
                if n <= 0:
                    raise OSError(28, "no byte written")
                done += n
        except OSError as exc:
            raise OutputError(f"write failed ({exc.strerror or exc}); nothing was published.", path=self.path,
                              hint="check free disk space and permissions.") from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.plan:
            raise UsageError(f"internal error: tensor {name!r} was not planned for {self.path}")
        code, shape = self.plan[name]
        got = dtype_code(tensor.dtype, name=name)
        if got != code or tuple(tensor.shape) != shape:
            raise UsageError(f"internal error: {name!r} planned as {code} {list(shape)}, got {got} {list(tensor.shape)}")
        if name in self.written:
            raise UsageError(f"internal error: tensor {name!r} written twice")
        data = tensor_bytes(tensor)
        assert len(data) == math.prod(shape) * itemsize(code)
        self._pwrite(data, self.offsets[name][0])
        self.written.add(name)
        if SLOW_WRITE_HOOK:   # test hook: makes interrupt-mid-write tests deterministic
            time.sleep(SLOW_WRITE_HOOK)

    def commit(self) -> str:
        missing = [n for n in self.plan if n not in self.written]
        if missing:
            self.abort()
            raise UsageError(f"internal error: {len(missing)} planned tensors never written (e.g. {missing[0]!r})")
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            resolve_output(self.path)     # still absent or a regular file (not turned into a FIFO meanwhile)
            os.replace(self.tmp, self.path)
            self.tmp = ""
        except (OSError, OutputError) as exc:
            self.abort()
            if isinstance(exc, OutputError):
                raise
            raise OutputError(f"cannot publish the output ({exc.strerror}).", path=self.path) from None
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        return self.path

    def abort(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        if self.tmp:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = ""

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            if self.fd >= 0:
                self.commit()
        else:
            self.abort()


def fsync_dir(folder: str) -> None:
    """Flush a folder's entries to disk (a rename is durable only then); errors are ignored."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None, *, inputs: Iterable[str | os.PathLike[str]] = ()) -> str:
    """Write an in-memory dict atomically (LoRA-sized outputs)."""
    entries = [(k, dtype_code(v.dtype, name=k), tuple(v.shape)) for k, v in tensors.items()]
    with SafetensorsWriter(path, entries, metadata, inputs=inputs) as w:
        for name in w.order:
            w.write(name, tensors[name])
    return os.fspath(path)


def data_section_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the data section `safetensors.torch.save` (and this writer) would produce."""
    entries = [(k, dtype_code(v.dtype, name=k), tuple(v.shape)) for k, v in tensors.items()]
    h = hashlib.sha256()
    for name, _, _ in serialisation_order(entries):
        h.update(tensor_bytes(tensors[name]))
    return h.hexdigest()
