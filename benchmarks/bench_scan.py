"""Benchmark ``lorakit scan`` in one run, on one generated library, against the floors it cannot beat:

1. header-only scanning (``--no-hashes``: container sniff, header, detection, kind/architecture/format, coverage)
   in files per second, vs ``stat`` of the same files (``os.stat`` in a loop; the floor for visiting a file);
2. hashing (SHA-256 + AutoV2/AutoV3, one pass per file) in MB/s, vs ``sha256sum`` of the same files (coreutils,
   one process over all of them).

The library is N small LoRAs (kohya FLUX.1, a few tensors each, real per-module sizes at rank R) plus a few large
files. The page cache is warm (both sides read the same cached bytes; a cold disk measures the disk).

    python benchmarks/bench_scan.py                    # 2000 rank-2 LoRAs (0.2 MB each) + 3 × 64 MB
    python benchmarks/bench_scan.py --files 20000 --big 4 --big-mb 256
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time


def write_raw(path: str, tensors: dict[str, tuple[tuple[int, ...], bytes]]) -> None:
    header, off = {}, 0
    for k, (shape, data) in tensors.items():
        header[k] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        for _, d in tensors.values():
            fh.write(d)


def build(root: str, n: int, rank: int, big: int, big_mb: int) -> list[str]:
    H, M = 3072, 12288            # FLUX.1-dev widths: the headers and sizes are those of real LoRAs
    paths = []
    for i in range(n):
        seed = i.to_bytes(4, "little")
        t = {}
        for stem, (o, inp) in ((f"lora_unet_double_blocks_{i % 19}_img_attn_proj", (H, H)),
                               (f"lora_unet_single_blocks_{i % 38}_linear2", (H, H + M))):
            t[f"{stem}.lora_down.weight"] = ((rank, inp), (seed * (rank * inp))[:rank * inp * 4])
            t[f"{stem}.lora_up.weight"] = ((o, rank), (seed * (rank * o))[:rank * o * 4])
            t[f"{stem}.alpha"] = ((), struct.pack("<f", rank))
        p = os.path.join(root, f"sub{i % 10}", f"lora{i:06d}.safetensors")
        os.makedirs(os.path.dirname(p), exist_ok=True)
        write_raw(p, t)
        paths.append(p)
    block = os.urandom(1 << 20)
    for j in range(big):
        rows = max(1, big_mb * (1 << 20) // 4 // 2 // 3072)      # a rank-`rows` module of 3072×3072
        data = (block * (big_mb // 2 + 1))[:rows * 3072 * 4]
        p = os.path.join(root, f"big{j}.safetensors")
        write_raw(p, {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": ((rows, 3072), data),
                      "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": ((3072, rows), data)})
        paths.append(p)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--big", type=int, default=3)
    ap.add_argument("--big-mb", type=int, default=64)
    ap.add_argument("--dir", default=None, help="where to build the library (default: a temporary folder)")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    import torch
    torch.set_num_threads(1)
    from lorakit.ops.scan import scan_file, scan_library
    root = args.dir or tempfile.mkdtemp(prefix="lorakit-scan-")
    try:
        t = time.perf_counter()
        paths = build(root, args.files, args.rank, args.big, args.big_mb)
        total = sum(os.path.getsize(p) for p in paths)
        print(f"library: {len(paths)} files, {total / 1e6:.1f} MB, built in {time.perf_counter() - t:.1f} s")
        scan_file(paths[0], hashes=False)                 # imports and caches out of the timing
        for p in paths:                                   # warm the page cache for both sides
            with open(p, "rb") as fh:
                while fh.read(1 << 24):
                    pass

        t = time.perf_counter()
        for p in paths:
            os.stat(p)
        t_stat = time.perf_counter() - t
        t, c = time.perf_counter(), time.process_time()
        rep = scan_library([root], hashes=False)
        t_head, c_head = time.perf_counter() - t, time.process_time() - c
        assert len(rep.records) == len(paths) and {r["kind"] for r in rep.records} == {"LoRA"}, rep.summary()
        print(f"header-only scan: {len(paths) / t_head:,.0f} files/s ({t_head:.2f} s wall, {c_head:.2f} s CPU: "
              f"{len(paths) / c_head:,.0f} files per CPU-second); "
              f"stat: {len(paths) / t_stat:,.0f} files/s ({t_stat * 1e3:.1f} ms); ratio {t_head / t_stat:.0f}×")

        t = time.perf_counter()
        rep = scan_library([root], hashes=True)
        t_hash_scan = time.perf_counter() - t
        from lorakit.io.hashes import file_digests
        t, c = time.perf_counter(), time.process_time()
        for p in paths:
            file_digests(p)
        t_hash, c_hash = time.perf_counter() - t, time.process_time() - c
        sha = shutil.which("sha256sum")
        t_sum = None
        if sha:
            t = time.perf_counter()
            for i in range(0, len(paths), 500):
                subprocess.run([sha, *paths[i:i + 500]], check=True, stdout=subprocess.DEVNULL)
            t_sum = time.perf_counter() - t
        print(f"hashing (SHA-256 + AutoV2/AutoV3): {total / t_hash / 1e6:,.0f} MB/s ({t_hash:.2f} s wall, "
              f"{c_hash:.2f} s CPU)"
              + (f"; sha256sum: {total / t_sum / 1e6:,.0f} MB/s ({t_sum:.2f} s); ratio {t_hash / t_sum:.2f}×"
                 if t_sum else "; sha256sum not found"))
        print(f"full scan with hashes: {len(paths) / t_hash_scan:,.0f} files/s, {total / t_hash_scan / 1e6:,.0f} MB/s "
              f"({t_hash_scan:.2f} s)")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
