"""``lorakit merge``: LoRA + LoRA merging on the native internal form.

Strength semantics are linear (``math.md`` §2): the merge of inputs ``i`` with weights ``w_i`` is
``Σ_i w_i·ΔW_i`` per target weight, where ``ΔW_i`` is input ``i``'s delta at strength 1 (its α/r
included). ``--blocks`` multiplies a module's merged delta once.

Methods
- ``concat`` (default, exact): every input's factors are stacked along the rank with the coefficient
  ``c = w·m·α/r`` folded in (``√|c|`` on both factors, sign on the down; all of it on the up when
  ``|c|`` is a power of two). Row windows of fused targets are combined by the format writer's own
  block-diagonal fusing. LoHa/LoKr modules join through their exact low-rank rewrites (``math.md``
  §4.3) when those are smaller than the dense matrix; otherwise the module is written as a full
  ``diff`` (kohya/comfy) or refused.
- ``svd``: the exact top-k of the weighted sum from the stacked factors (QR + core SVD, no dense
  matrix), rank from ``--rank`` or a ``--dynamic`` rule; default rank = the largest input rank on the
  module. Retained energy is reported per module.
- ``ties``, ``dare_linear``, ``dare_ties``: PEFT 0.21.2 ``merge_utils`` definitions on the dense task
  tensors ``T_i = ΔW_i`` with weights ``w_i`` (exactly what PEFT's ``*_svd`` combinations feed them),
  one native module at a time, then an SVD to the target rank. DARE draws its Bernoulli masks from a
  ``torch.Generator`` seeded by ``--seed`` and the module name: same seed, same bytes.

Loose parameters (q/k norm scale ``diff`` entries) are merged as the exact weighted sum ``Σ w_i·diff_i`` by
every method (a 1-D parameter has no rank to truncate or sign pattern to trim); the report says so.

Convolutions (SD1.5/SDXL LoCon; any architecture whose ``ModuleSpec.kernel`` is non-empty) are merged in
the flattened view ``ΔW (out, in·k·k)``: ``concat`` stacks ``down`` (r, in, k, k) and ``up`` (out, r, 1, 1)
exactly (Tucker ``mid`` and conv LoHa/LoKr are first rewritten as plain factors, exactly, when those are
smaller than the dense matrix); ``svd`` and ties/dare factor the flattened sum and reshape ``down`` back to
(k, in, kh, kw), ``up`` to (out, k, 1, 1).
``conv_rank`` (CLI ``--conv-rank``; sd-scripts' ``--new_conv_rank``/``--conv_dim``) is the output rank of
modules with a kernel larger than 1×1, exactly as sd-scripts' ``svd_merge_lora.py`` chooses it (its
``conv2d_3x3`` test): 1×1 convolutions count as Linear there and take ``--rank``. Without ``conv_rank``
the 3×3 modules take ``--rank`` too (sd-scripts: ``new_conv_rank`` defaults to ``new_rank``); with
``--dynamic`` it is their rank cap. The per-module report says which modules are convolutions.

Metadata policy for merged files: keys whose value is identical in every input are carried over;
``ss_base_model_version`` and the ModelSpec architecture/implementation keys come from the first
input that has them; everything else (training tags, dataset statistics, per-input names) is dropped.
"""

from __future__ import annotations

from lorakit.ops.merging.report import MergeReport, ModuleStat
from lorakit.ops.merging.registry import (DenseCombine, METHOD_OPTIONS, MergeMethod, ModuleMerge, get_merge_method,
                                          merge_method, merge_methods, methods_with, register_merge_method,
                                          unregister_merge_method)
from lorakit.ops.merging.contributions import (Contribution, IDENTITY_KEYS, InputSpec, factor_form, merge_arch,
                                               merged_metadata, module_seed)
from lorakit.ops.merging.dense import MAJORITY_SIGN, combine_dense, magnitude_prune, majority_sign_mask, random_prune
from lorakit.ops.merging.plan import MergeOptions, MergeResult, gather, merge_models, module_kernel, uses_conv_rank
from lorakit.ops.merging.methods import dense_merge, dense_merge_method, input_deltas, stacked_factors
from lorakit.ops.merging.verify import verify_merge
from lorakit.ops.merging.run import merge

__all__ = ["Contribution", "DenseCombine", "IDENTITY_KEYS", "InputSpec", "MAJORITY_SIGN", "METHOD_OPTIONS",
           "MergeMethod", "MergeOptions", "MergeReport", "MergeResult", "ModuleMerge", "ModuleStat", "combine_dense",
           "dense_merge", "dense_merge_method", "factor_form", "gather", "get_merge_method", "input_deltas",
           "magnitude_prune", "majority_sign_mask", "merge", "merge_arch", "merge_method", "merge_methods",
           "merge_models", "merged_metadata", "methods_with", "module_kernel", "module_seed", "random_prune",
           "register_merge_method", "stacked_factors", "unregister_merge_method", "uses_conv_rank", "verify_merge"]
