"""lorakit's ComfyUI nodes (ComfyUI's classic node contract: INPUT_TYPES / RETURN_TYPES / FUNCTION / CATEGORY).

Each node is a thin call of the lorakit library with the same arguments the matching ``lorakit`` command
passes; outputs are written through the library's temp-file-and-rename writer into ComfyUI's output folder.
"""

from __future__ import annotations

from typing import Any

from lorakit.dtypes import parse_dtype
from lorakit.formats import WRITABLE
from lorakit.io.memory import StateDictWeights, ZeroWeights

from . import bridge

CATEGORY = "lorakit"
DTYPES = ["keep", "fp32", "fp16", "bf16"]
DYNAMIC = ["off", "sv_ratio", "sv_fro", "sv_cumulative"]
MAX_MERGE = 4            # LoRA slots of the merge node (the first two required)


def _optional_int(value: int) -> int | None:
    return int(value) if value and int(value) > 0 else None


def _dynamic(method: str, param: float) -> str | None:
    return f"{method}:{param}" if method != "off" else None


def _text(ui: str, result: tuple[Any, ...]) -> dict[str, Any]:
    """An output node's return: the text shown on the node and the outputs."""
    return {"ui": {"text": [ui]}, "result": result}


def _rank_input(default: int, tooltip: str) -> tuple[str, dict[str, Any]]:
    return ("INT", {"default": default, "min": 0, "max": 4096, "step": 1, "tooltip": tooltip})


def _prefix_input(default: str) -> tuple[str, dict[str, Any]]:
    return ("STRING", {"default": default, "tooltip": "file name prefix inside ComfyUI's output folder"})


class LoraDoctor:
    """Will this LoRA apply to the loaded model? The doctor's verdict against the model's state dict."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model": ("MODEL", {"tooltip": "the loaded diffusion model to check against"}),
                             "lora_name": (bridge.lora_names(), {"tooltip": "a LoRA of the loras folder"})}}

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("verdict", "report")
    FUNCTION = "diagnose"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "lorakit doctor: OK / PARTIAL / WILL NOT APPLY / INVALID, why, and how to fix it."

    def diagnose(self, model: Any, lora_name: str) -> dict[str, Any]:
        from lorakit.base.checkpoint import open_base
        from lorakit.ops.diagnose import DoctorReport, diagnose, format_report
        # names and shapes are all the doctor reads of the model: its patches need not be applied
        base = open_base(StateDictWeights(bridge.model_state_dict(model, apply_patches=False), "ComfyUI model"))
        d = diagnose(bridge.lora_path(lora_name), base)
        text = format_report(DoctorReport([d]))
        return _text(text, (d.verdict, text))


class ConvertLora:
    """Convert a LoRA to another format, exactly (lossy steps only when allowed, with their error)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"lora_name": (bridge.lora_names(),),
                             "target_format": (list(WRITABLE), {"default": "comfy"}),
                             "dtype": (DTYPES, {"default": "keep"}),
                             "allow_lossy": ("BOOLEAN", {"default": False}),
                             "filename_prefix": _prefix_input("loras/lorakit_converted")}}

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("path", "report")
    FUNCTION = "convert"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "lorakit convert: write the LoRA in kohya, diffusers or comfy naming."

    def convert(self, lora_name: str, target_format: str, dtype: str, allow_lossy: bool,
                filename_prefix: str) -> dict[str, Any]:
        from lorakit.ops.conversion import convert
        out = bridge.output_file(filename_prefix)
        r = convert(bridge.lora_path(lora_name), out, target_format, dtype=parse_dtype(dtype),
                    allow_lossy=allow_lossy)
        text = f"{r.source_format} → {r.target_format}: {r.modules_out} modules, {r.tensors_out} tensors " \
               f"({r.dtype}); wrote {out}" + "".join(f"\nwarning: {w}" for w in r.warnings)
        return _text(text, (out, text))


class MergeLoras:
    """Merge LoRAs exactly (concat) or to a rank (svd, ties, dare) with linear strengths."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        from lorakit.ops.merging import merge_methods
        names = bridge.lora_names()
        strength = ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})
        required: dict[str, Any] = {"lora_1": (names,), "strength_1": strength,
                                    "lora_2": (names,), "strength_2": strength}
        optional = {k: v for i in range(3, MAX_MERGE + 1)
                    for k, v in ((f"lora_{i}", ([bridge.NONE, *names],)), (f"strength_{i}", strength))}
        required.update({
            "method": (list(merge_methods()), {"default": "concat"}),
            "rank": _rank_input(0, "output rank for svd/ties/dare (0: the largest input rank)"),
            "density": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "ties/dare: fraction kept (0: not set)"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "tooltip": "dare: random seed"}),
            "target_format": (list(WRITABLE), {"default": "kohya"}),
            "dtype": (DTYPES, {"default": "keep"}),
            "filename_prefix": _prefix_input("loras/lorakit_merged")})
        return {"required": required, "optional": optional}

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("path", "report")
    FUNCTION = "merge"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "lorakit merge: Σ strength·ΔW; concat is exact (ranks add up)."

    def merge(self, lora_1: str, strength_1: float, lora_2: str, strength_2: float, method: str, rank: int,
              density: float, seed: int, target_format: str, dtype: str, filename_prefix: str,
              **more: Any) -> dict[str, Any]:
        from lorakit.ops.merging import get_merge_method, merge
        from lorakit.ops.recipes import WeightedInput
        picked = [(lora_1, strength_1), (lora_2, strength_2)]
        picked += [(more[f"lora_{i}"], more.get(f"strength_{i}", 1.0)) for i in range(3, MAX_MERGE + 1)
                   if more.get(f"lora_{i}") not in (None, bridge.NONE)]
        takes = get_merge_method(method).options
        out = bridge.output_file(filename_prefix)
        r = merge([WeightedInput(bridge.lora_path(n), float(w)) for n, w in picked], out, method=method,
                  rank=_optional_int(rank), to=target_format, dtype=parse_dtype(dtype),
                  density=float(density) if density and "density" in takes else None,
                  seed=int(seed) if "seed" in takes else None)
        text = f"{method}: {r.modules_out} modules, {r.tensors_out} tensors ({r.dtype}, {r.target_format}); " \
               f"wrote {out}" + "".join(f"\nwarning: {w}" for w in r.warnings)
        return _text(text, (out, text))


class ExtractLora:
    """A LoRA from two loaded models (tuned − original), or from a ModelSubtract difference alone."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model_tuned": ("MODEL", {"tooltip": "the fine-tuned model, or a ModelSubtract "
                                                                  "difference (leave model_original empty)"}),
                             "rank": _rank_input(16, "rank (the cap with dynamic)"),
                             "conv_rank": _rank_input(0, "rank of k×k convolutions (0: left out, reported)"),
                             "dynamic": (DYNAMIC, {"default": "off"}),
                             "dynamic_param": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 1000.0, "step": 0.01}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1}),
                             "target_format": (list(WRITABLE), {"default": "comfy"}),
                             "dtype": (DTYPES, {"default": "keep"}),
                             "filename_prefix": _prefix_input("loras/lorakit_extracted")},
                "optional": {"model_original": ("MODEL", {"tooltip": "the base the tuned model started from"})}}

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("path", "report")
    FUNCTION = "extract"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "lorakit extract: seeded randomized SVD, alpha written, every module's error reported."

    def extract(self, model_tuned: Any, rank: int, conv_rank: int, dynamic: str, dynamic_param: float, seed: int,
                target_format: str, dtype: str, filename_prefix: str,
                model_original: Any = None) -> dict[str, Any]:
        from lorakit.ops.extraction import extract
        tuned = StateDictWeights(bridge.model_state_dict(model_tuned), "ComfyUI model (tuned)")
        if model_original is None:
            original: Any = ZeroWeights(tuned, "zeros (model_tuned is a difference)")
        else:
            original = StateDictWeights(bridge.model_state_dict(model_original), "ComfyUI model (original)")
        out = bridge.output_file(filename_prefix)
        r = extract(original, tuned, out, rank=_optional_int(rank), conv_rank=_optional_int(conv_rank),
                    dynamic=_dynamic(dynamic, dynamic_param), seed=int(seed), to=target_format,
                    dtype=parse_dtype(dtype))
        worst = r.worst
        text = f"{len(r.modules)} modules extracted, mean retained energy {r.mean_retained_energy:.4f}" + \
               (f", worst relative error {worst.relative_error:.3e} ({worst.module})" if worst else "") + \
               f"; wrote {out}" + "".join(f"\nwarning: {w}" for w in r.warnings)
        return _text(text, (out, text))


class ResizeLora:
    """Lower a LoRA's rank by the exact optimal truncation (strength preserved, energy reported)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"lora_name": (bridge.lora_names(),),
                             "rank": _rank_input(8, "new rank (the cap with dynamic)"),
                             "conv_rank": _rank_input(0, "new rank of convolutions (0: the rank)"),
                             "dynamic": (DYNAMIC, {"default": "off"}),
                             "dynamic_param": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 1000.0, "step": 0.01}),
                             "dtype": (DTYPES, {"default": "keep"}),
                             "filename_prefix": _prefix_input("loras/lorakit_resized")}}

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("path", "report")
    FUNCTION = "resize"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "lorakit resize: SVD truncation through small QR cores; alpha rescaled with the rank."

    def resize(self, lora_name: str, rank: int, conv_rank: int, dynamic: str, dynamic_param: float, dtype: str,
               filename_prefix: str) -> dict[str, Any]:
        from lorakit.ops.resizing import resize
        out = bridge.output_file(filename_prefix)
        r = resize(bridge.lora_path(lora_name), out, rank=_optional_int(rank), conv_rank=_optional_int(conv_rank),
                   dynamic=_dynamic(dynamic, dynamic_param), dtype=parse_dtype(dtype))
        mean = sum(m.retained_energy for m in r.modules) / len(r.modules) if r.modules else 1.0
        text = f"{len(r.modules)} modules, mean retained energy {mean:.4f}; wrote {out}" + \
               "".join(f"\nwarning: {w}" for w in r.warnings)
        return _text(text, (out, text))


NODE_CLASS_MAPPINGS = {
    "LorakitLoraDoctor": LoraDoctor,
    "LorakitConvertLora": ConvertLora,
    "LorakitMergeLoras": MergeLoras,
    "LorakitExtractLora": ExtractLora,
    "LorakitResizeLora": ResizeLora,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LorakitLoraDoctor": "LoRA Doctor (lorakit)",
    "LorakitConvertLora": "Convert & Save LoRA (lorakit)",
    "LorakitMergeLoras": "Merge LoRAs exactly (lorakit)",
    "LorakitExtractLora": "Extract LoRA (lorakit)",
    "LorakitResizeLora": "Resize LoRA (lorakit)",
}
