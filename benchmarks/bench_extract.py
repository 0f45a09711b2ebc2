"""Benchmark ``lorakit extract`` at rank 64 on synthetic FLUX.1-dev-width models.

Full-size models are 2 × 24 GB, so by default the models are full width with reduced depth
(``--blocks D,S`` double/single blocks, default 1,2) and the time is extrapolated per layer to the
19/38 blocks of FLUX.1-dev (counts taken from the layout preset). ``--scale F`` also divides the widths
by F for smoke runs. Models are generated fast: the base is a tiled random pool (no randn of billions
of elements), the tuned model adds a rank-32 delta plus tiled noise, computed per tensor while streaming
through SafetensorsWriter.

In the same run, a sample of layers is decomposed again with the exact thin SVD (the floor lorakit's
randomized SVD is compared against): seconds per layer, ratio and relative errors are printed.
The extraction itself runs in a child process so that its peak RSS is measured alone.

    python benchmarks/bench_extract.py                     # full width, 1+2 blocks
    python benchmarks/bench_extract.py --scale 8           # smoke run
    python benchmarks/bench_extract.py --blocks 19,38      # the real thing (48 GB of disk)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from lorakit.dtypes import dtype_code
from lorakit.io import SafetensorsWriter
from lorakit.layouts import FLUX1, expand
from lorakit.samples.synthetic import base_tensors, full_flux_params

POOL = 4_000_037   # prime length: tiled rows do not repeat with a short period


def model_params(blocks: tuple[int, int], scale: int) -> dict[str, int]:
    p = full_flux_params()
    p["double"], p["single"] = blocks
    if scale > 1:
        for k in ("H", "M", "CTX", "VEC", "T"):
            p[k] = max(8, p[k] // scale)
    return p


def _tiled(pool: torch.Tensor, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    reps = (n + offset) // pool.numel() + 1
    return pool.repeat(reps)[offset:offset + n].reshape(shape)


def write_pair(folder: str, params: dict[str, int], dtype: torch.dtype, true_rank: int = 32,
               seed: int = 0) -> tuple[str, str]:
    """A base and a tuned model (BFL layout) written tensor by tensor."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL, generator=gen) * 0.05
    noise = torch.randn(POOL, generator=gen) * 1e-4
    specs = base_tensors(params, "bfl")
    entries = [(t.name, dtype_code(dtype), t.shape) for t in specs]
    paths = os.path.join(folder, "base.safetensors"), os.path.join(folder, "tuned.safetensors")
    with SafetensorsWriter(paths[0], entries, {"format": "pt"}) as wb, \
            SafetensorsWriter(paths[1], entries, {"format": "pt"}) as wt:
        for i, t in enumerate(specs):
            base = _tiled(pool, t.shape, (i * 7919) % POOL)
            tuned = base.clone()
            if len(t.shape) == 2:
                out, inp = t.shape
                r = min(true_rank, out, inp)
                b = torch.randn(out, r, generator=gen) * (0.5 / r ** 0.5)
                a = torch.randn(r, inp, generator=gen) * (0.02 / inp ** 0.5)
                tuned += b @ a
                tuned += _tiled(noise, t.shape, (i * 104729) % POOL)
            else:
                tuned += 1e-3
            wb.write(t.name, base.to(dtype))
            wt.write(t.name, tuned.to(dtype))
            del base, tuned
    return paths


def lora_numel(params: dict[str, int], rank: int) -> int:
    return sum(min(rank, m.out, m.inp) * (m.out + m.inp) for m in expand(FLUX1.components["transformer"], params))


def run_child(args: argparse.Namespace, base: str, tuned: str, out: str) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--phase", "extract", "--rank", str(args.rank), base, tuned, out]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"extraction failed (exit {proc.returncode})")
    report = json.loads(proc.stdout)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    report["peak_rss_bytes"] = usage.ru_maxrss * 1024
    report["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    return report


def child(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--phase")
    p.add_argument("--rank", type=int)
    p.add_argument("paths", nargs=3)
    a = p.parse_args(argv)
    from lorakit.ops.extraction import extract
    t0 = time.perf_counter()
    r = extract(*a.paths, rank=a.rank)
    out = r.to_json()
    out["wall_seconds"] = time.perf_counter() - t0
    json.dump(out, sys.stdout, default=str)


def extrapolate(report: dict[str, object], measured: dict[str, int], full: dict[str, int],
                rank: int) -> dict[str, float]:
    per_template: dict[str, list[float]] = {}
    module_total = 0.0
    for m in report["modules"]:  # type: ignore[union-attr]
        name = m["module"]  # type: ignore[index]
        module_total += m["seconds"]  # type: ignore[index]
        per_template.setdefault(re.sub(r"\.\d+\.", ".{i}.", name), []).append(m["seconds"])  # type: ignore[index]
    full_modules = 0.0
    for tmpl, secs in per_template.items():
        mean = sum(secs) / len(secs)
        if "{i}" in tmpl:
            count = full["double"] if tmpl.startswith("double_blocks") else full["single"]
        else:
            count = 1
        full_modules += mean * count
    wall = float(report["wall_seconds"])  # type: ignore[arg-type]
    overhead = max(0.0, wall - module_total)
    size_ratio = lora_numel(full, rank) / max(1, lora_numel(measured, rank))
    return {"module_seconds": module_total, "overhead_seconds": overhead,
            "full_seconds": full_modules + overhead * size_ratio, "lora_size_ratio": size_ratio}


def exact_sample(base: str, tuned: str, rank: int, names: list[str]) -> list[dict[str, object]]:
    from lorakit.base.checkpoint import open_base
    from lorakit.ops.extraction import decompose
    from lorakit.ops.extraction.pairing import assemble
    from lorakit.io import open_weights
    rows = []
    with open_weights(base) as fo, open_weights(tuned) as ft:
        bo, bt = open_base(fo), open_base(ft)
        om, tm = bo.by_module(), bt.by_module()
        for name in names:
            shape = bt.native_shape(name)
            d = assemble(bt, [s for s in tm[name] if s.param == "weight"], shape)
            d -= assemble(bo, [s for s in om[name] if s.param == "weight"], shape)
            t0 = time.perf_counter()
            fast = decompose(d, rank)
            t1 = time.perf_counter()
            best = decompose(d, rank, exact=True)
            t2 = time.perf_counter()
            rows.append({"module": name, "shape": list(shape), "randomized_s": t1 - t0, "exact_s": t2 - t1,
                         "randomized_error": fast.relative_error, "exact_error": best.relative_error})
            del d
    return rows


def main() -> None:
    if "--phase" in sys.argv:
        child(sys.argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="1,2", help="double,single block counts of the generated models")
    ap.add_argument("--scale", type=int, default=1, help="divide the widths by this factor (smoke runs)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--sample", default="double_blocks.0.img_attn.qkv,single_blocks.0.linear1,single_blocks.0.linear2",
                    help="modules decomposed again with the exact SVD")
    ap.add_argument("--dir", default=None, help="folder for the generated models (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--reuse", action="store_true", help="reuse models already in --dir (same --blocks/--scale)")
    args = ap.parse_args()
    d, s = (int(x) for x in args.blocks.split(","))
    params = model_params((d, s), args.scale)
    preset = FLUX1.components["transformer"].presets[0].params
    full = dict(params, double=preset["double"], single=preset["single"])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    folder = args.dir or tempfile.mkdtemp(prefix="lorakit-bench-extract-")
    os.makedirs(folder, exist_ok=True)
    try:
        t0 = time.perf_counter()
        base, tuned = os.path.join(folder, "base.safetensors"), os.path.join(folder, "tuned.safetensors")
        if not (args.reuse and os.path.exists(base) and os.path.exists(tuned)):
            base, tuned = write_pair(folder, params, dtype)
        gen_s = time.perf_counter() - t0
        size = os.path.getsize(base)
        print(f"generated 2 models of {size / 1e9:.2f} GB ({d} double + {s} single blocks, H={params['H']}, "
              f"{args.dtype}) in {gen_s:.1f} s")
        report = run_child(args, base, tuned, os.path.join(folder, "lora.safetensors"))
        ex = extrapolate(report, params, full, args.rank)
        rss = float(report["peak_rss_bytes"])  # type: ignore[arg-type]
        lora_bytes = float(report["output_bytes"])  # type: ignore[arg-type]
        rss_full = rss + 2 * lora_bytes * (ex["lora_size_ratio"] - 1)
        mods = report["modules"]  # type: ignore[assignment]
        print(f"extract rank {args.rank}: {len(mods)} modules in {report['wall_seconds']:.1f} s "
              f"(modules {ex['module_seconds']:.1f} s, open/emit/save {ex['overhead_seconds']:.1f} s; "
              f"{report['cpu_seconds']:.1f} CPU s incl. start-up), {torch.get_num_threads()} threads, load average "
              f"{os.getloadavg()[0]:.1f}; output {lora_bytes / 1e6:.1f} MB")
        print(f"extrapolated to {full['double']}+{full['single']} blocks: {ex['full_seconds']:.1f} s "
              f"(target 180 s); peak RSS {rss / 1e9:.2f} GB measured, ≈{rss_full / 1e9:.2f} GB extrapolated "
              f"(target 3 GB)")
        worst = max(mods, key=lambda m: m["relative_error"])  # type: ignore[index]
        print(f"mean retained energy {report['mean_retained_energy']:.6f}, worst relative error "
              f"{worst['relative_error']:.4e} ({worst['module']})")
        sample = [n for n in args.sample.split(",") if n]
        rows = exact_sample(base, tuned, args.rank, sample)
        r_tot = sum(r["randomized_s"] for r in rows)  # type: ignore[misc]
        e_tot = sum(r["exact_s"] for r in rows)  # type: ignore[misc]
        for r in rows:
            print(f"  {r['module']:<34} {str(r['shape']):<14} randomized {r['randomized_s']:.3f} s, exact "
                  f"{r['exact_s']:.3f} s (×{r['exact_s'] / max(r['randomized_s'], 1e-9):.1f}); error "
                  f"{r['randomized_error']:.6f} vs optimal {r['exact_error']:.6f} "
                  f"(+{100 * (r['randomized_error'] / max(r['exact_error'], 1e-30) - 1):.3f}%)")
        ratio = e_tot / max(r_tot, 1e-9)
        full_modules = ex["full_seconds"] - ex["overhead_seconds"] * ex["lora_size_ratio"]
        print(f"exact/randomized time ratio on the sample: {ratio:.1f} (an exact-SVD extraction of "
              f"{full['double']}+{full['single']} blocks: roughly {full_modules * ratio / 60:.0f} min)")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
