"""Lazy weight readers: header-only metadata, per-tensor reads, sharded folders, opt-in pickle.

Tensor data is read with ``pread`` into fresh (or caller-supplied) buffers: no mmap, so a file being
replaced underneath cannot zero-fill what we read, and nothing but the requested byte range is touched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ..dtypes import TORCH_TO_ST, torch_dtype
from ..errors import HeaderError, InputFileError, PickleRefusedError, UnsupportedDtypeError
from .header import MAX_HEADER_BYTES, TensorInfo, parse_header

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
INDEX_SUFFIX = ".safetensors.index.json"


class WeightFile:
    """A read-only, lazily loaded mapping name -> tensor with header-level information."""

    path: str
    metadata: dict[str, str]
    infos: dict[str, TensorInfo]

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors in on-disk order (sequential reads)."""
        for info in sorted(self.infos.values(), key=lambda i: (i.file, i.start)):
            yield info.name, self.get(info.name)

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def close(self) -> None:  # pragma: no cover - trivial
        pass

    def __enter__(self) -> "WeightFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsFile(WeightFile):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise InputFileError("file not found.", path=self.path) from None
        except IsADirectoryError:
            raise InputFileError("is a folder without a *.safetensors.index.json.", path=self.path) from None
        except OSError as exc:
            raise InputFileError(f"cannot open ({exc.strerror}).", path=self.path) from None
        try:
            self.file_size = os.fstat(self._fd).st_size
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
            head = os.pread(self._fd, 8, 0)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            prefix = head + (os.pread(self._fd, n, 8) if len(head) == 8 and 0 < n <= MAX_HEADER_BYTES
                             and 8 + n <= self.file_size else b"")
            self.infos, self.metadata, self.data_start = parse_header(prefix, self.file_size, self.path)
        except BaseException:
            os.close(self._fd)
            self._fd = -1       # else __del__ closes the number again, by then another file's descriptor
            raise

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        info = self.infos[name]
        return read_tensor(self._fd, info, out)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def read_tensor(fd: int, info: TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes from ``fd`` (into ``out``'s buffer when it is large enough)."""
    dtype = torch_dtype(info.dtype, name=info.name, path=info.file)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    if out is not None and out.dtype == torch.uint8 and out.numel() >= info.nbytes:
        buf = out.reshape(-1)[: info.nbytes]
    else:
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    done = 0
    while done < info.nbytes:
        got = os.preadv(fd, [view[done:]], info.start + done)
        if got <= 0:
            raise InputFileError(f"file ended while reading tensor {info.name!r} (truncated?).", path=info.file)
        done += got
    return buf.view(dtype).reshape(info.shape)


class ShardedFile(WeightFile):
    """A diffusers/HF sharded checkpoint: ``*.safetensors.index.json`` plus its shards."""

    def __init__(self, index_path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(index_path)
        self.folder = os.path.dirname(self.path)
        try:
            with open(self.path, encoding="utf-8") as fh:
                index = json.load(fh)
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, AssertionError, TypeError) as exc:
            raise HeaderError(f"not a valid shard index ({exc}).", path=self.path) from None
        self.index_metadata = index.get("metadata") or {}
        self.shard_names = sorted(set(weight_map.values()))
        self.shards: dict[str, SafetensorsFile] = {}
        try:
            for shard in self.shard_names:
                self.shards[shard] = SafetensorsFile(os.path.join(self.folder, shard))
        except BaseException:
            self.close()
            raise
        self.infos = {}
        self.shard_of: dict[str, str] = {}
        for shard in self.shard_names:
            for name, info in self.shards[shard].infos.items():
                self.infos[name] = info
                self.shard_of[name] = shard
        missing = [k for k in weight_map if k not in self.infos]
        if missing:
            raise HeaderError(f"the index lists {len(missing)} tensors missing from the shards (e.g. {missing[0]!r}).",
                              path=self.path)
        first = self.shards[self.shard_names[0]] if self.shard_names else None
        self.metadata = dict(first.metadata) if first else {}

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.shards[self.shard_of[name]].get(name, out)

    def close(self) -> None:
        for shard in getattr(self, "shards", {}).values():
            shard.close()


class PickleFile(WeightFile):
    """A torch pickle checkpoint, loaded with ``weights_only=True`` (only behind an explicit opt-in)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except FileNotFoundError:
            raise InputFileError("file not found.", path=self.path) from None
        except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
            raise InputFileError(f"cannot load pickle checkpoint ({type(exc).__name__}: {exc}).".splitlines()[0],
                                 path=self.path) from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise InputFileError("pickle checkpoint does not hold a state dict.", path=self.path)
        self._tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        self.metadata = {}
        self.infos = {}
        for k, v in self._tensors.items():
            if v.dtype not in TORCH_TO_ST:
                raise UnsupportedDtypeError(f"tensor {k!r} has unsupported dtype {v.dtype}.", path=self.path)
            nbytes = v.numel() * v.element_size()
            self.infos[k] = TensorInfo(k, TORCH_TO_ST[v.dtype], tuple(v.shape), 0, nbytes, self.path)

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensors[name].contiguous()


def _sniff(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except FileNotFoundError:
        raise InputFileError("file not found.", path=path) from None
    except OSError as exc:
        raise InputFileError(f"cannot open ({exc.strerror}).", path=path) from None
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"   # an 8-byte header length may well start with 0x80 or "PK"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "pickle"
    return "safetensors"


def find_index(folder: str) -> str | None:
    """The ``*.safetensors.index.json`` of a sharded folder, if there is one."""
    candidates = sorted(p for p in os.listdir(folder) if p.endswith(INDEX_SUFFIX))
    return os.path.join(folder, candidates[0]) if candidates else None


def open_weights(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> WeightFile:
    """Open a safetensors file, a sharded folder/index, or (with ``allow_pickle``) a torch pickle."""
    p = os.fspath(path)
    if os.path.isdir(p):
        index = find_index(p)
        if index is None:
            singles = sorted(x for x in os.listdir(p) if x.endswith(SAFETENSORS_SUFFIXES))
            if len(singles) == 1:
                return SafetensorsFile(os.path.join(p, singles[0]))
            raise InputFileError("folder has no *.safetensors.index.json and not exactly one .safetensors file.",
                                 path=p, hint="pass the file itself, or the index of a sharded checkpoint.")
        return ShardedFile(index)
    if p.endswith(INDEX_SUFFIX):
        return ShardedFile(p)
    kind = _sniff(p)
    if kind == "pickle" or Path(p).suffix.lower() in PICKLE_SUFFIXES and kind != "safetensors":
        if not allow_pickle:
            raise PickleRefusedError(
                "is a pickle checkpoint; unpickling can run arbitrary code, so lorakit refuses it by default.",
                path=p, hint="convert it to .safetensors, or pass --allow-pickle to load it with "
                             "torch.load(weights_only=True).")
        return PickleFile(p)
    return SafetensorsFile(p)
