#!/usr/bin/env python
"""Benchmark ``lorakit bake`` against the I/O floor (``cp`` of the base), both followed by ``sync``.

Writes a synthetic FLUX.1-dev base (bf16, BFL layout; at --scale 1: 780 tensors, 23.8 GB) and a rank-32
sd-scripts LoRA on every block module into --dir, then measures in one run:
  * cp BASE COPY && sync          (the floor: read + write the same bytes)
  * lorakit bake BASE LORA -o OUT && sync   (subprocess; its peak RSS from wait4)
and prints seconds, GB/s, the ratio bake/cp and the peak RSS against the targets (≤ 1.3× cp, ≤ 2 GB).
--scale < 1 keeps the full tensor shapes but fewer blocks (for smoke runs). Big files are deleted at
the end unless --keep.

    python benchmarks/bench_bake.py --scale 0.08 --dir /tmp/bench   # ≈ 2 GB smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

from lorakit.dtypes import dtype_code
from lorakit.io import SafetensorsWriter
from lorakit.samples.synthetic import base_tensors, full_flux_params, write_sdscripts_lora


def scaled_params(scale: float) -> dict[str, int]:
    p = full_flux_params()
    p["double"] = max(1, round(p["double"] * scale))
    p["single"] = max(1, round(p["single"] * scale))
    return p


def write_base_fast(path: str, params: dict[str, int], dtype: torch.dtype = torch.bfloat16) -> int:
    """A base whose tensors are slices of one buffer tiled from a small random block (fast to make)."""
    specs = base_tensors(params)
    biggest = max(max(1, torch.Size(t.shape).numel()) for t in specs)
    block = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    buf = block.repeat((biggest + block.numel() - 1) // block.numel())
    entries = [(t.name, dtype_code(dtype), t.shape) for t in specs]
    with SafetensorsWriter(path, entries, {"format": "pt"}) as w:
        for t in specs:
            w.write(t.name, buf[: torch.Size(t.shape).numel()].view(t.shape))
    return os.path.getsize(path)


def sync() -> None:
    subprocess.run(["sync"], check=True)


def drop_caches() -> bool:
    try:
        sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """Seconds (command + sync), the child's peak RSS in bytes and its stdout."""
    sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed with exit code {proc.returncode}")
    sync()
    return time.perf_counter() - t0, usage.ru_maxrss * 1024, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the blocks (shapes stay full size)")
    ap.add_argument("--dir", default="bench_bake_work", help="work folder (needs ≈ 3× the base size free)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="alternate cp/bake this many times; medians reported")
    ap.add_argument("--drop-caches", action="store_true", help="drop the page cache before each timing (root)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args()

    os.makedirs(args.dir, exist_ok=True)
    base, lora = os.path.join(args.dir, "base.safetensors"), os.path.join(args.dir, "lora.safetensors")
    copy, out = os.path.join(args.dir, "copy.safetensors"), os.path.join(args.dir, "baked.safetensors")
    params = scaled_params(args.scale)
    try:
        t0 = time.perf_counter()
        size = write_base_fast(base, params)
        write_sdscripts_lora(lora, params, rank=args.rank, dtype=torch.bfloat16, clip=None)
        n = len(base_tensors(params))
        print(f"base: {n} tensors, {size / 1e9:.2f} GB bf16 ({params['double']}+{params['single']} blocks); "
              f"LoRA rank {args.rank}: {os.path.getsize(lora) / 1e6:.0f} MB; generated in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        bake_cmd = [sys.executable, "-m", "lorakit", "bake", base, lora, "-o", out, "--no-progress",
                    "--device", args.device, "--json"]
        cps, bakes, rss, inner, stages = [], [], [], [], []
        for i in range(args.repeat):
            for what in ("cp", "bake"):
                for f in (copy, out):
                    if os.path.exists(f):
                        os.unlink(f)
                if args.drop_caches and not drop_caches():
                    print("(cannot drop caches: not root)")
                if what == "cp":
                    s, _, _ = timed(["cp", base, copy])
                    cps.append(s)
                else:
                    s, peak, text = timed(bake_cmd)
                    bakes.append(s)
                    rss.append(peak)
                    inner.append(float(json.loads(text)["seconds"]))
                    stages.append(json.loads(text).get("stages", {}))
                print(f"  run {i + 1} {what:4s}: {s:7.2f} s  {size / s / 1e9:5.2f} GB/s"
                      + (f"  (in-process {inner[-1]:.2f} s)  peak RSS {rss[-1] / 2**30:.2f} GiB"
                         if what == "bake" else ""), flush=True)
        cp_s, bake_s, peak = statistics.median(cps), statistics.median(bakes), max(rss)
        ratio = bake_s / cp_s
        inner_s = statistics.median(inner)
        print(f"cp + sync   : {cp_s:7.2f} s  ({size / cp_s / 1e9:.2f} GB/s)  [floor]")
        print(f"bake + sync : {bake_s:7.2f} s  ({size / bake_s / 1e9:.2f} GB/s); inside bake(): {inner_s:.2f} s, "
              f"process start + imports + sync: {bake_s - inner_s:.2f} s")
        if stages and stages[0]:
            med = {k: statistics.median(st[k] for st in stages) for k in stages[0]}
            print("stages (median s; they overlap): " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
        print(f"ratio bake/cp = {ratio:.2f}  (target ≤ 1.30: {'ok' if ratio <= 1.3 else 'MISSED'}; "
              f"issue 14: ≤ 1.05: {'ok' if ratio <= 1.05 else 'MISSED'})")
        print(f"peak RSS    = {peak / 2**30:.2f} GiB  (target ≤ 2 GB: {'ok' if peak <= 2e9 else 'MISSED'})")
        if args.json:
            print(json.dumps({"bytes": size, "tensors": n, "cp_s": cp_s, "bake_s": bake_s, "ratio": ratio,
                              "peak_rss": peak, "cp_runs": cps, "bake_runs": bakes, "bake_inner_runs": inner,
                              "scale": args.scale}))
    finally:
        if not args.keep:
            for f in (base, lora, copy, out):
                if os.path.exists(f):
                    os.unlink(f)
            try:
                os.rmdir(args.dir)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
