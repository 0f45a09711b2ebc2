"""Detection (confidence, runner-up, ties, metadata tie-break), variants, FLUX.1 vs FLUX.2, header-only inspect."""

from __future__ import annotations

import ctypes
import importlib
import dataclasses
import json
import mmap
import os

import pytest
import torch

from lorakit.cli import main
from lorakit.errors import AmbiguousFormatError, UnknownFormatError, UnsupportedArchitectureError
from lorakit.formats import read_lora
from lorakit.formats.spec import FormatSpec
from lorakit.layouts.base import Rule
from lorakit.ops.inspection import inspect_lora
from lorakit.io import SafetensorsWriter, open_weights
from lorakit.layouts import FLUX1, ArchSpec, expand
from lorakit.samples.synthetic import full_flux_params

H = 32
parse_mod = importlib.import_module("lorakit.formats.parse")


def lora(t: dict, stem: str, out: int, inp: int, r: int = 4, alpha: float | None = 4.0,
         down: str = "lora_down.weight", up: str = "lora_up.weight") -> None:
    t[f"{stem}.{down}"] = torch.randn(r, inp) * 0.1
    t[f"{stem}.{up}"] = torch.randn(out, r) * 0.1
    if alpha is not None:
        t[f"{stem}.alpha"] = torch.tensor(alpha)


def kohya_blocks(t: dict) -> None:
    for i in range(2):
        lora(t, f"lora_unet_double_blocks_{i}_img_attn_qkv", 3 * H, H)
        lora(t, f"lora_unet_double_blocks_{i}_img_mlp_0", 4 * H, H)
    lora(t, "lora_unet_single_blocks_0_linear1", 7 * H, H)


def inspect_json(capsys, path: str) -> tuple[int, dict]:
    capsys.readouterr()
    rc = main(["inspect", path, "--json"])
    return rc, json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------

def test_confidence_and_unknown_keys(write_st, capsys) -> None:
    t: dict = {}
    kohya_blocks(t)
    t["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(4, 8)
    t["random_junk"] = torch.zeros(2)
    path = write_st(t)
    rc, r = inspect_json(capsys, path)
    assert rc == 1                               # partial understanding is a warning exit
    assert r["format"] == "kohya"
    assert r["confidence"] == pytest.approx(15 / 17, abs=1e-4)
    assert r["unknown_key_count"] == 2
    assert set(r["unknown_keys"]) == {"lora_unet_not_a_module.lora_down.weight", "random_junk"}


def test_full_confidence_and_runner_up(write_st, capsys) -> None:
    t: dict = {}
    kohya_blocks(t)                                           # 15 keys
    lora(t, "lora_te1_text_model_encoder_layers_0_mlp_fc1", 48, 24)   # 3 keys onetrainer also reads
    rc, r = inspect_json(capsys, write_st(t))
    assert rc == 0
    assert r["format"] == "kohya" and r["confidence"] == 1.0
    assert r["runner_up"] == {"format": "onetrainer", "score": round(3 / 18, 4)}
    assert r["components"]["clip_l"]["present"] == 1


def test_tie_with_same_meaning_is_not_ambiguous(write_st, capsys) -> None:
    t: dict = {}
    lora(t, "lora_te1_text_model_encoder_layers_0_mlp_fc1", 48, 24)   # kohya and onetrainer: same meaning
    rc, r = inspect_json(capsys, write_st(t))
    assert rc == 0 and r["format"] == "kohya"
    assert r["runner_up"]["format"] == "onetrainer" and r["runner_up"]["score"] == 1.0


def _fake_registry(monkeypatch):
    """Two formats that read the same keys with different meanings (lora_te1_ as CLIP-L vs as a second,
    same-named encoder), over an architecture that has both components."""
    clip = FLUX1.components["clip_l"]
    arch = ArchSpec("fake", "fake", {"clip_l": clip, "t5": dataclasses.replace(clip, name="t5")},
                    rules={"kohya": (Rule("lora_te1_", "clip_l", ("native",), True),),
                           "alt": (Rule("lora_te1_", "t5", ("native",), True),)})
    alt = FormatSpec("alt", "alternative reading")
    monkeypatch.setattr(parse_mod, "formats", lambda: (parse_mod.get_format("kohya"), alt))
    return arch


def test_tie_with_different_meaning_is_ambiguous(monkeypatch) -> None:
    arch = _fake_registry(monkeypatch)
    keys = ["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"]
    shapes = {keys[0]: (4, 24), keys[1]: (48, 4)}
    with pytest.raises(AmbiguousFormatError) as exc:
        parse_mod.detect(keys, shapes, {}, arch=arch, path="x.safetensors")
    assert exc.value.candidates == ["kohya", "alt"]
    assert "--from" in str(exc.value)
    # metadata breaks the tie (and only the tie)
    det = parse_mod.detect(keys, shapes, {"ss_network_module": "networks.lora"}, arch=arch)
    assert det.format.name == "kohya" and det.score == 1.0
    with pytest.raises(AmbiguousFormatError):
        parse_mod.detect(keys, shapes, {"lora_adapter_metadata": "{}"}, arch=arch)
    # forcing the format resolves it too
    assert parse_mod.detect(keys, shapes, {}, arch=arch, force="alt").format.name == "alt"


def test_metadata_does_not_override_keys(write_st) -> None:
    t: dict = {}
    lora(t, "transformer.transformer_blocks.0.attn.to_q", H, H, alpha=None, down="lora_A.weight", up="lora_B.weight")
    path = write_st(t, {"ss_network_module": "networks.lora_flux", "ss_network_dim": "4"})
    assert inspect_lora(path)["format"] == "diffusers"


def test_force_format(write_st) -> None:
    t: dict = {}
    lora(t, "transformer_blocks.0.attn.to_q", H, H, alpha=None, down="lora_A.weight", up="lora_B.weight")
    path = write_st(t)
    assert inspect_lora(path)["format"] == "diffsynth"
    with pytest.raises(UnknownFormatError):
        inspect_lora(path, from_format="peft")      # PEFT needs a marker these keys lack


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, meta, variant, in_ch", [
    ({"lora_unet_guidance_in_in_layer": (H, 8)}, {}, "dev", None),
    ({}, {}, "dev-or-schnell", None),
    ({}, {"modelspec.architecture": "flux-1-schnell/lora"}, "schnell", None),
    ({"lora_unet_img_in": (H, 384)}, {}, "fill", 384),
    ({"lora_unet_img_in": (H, 128)}, {}, "control", 128),
    ({"lora_unet_img_in": (H, 64)}, {}, "dev-or-schnell", 64),
    ({}, {"ss_base_model_version": "chroma"}, "chroma", None),
    ({"lora_unet_guidance_in_in_layer": (H, 8)}, {"modelspec.architecture": "flux-1-schnell/lora"}, "dev", None),
])
def test_variants(write_st, extra, meta, variant, in_ch) -> None:
    t: dict = {}
    kohya_blocks(t)
    for stem, (o, i) in extra.items():
        lora(t, stem, o, i)
    r = inspect_lora(write_st(t, meta))
    assert r["variant"] == variant
    if in_ch is not None:
        assert r["sizes"]["transformer"]["IN"] == in_ch


def test_flux2_hidden_4096_is_klein_9b_not_flux1(write_st, capsys) -> None:
    t: dict = {}
    lora(t, "lora_unet_double_blocks_0_img_attn_proj", 4096, 4096, r=1)
    path = write_st(t)
    model = read_lora(path)
    assert (model.arch.name, model.arch.variant) == ("flux2", "klein-9b")
    # read as FLUX.1 on request: refused, naming the architecture it is
    with pytest.raises(UnsupportedArchitectureError, match="FLUX.2") as exc:
        read_lora(path, arch="flux1")
    assert "--arch flux2" in (exc.value.hint or "")
    assert main(["inspect", path, "--arch", "flux1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "FLUX.2" in err[0] and path in err[0]


def test_flux2_klein_4b_mlp_is_flux2(write_st) -> None:
    # 3072 wide like FLUX.1; its SwiGLU img_mlp.0 holds 6×3072 rows (FLUX.1: 4×3072)
    t: dict = {}
    lora(t, "lora_unet_double_blocks_0_img_attn_qkv", 3 * 3072, 3072, r=1)
    lora(t, "lora_unet_double_blocks_0_img_mlp_0", 6 * 3072, 3072, r=1)
    model = read_lora(write_st(t))
    assert (model.arch.name, model.arch.variant) == ("flux2", "klein-4b")


def test_flux1_attention_only_stays_flux1_and_names_flux2(write_st, capsys) -> None:
    # a double-block attention LoRA 3072 wide fits FLUX.1 and FLUX.2 Klein 4B alike: FLUX.1 (registered first), and
    # the report says it also fits FLUX.2; metadata naming FLUX.2 settles it
    t: dict = {}
    lora(t, "lora_unet_double_blocks_0_img_attn_qkv", 3 * 3072, 3072, r=1)
    rc, r = inspect_json(capsys, write_st(t))
    assert rc == 0 and r["architecture"] == "flux1" and "FLUX.2" in r["also_fits"]
    named = read_lora(write_st(t, {"modelspec.architecture": "Flux.2-klein-4b/lora"}))
    assert (named.arch.name, named.arch.variant) == ("flux2", "klein-4b")
    assert read_lora(write_st(t, {"ss_base_model_version": "flux1"})).arch.name == "flux1"


def test_flux2_key_names_convert(write_st, tmp_path) -> None:
    t: dict = {}
    for j in range(2):
        lora(t, f"transformer.single_transformer_blocks.{j}.attn.to_qkv_mlp_proj", 9 * H, H, alpha=None,
             down="lora_A.weight", up="lora_B.weight")
    path = write_st(t)
    out = str(tmp_path / "k.safetensors")
    assert main(["convert", path, "-o", out, "--to", "kohya"]) == 0
    with open_weights(out) as f:
        assert sorted(f.keys()) == sorted(f"lora_unet_single_blocks_{j}_linear1.{s}" for j in range(2)
                                          for s in ("alpha", "lora_down.weight", "lora_up.weight"))


# ---------------------------------------------------------------------------------------------
# Plain inspect reads only the header (and alpha scalars)
# ---------------------------------------------------------------------------------------------

def _resident_fraction(path: str) -> float:
    """Fraction of the file's pages in the page cache (mincore on a fresh read-only mapping)."""
    import numpy as np

    size = os.path.getsize(path)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ) as mm:
        arr = np.frombuffer(mm, dtype=np.uint8)      # no page is touched by mapping or by this view
        rc = libc.mincore(ctypes.c_void_p(arr.ctypes.data), ctypes.c_size_t(size), vec)
        del arr
    if rc != 0:
        pytest.skip(f"mincore failed (errno {ctypes.get_errno()})")
    return int((np.frombuffer(bytes(vec), dtype=np.uint8) & 1).sum()) / pages


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _big_kohya(path: str, rank: int) -> int:
    entries = []
    for m in expand(FLUX1.components["transformer"], full_flux_params()):
        stem = "lora_unet_" + m.name.replace(".", "_")
        entries += [(stem + ".lora_down.weight", "BF16", (rank, m.inp)), (stem + ".lora_up.weight", "BF16", (m.out, rank)),
                    (stem + ".alpha", "F32", ())]
    with SafetensorsWriter(path, entries, {"ss_network_module": "networks.lora_flux"}) as w:
        for name, code, shape in entries:
            w.write(name, torch.tensor(rank / 2) if code == "F32" else torch.zeros(shape, dtype=torch.bfloat16))
    return len(entries)


def _header_only_check(tmp_path, capsys, rank: int, min_bytes: int) -> None:
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("posix_fadvise not available")
    path = str(tmp_path / "big.safetensors")
    try:
        _big_kohya(path, rank)
        assert os.path.getsize(path) >= min_bytes
        _drop_cache(path)
        before = _resident_fraction(path)
        if before > 0.01:
            pytest.skip(f"page cache could not be dropped on this filesystem ({before:.1%} resident)")
        rc, r = inspect_json(capsys, path)
        assert rc == 0 and r["format"] == "kohya" and r["modules"] == 314
        assert r["alphas"] == {str(rank / 2): 314}       # the alpha scalars were read
        after = _resident_fraction(path)
        with capsys.disabled():
            print(f"\ninspect header-only: {after:.3%} of {os.path.getsize(path) / 1e9:.2f} GB resident afterwards")
        assert after <= 0.01, f"inspect pulled {after:.2%} of the file into the page cache"
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_inspect_reads_only_header_256mb(tmp_path, capsys) -> None:
    _header_only_check(tmp_path, capsys, rank=27, min_bytes=256_000_000)


@pytest.mark.slow
def test_inspect_reads_only_header_1gb(tmp_path, capsys) -> None:
    """Writing 1 GB takes ~3-10 s on a shared disk, so the full-size check is opt-in."""
    _header_only_check(tmp_path, capsys, rank=108, min_bytes=1_000_000_000)


@pytest.mark.parametrize("stem, down, up, out, inp, fmt, target", [
    ("model.diffusion_model.double_blocks.0.img_attn.qkv", "lora_down.weight", "lora_up.weight", 3 * H, H, "comfy",
     "double_blocks.0.img_attn.qkv"),
    ("diffusion_model.single_blocks.1.processor.qkv_lora", "down.weight", "up.weight", 3 * H, H, "xlabs",
     "single_blocks.1.linear1"),
    ("lora_transformer_single_transformer_blocks_1_proj_mlp", "lora_down.weight", "lora_up.weight", 4 * H, H,
     "onetrainer", "single_blocks.1.linear1"),
    ("transformer.base_model.model.norm_out.linear", "lora_A.weight", "lora_B.weight", 2 * H, H, "peft",
     "final_layer.adaLN_modulation.1"),
    ("base_model.model.transformer_blocks.1.attn.to_add_out", "lora_A.weight", "lora_B.weight", H, H, "peft",
     "double_blocks.1.txt_attn.proj"),
    ("transformer.transformer_blocks.1.ff_context.net.0.proj", "lora_A.weight", "lora_B.weight", 4 * H, H,
     "diffusers", "double_blocks.1.txt_mlp.0"),
    ("lora_unet_time_in_out_layer", "lora_down.weight", "lora_up.weight", H, H, "kohya", "time_in.out_layer"),
])
def test_spellings(write_st, stem, down, up, out, inp, fmt, target) -> None:
    t: dict = {}
    lora(t, stem, out, inp, alpha=None, down=down, up=up)
    path = write_st(t)
    r = inspect_lora(path)
    assert r["format"] == fmt and r["unknown_key_count"] == 0
    assert [p.target.module for p in read_lora(path).patches] == [target]


def test_delta_norm_matches_dense() -> None:
    from lorakit.lora.adapters import Full, LoHa, LoKr, LoRA
    from lorakit.ops.inspection import delta_norm

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    for a in (LoRA(alpha=3.0, down=r(4, 10), up=r(12, 4)), LoHa(alpha=1.0, w1a=r(12, 2), w1b=r(2, 10), w2a=r(12, 2),
                                                                 w2b=r(2, 10)),
              LoKr(alpha=2.0, w1=r(3, 2), w2a=r(4, 2), w2b=r(2, 5)), LoKr(alpha=None, w1=r(3, 2), w2=r(4, 5)),
              Full(alpha=None, diff=r(12, 10))):
        assert delta_norm(a) == pytest.approx(float(a.dense().norm()), rel=1e-5)


def test_plain_inspect_shows_hashes_stored_in_the_header(tmp_path, capsys) -> None:
    from lorakit import convert
    from lorakit.samples.synthetic import write_aitoolkit_lora
    src = write_aitoolkit_lora(tmp_path / "ait.safetensors")       # written without sshs hashes
    out = str(tmp_path / "k.safetensors")
    convert(src, out, to="kohya")                                    # lorakit writes sshs_* on the written bytes
    rc, plain = inspect_json(capsys, src)
    assert rc == 0 and plain["stored_hashes"] == {}
    rc, r = inspect_json(capsys, out)
    meta = open_weights(out).metadata
    assert r["stored_hashes"] == {k: meta[k] for k in ("sshs_model_hash", "sshs_legacy_hash",
                                                       "modelspec.hash_sha256")}
    assert "hashes" not in r                                         # nothing recomputed without --hashes
    assert main(["inspect", out]) == 0
    assert "stored in the header" in capsys.readouterr().out
