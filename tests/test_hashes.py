"""Hashes on the bytes actually written, checked against independent computations.

sd-scripts' definition (reference metadata.md §3.1) is recomputed here with ``safetensors.torch.save``
on the tensors read back from the written file and its ``ss_*``-only metadata.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from lorakit.cli import main
from lorakit.ops.conversion import convert
from lorakit.io.hashes import file_digests, hash_report
from lorakit.ops.inspection import inspect_lora
from lorakit.io import save_tensors
from lorakit.samples.synthetic import write_sdscripts_lora

EMPTY_SHA = hashlib.sha256(b"").hexdigest()


def sdscripts_hashes(path: str) -> tuple[str, str]:
    """kohya sd-scripts' precalculate_safetensors_hashes, independently: re-serialise with ss_* only."""
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    b = save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    n = int.from_bytes(b[:8], "little")
    return hashlib.sha256(b[8 + n:]).hexdigest(), hashlib.sha256(b[0x100000:0x110000]).hexdigest()[:8]


def check_written_hashes(path: str) -> dict[str, str]:
    """Assert every hash stored in ``path`` is the hash of its bytes; usable for any lorakit LoRA writer."""
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    model_hash, legacy = sdscripts_hashes(path)
    assert meta["sshs_model_hash"] == model_hash
    assert meta["sshs_legacy_hash"] == legacy
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(raw[8 + n:]).hexdigest()
    return meta


@pytest.fixture(scope="module")
def big_fp32_lora(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("big") / "big.safetensors"
    write_sdscripts_lora(p, rank=160, dtype=torch.float32)
    return str(p)


def test_convert_bf16_hashes_match_sdscripts_definition(big_fp32_lora, tmp_path) -> None:
    out = str(tmp_path / "out_bf16.safetensors")
    convert(big_fp32_lora, out, "kohya", dtype=torch.bfloat16)
    tensors = load_file(out)
    assert all(t.dtype == torch.bfloat16 for k, t in tensors.items() if not k.endswith(".alpha"))
    size = len(open(out, "rb").read())
    assert size > 0x110000, size                      # the legacy window is not empty
    meta = check_written_hashes(out)
    assert meta["sshs_legacy_hash"] != EMPTY_SHA[:8]
    # hashes of the input dtype (what sd-scripts' merge used to store) would differ: the check can fail
    fp32 = save(load_file(big_fp32_lora), {k: v for k, v in meta.items() if k.startswith("ss_")})
    n = int.from_bytes(fp32[:8], "little")
    assert hashlib.sha256(fp32[8 + n:]).hexdigest() != meta["sshs_model_hash"]


@pytest.mark.parametrize("to", ["kohya", "diffusers", "comfy"])
def test_every_convert_target_stores_current_hashes(big_fp32_lora, tmp_path, to) -> None:
    out = str(tmp_path / f"{to}.safetensors")
    # folding α into fp16 diffusers factors rounds them beyond the cast (reported as lossy)
    convert(big_fp32_lora, out, to, dtype=torch.float16, allow_lossy=(to == "diffusers"))
    check_written_hashes(out)


def test_stale_input_hashes_are_replaced(tmp_path) -> None:
    src = write_sdscripts_lora(tmp_path / "in.safetensors")
    tensors = load_file(src)
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata())
    meta.update(sshs_model_hash="ab" * 32, sshs_legacy_hash="deadbeef", **{"modelspec.hash_sha256": "0x" + "cd" * 32})
    stale = save_tensors(tmp_path / "stale.safetensors", tensors, meta)
    report = hash_report(stale)
    assert {k for k, v in report["stored"].items() if not v["current"]} == {
        "sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"}
    out = str(tmp_path / "out.safetensors")
    convert(stale, out, "kohya")
    meta_out = check_written_hashes(out)
    assert meta_out["sshs_model_hash"] != "ab" * 32


def test_autov2_autov3_and_file_digests(big_fp32_lora) -> None:
    raw = open(big_fp32_lora, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    d = file_digests(big_fp32_lora)
    assert d["sha256"] == hashlib.sha256(raw).hexdigest()
    assert d["autov2"] == hashlib.sha256(raw).hexdigest()[:10].upper()
    assert d["autov3"] == hashlib.sha256(raw[8 + n:]).hexdigest()[:12].upper()
    assert d["legacy_model_hash"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    model_hash, legacy = sdscripts_hashes(big_fp32_lora)
    r = hash_report(big_fp32_lora)
    assert (r["sshs_model_hash"], r["sshs_legacy_hash"]) == (model_hash, legacy)


def test_sshs_hashes_of_third_party_file_order(tmp_path, write_st) -> None:
    """A file laid out in another order: sd-scripts re-serialises, so must we (not hash the disk layout)."""
    g = torch.Generator().manual_seed(0)
    t = {f"lora_unet_double_blocks_{i}_img_attn_proj.lora_down.weight": torch.randn(300, 32, generator=g)
         for i in range(2)}
    t.update({f"lora_unet_double_blocks_{i}_img_attn_proj.lora_up.weight": torch.randn(32, 300, generator=g)
              .to(torch.float16) for i in range(2)})
    path = write_st(t, {"ss_network_dim": "300", "other": "x"})
    r = hash_report(path)
    assert (r["sshs_model_hash"], r["sshs_legacy_hash"]) == sdscripts_hashes(path)


def test_inspect_shows_hashes_only_on_request(big_fp32_lora, capsys) -> None:
    assert "hashes" not in inspect_lora(big_fp32_lora)
    r = inspect_lora(big_fp32_lora, hashes=True)
    assert r["hashes"]["autov2"] == file_digests(big_fp32_lora)["autov2"]
    assert "hashes" in inspect_lora(big_fp32_lora, deep=True)
    assert main(["inspect", "--hashes", big_fp32_lora]) == 0
    out = capsys.readouterr().out
    assert "autov2 " + r["hashes"]["autov2"] in out and "autov3 " + r["hashes"]["autov3"] in out
    assert main(["inspect", "--hashes", "--json", big_fp32_lora]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["hashes"]["sshs_model_hash"] == r["hashes"]["sshs_model_hash"]
