"""``lorakit meta``: print, edit atomically (in place allowed), hashes, and the writer-metadata audit."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from lorakit.cli import main
from lorakit.ops.conversion import convert
from lorakit.errors import OutputError, UsageError
from lorakit.io import save_tensors
from lorakit.ops.metaedit import audit_lora_metadata, edit_metadata, read_metadata
from lorakit.samples.synthetic import TINY_FLUX, write_aitoolkit_lora, write_sdscripts_lora

H = TINY_FLUX["H"]


def _meta(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def _sd_hashes(path) -> tuple[str, str]:
    b = save(load_file(str(path)), {k: v for k, v in _meta(path).items() if k.startswith("ss_")})
    n = int.from_bytes(b[:8], "little")
    return hashlib.sha256(b[8 + n:]).hexdigest(), hashlib.sha256(b[0x100000:0x110000]).hexdigest()[:8]


def _same_tensors(a, b) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].reshape(-1).view(torch.uint8), tb[k].reshape(-1).view(torch.uint8)), k


@pytest.fixture
def converted(tmp_path) -> str:
    """A lorakit-written kohya LoRA (> 1.1 MiB so that the legacy hash window is not empty)."""
    src = write_sdscripts_lora(tmp_path / "src.safetensors", rank=96)
    out = str(tmp_path / "lora.safetensors")
    convert(src, out, "kohya")
    os.unlink(src)
    return out


def test_print_plain_and_json_unescapes_nested(tmp_path, capsys) -> None:
    tags = {"dataset": {"ohwx person": 12, "photo": 3}}
    p = save_tensors(tmp_path / "m.safetensors", {"x": torch.zeros(2)},
                     {"ss_tag_frequency": json.dumps(tags), "software": '{"name": "ai-toolkit"}', "plain": "{not json"})
    assert main(["meta", p, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ss_tag_frequency"] == tags and data["software"] == {"name": "ai-toolkit"}
    assert data["plain"] == "{not json"
    assert main(["meta", p]) == 0
    out = capsys.readouterr().out
    assert '"ohwx person": 12' in out and "plain: {not json" in out


def test_set_delete_output_copy(converted, tmp_path) -> None:
    before = open(converted, "rb").read()
    out = str(tmp_path / "edited.safetensors")
    r = edit_metadata(converted, set_items=[("modelspec.title", "My LoRA"), ("modelspec.trigger_phrase", "ohwx")],
                      delete=["lorakit.*"], output=out)
    assert open(converted, "rb").read() == before            # -o never touches the input
    m = _meta(out)
    assert m["modelspec.title"] == "My LoRA" and not any(k.startswith("lorakit.") for k in m)
    assert r.removed == ["lorakit.provenance"] and not r.rehashed    # no ss_* change: hashes stay valid
    assert (m["sshs_model_hash"], m["sshs_legacy_hash"]) == _sd_hashes(out)
    _same_tensors(converted, out)
    with pytest.raises(UsageError, match="matches no metadata key"):
        edit_metadata(converted, delete=["nope"], output=str(tmp_path / "x.safetensors"))
    with pytest.raises(UsageError, match="changes nothing"):
        edit_metadata(converted, set_items=[("modelspec.title", _meta(converted)["modelspec.title"])])
    assert not (tmp_path / "x.safetensors").exists()


def test_in_place_is_atomic_and_keeps_permissions(converted) -> None:
    os.chmod(converted, 0o640)
    inode = os.stat(converted).st_ino
    old_bytes = open(converted, "rb").read()
    reader = open(converted, "rb")            # a reader holding the old file keeps seeing the old bytes
    try:
        assert main(["meta", converted, "--set", "modelspec.author=me"]) == 0
        assert reader.read() == old_bytes
    finally:
        reader.close()
    assert os.stat(converted).st_ino != inode                 # replaced by rename, not rewritten in place
    assert stat.S_IMODE(os.stat(converted).st_mode) == 0o640
    assert _meta(converted)["modelspec.author"] == "me"
    folder = os.path.dirname(converted)
    assert not [f for f in os.listdir(folder) if "lorakit-tmp" in f]


def test_ss_change_recomputes_sshs_per_sdscripts(converted, tmp_path) -> None:
    m0 = _meta(converted)
    assert os.path.getsize(converted) > 0x110000
    r = edit_metadata(converted, set_items=[("ss_network_args", '{"note": "edited"}')])
    assert "sshs_legacy_hash" in r.rehashed                  # the legacy window moved with the header
    m1 = _meta(converted)
    assert m1["sshs_legacy_hash"] != m0["sshs_legacy_hash"]
    assert m1["sshs_model_hash"] == m0["sshs_model_hash"]     # data-section hash ignores metadata
    assert (m1["sshs_model_hash"], m1["sshs_legacy_hash"]) == _sd_hashes(converted)


def test_rehash_fixes_stale_and_copy_from_never_copies_hashes(tmp_path) -> None:
    a = write_aitoolkit_lora(tmp_path / "a.safetensors")
    other = save_tensors(tmp_path / "o.safetensors", {"x": torch.zeros(1)},
                         {"sshs_model_hash": "ff" * 32, "modelspec.title": "from other", "ss_output_name": "o",
                          "lorakit.provenance": "{}"})
    out = str(tmp_path / "c.safetensors")
    r = edit_metadata(a, copy_from=other, output=out)
    m = _meta(out)
    assert m["modelspec.title"] == "from other" and "sshs_model_hash" not in m and "lorakit.provenance" not in m
    assert r.rehashed == []
    stale = save_tensors(tmp_path / "s.safetensors", load_file(a), {"sshs_model_hash": "00" * 32})
    assert main(["meta", stale, "--rehash"]) == 0
    assert (_meta(stale)["sshs_model_hash"], _meta(stale)["sshs_legacy_hash"]) == _sd_hashes(stale)


def test_bad_usage_is_one_line(tmp_path, capsys) -> None:
    a = write_aitoolkit_lora(tmp_path / "a.safetensors")
    for argv in (["meta", a, "--set", "novalue"], ["meta", a, "-o", str(tmp_path / "o.safetensors")],
                 ["meta", a, "--delete", "missing_key"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lorakit meta: error:"), err


def test_failed_in_place_edit_leaves_file_intact(converted, monkeypatch) -> None:
    before = open(converted, "rb").read()
    real = os.pwrite
    calls = {"n": 0}

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OutputError, match="No space left"):
        edit_metadata(converted, set_items=[("a", "b")])
    monkeypatch.undo()
    assert open(converted, "rb").read() == before
    assert os.listdir(os.path.dirname(converted)) == [os.path.basename(converted)]


# --- every LoRA writer stores a network description that matches its tensors ----------------

@pytest.mark.parametrize("to", ["kohya", "diffusers", "comfy"])
@pytest.mark.parametrize("source", ["sdscripts", "aitoolkit"])
def test_convert_outputs_pass_the_audit(tmp_path, to, source) -> None:
    src = (write_sdscripts_lora if source == "sdscripts" else write_aitoolkit_lora)(tmp_path / "in.safetensors")
    out = str(tmp_path / "out.safetensors")
    convert(src, out, to, dtype=torch.bfloat16)
    assert audit_lora_metadata(out) == []
    m = _meta(out)
    assert m["ss_network_module"] == "networks.lora_flux" and m["ss_base_model_version"] == "flux1"
    if source == "aitoolkit" and to != "diffusers":
        assert m["ss_network_dim"] == "Dynamic"        # fused qkv modules get rank 3r, others r


def test_architecture_dev_schnell_chroma(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    blocks = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(4, H, generator=g),
              "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(H, 4, generator=g),
              "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(4.0)}
    guidance = {"lora_unet_guidance_in_in_layer.lora_down.weight": torch.randn(4, TINY_FLUX["T"], generator=g),
                "lora_unet_guidance_in_in_layer.lora_up.weight": torch.randn(H, 4, generator=g),
                "lora_unet_guidance_in_in_layer.alpha": torch.tensor(2.0)}
    cases = [({**blocks, **guidance}, {}, "flux-1-dev/lora", "flux1", "Dynamic"),
             (blocks, {"modelspec.architecture": "flux-1-schnell/lora"}, "flux-1-schnell/lora", "flux1", "4"),
             (blocks, {"ss_base_model_version": "chroma"}, "chroma/lora", "chroma", "4")]
    for i, (tensors, meta, arch, version, alpha) in enumerate(cases):
        src = save_tensors(tmp_path / f"in{i}.safetensors", tensors,
                           {**meta, "sshs_model_hash": "00" * 32, "sshs_legacy_hash": "00000000"})
        out = str(tmp_path / f"out{i}.safetensors")
        convert(src, out, "kohya")
        m = _meta(out)
        assert m["modelspec.architecture"] == arch and m["ss_base_model_version"] == version
        assert m["ss_network_alpha"] == alpha and m["sshs_model_hash"] != "00" * 32
        assert audit_lora_metadata(out) == [], audit_lora_metadata(out)


def test_lycoris_output_declares_lycoris_module(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    t = {f"lycoris_transformer_blocks_0_attn_to_out_0.{n}": torch.randn(*s, generator=g)
         for n, s in {"hada_w1_a": (H, 2), "hada_w1_b": (2, H), "hada_w2_a": (H, 2), "hada_w2_b": (2, H)}.items()}
    src = save_tensors(tmp_path / "loha.safetensors", t)
    out = str(tmp_path / "out.safetensors")
    convert(src, out, "kohya", keep_algo=True)   # LyCORIS keys kept: the file must say lycoris
    m = _meta(out)
    assert m["ss_network_module"] == "lycoris.kohya" and json.loads(m["ss_network_args"])["algo"] == "loha"
    assert audit_lora_metadata(out) == []
    plain = str(tmp_path / "plain.safetensors")
    convert(out, plain, "kohya")                 # default: plain LoRA factors, which claim no LyCORIS module
    m = _meta(plain)
    assert m["ss_network_module"] == "networks.lora_flux" and "algo" not in json.loads(m.get("ss_network_args", "{}"))
    assert audit_lora_metadata(plain) == []


def test_audit_catches_wrong_metadata(tmp_path, capsys) -> None:
    src = write_sdscripts_lora(tmp_path / "in.safetensors")
    out = str(tmp_path / "out.safetensors")
    convert(src, out, "kohya")
    bad = str(tmp_path / "bad.safetensors")
    edit_metadata(out, set_items=[("ss_network_dim", "16"), ("ss_network_module", "networks.lora"),
                                  ("modelspec.architecture", "flux-1-schnell/lora"), ("sshs_model_hash", "1" * 64)],
                  output=bad)
    problems = audit_lora_metadata(bad)
    assert any(p.startswith("ss_network_dim") for p in problems)
    assert any(p.startswith("ss_network_module") for p in problems)
    assert any("sshs_model_hash" in p for p in problems)
    assert main(["meta", bad, "--check"]) == 1
    assert main(["meta", out, "--check"]) == 0
    assert read_metadata(out)["ss_network_dim"] == "4"
