"""Reports include what storing factors in a low-precision dtype costs (reviewer finding: extract/resize
printed a worst error of 0 for bf16 outputs)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from lorakit import resize
from lorakit.formats import read_lora
from lorakit.lora.model import dense_deltas
from lorakit.samples.synthetic import write_sdscripts_lora


def _optimal(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_resize_reports_bf16_rounding_measured_independently(tmp_path) -> None:
    src = write_sdscripts_lora(tmp_path / "in.safetensors", rank=8, alpha=8.0, dtype=torch.bfloat16, clip=None)
    out = tmp_path / "out.safetensors"
    rep = resize(src, out, rank=4)
    assert rep.worst_rounding is not None and rep.worst_rounding.rounding_error > 1e-4
    before, after = dense_deltas(read_lora(src)), dense_deltas(read_lora(str(out)))
    by_module = {m.target: m for m in rep.modules}
    for target, d in before.items():
        m = by_module[str(target)]
        best = _optimal(d, 4)
        measured = float((after[target].double() - best).norm() / best.norm())
        assert abs(measured - m.rounding_error) <= 0.05 * m.rounding_error + 1e-7, (target, measured, m.rounding_error)
    assert rep.to_json()["worst_rounding_error"]["rounding_error"] == rep.worst_rounding.rounding_error


def test_fp32_output_has_no_rounding(tmp_path) -> None:
    src = write_sdscripts_lora(tmp_path / "in.safetensors", rank=8, alpha=8.0, dtype=torch.bfloat16, clip=None)
    rep = resize(src, tmp_path / "out.safetensors", rank=4, dtype=torch.float32)
    assert rep.worst_rounding is None and all(m.rounding_error <= 1e-6 for m in rep.modules)
    assert all(t.dtype == torch.float32 for k, t in load_file(str(tmp_path / "out.safetensors")).items()
               if not k.endswith(".alpha"))
