"""Weights already in memory, read through the :class:`~lorakit.io.reader.WeightFile` interface.

For hosts that hold a loaded model (a node graph's model object, a training script's ``state_dict()``): the
library's base-model functions (``open_base``, ``diagnose``, ``extract``) take these as they take files.
Nothing is copied: ``get`` returns the tensor itself (moved to the CPU when it lives elsewhere).
:class:`ZeroWeights` stands for an all-zero model of the same names and shapes, so that a *difference*
(tuned − original, already formed by the host) can be extracted as ``extract(ZeroWeights(d), d, …)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lorakit.dtypes import TORCH_TO_ST, torch_dtype
from lorakit.errors import InputFileError, UnsupportedDtypeError
from lorakit.io.header import TensorInfo
from lorakit.io.reader import WeightFile


class StateDictWeights(WeightFile):
    """A ``name -> tensor`` mapping as a weight file named ``label`` (used in messages and provenance)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str,
                 metadata: Mapping[str, str] | None = None) -> None:
        self.path = label
        self.metadata = dict(metadata or {})
        self._tensors: dict[str, torch.Tensor] = {}
        self.infos = {}
        offset = 0
        for name, value in tensors.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                raise InputFileError(f"entry {name!r} is not a named tensor.", path=label,
                                     hint="pass a state dict: module names mapped to tensors.")
            if value.dtype not in TORCH_TO_ST:
                raise UnsupportedDtypeError(f"tensor {name!r} has unsupported dtype {value.dtype}.", path=label)
            nbytes = value.numel() * value.element_size()
            self.infos[name] = TensorInfo(name, TORCH_TO_ST[value.dtype], tuple(value.shape), offset,
                                          offset + nbytes, label)
            self._tensors[name] = value
            offset += nbytes

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        t = self._tensors[name].detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        return t.contiguous()


class ZeroWeights(WeightFile):
    """Zeros with the names, shapes and dtypes of ``like`` (nothing is allocated until a tensor is read)."""

    def __init__(self, like: WeightFile, label: str) -> None:
        self.path = label
        self.metadata = {}
        self.infos = {k: TensorInfo(k, i.dtype, i.shape, i.start, i.end, label) for k, i in like.infos.items()}
        self._dtypes = {k: torch_dtype(i.dtype, name=k, path=label) for k, i in like.infos.items()}

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(self.infos[name].shape, dtype=self._dtypes[name])

