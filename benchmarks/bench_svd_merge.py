"""SVD merge of several rank-r FLUX.1 LoRAs to rank k, at full FLUX.1-dev shapes (or a fraction of the blocks).

The inputs are generated in memory from the layout (every double/single block module, native fused names),
so no large files are needed; ``--files`` also writes them to a temporary folder and times the full
``lorakit.merge`` call (read, merge, write) against the time to read the inputs.

Figures printed:
- ``merge``: ``lorakit.ops.merging.merge_models(method="svd")`` on the in-memory inputs (the maths);
- ``emit``: writing tensors in kohya layout (in memory) at the output dtype;
- floors measured in the same run: ``fp32 pass`` (casting every factor to fp32 once: a memory pass) and
  ``gram pass`` (``UᵀU`` and ``DDᵀ`` of every stacked module: one matmul pass with the same R² work as a QR).

    python benchmarks/bench_svd_merge.py                 # full size (lead only: ~1 GB of factors)
    python benchmarks/bench_svd_merge.py --scale 0.1     # smoke run: 10 % of the blocks
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from lorakit.lora.adapters import LoRA
from lorakit.formats import emit
from lorakit.layouts import FLUX1, expand
from lorakit.ops.merging import MergeOptions, merge_arch, merge_models
from lorakit.lora.model import ArchInstance, LoraModel, Patch, Target
from lorakit.samples.synthetic import full_flux_params


def scaled_params(scale: float) -> dict[str, int]:
    params = full_flux_params()
    comp = FLUX1.components["transformer"]
    for count in comp.counts:
        params[count] = max(1, round(params[count] * scale))
    return params


def block_modules(params: dict[str, int]):
    comp = FLUX1.components["transformer"]
    return [m for m in expand(comp, params) if m.spec.repeat in comp.counts]


def make_input(params: dict[str, int], rank: int, seed: int, dtype: torch.dtype) -> LoraModel:
    gen = torch.Generator().manual_seed(seed)
    patches = []
    for m in block_modules(params):
        down = (torch.randn(rank, m.inp, generator=gen) / m.inp ** 0.5).to(dtype)
        up = (torch.randn(m.out, rank, generator=gen) * 0.05).to(dtype)
        patches.append(Patch(Target("transformer", m.name), LoRA(alpha=float(rank), down=down, up=up)))
    arch = ArchInstance(FLUX1, {"transformer": dict(params)}, "dev")
    return LoraModel(arch, patches, "kohya", {"ss_base_model_version": "flux1"}, f"<memory:{seed}>")


def floors(models: list[LoraModel]) -> tuple[float, float]:
    t0 = time.perf_counter()
    for m in models:
        for p in m.patches:
            p.adapter.up.float()
            p.adapter.down.float()
    t1 = time.perf_counter()
    by_target: dict[Target, list[LoRA]] = {}
    for m in models:
        for p in m.patches:
            by_target.setdefault(p.target, []).append(p.adapter)
    for adapters in by_target.values():
        up = torch.cat([a.up.float() for a in adapters], dim=1)
        down = torch.cat([a.down.float() for a in adapters], dim=0)
        up.T @ up
        down @ down.T
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the double/single blocks (default 1 = full)")
    ap.add_argument("--inputs", type=int, default=3)
    ap.add_argument("--rank-in", type=int, default=32)
    ap.add_argument("--rank", type=int, default=64, help="output rank")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--files", action="store_true", help="also write the inputs and time lorakit.merge end to end")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--target", type=float, default=10.0, help="target seconds for the full-size merge")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    params = scaled_params(args.scale)
    mods = block_modules(params)
    dense_params = sum(m.out * m.inp for m in mods)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; blocks double={params['double']} "
          f"single={params['single']}: {len(mods)} modules ({dense_params:,} dense parameters per ΔW)")
    t = time.perf_counter()
    models = [make_input(params, args.rank_in, seed=i + 1, dtype=dtype) for i in range(args.inputs)]
    factor_bytes = sum(p.adapter.up.numel() * p.adapter.up.element_size() + p.adapter.down.numel()
                       * p.adapter.down.element_size() for m in models for p in m.patches)
    print(f"generated {args.inputs} rank-{args.rank_in} inputs ({factor_bytes / 2**20:.0f} MiB of {args.dtype} "
          f"factors) in {time.perf_counter() - t:.1f} s")

    fp32_pass, gram_pass = floors(models)
    weights = [1.0 / args.inputs] * args.inputs
    opts = MergeOptions(method="svd", rank=args.rank)
    t = time.perf_counter()
    result = merge_models(models, weights, opts, arch=merge_arch(models))
    merge_s = time.perf_counter() - t
    t = time.perf_counter()
    emitted = emit(result.model, "kohya", dtype=dtype)
    emit_s = time.perf_counter() - t
    worst = min(result.stats, key=lambda s: s.retained_energy or 1.0)

    print(f"merge (svd → rank {args.rank}): {merge_s:.2f} s   emit: {emit_s:.2f} s   "
          f"({len(emitted.tensors)} tensors)")
    print(f"floors: fp32 pass {fp32_pass:.2f} s, gram pass {gram_pass:.2f} s   "
          f"ratio merge/gram = {merge_s / max(gram_pass, 1e-9):.1f}×")
    print(f"lowest retained energy {worst.retained_energy:.4f} ({worst.module})")
    if args.scale != 1.0:
        full = len(block_modules(full_flux_params()))
        print(f"extrapolated to the full {full} modules: merge ≈ {merge_s * full / len(mods):.1f} s "
              f"(target ≤ {args.target:g} s on 2 CPU cores)")
    else:
        print(f"target ≤ {args.target:g} s on 2 CPU cores: {'OK' if merge_s <= args.target else 'MISSED'}")

    if args.files:
        import lorakit
        from lorakit.io import open_weights, save_tensors
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i, m in enumerate(models):
                tensors = emit(m, "kohya").tensors
                paths.append(save_tensors(os.path.join(tmp, f"in{i}.safetensors"), tensors,
                                          {"ss_base_model_version": "flux1"}))
            t = time.perf_counter()
            for p in paths:
                with open_weights(p) as f:
                    for k in f.keys():
                        f.get(k)
            read_s = time.perf_counter() - t
            t = time.perf_counter()
            lorakit.merge([(p, w) for p, w in zip(paths, weights)], os.path.join(tmp, "out.safetensors"),
                          method="svd", rank=args.rank)
            total_s = time.perf_counter() - t
            print(f"files: read inputs {read_s:.2f} s; lorakit.merge end to end {total_s:.2f} s "
                  f"(ratio {total_s / max(read_s, 1e-9):.1f}× the read)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
