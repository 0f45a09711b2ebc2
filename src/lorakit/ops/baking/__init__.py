"""``lorakit bake``: add LoRAs into a base model's weights, streaming, with fp32 accumulation.

For every base tensor: read → fp32 → add ``Σ wᵢ·ΔWᵢ`` (exactly the rows of each patch that land in
this tensor) → cast once to the output dtype → write. LoRA patches live on native targets (component,
module) with row windows, and every base tensor is a (component, module, rows[, swapped halves][,
transposed]) slot of a native tensor, so any LoRA layout bakes into any base layout (BFL, ComfyUI-prefixed,
diffusers single file or sharded, single-file checkpoints holding a denoiser and text encoders, diffusers
pipeline folders), and the output keeps the base's layout, names, shard assignment and (by default) dtypes.
Convolution deltas are added flattened (``out × in·k·k``, the base tensor's layout); a weight the base stores
``in × out`` (OpenCLIP's ``text_projection``) gets ΔWᵀ.

Work is done in row chunks of bounded size through a three-stage thread pipeline (read → compute →
write) with reused buffers, so peak memory depends on the chunk size, not on the model size.
Tensors no patch touches are copied file-to-file by the kernel (``copy_file_range``) when their
dtype is kept.

Formulas (all contributions are computed against the base weight W0, so the result does not depend on
the order of the inputs):
- additive patches (LoRA/LoCon/LoHa/LoKr/full diff, biases, diffs of loose parameters such as q/k norm
  scales) contribute ``w·ΔW`` (``w·Δb``);
- a DoRA patch with weight ``s`` contributes ``m ⊙ (W0 + s·ΔW)/‖W0 + s·ΔW‖ − W0`` (PEFT's formula, for
  any ``s``), the norm taken per output row (PEFT, LyCORIS ``wd_on_out``) or per input column (LyCORIS
  input-axis magnitudes, shape ``(1, in)``). For one DoRA LoRA this is ``m·(W+ΔW)/‖W+ΔW‖`` at s = 1
  (PEFT = LyCORIS, ``math.md`` §8). With other LoRAs in the same bake it equals PEFT's unfused forward
  pass and diffusers/PEFT ``fuse_lora`` with the DoRA adapters fused first (PEFT 0.21.2 fusing a DoRA
  adapter after plain ones also rescales their deltas by m/‖·‖).
"""

from lorakit.ops.baking.inputs import component_flags, flagged_components
from lorakit.ops.baking.pipeline import DEFAULT_CHUNK_BYTES
from lorakit.ops.baking.report import BakeReport, format_plan
from lorakit.ops.baking.run import ComponentFiles, bake

__all__ = ["bake", "BakeReport", "ComponentFiles", "DEFAULT_CHUNK_BYTES", "component_flags", "flagged_components",
           "format_plan"]
