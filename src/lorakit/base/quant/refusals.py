"""Quantized formats lorakit recognises but cannot bake or read exactly, refused by name with the reason."""

from __future__ import annotations

from lorakit.base.quant.view import QuantizedFile, register_detector
from lorakit.errors import UnsupportedDtypeError
from lorakit.io import WeightFile

#: (name, key fragments that identify it, reason)
REFUSED = (
    ("bitsandbytes NF4/FP4", ("quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4"),
     "its 4-bit codes index a per-block lookup table with double-quantized absmax scales; writing a LoRA back "
     "into it means re-running bitsandbytes' blockwise quantization, which lorakit does not reproduce exactly"),
    ("SVDQuant (Nunchaku)", (".wscales", ".smooth_factor", ".proj_down", ".wtscale"),
     "each layer is a 4-bit residual plus a low-rank branch fitted by SVD with activation smoothing; a LoRA "
     "cannot be added to it without redoing that calibrated decomposition"),
)


@register_detector
def refuse_packed(file: WeightFile) -> QuantizedFile | None:
    keys = file.keys()
    for name, fragments, reason in REFUSED:
        hit = next((k for k in keys if any(f in k for f in fragments)), None)
        if hit is not None:
            raise UnsupportedDtypeError(
                f"this is a {name} checkpoint (e.g. {hit!r}); lorakit cannot bake into it or read it exactly: "
                f"{reason}.", path=file.path,
                hint="use the bf16/fp16 original (or an fp8 / GGUF Q8_0 build), bake there, then quantize.")
    return None
