#!/usr/bin/env python
"""Benchmark ``lorakit.bake`` on a full-size SDXL base 1.0 single-file checkpoint against ``cp``.

Writes, into --dir:
  * base.safetensors: fp16, exactly the keys and shapes of the real ``sd_xl_base_1.0.safetensors``
    (reference/shapes/sdxl-single-file-sgm.json: 2514 parameters + the int64 ``position_ids`` buffer,
    ≈ 6.9 GB), streamed tensor by tensor with a tiled random fill (kept with --keep when the size is right);
  * lora.safetensors: a rank-32 (alpha 16) kohya LoRA on what sd-scripts trains on SDXL by default, the
    module list derived from lorakit's SDXL layout: every Linear of the UNet's transformers (attn1/attn2
    to_q/k/v/out.0, ff.net.0.proj, ff.net.2, proj_in, proj_out; SGM names under ``lora_unet_``) and both text
    encoders' self_attn q/k/v/out_proj and mlp fc1/fc2 (HF names under ``lora_te1_`` / ``lora_te2_``).

Then measures in one run, each timing followed by ``sync``: ``cp BASE COPY`` (the I/O floor) and
``lorakit.bake(BASE, [LORA], OUT)`` in a child process (its peak RSS: VmHWM read in the child, and ru_maxrss
from wait4). "cold" runs evict the base from the page cache first (drop_caches when allowed, otherwise
posix_fadvise DONTNEED on the file, which needs no privilege); "warm" runs read it into the cache first.

    python benchmarks/bake_sdxl.py --dir /tmp/sdxl-bench --keep
    python benchmarks/bake_sdxl.py --dir /tmp/sdxl-bench --keep --device cuda --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorakit.dtypes import dtype_code
from lorakit.io import SafetensorsWriter, save_tensors
from lorakit.layouts import ArchSpec, evaluate, expand, resolve

SHAPES = Path("/work/shared/reference/shapes/sdxl-single-file-sgm.json")
BUFFER_DTYPES = {"position_ids": torch.int64}   # by the buffer name's last part; others: the base dtype
POOL = 1_000_003                                # prime: tiled tensors do not repeat with a short period

# What sd-scripts' networks/lora.py trains on SDXL without conv_dim: every Linear / 1×1 conv inside the UNet's
# Transformer2DModel and the text encoders' CLIPAttention / CLIPMLP. Matched against the names the kohya
# rule of each component writes (SGM names for the UNet, HF names for both text encoders).
TARGETS: dict[str, re.Pattern[str]] = {
    "unet": re.compile(r"(\.transformer_blocks\.\d+\.(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))"
                       r"|\.proj_(in|out))$"),
    "clip_l": re.compile(r"\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"),
    "clip_g": re.compile(r"\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"),
}
# sd-scripts' own counts ("create LoRA for U-Net: 722 modules", TE1 72, TE2 192).
EXPECTED_MODULES = {"unet": 722, "clip_l": 72, "clip_g": 192}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def base_entries(shapes: dict[str, dict[str, list[int]]], dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor of the reference checkpoint, parameters then buffers."""
    out = [(n, dtype, tuple(s)) for n, s in shapes["params"].items()]
    for n, s in shapes.get("buffers", {}).items():
        out.append((n, BUFFER_DTYPES.get(n.rsplit(".", 1)[-1], dtype), tuple(s)))
    return out


def write_base(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], seed: int = 0) -> None:
    """Stream the checkpoint: float tensors are slices (at a per-tensor offset) of a tiled random pool."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL, generator=gen) * 0.02
    biggest = max(torch.Size(s).numel() for _, _, s in entries)
    cache: dict[torch.dtype, torch.Tensor] = {}
    with SafetensorsWriter(os.fspath(path), [(n, dtype_code(d), s) for n, d, s in entries], {"format": "pt"}) as w:
        for i, (name, dt, shape) in enumerate(entries):
            n = torch.Size(shape).numel()
            if dt.is_floating_point:
                if dt not in cache:
                    cache[dt] = pool.to(dt).repeat((biggest + 2 * POOL) // POOL)
                off = (i * 7919) % POOL
                value = cache[dt][off:off + n].view(shape)
            else:
                value = torch.arange(n, dtype=dt).view(shape)
            w.write(name, value)


def lora_modules(arch: ArchSpec) -> Iterator[tuple[str, str, int, int]]:
    """(component, kohya key stem, out, in) of every default sd-scripts module, from the layout data."""
    for comp_name, pattern in TARGETS.items():
        comp = arch.components[comp_name]
        rule = arch.write_rule("kohya", comp_name)
        assert rule is not None, f"no kohya rule for {comp_name}"
        params = {**comp.presets[0].params, **comp.fixed}
        naming = rule.namings[0]
        for m in expand(comp, params):
            if any(k != 1 for k in m.kernel):
                continue
            for alias in m.spec.names(naming):
                name = alias.template.format(i=m.index) if m.index is not None else alias.template
                if not pattern.search(name):
                    continue
                rows = m.out if alias.rows is None else evaluate(alias.rows[1], params)
                stem = rule.prefix + name.replace(".", "_") if rule.flat else rule.prefix + name
                yield comp_name, stem, rows, m.inp


def module_counts(arch: ArchSpec) -> dict[str, int]:
    counts: dict[str, int] = {}
    for comp, *_ in lora_modules(arch):
        counts[comp] = counts.get(comp, 0) + 1
    return counts


def _header(path: Path) -> dict[str, dict[str, object]]:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(n))


def _metadata(path: Path) -> str:
    """The JSON ``__metadata__`` of a safetensors file (``{}`` if none)."""
    return json.dumps(_header(path).get("__metadata__", {}))


def matches(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> bool:
    """The file holds exactly these tensor names, dtypes and shapes."""
    head = _header(path)
    head.pop("__metadata__", None)
    want = {n: (dtype_code(d), list(s)) for n, d, s in entries}
    return {n: (h["dtype"], h["shape"]) for n, h in head.items()} == want


def write_lora(path: Path, arch: ArchSpec, rank: int, alpha: float, seed: int = 1) -> dict[str, int]:
    """A kohya LoRA (fp16) with nonzero random factors; returns the module count per component."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for comp, stem, out, inp in lora_modules(arch):
        tensors[f"{stem}.lora_down.weight"] = (torch.randn(rank, inp, generator=gen) / inp ** 0.5).half()
        tensors[f"{stem}.lora_up.weight"] = (torch.randn(out, rank, generator=gen) * 0.01).half()
        tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
        counts[comp] = counts.get(comp, 0) + 1
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": "sdxl_base_v1-0", "ss_output_name": "bake_sdxl_synthetic"}
    save_tensors(os.fspath(path), tensors, meta)
    return counts


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

CHILD = """
import json, sys, time, lorakit
t0 = time.perf_counter()
r = lorakit.bake(sys.argv[1], [sys.argv[2]], sys.argv[3], device=sys.argv[4])
s = time.perf_counter() - t0
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": s, "vmhwm": hwm, "changed": r.changed, "copied": r.copied, "tensors": r.tensors,
                  "not_applied": len(r.not_applied), "skipped": len(r.skipped)}))
"""


@dataclass
class Run:
    """One timed command: ``cp`` or ``bake`` (``child``: what the bake process reported), cold or warm."""

    what: str
    mode: str
    prepared: str                     # how the page cache was set: drop_caches / fadvise / read
    cached_before: float | None = None
    seconds: float = 0.0
    ru_maxrss: int = 0
    child: dict[str, float] = field(default_factory=dict)

    def line(self, size: int) -> str:
        cached = "?" if self.cached_before is None else f"{self.cached_before:.0%}"
        text = (f"  {self.mode:4s} {self.what:4s}: {self.seconds:7.2f} s  {size / self.seconds / 1e9:5.2f} GB/s"
                f"  (cache before: {cached}, {self.prepared})")
        if self.child:
            c = self.child
            text += (f"  in bake(): {c['seconds']:.2f} s; peak RSS VmHWM {c['vmhwm'] / 2**20:.0f} MB (ru_maxrss "
                     f"{self.ru_maxrss / 2**20:.0f} MB); changed {c['changed']:.0f}, copied {c['copied']:.0f}, "
                     f"not applied {c['not_applied']:.0f}")
        return text


def sync() -> None:
    subprocess.run(["sync"], check=True)


def evict(path: Path) -> str:
    """Drop ``path`` from the page cache: drop_caches when writable, else fadvise DONTNEED (clean pages)."""
    sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return "drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return "fadvise"


def cached_fraction(path: Path) -> float | None:
    """Fraction of the file's bytes in the page cache (util-linux ``fincore``), None if unavailable."""
    try:
        res = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", str(path)],
                             capture_output=True, text=True, check=True)
        res_b, size_b = (int(x) for x in res.stdout.split())
        return res_b / size_b if size_b else None
    except (OSError, subprocess.CalledProcessError, ValueError):
        return None


def warm(path: Path) -> str:
    """Read ``path`` once so that it is in the page cache."""
    buf = bytearray(1 << 26)
    with open(path, "rb") as fh:
        while fh.readinto(buf):
            pass
    return "read"


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """Seconds (command + sync), the child's peak RSS (ru_maxrss, bytes) and its stdout."""
    sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"{cmd[:3]} failed with exit code {code}")
    sync()
    return time.perf_counter() - t0, usage.ru_maxrss * 1024, out


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/sdxl-bench", help="work folder (needs ≈ 3 × 6.9 GB free)")
    ap.add_argument("--shapes", default=str(SHAPES), help="reference key/shape list of the SDXL single file")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="cold,warm", help="comma list of cold / warm; each runs cp then bake")
    ap.add_argument("--repeat", type=int, default=2, help="cp + bake runs per mode; medians reported")
    ap.add_argument("--keep", action="store_true", help="keep base and LoRA (reused next time if the size fits)")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args()

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    base, lora = work / "base.safetensors", work / "lora.safetensors"
    copy, out = work / "copy.safetensors", work / "baked.safetensors"
    arch = resolve("sdxl")
    shapes = json.loads(Path(args.shapes).read_text())
    entries = base_entries(shapes, torch.float16)
    data_bytes = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, d, s in entries)
    try:
        t0 = time.perf_counter()
        reused = args.keep and base.exists() and data_bytes < base.stat().st_size < data_bytes + (1 << 20)
        if not reused:
            write_base(base, entries)
        if not matches(base, entries) or base.stat().st_size <= data_bytes:
            raise SystemExit(f"{base} does not hold the reference keys, dtypes and shapes (delete it)")
        t_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        wanted = {"ss_network_dim": str(args.rank), "ss_network_alpha": str(args.alpha)}
        lora_reused = args.keep and lora.exists() and wanted.items() <= json.loads(_metadata(lora)).items()
        counts = module_counts(arch) if lora_reused else write_lora(lora, arch, args.rank, args.alpha)
        t_lora = time.perf_counter() - t0
        if counts != EXPECTED_MODULES:
            print(f"warning: module counts {counts} differ from sd-scripts' {EXPECTED_MODULES}", file=sys.stderr)
        size = base.stat().st_size
        print(f"base: {len(entries)} tensors, {size / 1e9:.3f} GB fp16 "
              f"({'reused' if reused else f'written in {t_base:.1f} s'}); LoRA rank {args.rank} alpha "
              f"{args.alpha:g}: {sum(counts.values())} modules {counts}, {lora.stat().st_size / 1e6:.1f} MB "
              f"({'reused' if lora_reused else f'written in {t_lora:.1f} s'})", flush=True)

        bake_cmd = [sys.executable, "-c", CHILD, str(base), str(lora), str(out), args.device]
        runs: list[Run] = []
        for mode in [m for _ in range(args.repeat) for m in args.modes.split(",")]:
            for what in ("cp", "bake"):
                for f in (copy, out):
                    f.unlink(missing_ok=True)
                run = Run(what, mode, prepared=evict(base) if mode == "cold" else warm(base))
                run.cached_before = cached_fraction(base)
                if what == "cp":
                    run.seconds, _, _ = timed(["cp", str(base), str(copy)])
                else:
                    run.seconds, run.ru_maxrss, text = timed(bake_cmd)
                    run.child = json.loads(text.strip().splitlines()[-1])
                runs.append(run)
                print(run.line(size), flush=True)

        summary: dict[str, object] = {"bytes": size, "tensors": len(entries), "lora_modules": counts,
                                      "device": args.device, "runs": [asdict(r) for r in runs]}
        print(f"size        : base {size / 1e9:.3f} GB, output {out.stat().st_size / 1e9:.3f} GB")
        for mode in args.modes.split(","):
            cp_s = statistics.median(r.seconds for r in runs if r.mode == mode and r.what == "cp")
            b = [r for r in runs if r.mode == mode and r.what == "bake"]
            bake_s = statistics.median(r.seconds for r in b)
            inner_s = statistics.median(float(r.child["seconds"]) for r in b)
            ratio = bake_s / cp_s
            rss = max(int(r.child["vmhwm"]) for r in b)
            print(f"{mode:4s}: cp+sync {cp_s:6.2f} s ({size / cp_s / 1e9:.2f} GB/s) | bake+sync {bake_s:6.2f} s "
                  f"({size / bake_s / 1e9:.2f} GB/s) | ratio bake/cp {ratio:.2f} (target ≤ 1.10: "
                  f"{'ok' if ratio <= 1.1 else 'MISSED'}) | inside bake() {inner_s:.2f} s | peak RSS "
                  f"{rss / 2**20:.0f} MB")
            summary[mode] = {"cp_s": cp_s, "bake_s": bake_s, "bake_inner_s": inner_s, "ratio": ratio,
                             "peak_rss": rss}
        if args.json:
            print(json.dumps(summary))
    finally:
        for f in (copy, out) if args.keep else (base, lora, copy, out):
            f.unlink(missing_ok=True)
        if not args.keep:
            try:
                work.rmdir()
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
