"""``lorakit extract``: a LoRA from the difference of a fine-tuned model and its base (``math.md`` §5).

Any registered architecture (FLUX.1, SD1.x, SD2.x, SDXL). Both models may be in any base layout that
:func:`lorakit.base.checkpoint.open_base` reads (FLUX: BFL, ComfyUI-prefixed, diffusers single file or sharded folder;
SD: single-file checkpoints holding UNet and text encoders, bare UNet files; diffusers pipeline folders, their
component subfolders read as one model); tensors are paired through their
component, native module and row window, so every patch is written on a native target whatever the input
layouts. Every component both models hold is compared: the denoiser and, for SD models, each text encoder.

Work is streamed one native module at a time: the module's full native weight is assembled from the slots of
each model (diffusers q/k/v rows, OpenCLIP's fused ``in_proj_weight`` read as one ``3·D × D`` weight, the
``norm_out.linear`` half swap, the transposed ``text_projection`` turned back with
:func:`lorakit.lora.transforms.stored_to_native`), the difference ``D = W_tuned − W_original`` is formed in fp32 (one
reused buffer) and decomposed, and only the low-rank factors are kept. The next module's tensors are read by a
background thread while the current one is decomposed (at most one extra module pair in memory). Fused weights
are written split in the output's naming by :func:`lorakit.formats.emit` (exactly: the parts share the down).

Decomposition: seeded randomized SVD (tall orientation, oversampling, power iterations; same inputs
and seed give the same bytes) or, with ``exact=True``, a thin SVD. A fixed ``rank`` keeps ``k =
min(rank, out, in)`` values; ``dynamic=("sv_fro", 0.9)`` etc. chooses ``k`` per module from the
values computed at the cap rank (``sv_fro`` measures energy against the exact ``‖D‖_F²``;
``sv_cumulative`` against the computed values unless ``exact``). Each module's retained energy and
relative Frobenius error are exact (they use ``‖D‖_F``, and a direct residual when the error is
small enough for cancellation to matter).

Convolutions follow sd-scripts' ``networks/extract_lora_from_models.py``: a ``k×k`` convolution (k > 1) is SVD'd
as the ``(out, in·k·k)`` matrix at ``conv_rank`` (``--conv_dim``) and written as a 4-D down ``(r, in, k, k)`` and
up ``(out, r, 1, 1)``; without ``conv_rank`` it is left out (reported). A 1×1 convolution is treated as a Linear
layer (SVD of ``(out, in)`` at ``rank``) and written with 4-D factors ``(r, in, 1, 1)`` / ``(out, r, 1, 1)``.

Text encoders follow sd-scripts' rule too: an encoder is extracted only when its largest absolute weight
difference (over all its modules) exceeds ``te_min_diff`` (sd-scripts' ``--min_diff``, default 0.01); otherwise
it is left out whole and reported as the same in both models. Unlike sd-scripts, the rule is applied per
encoder (SDXL's CLIP-L and OpenCLIP-G separately), and a changed encoder's modules then follow the per-module
rule below like the denoiser's. The decision reads the encoder's modules in file order and stops at the first
one above the threshold (a changed encoder costs one extra module read; an unchanged one is read once, by the
decision, and never again).

Skipping: modules whose ``max|D| ≤ min_diff`` are skipped and counted; the default 0 skips only
modules that are exactly unchanged. Bias differences are written as ``diff_b`` entries with
``include_bias``. Differences of loose parameters (q/k norm scales) are always reported; with
``include_norms`` they are also written, exactly (fp32 difference, stored at the output dtype; the
rounding is reported), as ``diff`` entries on the parameter's full name: ``lora_unet_<param, . → _>.diff``
(kohya), ``diffusion_model.<param>.diff`` (comfy: ComfyUI's key for non-``.weight`` parameters) or
``transformer.<diffusers param>.diff`` (diffusers: lorakit's own spelling; diffusers does not load it).
"""

from __future__ import annotations

from lorakit.ops.extraction.decompose import (DEFAULT_DYNAMIC_CAP, DEFAULT_NITER, DEFAULT_OVERSAMPLE,
                                              DEFAULT_TE_MIN_DIFF, Decomposition, clamp_factors, decompose, fro_sq)
from lorakit.ops.extraction.report import ExtractReport, ModuleResult
from lorakit.ops.extraction.pairing import Job, Pairing, RawSlots
from lorakit.ops.extraction.plan import format_plan
from lorakit.ops.extraction.run import extract

__all__ = ["DEFAULT_DYNAMIC_CAP", "DEFAULT_NITER", "DEFAULT_OVERSAMPLE", "DEFAULT_TE_MIN_DIFF", "Decomposition",
           "ExtractReport", "Job", "ModuleResult", "Pairing", "RawSlots", "clamp_factors", "decompose", "extract",
           "format_plan", "fro_sq"]
