"""Writing never produces non-finite factors: folding a large scale into fp16, or casting a merge result to
fp16, that overflows is a typed error (exit 2, no file), not an inf-filled LoRA."""

from __future__ import annotations

import math

import torch
from safetensors.torch import load_file, save_file

from lorakit.cli import main
from lorakit.lora.linalg import gram_fro_norm
from lorakit.samples.synthetic import write_sdscripts_lora


def _huge_alpha_fp16(tmp_path) -> str:
    src = write_sdscripts_lora(tmp_path / "k.safetensors", rank=4, alpha=2.0, clip=None)
    t = {k: (torch.tensor(4 * 2.0 ** 21) if k.endswith(".alpha") else v.half()) for k, v in load_file(src).items()}
    path = str(tmp_path / "huge.safetensors")
    save_file(t, path)
    return path


def test_fold_overflow_is_refused(tmp_path, capsys) -> None:
    src = _huge_alpha_fp16(tmp_path)
    for argv in (["convert", src, "-o", str(tmp_path / "c.safetensors"), "--to", "diffusers"],
                 ["convert", src, "-o", str(tmp_path / "c.safetensors"), "--to", "diffusers", "--allow-lossy"],
                 ["merge", src, "-o", str(tmp_path / "m.safetensors"), "--to", "diffusers"],
                 ["merge", src, "-o", str(tmp_path / "m.safetensors"), "--to", "kohya"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("overflows" in err[0] or "range" in err[0]) and "Traceback" not in err[0]
    assert not (tmp_path / "c.safetensors").exists() and not (tmp_path / "m.safetensors").exists()


def test_fp32_or_kohya_alpha_keep_it_finite(tmp_path) -> None:
    src = _huge_alpha_fp16(tmp_path)
    for argv, out in ((["convert", src, "--to", "diffusers", "--dtype", "fp32"], "d.safetensors"),
                      (["convert", src, "--to", "kohya"], "k.safetensors"),     # alpha stays separate
                      (["merge", src, "--to", "kohya", "--dtype", "fp32"], "m.safetensors")):
        assert main([argv[0], argv[1], "-o", str(tmp_path / out), *argv[2:]]) == 0, argv
        assert all(bool(torch.isfinite(v.float()).all()) for v in load_file(str(tmp_path / out)).values())


def test_gram_norm_of_overflowed_factors_is_infinite() -> None:
    up = torch.tensor([[float("inf")], [1.0]], dtype=torch.float64)
    down = torch.ones(1, 3, dtype=torch.float64)
    assert math.isinf(gram_fro_norm(up, down))
    assert gram_fro_norm(torch.ones(2, 1), torch.ones(1, 3)) == math.sqrt(6)
