"""sd-scripts spellings users already type: --models/--ratios, --new_rank, --save_to, --save_precision."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.samples.synthetic import write_aitoolkit_lora, write_sdscripts_lora


def test_merge_models_ratios_equal_positional_weights(tmp_path) -> None:
    a = write_aitoolkit_lora(tmp_path / "a.safetensors", rank=4, seed=1)
    b = write_sdscripts_lora(tmp_path / "b.safetensors", rank=8, alpha=4.0, seed=2, clip=None)
    pos, ali = tmp_path / "pos.safetensors", tmp_path / "alias.safetensors"
    assert main(["merge", f"{a}:0.3", f"{b}:0.7", "-o", str(pos), "--method", "svd", "--rank", "6"]) == 0
    assert main(["merge", "--models", a, b, "--ratios", "0.3", "0.7", "--save_to", str(ali), "--method", "svd",
                 "--new_rank", "6", "--save_precision", "float"]) == 0
    x, y = load_file(str(pos)), load_file(str(ali))
    assert x.keys() == y.keys()
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_ratios_must_match_models(tmp_path, capsys) -> None:
    a = write_aitoolkit_lora(tmp_path / "a.safetensors", rank=4, seed=1)
    out = tmp_path / "out.safetensors"
    assert main(["merge", "--models", a, "--ratios", "0.3", "0.7", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 --models but 2 --ratios" in err[0] and not out.exists()
    assert main(["merge", a, "--ratios", "0.5", "-o", str(out)]) == 2
    assert "--ratios needs --models" in capsys.readouterr().err and not out.exists()
