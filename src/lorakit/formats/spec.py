"""LoRA file formats, declared as data and registered by name.

A format is the outer containers it tolerates, whether it requires or forbids PEFT markers
(``base_model.model.`` or an adapter name such as ``.default``), and the suffix style it writes. Which
prefix names which component, in which naming scheme, is declared per architecture
(:attr:`lorakit.layouts.ArchSpec.rules`). Naming (where the module is) and algorithm (the suffix family)
are independent facts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# ---------------------------------------------------------------------------------------------
# Suffix vocabulary: key tail -> (family, role)
# ---------------------------------------------------------------------------------------------

SUFFIXES: dict[str, tuple[str, str]] = {
    "lora_down.weight": ("lora", "down"),
    "lora_up.weight": ("lora", "up"),
    "lora_mid.weight": ("lora", "mid"),
    "lora_A.weight": ("lora", "down"),
    "lora_B.weight": ("lora", "up"),
    "lora_B.bias": ("lora", "bias"),
    "lora.down.weight": ("lora", "down"),
    "lora.up.weight": ("lora", "up"),
    "alpha": ("meta", "alpha"),
    "dora_scale": ("dora", "dora"),
    "lora_magnitude_vector": ("dora", "dora"),
    "lora_magnitude_vector.weight": ("dora", "dora"),
    "diff": ("full", "diff"),
    "diff_b": ("bias", "diff_b"),
    # LyCORIS ``norms``: additive diffs on a norm module's weight / bias, keyed by the module's name. lorakit
    # reads ``w_norm`` on the owner of a loose parameter (q/k norm ``…query_norm.w_norm`` = diff of its scale)
    "w_norm": ("norm", "w_norm"),
    "b_norm": ("norm", "b_norm"),
    **{f"hada_{n}": ("loha", f"hada_{n}") for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{n}": ("lokr", f"lokr_{n}") for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}
XLABS_SUFFIXES: dict[str, tuple[str, str]] = {"down.weight": ("lora", "down"), "up.weight": ("lora", "up")}
ADAPTER_NAMED = re.compile(r"\.lora_(?P<ab>[AB])\.(?P<name>[A-Za-z0-9_]+)\.(?P<param>weight|bias)\Z")

_BY_LENGTH = sorted(SUFFIXES, key=len, reverse=True)
_XLABS_BY_LENGTH = sorted(XLABS_SUFFIXES, key=len, reverse=True)


@dataclass(frozen=True)
class SplitKey:
    module: str
    family: str
    role: str
    adapter_name: str | None = None


@lru_cache(maxsize=1 << 16)
def split_key(key: str, *, xlabs: bool = False) -> SplitKey | None:
    """Split ``<module>.<suffix>`` using the known suffix vocabulary (memoised: detection splits every key once
    per architecture × format, and the result, a frozen dataclass, depends on the key alone)."""
    if not xlabs:
        m = ADAPTER_NAMED.search(key)
        if m and m.group("name") not in ("weight", "bias"):
            role = ("down" if m.group("ab") == "A" else "up") if m.group("param") == "weight" else "bias"
            if role == "bias" and m.group("ab") == "A":
                return None
            return SplitKey(key[: m.start()], "lora", role, m.group("name"))
    for suffix in (_XLABS_BY_LENGTH if xlabs else _BY_LENGTH):
        if key.endswith("." + suffix):
            family, role = (XLABS_SUFFIXES if xlabs else SUFFIXES)[suffix]
            return SplitKey(key[: -len(suffix) - 1], family, role)
    return None


# Suffixes each writing style uses, by role.
WRITE_SUFFIXES: dict[str, dict[str, str]] = {
    "kohya": {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight", "alpha": "alpha",
              "dora": "dora_scale", "diff": "diff", "diff_b": "diff_b"},
    "peft": {"down": "lora_A.weight", "up": "lora_B.weight", "bias": "lora_B.bias", "alpha": "alpha",
             "dora": "lora_magnitude_vector", "diff": "diff", "diff_b": "diff_b"},
}


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FormatSpec:
    """Format-level facts: the containers and markers of its keys, its suffix family and writing style. Which
    prefix names which component is the architecture's data (:attr:`~lorakit.layouts.ArchSpec.rules`)."""

    name: str
    label: str
    containers: tuple[str, ...] = ()      # outer prefixes tolerated before a rule prefix
    inner: tuple[str, ...] = ()           # prefixes tolerated between the rule prefix and the module
    marker: str = "forbidden"             # PEFT markers: "required" | "forbidden" | "any"
    xlabs_suffixes: bool = False
    write_style: str | None = None        # "kohya" | "peft" when the format can be written
    fold_alpha: bool = False              # writer folds every scale into the factors
    strip_trailing_underscore: bool = False
    lora_only: bool = False               # its loader reads LoRA factors only (no LoHa/LoKr keys)
    replacements: bool = False            # a key naming a loose parameter itself holds its new value (BFL)
    rewrites: tuple[tuple[str, str], ...] = ()   # (regex, replacement) applied to a key before it is split

    def rewrite(self, key: str) -> str:
        for pattern, repl in self._compiled():
            key = pattern.sub(repl, key)
        return key

    def _compiled(self) -> tuple[tuple[re.Pattern[str], str], ...]:
        return tuple((re.compile(p), r) for p, r in self.rewrites)


_PEFT_CONTAINER = "base_model.model."
_FORMATS: dict[str, FormatSpec] = {}


def register_format(fmt: FormatSpec) -> FormatSpec:
    """Add a format to the registry (ValueError if its name is taken). Architectures then name its prefixes."""
    if fmt.name in _FORMATS:
        raise ValueError(f"format {fmt.name!r} registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


for _fmt in (
    FormatSpec("kohya", "kohya / sd-scripts (lora_unet_…, lora_te1_…)", write_style="kohya",
               strip_trailing_underscore=True),
    FormatSpec("comfy", "ComfyUI (single-file names under diffusion_model.)", containers=("model.",),
               write_style="kohya"),
    FormatSpec("diffusers", "diffusers / AI-Toolkit / SimpleTuner (component-prefixed diffusers names, lora_A/lora_B)",
               write_style="peft", fold_alpha=True, lora_only=True),
    # diffusers before PEFT (<= 0.20): attention-processor LoRA layers, e.g. UNet
    # ``…attn1.processor.to_q_lora.down.weight`` (``to_out_lora`` = ``to_out.0``) and text encoders
    # ``…self_attn.to_q_lora.down.weight`` (on ``q_proj``) or ``…mlp.fc1.lora_linear_layer.down.weight``
    # (diffusers utils/state_dict_utils.py UNET_TO_DIFFUSERS, DIFFUSERS_OLD_TO_PEFT)
    FormatSpec("diffusers_old", "diffusers attention processors (…processor.to_q_lora.down.weight)",
               rewrites=((r"\.processor\.to_(q|k|v)_lora\.(up|down)\.weight\Z", r".to_\1.lora.\2.weight"),
                         (r"\.processor\.to_out_lora\.(up|down)\.weight\Z", r".to_out.0.lora.\1.weight"),
                         (r"\.self_attn\.to_(q|k|v)_lora\.(up|down)\.weight\Z", r".self_attn.\1_proj.lora.\2.weight"),
                         (r"\.self_attn\.to_out_lora\.(up|down)\.weight\Z", r".self_attn.out_proj.lora.\1.weight"),
                         (r"\.lora_linear_layer\.(up|down)\.weight\Z", r".lora.\1.weight"))),
    FormatSpec("peft", "PEFT (base_model.model.… or adapter-named keys)", containers=(_PEFT_CONTAINER,),
               inner=(_PEFT_CONTAINER,), marker="required"),
    FormatSpec("xlabs", "XLabs x-flux (processor.qkv_lora1 …)", containers=("diffusion_model.",),
               xlabs_suffixes=True),
    FormatSpec("onetrainer", "OneTrainer legacy (lora_transformer_…)"),
    FormatSpec("lycoris", "SimpleTuner / LyCORIS generic (lycoris_…)"),
    # BFL's own LoRAs (FLUX.1 Canny/Depth dev LoRA: flux/modules/lora.py LinearLora, loaded by load_state_dict in
    # flux/util.py, whose bare ``…norm.query_norm.scale`` tensors overwrite the base's) and OneTrainer's ORIGINAL
    # LoRA export (bare single-file names, lora_A/lora_B, ``.alpha``).
    FormatSpec("bfl", "bare single-file names (BFL control LoRAs, OneTrainer ORIGINAL: img_in.lora_A.weight …)",
               replacements=True),
    FormatSpec("diffsynth", "DiffSynth (bare diffusers names)"),
    # AI-Toolkit's ComfyUI-style files (toolkit/models/wan21/wan_lora_convert.py convert_to_original): single-file
    # names under ``diffusion_model.``, lora_A/lora_B, no alpha; its combined Wan 2.2 files put each expert under
    # ``diffusion_model.transformer_1.`` / ``.transformer_2.`` (the architecture's paired rules)
    FormatSpec("aitoolkit", "AI-Toolkit (diffusion_model. + single-file names, lora_A/lora_B, no alpha)",
               write_style="peft", fold_alpha=True),
):
    register_format(_fmt)


def formats() -> tuple[FormatSpec, ...]:
    """Every registered format, in registration order."""
    return tuple(_FORMATS.values())


FORMATS = formats()
WRITABLE = tuple(f.name for f in FORMATS if f.write_style)


def get_format(name: str) -> FormatSpec:
    """The format spec named ``name`` (KeyError if unknown)."""
    return _FORMATS[name]
