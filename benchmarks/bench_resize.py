"""Resize of a full rank-32 FLUX.1 LoRA (every double/single block module, native fused names) to rank 16.

The input is generated from the layout and written once; then, in the same run:
- floor ``read``: reading every tensor of the input file;
- floor ``qr pass``: one QR of every module's up and downᵀ (the factor-space work a resize cannot avoid);
- ``lorakit.resize(..., rank=16)`` end to end from the file (read, truncate, write), and the same from the command
  line (process start and imports included).
Issue 14 target: ≤ 3 s end to end on 2 cores.

    python benchmarks/bench_resize.py                 # full size (~300 MB of bf16 factors)
    python benchmarks/bench_resize.py --scale 0.1     # smoke run: 10 % of the blocks
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench_svd_merge import block_modules, make_input, scaled_params

import lorakit
from lorakit.formats import emit
from lorakit.io import open_weights, save_tensors


def qr_pass(path: str) -> float:
    """Seconds for one reduced QR of every up and downᵀ in the file (fp32)."""
    with open_weights(path) as f:
        tensors = {k: f.get(k) for k in f.keys() if k.endswith(("lora_up.weight", "lora_down.weight"))}
    t = time.perf_counter()
    for k, v in tensors.items():
        m = v.float().reshape(v.shape[0], -1)
        torch.linalg.qr(m if k.endswith("up.weight") else m.T, mode="reduced")
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--rank-in", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    params = scaled_params(args.scale)
    model = make_input(params, args.rank_in, seed=1, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        src = save_tensors(os.path.join(tmp, "in.safetensors"), emit(model, "kohya").tensors,
                           {"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux"})
        print(f"input: {len(block_modules(params))} modules, rank {args.rank_in}, "
              f"{os.path.getsize(src) / 1e6:.0f} MB; {torch.get_num_threads()} torch threads")
        reads, qrs, calls, clis = [], [], [], []
        for i in range(args.repeat):
            t = time.perf_counter()
            with open_weights(src) as f:
                for k in f.keys():
                    f.get(k)
            reads.append(time.perf_counter() - t)
            qrs.append(qr_pass(src))
            out = os.path.join(tmp, f"out{i}.safetensors")
            t = time.perf_counter()
            lorakit.resize(src, out, rank=args.rank)
            calls.append(time.perf_counter() - t)
            out2 = os.path.join(tmp, f"cli{i}.safetensors")
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lorakit", "resize", src, "-o", out2, "--rank", str(args.rank)],
                           check=True, capture_output=True)
            clis.append(time.perf_counter() - t)
        read_s, qr_s = statistics.median(reads), statistics.median(qrs)
        call_s, cli_s = statistics.median(calls), statistics.median(clis)
        print(f"floors: read {read_s:.2f} s, qr pass {qr_s:.2f} s")
        print(f"lorakit.resize → rank {args.rank}: {call_s:.2f} s ({call_s / max(read_s + qr_s, 1e-9):.1f}× read + qr); "
              f"command line {cli_s:.2f} s")
        print(f"target ≤ 3 s end to end: {'ok' if cli_s <= 3 else 'MISSED'} (median of {args.repeat})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
