"""Quantized formats lorakit recognises but cannot bake or read exactly, refused by name with the reason."""

from __future__ import annotations

from lorakit.base.quant.view import QuantizedFile, register_detector
from lorakit.errors import UnsupportedDtypeError
from lorakit.io import WeightFile

#: (name, key fragment groups that identify it: some key holds one fragment of every group, reason)
REFUSED: tuple[tuple[str, tuple[tuple[str, ...], ...], str], ...] = (
    ("bitsandbytes NF4/FP4", (("quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4"),),
     "its 4-bit codes index a per-block lookup table with double-quantized absmax scales; writing a LoRA back "
     "into it means re-running bitsandbytes' blockwise quantization, which lorakit does not reproduce exactly"),
    ("SVDQuant (Nunchaku)", ((".qweight",), (".wscales", ".wtscale", ".smooth_factor")),
     "each layer is a 4-bit residual plus a low-rank branch fitted by SVD with activation smoothing; a LoRA "
     "cannot be added to it without redoing that calibrated decomposition"),
)


@register_detector(0)
def refuse_packed(file: WeightFile) -> QuantizedFile | None:
    """Raise for a format of :data:`REFUSED` (named, with the reason); None otherwise."""
    keys = file.keys()
    for name, groups, reason in REFUSED:
        hits = [next((k for k in keys if any(f in k for f in group)), None) for group in groups]
        hit = hits[0]
        if hit is not None and all(h is not None for h in hits):
            raise UnsupportedDtypeError(
                f"this is a {name} checkpoint (e.g. {hit!r}); lorakit cannot bake into it or read it exactly: "
                f"{reason}.", path=file.path,
                hint="use the bf16/fp16 original (or an fp8 / GGUF Q8_0 build), bake there, then quantize.")
    return None
