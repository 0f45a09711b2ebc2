"""Bad inputs give a non-zero exit code, one stderr line naming the file and the problem, and no output."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from lorakit.cli import main
from lorakit.samples.synthetic import TINY_FLUX, write_base


def _good_lora(path) -> str:
    g = torch.Generator().manual_seed(0)
    t = {}
    for i in range(2):
        stem = f"lora_unet_double_blocks_{i}_img_attn_proj"
        t[stem + ".lora_down.weight"] = torch.randn(4, 32, generator=g)
        t[stem + ".lora_up.weight"] = torch.randn(32, 4, generator=g)
        t[stem + ".alpha"] = torch.tensor(4.0)
    save_file(t, str(path))
    return str(path)


def truncated(tmp_path) -> str:
    good = _good_lora(tmp_path / "good.safetensors")
    data = open(good, "rb").read()
    p = tmp_path / "truncated.safetensors"
    p.write_bytes(data[: len(data) - 100])
    return str(p)


def tiny_stub(tmp_path) -> str:
    p = tmp_path / "stub.safetensors"
    p.write_bytes(b"\x05\x00")
    return str(p)


def corrupt_header(tmp_path) -> str:
    body = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'   # unterminated JSON
    body += b" " * (-len(body) % 8)
    p = tmp_path / "corrupt.safetensors"
    p.write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 4)
    return str(p)


def header_too_long(tmp_path) -> str:
    body = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    p = tmp_path / "headerlen.safetensors"
    p.write_bytes((len(body) + 4096).to_bytes(8, "little") + body + b"\0" * 4)
    return str(p)


def base_model(tmp_path) -> str:
    return write_base(tmp_path / "base.safetensors", TINY_FLUX)


def sd3_lora(tmp_path) -> str:
    """An SD3-medium LoRA in diffusers naming: its joint blocks have FLUX.1's diffusers module names
    (``transformer_blocks.N.attn.to_q`` / ``add_q_proj``); only the 1,536-wide hidden size tells them apart."""
    t = {}
    for blk in range(2):
        for mod in ("attn.to_q", "attn.to_k", "attn.add_q_proj", "attn.to_out.0"):
            stem = f"transformer.transformer_blocks.{blk}.{mod}"
            t[stem + ".lora_A.weight"] = torch.zeros(4, 1536)
            t[stem + ".lora_B.weight"] = torch.zeros(1536, 4)
    p = tmp_path / "sd3.safetensors"
    save_file(t, str(p))
    return str(p)


def sd3_kohya_lora(tmp_path) -> str:
    """sd-scripts' SD3 naming (MMDiT joint blocks)."""
    t = {}
    for stem in ("lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_context_block_attn_qkv"):
        t[stem + ".lora_down.weight"] = torch.zeros(4, 1536)
        t[stem + ".lora_up.weight"] = torch.zeros(3 * 1536, 4)
    p = tmp_path / "sd3-kohya.safetensors"
    save_file(t, str(p))
    return str(p)


def unknown_keys(tmp_path) -> str:
    t = {"my_model.encoder.lin.lora_down.weight": torch.zeros(4, 8),
         "my_model.encoder.lin.lora_up.weight": torch.zeros(8, 4),
         "something_else.weight": torch.zeros(3)}
    p = tmp_path / "unknown.safetensors"
    save_file(t, str(p))
    return str(p)


BAD = {
    "truncated": (truncated, ("truncated", "run past")),
    "stub": (tiny_stub, ("too short",)),
    "corrupt_header": (corrupt_header, ("not valid JSON",)),
    "header_too_long": (header_too_long, ("header length",)),
    "base_model": (base_model, ("not a LoRA", "base model")),
    "sd3": (sd3_lora, ("SD3",)),
    "sd3_kohya": (sd3_kohya_lora, ("SD3",)),
    "unknown_keys": (unknown_keys, ("not understood",)),
}


def _check_one_line(capsys, path: str, words: tuple[str, ...]) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert "Traceback" not in err and "internal error" not in line
    assert path in line
    assert any(w.lower() in line.lower() for w in words), line
    return line


@pytest.mark.parametrize("case", list(BAD))
def test_inspect_bad_input(case: str, tmp_path, capsys) -> None:
    make, words = BAD[case]
    path = make(tmp_path)
    capsys.readouterr()
    rc = main(["inspect", path])
    assert rc != 0
    _check_one_line(capsys, path, words)


@pytest.mark.parametrize("case", list(BAD))
def test_convert_bad_input(case: str, tmp_path, capsys) -> None:
    make, words = BAD[case]
    path = make(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "x.safetensors"
    capsys.readouterr()
    rc = main(["convert", path, "-o", str(out), "--to", "diffusers"])
    assert rc != 0
    _check_one_line(capsys, path, words)
    assert os.listdir(out_dir) == []      # no output, no temporary file left behind


def test_missing_file(tmp_path, capsys) -> None:
    path = str(tmp_path / "nope.safetensors")
    assert main(["inspect", path]) != 0
    _check_one_line(capsys, path, ("not found",))


def test_pickle_refused_one_line(tmp_path, capsys) -> None:
    path = str(tmp_path / "lora.ckpt")
    torch.save({"a": torch.zeros(2)}, path)
    assert main(["convert", path, "-o", str(tmp_path / "o.safetensors"), "--to", "kohya"]) == 2
    _check_one_line(capsys, path, ("pickle",))
    assert not (tmp_path / "o.safetensors").exists()
