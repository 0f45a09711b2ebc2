"""Signatures of architectures lorakit recognises but does not (yet) convert (layout data).

Each recogniser names an architecture from key patterns and, optionally, one tensor dimension, so a
LoRA or base of that kind is refused with its name instead of a wall of unknown keys.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Recognizer:
    arch: str
    label: str
    patterns: tuple[str, ...]               # a key matching any of these counts as a hit
    dim_rule: tuple[str, int, int] | None = None   # (key regex, dim index, value) that must hold for some key
    hint: str = ""

    def compiled(self) -> re.Pattern[str]:
        return re.compile("|".join(f"(?:{p})" for p in self.patterns))

    def hits(self, keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
        """Keys carrying this signature (empty when the dimension rule, if any, does not hold)."""
        pat = self.compiled()
        hits = [k for k in keys if pat.search(k)]
        if hits and self.dim_rule is not None:
            kre, dim, value = self.dim_rule
            probe = [shapes[k] for k in keys if re.search(kre, k) and shapes.get(k)]
            if not any(len(s) > (abs(dim) - (dim < 0)) and s[dim] == value for s in probe):
                return []
        return hits


RECOGNIZERS: tuple[Recognizer, ...] = (
    Recognizer("sdxl", "SDXL", (r"^lora_te2_", r"^text_encoder_2\.", r"input_blocks[._]\d+[._]1[._]",
                               r"output_blocks[._]\d+[._]1[._]", r"middle_block[._]1[._]", r"add_embedding",
                               r"label_emb")),
    Recognizer("sdxl", "SDXL", (r"(down|up)_blocks[._]\d+[._]attentions", r"mid_block[._]attentions"),
               dim_rule=(r"attn2[._]to_k.*(lora_down|lora_A|down)", -1, 2048)),
    Recognizer("sd1", "SD1.x/SD2.x", (r"(down|up)_blocks[._]\d+[._](attentions|resnets)", r"mid_block[._]",
                                     r"^lora_te_text_model")),
    Recognizer("sd3", "SD3", (r"joint_blocks[._]\d+[._](x|context)_block", r"(^|[._])pos_embed[._]proj")),
)


def recognize(keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]],
              exclude: Collection[str] = ()) -> tuple[Recognizer, list[str]] | None:
    """The recognised architecture with the most matching keys, if any (``exclude``: registered architectures,
    whose files the detector reads instead of refusing)."""
    best: tuple[Recognizer, list[str]] | None = None
    for rec in RECOGNIZERS:
        if rec.arch in exclude:
            continue
        hits = rec.hits(keys, shapes)
        if hits and (best is None or len(hits) > len(best[1])):
            best = (rec, hits)
    return best

