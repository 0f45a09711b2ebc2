"""Lazy weight readers: header-only metadata, per-tensor reads, sharded folders, opt-in pickle.

Tensor data is read with ``pread`` into fresh (or caller-supplied) buffers: no mmap, so a file being
replaced underneath cannot zero-fill what we read, and nothing but the requested byte range is touched.
"""

from __future__ import annotations

import json
import os
import zipfile
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, cast


from lorakit import dtypes
from lorakit.dtypes import decode_scalar, itemsize, torch_dtype
from lorakit.errors import HeaderError, InputFileError, PickleRefusedError, UnsupportedDtypeError, brief
from lorakit.io.header import MAX_HEADER_BYTES, TensorInfo, loads_json, no_duplicate_keys, parse_header

if TYPE_CHECKING:
    import torch
else:
    from lorakit.lazy import torch

if TYPE_CHECKING:
    from typing_extensions import NotRequired     # typing has it from 3.11; the package supports 3.10

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

    def first_value(self, name: str) -> float:
        """The first element of a tensor as a float (α scalars; 0.0 for an empty tensor)."""
        t = self.get(name)
        return float(t.double().reshape(-1)[0]) if t.numel() else 0.0

    def raw_bytes(self, name: str) -> bytes:
        """A tensor's bytes as stored (little-endian, row-major)."""
        from lorakit.io.writer import tensor_bytes
        return bytes(tensor_bytes(self.get(name)))

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
        _regular(self.path)
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

    def first_value(self, name: str) -> float:
        """The first element read from its bytes (no torch: header-only commands read α scalars this way)."""
        info = self.infos[name]
        if info.nbytes == 0:
            return 0.0
        value = decode_scalar(info.dtype, os.pread(self._fd, itemsize(info.dtype), info.start))
        return super().first_value(name) if value is None else value

    def raw_bytes(self, name: str) -> bytes:
        """Read from the file as they are (no torch)."""
        info = self.infos[name]
        data = os.pread(self._fd, info.nbytes, info.start)
        if len(data) != info.nbytes:
            raise InputFileError(f"file ended while reading tensor {name!r} (truncated?).", path=self.path)
        return data

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
    view = buf.numpy().data     # the array's memoryview (numpy's stubs lack __buffer__ before 3.12)
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
        index = read_index(self.path)
        weight_map = index["weight_map"]
        self.index_metadata = index.get("metadata") or {}
        self.shard_names = sorted(set(weight_map.values()))
        self.shards: dict[str, SafetensorsFile] = {}
        try:
            for shard in self.shard_names:
                full = os.path.join(self.folder, shard)
                for other in self.shards:
                    if _same(full, os.path.join(self.folder, other)):
                        raise HeaderError(f"the index names one shard file twice, as {other!r} and {shard!r}.",
                                          path=self.path, hint="list each shard file under one name.")
                self.shards[shard] = SafetensorsFile(full)
        except BaseException:
            self.close()
            raise
        self.infos = {}
        self.shard_of: dict[str, str] = {}
        try:
            for shard in self.shard_names:
                for name, info in self.shards[shard].infos.items():
                    if name in self.shard_of:
                        raise HeaderError(f"tensor {name!r} is in two shards, {self.shard_of[name]!r} and {shard!r}.",
                                          path=self.path, hint="keep each tensor in one shard.")
                    listed = weight_map.get(name)
                    if listed is not None and listed != shard:
                        raise HeaderError(f"the index puts tensor {name!r} in {listed!r}, but it is in {shard!r}.",
                                          path=self.path, hint="fix the index's weight_map.")
                    self.infos[name] = info
                    self.shard_of[name] = shard
            missing = [k for k in weight_map if k not in self.infos]
            if missing:
                raise HeaderError(f"the index lists {len(missing)} tensors missing from the shards "
                                  f"(e.g. {missing[0][:200]!r}).", path=self.path)
        except BaseException:
            self.close()
            raise
        first = self.shards[self.shard_names[0]] if self.shard_names else None
        self.metadata = dict(first.metadata) if first else {}

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.shards[self.shard_of[name]].get(name, out)

    def first_value(self, name: str) -> float:
        return self.shards[self.shard_of[name]].first_value(name)

    def raw_bytes(self, name: str) -> bytes:
        return self.shards[self.shard_of[name]].raw_bytes(name)

    def close(self) -> None:
        for shard in getattr(self, "shards", {}).values():
            shard.close()


class PickleFile(WeightFile):
    """A torch pickle checkpoint, loaded with ``weights_only=True`` (only behind an explicit opt-in)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:   # mmap only works on zip checkpoints; legacy (pre-1.6) pickles are read into memory
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(self.path))
        except FileNotFoundError:
            raise InputFileError("file not found.", path=self.path) from None
        except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
            raise InputFileError(f"cannot load pickle checkpoint ({type(exc).__name__}: {exc}).".splitlines()[0],
                                 path=self.path) from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise InputFileError("pickle checkpoint does not hold a state dict.", path=self.path)
        odd = [k for k, v in obj.items() if isinstance(v, torch.Tensor) and not isinstance(k, str)]
        if odd:
            raise InputFileError(f"pickle checkpoint has {len(odd)} tensor(s) under keys that are not strings "
                                 f"(e.g. {brief(odd[0])}, a {type(odd[0]).__name__}); a state dict maps names to "
                                 "tensors.", path=self.path, hint="save it with string keys (module names).")
        self._tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        self.metadata = {}
        self.infos = {}
        for k, v in self._tensors.items():
            if v.dtype not in dtypes.TORCH_TO_ST:
                raise UnsupportedDtypeError(f"tensor {k!r} has unsupported dtype {v.dtype}.", path=self.path)
            nbytes = v.numel() * v.element_size()
            self.infos[k] = TensorInfo(k, dtypes.TORCH_TO_ST[v.dtype], tuple(v.shape), 0, nbytes, self.path)

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensors[name].contiguous()


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def check_shard_name(name: object, index_path: str, tensor: str | None = None) -> str:
    """A shard name from an index: a plain file name inside the index's folder, else a HeaderError."""
    where = f" for tensor {tensor[:200]!r}" if tensor is not None else ""
    if not isinstance(name, str):
        raise HeaderError(f"the index's weight_map gives {type(name).__name__} {_short(name)}{where}; shard names "
                          "are strings.", path=index_path, hint="fix the index's weight_map.")
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set()) | {"\\"}
    if (not name or name in (".", "..") or any(c in name for c in seps) or "\0" in name or os.path.isabs(name)
            or (len(name) > 1 and name[1] == ":")):
        raise HeaderError(f"the index names shard {name[:200]!r}{where}, which is not a plain file name in the "
                          "index's folder; lorakit never reads or writes outside it.", path=index_path,
                          hint="shard names must be file names without folders, e.g. "
                               "'diffusion_pytorch_model-00001-of-00002.safetensors'.")
    return name


def _short(value: object) -> str:
    text = repr(value) if not isinstance(value, (list, dict)) else f"({len(value)} items)"
    return text if len(text) <= 60 else text[:57] + "..."


class ShardIndex(TypedDict):
    """A validated shard index (:func:`read_index`); any other top-level keys are kept as read."""

    weight_map: dict[str, str]
    metadata: NotRequired[dict[str, object] | None]


def read_index(path: str) -> ShardIndex:
    """A validated ``*.safetensors.index.json``: a ``weight_map`` of tensor name -> plain shard file name,
    and an optional ``metadata`` object. Typed one-line errors for anything else."""
    try:
        if not os.path.isfile(path):
            raise InputFileError("index file not found." if not os.path.exists(path) else
                                 "index path is not a regular file.", path=path)
        if os.path.getsize(path) > MAX_HEADER_BYTES:
            raise HeaderError(f"index is {os.path.getsize(path)} bytes, over the {MAX_HEADER_BYTES}-byte limit.",
                              path=path)
        with open(path, encoding="utf-8") as fh:
            index = loads_json(fh.read(), object_pairs_hook=no_duplicate_keys)
    except (InputFileError, HeaderError):
        raise
    except RecursionError:
        raise HeaderError("not a valid shard index (JSON nested too deeply).", path=path) from None
    except (OSError, ValueError) as exc:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise HeaderError(f"not a valid shard index ({str(exc)[:200]}).", path=path) from None
    if not isinstance(index, dict):
        raise HeaderError(f"not a valid shard index (a JSON {type(index).__name__}, not an object).", path=path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise HeaderError("not a valid shard index (no 'weight_map' object).", path=path,
                          hint="an index maps tensor names to shard files under 'weight_map'.")
    meta = index.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise HeaderError(f"the index's 'metadata' is a {type(meta).__name__}, not an object.", path=path,
                          hint="write it as {\"total_size\": …} or leave it out.")
    for tensor, shard in weight_map.items():
        check_shard_name(shard, path, tensor)
    return cast(ShardIndex, index)      # its shape is checked above


def input_files(path: str | os.PathLike[str]) -> list[str]:
    """Every file reading ``path`` may open: the path itself, a folder's or index's index and shards, and
    the ``adapter_config.json`` that PEFT's ``adapter_model*`` files take alphas from (the rule of
    ``formats.parse._peft_config``). Best effort: an index that does not parse adds nothing."""
    p = os.fspath(path)
    files = [p]
    index = None
    if os.path.isdir(p):
        try:
            index = find_index(p)
        except OSError:
            index = None
    elif p.endswith(INDEX_SUFFIX):
        index = p
    if index is not None:
        if index != p:
            files.append(index)
        try:
            weight_map = read_index(index)["weight_map"]
        except InputFileError:
            weight_map = {}
        folder = os.path.dirname(index)
        files += [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
    elif not os.path.isdir(p) and os.path.basename(p).startswith("adapter_model"):
        files.append(os.path.join(os.path.dirname(p), "adapter_config.json"))
    return files


def _regular(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputFileError("file not found.", path=path) from None
    except OSError as exc:
        raise InputFileError(f"cannot open ({exc.strerror}).", path=path) from None
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        raise InputFileError("is not a regular file (a FIFO, device or socket); lorakit reads weight files only.",
                             path=path)


def _sniff(path: str) -> str:
    _regular(path)
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


#: files that open by their first bytes rather than as safetensors: magic -> "module:function" (imported on use;
#: the formats live with the code that understands them)
MAGIC_OPENERS: dict[bytes, str] = {b"GGUF": "lorakit.base.quant.gguf_file:open_gguf"}


def _magic_opener(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return None
    return next((o for m, o in MAGIC_OPENERS.items() if head.startswith(m)), None)


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
    opener = _magic_opener(p)
    if opener is not None:
        import importlib
        module, _, fn = opener.partition(":")
        opened: WeightFile = getattr(importlib.import_module(module), fn)(p)
        return opened
    if kind == "pickle" or Path(p).suffix.lower() in PICKLE_SUFFIXES and kind != "safetensors":
        if not allow_pickle:
            raise PickleRefusedError(
                "is a pickle checkpoint; unpickling can run arbitrary code, so lorakit refuses it by default.",
                path=p, hint="convert it to .safetensors, or pass --allow-pickle to load it with "
                             "torch.load(weights_only=True).")
        return PickleFile(p)
    return SafetensorsFile(p)
