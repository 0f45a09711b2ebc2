"""The dequantized view of a quantized base: one logical fp32 tensor per quantized weight, the scales and markers
that only describe the quantization hidden, every other tensor as stored. extract, diff and doctor read it like
any weight file; bake reads it and writes back through :mod:`lorakit.base.quant.requant`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from lorakit.base.quant.codecs import Codec, codec
from lorakit.io import TensorInfo, WeightFile


@dataclass(frozen=True)
class QEntry:
    """One quantized logical tensor: its name and shape, its scheme and the stored tensors it is made of."""

    name: str
    shape: tuple[int, ...]
    codec: str
    members: dict[str, str] = field(hash=False)     # role ("weight", "scale", "data") -> stored tensor name

    @property
    def scheme(self) -> Codec:
        return codec(self.codec)


class QuantizedFile(WeightFile):
    """A read-only dequantized view of a quantized checkpoint (see the module docstring).

    ``raw``: the stored file (None for formats lorakit reads itself, such as GGUF); ``entries``: the quantized
    tensors by logical name; ``hidden``: stored tensors that only describe the quantization (scales, markers);
    ``convention``: the format's name for reports."""

    def __init__(self, raw: WeightFile | None, entries: dict[str, QEntry], hidden: set[str], convention: str,
                 *, path: str | None = None, metadata: dict[str, str] | None = None,
                 plain: dict[str, TensorInfo] | None = None) -> None:
        self.raw = raw
        self.path = path if path is not None else (raw.path if raw is not None else "")
        self.metadata = dict(metadata if metadata is not None else (raw.metadata if raw is not None else {}))
        self.entries = entries
        self.hidden = set(hidden)
        self.convention = convention
        infos: dict[str, TensorInfo] = {}
        stored = plain if plain is not None else (raw.infos if raw is not None else {})
        for name, info in stored.items():
            if name in self.hidden:
                continue
            e = entries.get(name)
            if e is None:
                infos[name] = info
            else:
                n = 1
                for d in e.shape:
                    n *= d
                infos[name] = TensorInfo(name, "F32", e.shape, info.start, info.start + 4 * n, info.file)
        for name, e in entries.items():      # entries whose name is no stored tensor (GGUF names them itself)
            if name not in infos:
                n = 1
                for d in e.shape:
                    n *= d
                infos[name] = TensorInfo(name, "F32", e.shape, 0, 4 * n, self.path)
        self.infos = infos
        self.noise: dict[str, float] = {}     # logical tensor -> estimated rounding-noise norm, once decoded
        self.track_noise = False                # estimate it while decoding (extract turns it on)

    # stored tensors -----------------------------------------------------------------------------------------
    def member(self, key: str) -> torch.Tensor:
        """A stored tensor by its stored name (codes, scales, markers)."""
        assert self.raw is not None
        return self.raw.get(key)

    def members(self, entry: QEntry) -> dict[str, torch.Tensor]:
        return {role: self.member(key) for role, key in entry.members.items()}

    # the WeightFile API: logical tensors -----------------------------------------------------------------------
    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        e = self.entries.get(name)
        if e is None:
            assert self.raw is not None
            return self.raw.get(name, out)
        members = self.members(e)
        values = e.scheme.decode(members, e.shape)
        if self.track_noise:
            self.noise[name] = e.scheme.noise(members, values)
        return values

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.infos:
            yield name, self.get(name)

    def schemes(self) -> Counter[str]:
        """How many logical tensors each scheme stores."""
        return Counter(e.codec for e in self.entries.values())

    def describe(self) -> str:
        counts = ", ".join(f"{n} {codec(c).label}" for c, n in sorted(self.schemes().items()))
        return f"{self.convention} ({counts})" if counts else self.convention

    def close(self) -> None:
        if self.raw is not None:
            self.raw.close()


Detector = Callable[[WeightFile], "QuantizedFile | None"]
#: detectors of quantized formats in an opened safetensors file: (rank, detector), run by rank (refusals first);
#: each returns a view, None, or raises for a format it refuses
_DETECTORS: list[tuple[int, Detector]] = []


def register_detector(rank: int) -> Callable[[Detector], Detector]:
    """Decorator: add a format detector, run in ``rank`` order by :func:`dequantized`."""
    def add(fn: Detector) -> Detector:
        _DETECTORS.append((rank, fn))
        _DETECTORS.sort(key=lambda rf: rf[0])
        return fn
    return add


def dequantized(file: WeightFile) -> WeightFile:
    """``file`` itself, or its dequantized view when it holds quantized tensors (refused formats raise)."""
    if isinstance(file, QuantizedFile):
        return file
    from lorakit.base.quant import comfy_fp8, refusals  # noqa: F401  (registers the detectors)
    for _rank, detect in _DETECTORS:
        view = detect(file)
        if view is not None:
            return view
    return file


def open_quantized(path: str, *, allow_pickle: bool = False) -> WeightFile:
    """Open a base checkpoint for reading values: GGUF files by their format, safetensors through
    :func:`dequantized` (plain files come back as they are)."""
    from lorakit.base.quant.gguf_file import is_gguf, open_gguf
    from lorakit.io import open_weights
    if is_gguf(path):
        return open_gguf(path)
    return dequantized(open_weights(path, allow_pickle=allow_pickle))
