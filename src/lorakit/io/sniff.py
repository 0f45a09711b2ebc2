"""What a weight file is by its content, not its name: the container told from its first bytes.

- ``safetensors``: an 8-byte little-endian header length ``n``, then ``{`` (a JSON object) and ``8 + n`` within
  the file (else ``safetensors-truncated``);
- ``gguf``: the ``GGUF`` magic;
- ``pickle-zip``: a zip archive (``PK\\x03\\x04``) holding a ``*.pkl`` (torch.save since 1.6: ``.pt``, ``.bin``,
  ``.ckpt``); ``zip`` when it holds none;
- ``pickle``: a raw pickle stream (protocol 2+ starts with ``\\x80`` and the protocol number; legacy torch files
  too);
- ``empty``, ``unknown`` otherwise.

Reads 16 bytes (and a zip's directory); never unpickles anything.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

SAFETENSORS, GGUF, PICKLE_ZIP, PICKLE, ZIP = "safetensors", "gguf", "pickle-zip", "pickle", "zip"
TRUNCATED_SAFETENSORS, EMPTY, UNKNOWN = "safetensors-truncated", "empty", "unknown"
PICKLES = (PICKLE_ZIP, PICKLE)

# the container a file name's extension promises (a name promising one and holding another is reported)
EXPECTED = {".safetensors": SAFETENSORS, ".sft": SAFETENSORS, ".gguf": GGUF, ".ckpt": "pickle", ".pt": "pickle",
            ".pth": "pickle", ".bin": "pickle"}


@dataclass(frozen=True)
class Sniffed:
    container: str
    header_bytes: int | None = None     # safetensors: the JSON header's length


def sniff_bytes(head: bytes, size: int) -> Sniffed:
    """The container of a file of ``size`` bytes whose first bytes are ``head`` (16 suffice; a zip is
    reported as ``zip`` here, :func:`sniff` looks inside it)."""
    if size == 0:
        return Sniffed(EMPTY)
    if head[:4] == b"GGUF":
        return Sniffed(GGUF)
    if head[:4] == b"PK\x03\x04":
        return Sniffed(ZIP)
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" or (head[8:9] in (b" ", b"\n") and n > 1):
            return Sniffed(SAFETENSORS if 8 + n <= size else TRUNCATED_SAFETENSORS, n)
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return Sniffed(PICKLE)
    if head[:1] in (b"(", b"}", b"]", b"c"):      # protocol 0/1 pickles
        return Sniffed(PICKLE)
    return Sniffed(UNKNOWN)


def sniff(path: str | os.PathLike[str]) -> Sniffed:
    """The container of the file at ``path`` (see the module docstring)."""
    p = os.fspath(path)
    with open(p, "rb") as fh:
        head = fh.read(16)
        size = os.fstat(fh.fileno()).st_size
    got = sniff_bytes(head, size)
    if got.container == ZIP:
        try:
            with zipfile.ZipFile(p) as z:
                if any(n.endswith(".pkl") for n in z.namelist()):
                    return Sniffed(PICKLE_ZIP)
        except (zipfile.BadZipFile, OSError, ValueError):
            pass
    return got


def extension_mismatch(path: str, container: str) -> str | None:
    """A note when the file's extension promises another container than it holds (a pickle named
    ``.safetensors``), else None."""
    ext = os.path.splitext(path)[1].lower()
    want = EXPECTED.get(ext)
    if want is None:
        return None
    family = "pickle" if container in PICKLES else container
    if family == want or (want == SAFETENSORS and container == TRUNCATED_SAFETENSORS):
        return None
    return f"named {ext} but holds {container}"
