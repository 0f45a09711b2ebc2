"""Demo steps for merge, doctor, bake, extract, resize and diff (run by :mod:`lorakit.samples.demo`)."""

from __future__ import annotations

import os

import torch

from lorakit import bake, diff, doctor, extract, merge, resize
from lorakit.ops.diffing import format_report as format_diff
from lorakit.formats import read_lora
from lorakit.lora.model import dense_deltas


def _step(text: str) -> None:
    print(f"\n== {text}")


def run_more(folder: str, ait: str, kohya: str, base: str) -> None:
    """The demo's merge, bake, extract, resize and diff steps on the sample files in ``folder``."""
    p = lambda name: os.path.join(folder, name)  # noqa: E731

    _step("lorakit merge aitoolkit_style:0.3 sdscripts_style:0.7 --method concat --to kohya --verify")
    r = merge([(ait, 0.3), (kohya, 0.7)], p("merged_concat.safetensors"), method="concat", to="kohya", verify=True)
    a, b, m = (dense_deltas(read_lora(x)) for x in (ait, kohya, p("merged_concat.safetensors")))
    worst = 0.0
    for t, got in m.items():
        zero = torch.zeros_like(got)    # a target only one input has
        want = 0.3 * a.get(t, zero) + 0.7 * b.get(t, zero)
        worst = max(worst, float((got - want).norm() / want.norm()))
    print(f"  {r.modules_out} modules; ΔW = 0.3·ΔA + 0.7·ΔB exactly: max relative error {worst:.2e}")

    _step("lorakit merge ... --method svd --rank 4 (exact top-4 of the weighted sum, from the factors)")
    r = merge([(ait, 0.3), (kohya, 0.7)], p("merged_svd_r4.safetensors"), method="svd", rank=4, to="kohya")
    print(f"  {r.modules_out} modules at rank 4")

    _step(f"lorakit doctor sdscripts_style --base {os.path.basename(base)}")
    d = doctor([kohya], base).loras[0]
    print(f"  verdict: {d.verdict} — {d.summary}")

    _step("lorakit bake tiny_flux_base merged_concat -o baked (streamed, fp32 accumulation, bf16 out)")
    br = bake(base, [(p("merged_concat.safetensors"), 1.0)], p("baked.safetensors"), progress=False)
    skipped = sum(int(x["modules"]) for x in br.not_applied)
    print(f"  {br.changed} of {br.tensors} tensors changed, {br.copied} copied untouched; "
          f"{skipped} text-encoder modules reported as not applied (no --clip-l given: the CLI exits 1)")

    _step("lorakit extract tiny_flux_base baked -o extracted --rank 32 (randomized SVD, seeded)")
    er = extract(base, p("baked.safetensors"), p("extracted.safetensors"), rank=32)
    worst_energy = min((mod.retained_energy for mod in er.modules), default=1.0)
    print(f"  {len(er.modules)} modules extracted; lowest retained energy {worst_energy:.4f} "
          "(bf16 rounding of the baked model is the only loss)")

    _step("lorakit resize merged_concat -o resized --dynamic sv_fro:0.99 --rank 16")
    rr = resize(p("merged_concat.safetensors"), p("resized.safetensors"), rank=16, dynamic="sv_fro:0.99")
    ranks_in = [m.rank_in for m in rr.modules]
    ranks_out = [m.rank_out for m in rr.modules]
    worst = min(rr.modules, key=lambda m: m.retained_energy)
    print(f"  {len(rr.modules)} modules, ranks {min(ranks_in)}–{max(ranks_in)} → {min(ranks_out)}–{max(ranks_out)}; "
          f"lowest retained energy {worst.retained_energy:.4f} ({worst.module}); strength kept (α rescaled)")

    _step("lorakit diff merged_concat extracted (cosine similarity of the deltas)")
    dr = diff(p("merged_concat.safetensors"), p("extracted.safetensors"))
    print(format_diff(dr, top=3))
