"""Signatures of weight files that are neither a LoRA nor a registered base model (layout data), so that a
library scan can say what they are: key patterns per kind, the kind applying when most keys match one."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FileKind:
    kind: str                          # the scan's kind name ("VAE")
    label: str
    patterns: tuple[str, ...]          # a key matching any of these counts as a hit
    share: float = 0.6                 # the fraction of keys that must hit

    def matches(self, keys: Sequence[str]) -> bool:
        if not keys:
            return False
        pat = re.compile("|".join(f"(?:{p})" for p in self.patterns))
        return sum(1 for k in keys if pat.search(k)) >= self.share * len(keys)


FILE_KINDS: tuple[FileKind, ...] = (
    # an autoencoder alone: LDM names (encoder.down.N.block / decoder.up.N / quant_conv, possibly under the
    # single-file prefix first_stage_model.) or diffusers AutoencoderKL names (encoder.down_blocks.N.resnets)
    FileKind("VAE", "VAE (autoencoder)", (r"^(first_stage_model\.|vae\.)?(encoder|decoder)\.",
                                          r"^(first_stage_model\.|vae\.)?(post_)?quant_conv\.")),
)


def file_kind(keys: Sequence[str]) -> FileKind | None:
    """The first declared kind most of ``keys`` match, if any."""
    return next((k for k in FILE_KINDS if k.matches(keys)), None)
