"""``lorakit scan``: a library read by content (magic bytes, not names), pickles listed without being run, an
index that makes a rescan read only what changed, duplicate groups by content hash, JSONL/CSV/HTML outputs.

Files are spelled here byte by byte (safetensors: an 8-byte header length, the JSON header, the data), so the
expected kinds, hashes and groups come from how the test built them, never from lorakit."""

from __future__ import annotations

import array
import csv
import hashlib
import json
import os
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from lorakit.cli.main import main
from lorakit.io.pickle_scan import DANGEROUS, SAFE, UNKNOWN, rate, scan_pickle
from lorakit.io.sniff import sniff
from lorakit.ops.scan import scan_file, scan_library

H = 32      # FLUX.1-shaped tiny modules (hidden 32)


def raw_safetensors(path: str, tensors: dict[str, tuple[tuple[int, ...], bytes]],
                    metadata: dict[str, str] | None = None) -> str:
    """A safetensors file written by hand: F32 tensors given as (shape, raw bytes)."""
    header: dict[str, object] = {}
    offset = 0
    for name, (shape, data) in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        for _, data in tensors.values():
            fh.write(data)
    return path


def tiny_lora(path: str, seed: int, rank: int = 2, metadata: dict[str, str] | None = None) -> str:
    """One kohya FLUX.1 module (double_blocks.0.img_attn.proj, 32×32) with factors from ``seed``."""
    rnd = hashlib.sha256(str(seed).encode()).digest()
    raw = (rnd * (2 * rank * H // len(rnd) + 1))[:2 * rank * H]
    floats = array.array("f", (b / 255 for b in raw)).tobytes()
    stem = "lora_unet_double_blocks_0_img_attn_proj"
    return raw_safetensors(path, {f"{stem}.lora_down.weight": ((rank, H), floats[:rank * H * 4]),
                                  f"{stem}.lora_up.weight": ((H, rank), floats[rank * H * 4:])}, metadata)


def build_library(root: str, n: int = 2000) -> dict[str, list[str]]:
    """``n`` tiny LoRAs under two folders, where file ``i`` and ``i + n/2`` for i < 40 are byte-identical
    copies (40 duplicate pairs) and 3 large files (two identical); returns the expected groups by name."""
    os.makedirs(os.path.join(root, "a", "deep"), exist_ok=True)
    os.makedirs(os.path.join(root, "b"), exist_ok=True)
    groups: dict[str, list[str]] = {}
    half = n // 2
    for i in range(n):
        sub = "a" if i < half else "b"
        if i % 7 == 0 and sub == "a":
            sub = os.path.join("a", "deep")
        seed = i - half if half <= i < half + 40 else i
        p = tiny_lora(os.path.join(root, sub, f"l{i:05d}.safetensors"), seed)
        if seed < 40:
            groups.setdefault(f"seed{seed}", []).append(p)
    big = bytes(range(256)) * (4 * 1024 * 1024 // 256)     # 4 MiB tensors
    for name, salt in (("big1", b""), ("big2", b""), ("big3", b"x")):
        data = (salt + big)[:len(big)]
        p = raw_safetensors(os.path.join(root, "b", f"{name}.safetensors"),
                            {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": ((len(data) // (4 * H), H), data),
                             "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": ((H, len(data) // (4 * H)), data)})
        if not salt:
            groups.setdefault("big", []).append(p)
    return {k: sorted(v) for k, v in groups.items()}


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> tuple[str, dict[str, list[str]]]:
    root = str(tmp_path_factory.mktemp("library"))
    return root, build_library(root)


def test_rescan_reads_only_changed_files_and_groups_duplicates(library, tmp_path) -> None:
    root, groups = library
    index = str(tmp_path / "index.sqlite")
    reads: list[str] = []
    first = scan_library([root], index=index, on_read=reads.append)
    assert len(first.records) == 2003 and len(reads) == 2003 and first.read == 2003
    assert {r["kind"] for r in first.records} == {"LoRA"}
    assert {r["architecture"] for r in first.records} == {"flux1"} and {r["format"] for r in first.records} == {"kohya"}
    got = sorted(sorted(g["paths"]) for g in first.duplicates)
    assert got == sorted(groups.values())
    assert len(first.duplicates) == 41
    big = next(g for g in first.duplicates if g["paths"] == groups["big"])
    assert big["sha256"] == hashlib.sha256(open(groups["big"][0], "rb").read()).hexdigest()

    touched = sorted(r["path"] for r in first.records[::200])[:10]
    assert len(touched) == 10
    for p in touched:
        st = os.stat(p)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    reads.clear()
    second = scan_library([root], index=index, on_read=reads.append)
    assert sorted(reads) == touched                      # only the 10 touched files were read
    assert second.read == 10 and second.reused == 1993
    assert [r["path"] for r in second.records] == [r["path"] for r in first.records]
    strip = ("mtime_ns",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in second.records] == \
        [{k: v for k, v in r.items() if k not in strip} for r in first.records]

    os.unlink(groups["seed3"][1])                       # a deleted file leaves the index and its group
    reads.clear()
    third = scan_library([root], index=index, on_read=reads.append)
    assert reads == [] and third.removed == 1 and len(third.records) == 2002
    assert sorted(g["paths"] for g in third.duplicates) == sorted(v for k, v in groups.items() if k != "seed3")


def _payload_pickle(marker: str) -> bytes:
    """A pickle that, if loaded, runs exec() writing ``marker`` (built opcode by opcode: nothing runs here)."""
    code = f"open({marker!r}, 'w').write('ran')"
    return (b"\x80\x04" + b"\x8c\x08builtins\x94" + b"\x8c\x04exec\x94" + b"\x93\x94"
            + b"\x8c" + bytes([len(code)]) + code.encode() + b"\x94" + b"\x85\x94R\x94.")


def test_malicious_pickle_flagged_and_never_run(tmp_path) -> None:
    marker = str(tmp_path / "PWNED")
    data = _payload_pickle(marker)
    renamed = tmp_path / "pretty.safetensors"       # a pickle named .safetensors
    renamed.write_bytes(data)
    with zipfile.ZipFile(tmp_path / "model.pt", "w") as z:        # torch.save-style zip with the same payload
        z.writestr("model/data.pkl", data)
        z.writestr("model/version", "3\n")
    legacy = tmp_path / "legacy.ckpt"
    legacy.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=2) + data)   # a benign first pickle, payload second
    report = scan_library([str(tmp_path)])
    by = {os.path.basename(r["path"]): r for r in report.records}
    for name in ("pretty.safetensors", "model.pt", "legacy.ckpt"):
        r = by[name]
        assert r["status"] == "dangerous" and r["pickle"]["dangerous"] == ["builtins.exec"], name
    assert by["pretty.safetensors"]["container"] == "pickle"
    assert any("named .safetensors but holds pickle" in p for p in by["pretty.safetensors"]["problems"])
    assert by["model.pt"]["container"] == "pickle-zip"
    assert report.exit_code == 2
    assert main(["scan", str(tmp_path), "--json"]) == 2
    assert not os.path.exists(marker)                  # nothing ran …
    pickle.loads(data)
    assert os.path.exists(marker)                      # … though the payload is live: loading it does run it


def test_pickle_globals_listed_and_rated(tmp_path) -> None:
    p = tmp_path / "ok.pt"
    torch.save({"w": torch.zeros(2)}, p)
    s = scan_pickle(p)
    assert s.verdict == SAFE and "torch._utils._rebuild_tensor_v2" in s.globals
    legacy = tmp_path / "old.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    assert scan_pickle(legacy).verdict == SAFE and sniff(legacy).container == "pickle"
    assert rate("posix", "system") == DANGEROUS and rate("subprocess", "Popen") == DANGEROUS
    assert rate("builtins", "eval") == DANGEROUS and rate("os", "system") == DANGEROUS
    assert rate("pytorch_lightning.callbacks", "ModelCheckpoint") == UNKNOWN
    obfuscated = tmp_path / "obf.pkl"       # STACK_GLOBAL whose operands are not plain strings
    obfuscated.write_bytes(b"\x80\x04" + b"N" + b"N" + b"\x93" + b".")
    assert scan_pickle(obfuscated).verdict == DANGEROUS


def test_containers_by_content_kinds_and_hashes(tmp_path, library) -> None:
    root, _ = library
    gguf = tmp_path / "q.gguf"
    gguf.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + bytes(24))
    good = tiny_lora(str(tmp_path / "g.safetensors"), 1)
    trunc = tmp_path / "t.safetensors"
    trunc.write_bytes(open(good, "rb").read()[:40])            # header cut short
    vae = raw_safetensors(str(tmp_path / "vae.safetensors"),
                          {"encoder.down.0.block.0.conv1.weight": ((4,), bytes(16)),
                           "decoder.up.0.block.0.conv1.weight": ((4,), bytes(16)),
                           "quant_conv.weight": ((4,), bytes(16))})
    tensors = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.ones(2, H),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.ones(H, 2)}
    ss = {"ss_network_dim": "2", "modelspec.trigger_phrase": "sks dog, red hat",
          "ss_sd_model_name": "flux1-dev.safetensors"}
    b = save(tensors, {k: v for k, v in ss.items() if k.startswith("ss_")})
    right = hashlib.sha256(b[8 + int.from_bytes(b[:8], "little"):]).hexdigest()   # sd-scripts' definition
    save_file(tensors, str(tmp_path / "current.safetensors"), {**ss, "sshs_model_hash": right})
    save_file(tensors, str(tmp_path / "stale.safetensors"), {**ss, "sshs_model_hash": "0" * 64})
    r = {os.path.basename(p): scan_file(str(tmp_path / p)) for p in os.listdir(tmp_path)}
    assert r["q.gguf"]["container"] == "gguf"
    assert r["t.safetensors"]["container"] == "safetensors-truncated" and r["t.safetensors"]["status"] == "error"
    assert r["vae.safetensors"]["kind"] == "VAE"
    cur = r["current.safetensors"]
    assert cur["sshs_current"] is True and cur["status"] == "ok"
    assert cur["trigger_words"][:2] == ["sks dog", "red hat"] and cur["base_model"] == "flux1-dev.safetensors"
    assert cur["ranks"] == {"2": 1} and cur["coverage"]
    assert r["stale.safetensors"]["sshs_current"] is False and r["stale.safetensors"]["status"] == "warning"
    raw = open(good, "rb").read()
    g = r["g.safetensors"]
    n = int.from_bytes(raw[:8], "little")
    assert g["sha256"] == hashlib.sha256(raw).hexdigest() and g["autov2"] == g["sha256"][:10].upper()
    assert g["autov3"] == hashlib.sha256(raw[8 + n:]).hexdigest()[:12].upper()
    assert load_file(good)          # the hand-written file is valid safetensors


def test_base_model_and_text_encoder_kinds(tmp_path) -> None:
    from lorakit.samples.synthetic import write_base
    base = write_base(tmp_path / "base.safetensors")
    r = scan_file(base)
    assert r["kind"] == "base model" and r["architecture"] == "flux1"


def test_cli_outputs_jsonl_csv_html(tmp_path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    for i in range(3):
        tiny_lora(str(lib / f"x{i}.safetensors"), i % 2)
    (lib / "evil.safetensors").write_bytes(_payload_pickle(str(tmp_path / "never")))
    out = tmp_path / "out"
    out.mkdir()
    rc = main(["scan", str(lib), "--index", str(out / "ix.db"), "--jsonl", str(out / "r.jsonl"),
               "--csv", str(out / "r.csv"), "--report", str(out / "r.html")])
    assert rc == 2
    lines = [json.loads(x) for x in (out / "r.jsonl").read_text().splitlines()]
    assert sorted(os.path.basename(x["path"]) for x in lines) == ["evil.safetensors", "x0.safetensors",
                                                                   "x1.safetensors", "x2.safetensors"]
    rows = list(csv.DictReader((out / "r.csv").open()))
    assert {r["status"] for r in rows} == {"ok", "dangerous"} and len(rows) == 4
    page = (out / "r.html").read_text()
    assert "data:image/png;base64," in page and "builtins.exec" in page and "<script" not in page
    assert not (tmp_path / "never").exists()


def test_header_only_records_are_rehashed_when_hashes_are_asked(tmp_path) -> None:
    for i in range(3):
        tiny_lora(str(tmp_path / f"x{i}.safetensors"), i)
    index = str(tmp_path / "ix.db")
    reads: list[str] = []
    fast = scan_library([str(tmp_path)], index=index, hashes=False, on_read=reads.append)
    assert len(reads) == 3 and all("sha256" not in r for r in fast.records)
    reads.clear()
    full = scan_library([str(tmp_path)], index=index, on_read=reads.append)
    assert len(reads) == 3 and all(r["sha256"] for r in full.records)
    reads.clear()
    scan_library([str(tmp_path)], index=index, hashes=False, on_read=reads.append)
    assert reads == []                         # hashed records also answer a header-only scan


def test_sharded_model_folder_is_scanned_file_by_file(tmp_path) -> None:
    model = tmp_path / "lib" / "model"
    model.mkdir(parents=True)
    shards = {"a-00001.safetensors": "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight",
              "a-00002.safetensors": "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"}
    for name, key in shards.items():
        save_file({key: torch.zeros(2, 2)}, str(model / name))
    (model / "a.safetensors.index.json").write_text(json.dumps({"weight_map": {k: n for n, k in shards.items()}}))
    report = scan_library([str(tmp_path / "lib")])
    assert sorted(os.path.basename(r["path"]) for r in report.records) == sorted(shards)
    assert all("sha256" in r for r in report.records)
