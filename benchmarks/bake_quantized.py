#!/usr/bin/env python
"""Benchmark ``lorakit.bake`` into quantized FLUX.1-dev bases.

1. A synthetic FLUX.1-dev ComfyUI scaled-fp8 base (older ``scale_weight`` convention by default; full size:
   every tensor of the real checkpoint, 11.9 G parameters ≈ 11.9 GB) baked with a rank-32 sd-scripts LoRA on every
   block module, against ``cp`` of the same file, in one run (each followed by ``sync``; the base was just written,
   so both read it from the page cache when it fits). Reported: seconds, the bake/cp ratio (target ≤ 1.3), the
   bake's peak RSS (VmHWM of a child process) and the delta retention.
2. The same model as a GGUF Q8_0 base (ComfyUI-GGUF conventions) baked with the same LoRA: seconds and throughput
   (GB/s of base read, G parameters/s).

Sizes: ``--double``/``--single`` keep FLUX.1-dev's widths (H 3072, M 12288: every tensor has its full-size shape)
with fewer blocks; leave them out for the full 19/38-block model (needs ≈ 3 × 12 GB of disk for fp8, 3 × 12.7 GB
for GGUF). Values: a tiled random pool, so making the base costs little more than writing it.

    python benchmarks/bake_quantized.py --dir /tmp/qbench                      # full size
    python benchmarks/bake_quantized.py --dir /tmp/qbench --double 1 --single 2 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from lorakit.samples.quantized import write_comfy_fp8, write_gguf
from lorakit.samples.synthetic import base_tensors, full_flux_params, write_sdscripts_lora

POOL = 1_000_003


def tiled_values(seed: int = 0, std: float = 0.05):
    pool = torch.randn(POOL, generator=torch.Generator().manual_seed(seed)) * std

    def value(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        reps = -(-n // POOL)
        start = (hash(name) & 0xFFFF) % POOL
        flat = pool.roll(-start).repeat(reps)[:n] if reps > 1 else pool.roll(-start)[:n]
        return flat.reshape(shape).clone()
    return value


def sync() -> None:
    os.sync()


CHILD = r"""
import json, sys, time, lorakit
base, lora, out, device = sys.argv[1:5]
t = time.perf_counter()
r = lorakit.bake(base, [lora], out, device=device)
secs = time.perf_counter() - t
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": secs, "vmhwm": hwm, "retention": r.quantized["retention"],
                  "requantized": r.quantized["requantized"], "bytes_in": r.bytes_in}))
"""


def bake_child(base: Path, lora: Path, out: Path, device: str) -> dict[str, float]:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, str(base), str(lora), str(out), device], check=True,
                         capture_output=True, text=True)
    sync()
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    stats["wall"] = time.perf_counter() - t
    return stats


def cp(src: Path, dst: Path) -> float:
    t = time.perf_counter()
    shutil.copyfile(src, dst)
    sync()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--double", type=int, default=None, help="double blocks (default: FLUX.1-dev's 19)")
    ap.add_argument("--single", type=int, default=None, help="single blocks (default: FLUX.1-dev's 38)")
    ap.add_argument("--convention", default="scale_weight", choices=["scale_weight", "quant_metadata"])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-gguf", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the bases for another run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    params = full_flux_params()
    if args.double is not None:
        params["double"] = args.double
    if args.single is not None:
        params["single"] = args.single
    specs = [(t.name, t.shape) for t in base_tensors(params)]
    n_params = sum(torch.Size(s).numel() for _n, s in specs)
    lora = d / f"lora_r{args.rank}.safetensors"
    write_sdscripts_lora(lora, params, rank=args.rank, alpha=args.rank / 2, dtype=torch.bfloat16, clip=None)
    values = tiled_values()
    results: dict[str, object] = {"params": n_params, "double": params["double"], "single": params["single"],
                                  "rank": args.rank, "device": args.device, "cpus": os.cpu_count()}

    base = d / f"flux1-dev-fp8-{args.convention}-{params['double']}x{params['single']}.safetensors"
    if not base.exists():
        t = time.perf_counter()
        write_comfy_fp8(base, specs, values, convention=args.convention)
        results["fp8_make_seconds"] = time.perf_counter() - t
    sync()
    size = base.stat().st_size
    t_cp = cp(base, d / "copy.safetensors")
    (d / "copy.safetensors").unlink()
    fp8 = bake_child(base, lora, d / "baked.safetensors", args.device)
    (d / "baked.safetensors").unlink()
    results["fp8"] = {"bytes": size, "cp_seconds": t_cp, **fp8, "ratio_vs_cp": fp8["wall"] / t_cp}

    if not args.skip_gguf:
        gbase = d / f"flux1-dev-Q8_0-{params['double']}x{params['single']}.gguf"
        if not gbase.exists():
            t = time.perf_counter()
            write_gguf(gbase, specs, values, qtype="Q8_0")
            results["gguf_make_seconds"] = time.perf_counter() - t
        sync()
        g = bake_child(gbase, lora, d / "baked.gguf", args.device)
        (d / "baked.gguf").unlink()
        gsize = gbase.stat().st_size
        results["gguf_q8_0"] = {"bytes": gsize, **g, "GB_per_s": gsize / g["wall"] / 1e9,
                                "Gparams_per_s": n_params / g["wall"] / 1e9}
        if not args.keep:
            gbase.unlink()
    if not args.keep:
        base.unlink()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        f = results["fp8"]
        print(f"FLUX.1-dev {params['double']}/{params['single']} blocks ({n_params / 1e9:.2f} G params), rank-{args.rank}"
              f" LoRA, {args.device}:")
        print(f"  scaled fp8 {f['bytes'] / 1e9:.2f} GB: cp {f['cp_seconds']:.1f} s, bake {f['wall']:.1f} s "  # type: ignore[index]
              f"(×{f['ratio_vs_cp']:.2f}), peak RSS {f['vmhwm'] / 2**20:.0f} MiB, retention {f['retention']:.3f}")  # type: ignore[index]
        if "gguf_q8_0" in results:
            g = results["gguf_q8_0"]
            print(f"  GGUF Q8_0 {g['bytes'] / 1e9:.2f} GB: bake {g['wall']:.1f} s, {g['GB_per_s']:.3f} GB/s, "  # type: ignore[index]
                  f"{g['Gparams_per_s']:.3f} G params/s, peak RSS {g['vmhwm'] / 2**20:.0f} MiB")  # type: ignore[index]
    return 0


if __name__ == "__main__":
    sys.exit(main())
