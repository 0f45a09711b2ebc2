"""Determinism: every writing command run twice on the same inputs gives byte-identical outputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lorakit.cli import main
from lorakit.samples.synthetic import write_aitoolkit_lora, write_base, write_sdscripts_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("det_inputs")
    return {"kohya": write_sdscripts_lora(d / "kohya.safetensors"),
            "ait": write_aitoolkit_lora(d / "ait.safetensors"),
            "base": write_base(d / "base.safetensors"),
            "tuned": write_base(d / "tuned.safetensors", seed=9)}


CASES = {
    "convert-kohya": ("convert", lambda i, o: ["convert", i["ait"], "-o", o, "--to", "kohya"]),
    "convert-diffusers": ("convert", lambda i, o: ["convert", i["kohya"], "-o", o, "--to", "diffusers",
                                                   "--dtype", "bf16"]),
    "convert-comfy": ("convert", lambda i, o: ["convert", i["kohya"], "-o", o, "--to", "comfy"]),
    "meta": ("meta", lambda i, o: ["meta", i["kohya"], "--set", "modelspec.title=x", "--set", "ss_note=y", "-o", o]),
    "merge": ("merge", lambda i, o: ["merge", i["kohya"] + ":0.5", i["ait"] + ":0.7", "-o", o]),
    "resize": ("resize", lambda i, o: ["resize", i["kohya"], "-o", o, "--rank", "2"]),
    "extract": ("extract", lambda i, o: ["extract", i["base"], i["tuned"], "-o", o, "--rank", "4", "--include-bias",
                                         "--include-norms", "--to", "comfy"]),   # every difference written: exit 0
    "bake": ("bake", lambda i, o: ["bake", i["base"], i["ait"] + ":0.8", "-o", o]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_twice_byte_identical(case: str, inputs, tmp_path, capsys) -> None:
    cmd, argv_of = CASES[case]
    out = str(tmp_path / "out.safetensors")
    outputs = []
    for _ in range(2):
        rc = main(argv_of(inputs, out))
        assert rc == 0, capsys.readouterr().err
        with open(out, "rb") as fh:
            outputs.append(fh.read())
        os.unlink(out)
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) > 8


def test_convert_identical_across_processes(inputs, tmp_path) -> None:
    """A separate interpreter (another hash seed, fresh allocator) writes the same bytes as this one."""
    out = str(tmp_path / "o.safetensors")
    argv = ["convert", inputs["ait"], "-o", out, "--to", "kohya"]
    assert main(argv) == 0
    here = open(out, "rb").read()
    os.unlink(out)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.path.join(ROOT, "src")}
    subprocess.run([sys.executable, "-m", "lorakit", *argv], check=True, env=env, capture_output=True)
    assert open(out, "rb").read() == here
