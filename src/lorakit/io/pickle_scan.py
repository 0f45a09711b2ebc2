"""The globals a pickle would import, listed WITHOUT unpickling: a walk over its opcodes (``pickletools.genops``,
which only decodes the byte stream) — nothing it names is imported, called or constructed.

``GLOBAL``/``INST`` carry ``module name`` in their argument; ``STACK_GLOBAL`` takes the two strings pushed before it
(directly or through the memo), which the walk tracks; one whose operands are not plain strings is reported as
unresolved (and counts as dangerous: only an obfuscated pickle builds its import names). A zip checkpoint
(torch.save ≥ 1.6) is walked member by member (every ``*.pkl``); a raw stream (legacy torch.save writes several
pickles back to back) pickle by pickle until its data part.

Each global is rated ``safe`` (what tensors and state dicts are rebuilt from), ``dangerous`` (code execution,
processes, files, network, imports: ``os.system``, ``builtins.eval``, ``subprocess.Popen`` …) or ``unknown`` (anything
else: a training framework's classes); the file's verdict is the worst.
"""

from __future__ import annotations

import os
import pickletools
import zipfile
from dataclasses import dataclass, field
from typing import IO, Any

SAFE, UNKNOWN, DANGEROUS = "safe", "unknown", "dangerous"
_RANK = {SAFE: 0, UNKNOWN: 1, DANGEROUS: 2}
MAX_PICKLES = 8             # a legacy torch file holds 5 pickles before its raw storage bytes
MAX_OPCODES = 20_000_000    # bounded work on hostile input

# whole modules whose every name is dangerous (code, processes, files, network, import machinery)
DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "runpy", "importlib", "pickle", "_pickle",
    "marshal", "ctypes", "pty", "webbrowser", "code", "codeop", "commands", "multiprocessing", "asyncio", "http",
    "httplib", "urllib", "urllib2", "requests", "ftplib", "smtplib", "telnetlib", "tempfile", "glob",
    "io", "_io", "signal", "threading", "_thread", "pdb", "bdb", "timeit", "cProfile", "profile", "trace",
    "distutils", "setuptools", "pip", "zipimport", "pkgutil", "inspect", "platform", "dill", "shelve",
    "joblib", "torch.storage._load_from_bytes",
})
# single dangerous names in otherwise harmless modules
DANGEROUS_NAMES = frozenset({
    ("builtins", n) for n in ("eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr",
                              "globals", "locals", "vars", "input", "breakpoint", "exit", "quit", "help",
                              "memoryview", "object", "type", "super", "classmethod", "staticmethod", "property")
} | {("__builtin__", n) for n in ("eval", "exec", "execfile", "compile", "open", "file", "__import__", "getattr",
                                  "setattr", "apply", "input", "raw_input", "reload")} | {
    ("operator", "attrgetter"), ("operator", "methodcaller"), ("operator", "itemgetter"), ("functools", "reduce"),
    ("functools", "partial"), ("torch", "load"), ("torch.serialization", "load"), ("numpy", "load"),
    ("numpy.lib.npyio", "load"), ("torch._utils", "_rebuild_from_type"), ("torch.storage", "_load_from_bytes"),
})
SAFE_NAMES = frozenset({
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("torch", "Size"), ("torch", "device"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_qtensor"), ("torch._utils", "_rebuild_sparse_tensor"), ("torch._utils", "_rebuild_meta_tensor_no_storage"),
    ("torch._utils", "_rebuild_wrapper_subclass"), ("torch._tensor", "_rebuild_from_type_v2"), ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"), ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "complex"), ("builtins", "bytearray"), ("builtins", "dict"), ("builtins", "list"),
    ("builtins", "tuple"), ("builtins", "int"), ("builtins", "float"), ("builtins", "str"), ("builtins", "bytes"),
    ("builtins", "bool"), ("__builtin__", "set"), ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
})
TORCH_STORAGE_SUFFIX = "Storage"
TORCH_DTYPES = frozenset({"float16", "float32", "float64", "bfloat16", "half", "float", "double", "int8", "uint8",
                          "int16", "int32", "int64", "bool", "float8_e4m3fn", "float8_e5m2", "complex64"})


def rate(module: str, name: str) -> str:
    """How dangerous importing ``module.name`` during unpickling is (see the module docstring)."""
    if (module, name) in SAFE_NAMES:
        return SAFE
    if module == "torch" and (name.endswith(TORCH_STORAGE_SUFFIX) or name in TORCH_DTYPES):
        return SAFE
    if (module, name) in DANGEROUS_NAMES:
        return DANGEROUS
    root = module.split(".")[0]
    if module in DANGEROUS_MODULES or root in DANGEROUS_MODULES:
        return DANGEROUS
    return UNKNOWN


@dataclass
class PickleScan:
    """What a pickle file would import: ``globals`` as ``module.name`` → rating, the verdict (worst rating)
    and problems (an undecodable stream, unresolved ``STACK_GLOBAL`` operands)."""

    globals: dict[str, str] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    opcodes: int = 0

    @property
    def verdict(self) -> str:
        return max(self.globals.values(), key=_RANK.__getitem__, default=SAFE)

    @property
    def dangerous(self) -> list[str]:
        return [g for g, r in self.globals.items() if r == DANGEROUS]

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "globals": dict(self.globals), "dangerous": self.dangerous,
                "members": self.members, "problems": self.problems, "opcodes": self.opcodes}


_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}


def _walk(stream: IO[bytes], out: PickleScan, where: str) -> bool:
    """Walk one pickle (up to its STOP); False when the stream holds no further pickle."""
    pushed: list[object] = []           # values of recent pushes (strings resolved; anything else a marker)
    memo: dict[int, object] = {}
    other = object()
    seen_any = False
    try:
        for op, arg, _pos in pickletools.genops(stream):
            seen_any = True
            out.opcodes += 1
            if out.opcodes > MAX_OPCODES:
                out.problems.append(f"{where}: more than {MAX_OPCODES} opcodes; the walk stopped")
                return False
            name = op.name
            if name in _STRINGS:
                pushed.append(arg if isinstance(arg, str) else
                              arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
            elif name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                out.globals[f"{module}.{attr}"] = rate(module, attr)
                pushed.append(other)
            elif name == "STACK_GLOBAL":
                if len(pushed) >= 2 and isinstance(pushed[-1], str) and isinstance(pushed[-2], str):
                    module, attr = str(pushed[-2]), str(pushed[-1])
                    out.globals[f"{module}.{attr}"] = rate(module, attr)
                else:
                    out.globals["<unresolved STACK_GLOBAL>"] = DANGEROUS
                    out.problems.append(f"{where}: a STACK_GLOBAL whose module/name are not plain strings "
                                        "(an obfuscated import)")
                pushed.append(other)
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else other
            elif name in _PUTS:
                memo[int(arg)] = pushed[-1] if pushed else other   # type: ignore[arg-type]
            elif name in _GETS:
                pushed.append(memo.get(int(arg), other))           # type: ignore[arg-type]
            elif name == "STOP":
                return True
            elif op.stack_after:
                pushed.append(other)
            if len(pushed) > 64:
                del pushed[:32]
    except Exception as exc:   # a truncated or non-pickle stream: genops raises ValueError and others
        if seen_any:
            out.problems.append(f"{where}: the pickle stream breaks off ({type(exc).__name__}: {str(exc)[:120]})")
        return False
    return seen_any


def _raw_pickles(stream: IO[bytes], out: PickleScan, where: str) -> None:
    """Pickles back to back. A later stream that does not decode is the file's raw data part (legacy torch.save):
    the walk ends there and keeps nothing it read from it."""
    for i in range(MAX_PICKLES):
        start = stream.tell()
        if not stream.read(1):
            return
        stream.seek(start)
        part = PickleScan(opcodes=out.opcodes)
        ok = _walk(stream, part, where)
        if ok or i == 0:
            out.globals.update(part.globals)
            out.problems.extend(part.problems)
            out.opcodes = part.opcodes
        if not ok:
            return


def scan_pickle(path: str | os.PathLike[str]) -> PickleScan:
    """List the globals of a pickle file (zip checkpoint or raw stream) without executing anything."""
    p = os.fspath(path)
    out = PickleScan()
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as z:
                for info in z.infolist():
                    if not info.filename.endswith(".pkl"):
                        continue
                    out.members.append(info.filename)
                    with z.open(info) as member:
                        _raw_pickles(member, out, info.filename)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            out.problems.append(f"unreadable zip archive ({type(exc).__name__}: {str(exc)[:120]})")
        return out
    with open(p, "rb") as fh:
        _raw_pickles(fh, out, os.path.basename(p))
    return out
