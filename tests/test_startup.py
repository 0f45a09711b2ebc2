"""Header-only commands import no torch (issue: start-up to the physical floor). Each command runs in a fresh
interpreter; afterwards ``sys.modules`` must not hold torch. Commands that compute (bake, merge, doctor's value
checks) import it on first use, which the last test shows still works."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

PROBE = r"""
import json, sys
from lorakit.cli.main import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def _run(*argv: str) -> dict[str, object]:
    res = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    return json.loads(res.stderr.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("startup") / "k.safetensors"
    t = {}
    for m in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"):
        t[m + ".lora_down.weight"] = torch.randn(4, 32).to(torch.bfloat16)
        t[m + ".lora_up.weight"] = torch.randn(96 if "qkv" in m else 224, 4).to(torch.bfloat16)
        t[m + ".alpha"] = torch.tensor(2.0, dtype=torch.bfloat16)
    save_file(t, str(path), {"ss_network_module": "networks.lora_flux", "ss_output_name": "startup"})
    return str(path)


@pytest.mark.parametrize("argv", [
    ("--help",), ("inspect", "--help"), ("bake", "--help"), ("merge", "--help"),
    ("inspect", "{lora}"), ("inspect", "{lora}", "--json"), ("inspect", "{lora}", "--hashes"),
    ("meta", "{lora}"), ("meta", "{lora}", "--json"), ("meta", "{lora}", "--check"),
    ("scan", "{folder}"), ("scan", "{folder}", "--json"), ("inspect", "{folder}", "--json"),
])
def test_header_only_commands_import_no_torch(lora, argv) -> None:
    got = _run(*(a.format(lora=lora, folder=os.path.dirname(lora)) for a in argv))
    assert got["rc"] in (0, 1), got
    assert got["torch"] is False, f"{' '.join(argv)} imported torch"


def test_inspect_reads_alpha_without_torch(lora) -> None:
    """The α shown comes from the file's bf16 bytes (decoded without torch): 2.0, scale 2/4."""
    res = subprocess.run([sys.executable, "-m", "lorakit", "inspect", lora, "--json"], capture_output=True, text=True,
                         timeout=120)
    assert json.loads(res.stdout)["alphas"] == {"2.0": 2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                   torch.int32, torch.uint8, torch.float8_e4m3fn])
def test_first_value_decodes_every_dtype_as_torch_does(tmp_path, dtype) -> None:
    from lorakit.io import open_weights
    values = {"a": torch.tensor(3.140625), "b": torch.tensor([-7.5, 1.0]), "c": torch.tensor([[0.1]])}
    if not dtype.is_floating_point:
        values = {"a": torch.tensor(3), "b": torch.tensor([7, 1]), "c": torch.tensor([[0]])}
    tensors = {k: v.to(dtype) for k, v in values.items()}
    save_file(tensors, str(tmp_path / "s.safetensors"))
    with open_weights(tmp_path / "s.safetensors") as f:
        for k, t in tensors.items():
            assert f.first_value(k) == float(t.double().reshape(-1)[0]), k
            assert f.raw_bytes(k) == t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), k


def test_the_probe_can_fail(lora) -> None:
    """Commands that compute still import torch (so the probe sees it when it is there)."""
    got = _run("inspect", lora, "--deep")
    assert got["torch"] is True
