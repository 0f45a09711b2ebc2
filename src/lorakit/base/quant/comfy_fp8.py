"""ComfyUI's fp8 checkpoints in a safetensors file, as quantized entries.

Conventions (from ComfyUI's ``comfy/utils.py`` ``convert_old_quants``, ``comfy/ops.py`` and
``comfy/quant_ops.py``):

- **scaled fp8, older**: a ``scaled_fp8`` marker tensor (its dtype the fp8 kind; 2 elements = full-precision
  matmul), ``<layer>.weight`` fp8 codes, ``<layer>.scale_weight`` (fp32), optionally ``<layer>.scale_input``.
  ``weight = codes.to(fp32) * scale_weight``.
- **mixed precision, newer**: a ``_quantization_metadata`` header entry
  ``{"format_version": "1.0", "layers": {layer: {"format": "float8_e4m3fn", ...}}}`` and/or per-layer
  ``<layer>.comfy_quant`` tensors (the layer's config as UTF-8 JSON bytes), ``<layer>.weight`` codes,
  ``<layer>.weight_scale`` (fp32 scalar) and optionally ``<layer>.input_scale``; layers the metadata does not name
  stay bf16/fp16. ``weight = codes.to(dtype) * weight_scale`` (``TensorCoreFP8Layout.dequantize``). A layer
  format lorakit has no exact codec for (``int8_blockwise``, ``nvfp4``, …) is refused by name.
- **plain fp8**: fp8 weights without any scale.
"""

from __future__ import annotations

import json

from lorakit.base.quant.codecs import FP8
from lorakit.base.quant.view import QEntry, QuantizedFile, register_detector
from lorakit.errors import HeaderError, UnsupportedDtypeError
from lorakit.io import WeightFile

QUANT_METADATA = "_quantization_metadata"
MARKER = "scaled_fp8"
FP8_CODES = {"F8_E4M3": "e4m3fn", "F8_E5M2": "e5m2"}
OLD_SCALE, OLD_INPUT = ".scale_weight", ".scale_input"
NEW_SCALE, NEW_INPUT, LAYER_CONF = ".weight_scale", ".input_scale", ".comfy_quant"


def layer_formats(file: WeightFile) -> dict[str, dict[str, object]]:
    """Each quantized layer's config (newer convention): the header's ``layers``, then ``.comfy_quant`` tensors."""
    layers: dict[str, dict[str, object]] = {}
    text = file.metadata.get(QUANT_METADATA)
    if text is not None:
        try:
            meta = json.loads(text)
            found = meta["layers"]
            if not isinstance(found, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise HeaderError(f"the {QUANT_METADATA!r} header entry is not a JSON object with a 'layers' object.",
                              path=file.path) from None
        for name, conf in found.items():
            layers[name] = conf if isinstance(conf, dict) else {"format": conf}
    for key in file.keys():
        if key.endswith(LAYER_CONF):
            raw = bytes(file.get(key).reshape(-1).tolist()).rstrip(b"\0")
            try:
                conf = json.loads(raw.decode("utf-8"))
            except ValueError:
                raise HeaderError(f"{key!r} is not a JSON layer config.", path=file.path) from None
            layers[key[:-len(LAYER_CONF)]] = conf if isinstance(conf, dict) else {"format": conf}
    return layers


def _resolve(layer: str, keys: set[str], suffix_index: dict[str, list[str]]) -> str | None:
    """The stored prefix of a layer the metadata names (with or without the file's model prefix)."""
    if layer + ".weight" in keys:
        return layer
    hits = suffix_index.get(layer, [])
    return hits[0] if len(hits) == 1 else None


def _entry(file: WeightFile, layer: str, scale_key: str | None, fmt: str) -> QEntry:
    weight = layer + ".weight"
    info = file.infos[weight]
    members = {"weight": weight}
    name = f"fp8_{fmt}"
    if scale_key is not None:
        members["scale"] = scale_key
        name += "_scaled"
    return QEntry(weight, info.shape, name, members)


@register_detector(10)
def detect_comfy_fp8(file: WeightFile) -> QuantizedFile | None:
    """The dequantized view of a ComfyUI fp8 file (any convention in the module docstring), None if no fp8."""
    keys = file.keys()
    keyset = set(keys)
    layers = layer_formats(file)
    entries: dict[str, QEntry] = {}
    hidden: set[str] = set()
    if layers:
        index: dict[str, list[str]] = {}
        for k in keys:
            if k.endswith(".weight"):
                stem = k[:-len(".weight")]
                parts = stem.split(".")
                for i in range(1, len(parts)):
                    index.setdefault(".".join(parts[i:]), []).append(stem)
        for layer, conf in sorted(layers.items()):
            fmt = str(conf.get("format"))
            found = _resolve(layer, keyset, index)
            if found is None:
                raise HeaderError(f"the quantization metadata names layer {layer!r}, which has no weight in the file.",
                                  path=file.path)
            stem = found
            if fmt not in FP8:
                raise UnsupportedDtypeError(
                    f"layer {stem!r} is stored as {fmt!r}, a quantization lorakit has no exact codec for (it reads "
                    f"{', '.join(FP8)} layers of ComfyUI's mixed-precision files).", path=file.path,
                    hint="bake into the bf16/fp16 original, or an fp8-only build of this model.")
            short = fmt.replace("float8_", "")
            scale = stem + NEW_SCALE if stem + NEW_SCALE in keyset else None
            if scale is None:
                raise HeaderError(f"layer {stem!r} is {fmt} but has no {NEW_SCALE!r} tensor.", path=file.path)
            entries[stem + ".weight"] = _entry(file, stem, scale, short)
            hidden |= {scale, stem + NEW_INPUT, stem + LAYER_CONF}
        convention = "ComfyUI mixed-precision fp8 (_quantization_metadata)"
    else:
        scales = [k for k in keys if k.endswith(OLD_SCALE)]
        markers = [k for k in keys if k == MARKER or k.endswith("." + MARKER)]
        for sk in scales:
            stem = sk[:-len(OLD_SCALE)]
            w = stem + ".weight"
            if w not in keyset:
                raise HeaderError(f"scale {sk!r} has no weight {w!r}.", path=file.path)
            code = file.infos[w].dtype
            if code not in FP8_CODES:
                raise UnsupportedDtypeError(f"{w!r} has a scale_weight but is {code}, not fp8.", path=file.path,
                                            hint="lorakit reads scaled fp8 (e4m3fn, e5m2) weights.")
            entries[w] = _entry(file, stem, sk, FP8_CODES[code])
            hidden |= {sk, stem + OLD_INPUT}
        hidden |= set(markers)
        convention = "ComfyUI scaled fp8 (scale_weight)" if scales or markers else "plain fp8"
    for k in keys:          # fp8 tensors no scale describes: plain fp8 codes
        code = file.infos[k].dtype
        if k not in entries and k not in hidden and code in FP8_CODES and file.infos[k].nbytes > 0:
            entries[k] = QEntry(k, file.infos[k].shape, f"fp8_{FP8_CODES[code]}", {"weight": k})
    hidden &= keyset
    if not entries:
        return None
    return QuantizedFile(file, entries, hidden, convention)
