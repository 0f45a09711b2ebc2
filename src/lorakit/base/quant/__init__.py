"""Quantized and packed base checkpoints: plain fp8, ComfyUI scaled fp8 (both conventions, mixed precision) and
GGUF, read dequantized tensor by tensor and written back in their own format.

- :mod:`~lorakit.base.quant.codecs`: the registry of quantization schemes (decode to fp32, encode back).
- :mod:`~lorakit.base.quant.comfy_fp8`: ComfyUI's scaled-fp8 conventions found in a safetensors file.
- :mod:`~lorakit.base.quant.gguf_file`: GGUF files (``gguf-py``), ComfyUI-GGUF key and shape conventions.
- :mod:`~lorakit.base.quant.refusals`: formats recognised and refused by name (bnb NF4, SVDQuant/Nunchaku).
- :mod:`~lorakit.base.quant.view`: :class:`QuantizedFile`, the dequantized view every command reads.
- :mod:`~lorakit.base.quant.requant`: streaming bake output in the source's own format.
- :mod:`~lorakit.base.quant.retention`: how much of a delta survives requantization.
"""

from lorakit.base.quant.codecs import Codec, codec, codecs
from lorakit.base.quant.view import QEntry, QuantizedFile, dequantized, open_quantized

__all__ = ["Codec", "codec", "codecs", "QEntry", "QuantizedFile", "dequantized", "open_quantized"]
