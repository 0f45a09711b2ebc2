"""Wan 2.1 / 2.2: every LoRA spelling read onto the right native weights, every read format written to every
writable format and read back (≤ 1e-6), paired Wan 2.2 experts (combined file ⇄ high/low pair, byte-identical
tensors), full-size name/shape mapping from the reference shape files (no weights).

Expected deltas are computed here from the factors the test wrote; native names are spelled by hand."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorakit.errors import LorakitError, UsageError
from lorakit.formats import WRITABLE, emit, read_lora
from lorakit.lora.model import Target, dense_deltas
from lorakit.ops.conversion import convert

from reference import reference_shapes

H, FF, IN, HEAD, TEXT, T, IMG = 32, 64, 4, 16, 24, 8, 20
R = 2

# (native name, diffusers name, ΔW shape): spelled out here, independent of the layout module
MODS = [
    ("blocks.0.self_attn.q", "blocks.0.attn1.to_q", (H, H)),
    ("blocks.1.self_attn.o", "blocks.1.attn1.to_out.0", (H, H)),
    ("blocks.0.cross_attn.k", "blocks.0.attn2.to_k", (H, H)),
    ("blocks.1.ffn.0", "blocks.1.ffn.net.0.proj", (FF, H)),
    ("blocks.0.ffn.2", "blocks.0.ffn.net.2", (H, FF)),
    ("time_projection.1", "condition_embedder.time_proj", (6 * H, H)),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1", (H, TEXT)),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2", (H, H)),
    ("head.head", "proj_out", (HEAD, H)),
    ("patch_embedding", "patch_embedding", (H, IN, 1, 2, 2)),       # Conv3d LoRA: 5-D down
]
I2V_MODS = [
    ("blocks.0.cross_attn.k_img", "blocks.0.attn2.add_k_proj", (H, H)),
    ("blocks.1.cross_attn.v_img", "blocks.1.attn2.add_v_proj", (H, H)),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj", (IMG, IMG)),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2", (H, IMG)),
]


def _factors(gen: torch.Generator, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    tail = shape[2:]
    down = torch.randn((R, shape[1], *tail), generator=gen)
    up = torch.randn((shape[0], R, *([1] * len(tail))), generator=gen) * 0.1
    return down, up


def _dense(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    r = down.shape[0]
    return (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(up.shape[0], *down.shape[1:]) * scale


def _spell(style: str, native: str, diff: str) -> tuple[str, str, str, str | None]:
    """(stem, down suffix, up suffix, alpha key or None) of one module in a producer's spelling."""
    flat = native.replace(".", "_")
    return {
        "comfy-ab": (f"diffusion_model.{native}", "lora_A.weight", "lora_B.weight", None),
        "comfy-down": (f"diffusion_model.{native}", "lora_down.weight", "lora_up.weight", "alpha"),
        "musubi": (f"lora_unet_{flat}", "lora_down.weight", "lora_up.weight", "alpha"),
        "wanfun": (f"lora_unet__{flat}", "lora_down.weight", "lora_up.weight", "alpha"),
        "diffusers": (f"transformer.{diff}", "lora_A.weight", "lora_B.weight", None),
        "fal-native": (f"transformer.{native}", "lora_A.weight", "lora_B.weight", None),
        "aitoolkit": (f"diffusion_model.{diff}", "lora_A.weight", "lora_B.weight", None),
        "diffsynth": (native, "lora_A.weight", "lora_B.weight", None),
    }[style]


STYLES = ["comfy-ab", "comfy-down", "musubi", "wanfun", "diffusers", "fal-native", "aitoolkit", "diffsynth"]


def write_lora(path, style: str, gen: torch.Generator, mods=MODS, *, alpha: float = 4.0,
               metadata: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Write a LoRA by hand; returns native name -> expected ΔW."""
    tensors: dict[str, torch.Tensor] = {}
    want: dict[str, torch.Tensor] = {}
    for native, diff, shape in mods:
        stem, dn, upn, ak = _spell(style, native, diff)
        down, up = _factors(gen, shape)
        tensors[f"{stem}.{dn}"], tensors[f"{stem}.{upn}"] = down, up
        scale = 1.0
        if ak:
            tensors[f"{stem}.{ak}"] = torch.tensor(alpha)
            scale = alpha / R
        want[native] = _dense(down, up, scale)
    save_file(tensors, str(path), metadata=metadata)
    return want


def _deltas(model, component: str = "transformer") -> dict[str, torch.Tensor]:
    return {t.module: d for t, d in dense_deltas(model).items() if t.component == component}


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k].reshape(w.shape)
        assert (g - w).norm() <= 1e-6 * max(1.0, float(w.norm())), k


@pytest.mark.parametrize("style", STYLES)
def test_every_spelling_reads_onto_native_weights(tmp_path, style):
    gen = torch.Generator().manual_seed(1)
    want = write_lora(tmp_path / "l.safetensors", style, gen)
    model = read_lora(tmp_path / "l.safetensors", allow_partial=False)
    assert model.arch.name == "wan"
    assert not model.unknown_keys
    _close(_deltas(model), want)


def test_musubi_flattened_names_with_underscores_are_exact(tmp_path):
    """``self_attn_q``, ``cross_attn_k_img``, ``time_projection_1``, ``img_emb_proj_1``: restored from the layout's
    module names, each onto its own weight (an underscore heuristic would split ``k_img`` or ``time_projection``)."""
    gen = torch.Generator().manual_seed(2)
    want = write_lora(tmp_path / "m.safetensors", "musubi", gen, MODS + I2V_MODS)
    model = read_lora(tmp_path / "m.safetensors", allow_partial=False)
    assert model.format == "kohya" and model.arch.variant == "any"   # tiny sizes: no published variant
    assert model.arch.params["transformer"]["i2v"] == 1
    _close(_deltas(model), want)


@pytest.mark.parametrize("src", ["comfy-down", "musubi", "diffusers", "aitoolkit", "wanfun"])
@pytest.mark.parametrize("to", list(WRITABLE))
def test_round_trip_every_format(tmp_path, src, to):
    gen = torch.Generator().manual_seed(3)
    want = write_lora(tmp_path / "in.safetensors", src, gen, MODS + I2V_MODS)
    out = tmp_path / f"out-{to}.safetensors"
    convert(str(tmp_path / "in.safetensors"), str(out), to)
    back = read_lora(out, allow_partial=False)
    assert back.format == ("comfy" if to == "aitoolkit" else to)   # a single-expert AI-Toolkit file is ComfyUI's
    _close(_deltas(back), want)


def test_writers_spell_wan_names(tmp_path):
    gen = torch.Generator().manual_seed(4)
    write_lora(tmp_path / "in.safetensors", "comfy-ab", gen)
    keys = {}
    for to in ("kohya", "comfy", "diffusers"):
        convert(str(tmp_path / "in.safetensors"), str(tmp_path / f"{to}.safetensors"), to)
        with safe_open(str(tmp_path / f"{to}.safetensors"), "pt") as f:
            keys[to] = set(f.keys())
    assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in keys["kohya"]          # musubi-tuner's spelling
    assert "lora_unet_time_projection_1.alpha" in keys["kohya"]
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in keys["comfy"]    # ComfyUI's Wan names
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in keys["diffusers"]
    assert "transformer.condition_embedder.time_proj.lora_B.weight" in keys["diffusers"]
    assert "transformer.patch_embedding.lora_A.weight" in keys["diffusers"]


def test_distill_full_diffs_bias_and_norm_diffs(tmp_path):
    """lightx2v-style "distill" files: ``.diff`` (5-D patch_embedding, head), ``.diff_b`` on Linears and on the
    cross-attention LayerNorm ``norm3``, norm and modulation diffs; every key lands on its own parameter and the
    written comfy/kohya files spell them as ComfyUI reads them."""
    g = torch.Generator().manual_seed(5)
    t = {
        "diffusion_model.patch_embedding.diff": torch.randn(H, IN, 1, 2, 2, generator=g),
        "diffusion_model.patch_embedding.diff_b": torch.randn(H, generator=g),
        "diffusion_model.head.head.diff": torch.randn(HEAD, H, generator=g),
        "diffusion_model.head.head.diff_b": torch.randn(HEAD, generator=g),
        "diffusion_model.blocks.0.self_attn.q.diff_b": torch.randn(H, generator=g),
        "diffusion_model.blocks.0.norm3.diff": torch.randn(H, generator=g),
        "diffusion_model.blocks.0.norm3.diff_b": torch.randn(H, generator=g),
        "diffusion_model.blocks.1.self_attn.norm_q.diff": torch.randn(H, generator=g),
        "diffusion_model.blocks.1.modulation.diff": torch.randn(1, 6, H, generator=g),
        "diffusion_model.head.modulation.diff": torch.randn(1, 2, H, generator=g),
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(R, H, generator=g),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(H, R, generator=g),
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(2.0),
    }
    save_file(t, str(tmp_path / "d.safetensors"))
    model = read_lora(tmp_path / "d.safetensors", allow_partial=False)
    got = _deltas(model)
    p = "diffusion_model."
    assert torch.equal(got["patch_embedding"], t[p + "patch_embedding.diff"])
    assert torch.equal(got["blocks.0.norm3.weight"], t[p + "blocks.0.norm3.diff"])
    assert torch.equal(got["blocks.0.norm3.bias"], t[p + "blocks.0.norm3.diff_b"])
    assert torch.equal(got["blocks.1.self_attn.norm_q.weight"], t[p + "blocks.1.self_attn.norm_q.diff"])
    assert torch.equal(got["blocks.1.modulation"], t[p + "blocks.1.modulation.diff"])
    biases = {p.target.module: p.bias for p in model.patches if p.bias is not None}
    assert torch.equal(biases["blocks.0.self_attn.q"], t[p + "blocks.0.self_attn.q.diff_b"])
    assert torch.equal(biases["patch_embedding"], t[p + "patch_embedding.diff_b"])
    for to, prefix in (("comfy", "diffusion_model.blocks.0.norm3"), ("kohya", "lora_unet_blocks_0_norm3")):
        out = tmp_path / f"{to}.safetensors"
        convert(str(tmp_path / "d.safetensors"), str(out), to)
        with safe_open(str(out), "pt") as f:
            keys = set(f.keys())
            assert {f"{prefix}.diff", f"{prefix}.diff_b"} <= keys, sorted(keys)
        back = read_lora(out, allow_partial=False)
        _close(_deltas(back), got)


# ----------------------------------------------------------------------------------------------
# Paired experts (Wan 2.2 A14B)
# ----------------------------------------------------------------------------------------------

def _combined(path, gen, naming: str = "native") -> dict[str, dict[str, torch.Tensor]]:
    """AI-Toolkit's combined Wan 2.2 file: transformer_1 (high noise), transformer_2 (low noise); AI-Toolkit saves
    Wan names (its convert_to_original), some files have diffusers names."""
    tensors: dict[str, torch.Tensor] = {}
    want: dict[str, dict[str, torch.Tensor]] = {"transformer": {}, "transformer_2": {}}
    for comp, tag in (("transformer", "transformer_1"), ("transformer_2", "transformer_2")):
        for native, diff, shape in MODS[:5] + MODS[-1:]:
            down, up = _factors(gen, shape)
            name = native if naming == "native" else diff
            tensors[f"diffusion_model.{tag}.{name}.lora_A.weight"] = down
            tensors[f"diffusion_model.{tag}.{name}.lora_B.weight"] = up
            want[comp][native] = _dense(down, up, 1.0)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "wan_2.2_14b"})
    return want


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("naming", ["native", "diffusers"])
def test_combined_file_reads_both_experts(tmp_path, naming):
    want = _combined(tmp_path / "c.safetensors", torch.Generator().manual_seed(6), naming)
    model = read_lora(tmp_path / "c.safetensors", allow_partial=False)
    assert model.format == "aitoolkit"
    for comp in ("transformer", "transformer_2"):
        _close(_deltas(model, comp), want[comp])


def test_combined_to_pair_and_back_is_byte_identical(tmp_path):
    _combined(tmp_path / "c.safetensors", torch.Generator().manual_seed(7))
    r = convert(str(tmp_path / "c.safetensors"), str(tmp_path / "pair.safetensors"), "aitoolkit", split_experts=True)
    high, low = tmp_path / "pair_high_noise.safetensors", tmp_path / "pair_low_noise.safetensors"
    assert r.outputs == [str(high), str(low)]
    # AI-Toolkit's split files: the combined keys without the expert designation
    orig = _tensors(tmp_path / "c.safetensors")
    for path, tag in ((high, "transformer_1"), (low, "transformer_2")):
        got = _tensors(path)
        mine = {k.replace(f".{tag}.", "."): v for k, v in orig.items() if f".{tag}." in k}
        assert set(got) == set(mine)
        assert all(torch.equal(got[k], mine[k]) for k in mine)
    # and back: the pair joins into one combined file with exactly the original tensors
    convert([str(high), str(low)], str(tmp_path / "back.safetensors"), "aitoolkit")
    back = _tensors(tmp_path / "back.safetensors")
    assert set(back) == set(orig)
    assert all(torch.equal(back[k], orig[k]) and back[k].dtype == orig[k].dtype for k in orig)


def test_split_files_are_tagged_and_read_as_their_expert(tmp_path):
    want = _combined(tmp_path / "c.safetensors", torch.Generator().manual_seed(8))
    convert(str(tmp_path / "c.safetensors"), str(tmp_path / "x.safetensors"), "kohya", split_experts=True)
    low = tmp_path / "x_low_noise.safetensors"
    plain = tmp_path / "renamed.safetensors"        # renamed: the metadata still says which expert it is
    plain.write_bytes(low.read_bytes())
    for path in (low, plain):
        m = read_lora(path, allow_partial=False)
        assert m.components() == ["transformer_2"]
        assert m.arch.variant == "any" or m.arch.variant == "a14b"
        _close(_deltas(m, "transformer_2"), want["transformer_2"])


def test_untagged_pair_cannot_be_joined_and_single_format_cannot_hold_both(tmp_path):
    gen = torch.Generator().manual_seed(9)
    write_lora(tmp_path / "a.safetensors", "musubi", gen)
    write_lora(tmp_path / "b.safetensors", "musubi", gen)
    with pytest.raises(UsageError, match="same expert"):
        convert([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")], str(tmp_path / "o.safetensors"),
                "comfy")
    _combined(tmp_path / "c.safetensors", gen)
    with pytest.raises(UsageError, match="--split-experts"):
        convert(str(tmp_path / "c.safetensors"), str(tmp_path / "k.safetensors"), "kohya")
    assert not (tmp_path / "k.safetensors").exists()


def test_explicit_expert_for_an_untagged_file(tmp_path):
    gen = torch.Generator().manual_seed(10)
    write_lora(tmp_path / "a.safetensors", "diffusers", gen)
    convert(str(tmp_path / "a.safetensors"), str(tmp_path / "o.safetensors"), "comfy", expert="low_noise")
    assert read_lora(tmp_path / "o.safetensors").components() == ["transformer_2"]
    with pytest.raises(LorakitError, match="unknown expert"):
        convert(str(tmp_path / "a.safetensors"), str(tmp_path / "p.safetensors"), "comfy", expert="medium")


# ----------------------------------------------------------------------------------------------
# Full-size mapping from the reference shape files (no weights)
# ----------------------------------------------------------------------------------------------

REF = reference_shapes()
FULL = ["wan21-t2v-14b", "wan21-t2v-1.3b", "wan21-i2v-14b", "wan22-ti2v-5b"]


def _ref(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((REF / f"{name}.json").read_text())["params"].items()}


@pytest.mark.skipif(not (REF / "wan21-t2v-14b-native.json").exists(), reason="reference shape files not available")
@pytest.mark.parametrize("name", FULL)
def test_full_size_mapping_native_diffusers_and_back(name):
    """Every Linear/Conv weight of the native file maps to exactly the diffusers file's weight of the same shape and
    back, and every loose parameter (norms, modulation) too; nothing is left over on either side."""
    from lorakit.layouts import WAN, NameIndex
    from lorakit.layouts.base import ParamIndex
    native, diff = _ref(f"{name}-native"), _ref(f"{name}-diffusers")
    comp = WAN.components["transformer"]
    to_diff, to_native = NameIndex(comp, "native", flat=False), NameIndex(comp, "diffusers", flat=False)
    pn, pd = ParamIndex(comp, "native", flat=False), ParamIndex(comp, "diffusers", flat=False)
    seen: set[str] = set()
    for key, shape in native.items():
        mod, _, leaf = key.rpartition(".")
        m = to_diff.match(mod) if leaf in ("weight", "bias") else None
        if m is not None:
            (alias,) = m.spec.names("diffusers")
            dkey = f"{alias.template.format(i=m.index) if m.index is not None else alias.template}.{leaf}"
            back = to_native.match(dkey.rpartition(".")[0])
            assert back is not None and back.native == mod
        else:
            pm = pn.match(key)
            assert pm is not None, key
            tmpl = pm.spec.aliases["diffusers"]
            dkey = tmpl.format(i=pm.index) if pm.index is not None else tmpl
            bp = pd.match(dkey)
            assert bp is not None and bp.native == key
        assert diff[dkey] == shape, (key, dkey)
        seen.add(dkey)
    assert seen == set(diff)


@pytest.mark.skipif(not (REF / "wan21-t2v-14b-native.json").exists(), reason="reference shape files not available")
@pytest.mark.parametrize("name, variant", [("wan21-t2v-14b", "t2v-14b"), ("wan21-t2v-1.3b", "t2v-1.3b"),
                                           ("wan21-i2v-14b", "i2v-14b"), ("wan22-ti2v-5b", "ti2v-5b")])
def test_full_size_variants_from_lora_shapes(tmp_path, name, variant):
    """Rank-1 LoRAs on every Linear of each full-size model (header-only files): the variant is told from shapes."""
    from reference import header_only
    native = _ref(f"{name}-native")
    entries: dict[str, tuple[int, ...]] = {}
    for key, shape in native.items():
        if key.endswith(".weight") and len(shape) == 2:
            stem = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            entries[f"{stem}.lora_down.weight"] = (1, shape[1])
            entries[f"{stem}.lora_up.weight"] = (shape[0], 1)
    from lorakit.formats import parse
    from lorakit.io import open_weights
    with open_weights(header_only(tmp_path / "l.safetensors", entries)) as f:
        parsed = parse(f)
    assert parsed.arch.spec.name == "wan" and not parsed.unknown_keys
    assert parsed.arch.variant == variant
    n2d = {"wan21-t2v-14b": 400, "wan21-t2v-1.3b": 300, "wan21-i2v-14b": 480, "wan22-ti2v-5b": 300}[name]
    assert sum(1 for e in parsed.entries if e.match.native.startswith("blocks.")) == n2d


def test_target_equality_in_patches():
    assert Target("transformer", "blocks.0.self_attn.q") != Target("transformer_2", "blocks.0.self_attn.q")


def test_emit_keeps_both_experts_apart():
    from lorakit.lora.adapters import LoRA
    from lorakit.lora.model import ArchInstance, LoraModel, Patch
    from lorakit.layouts import WAN
    from lorakit.samples.synthetic import TINY_WAN
    inst = ArchInstance(WAN, {"transformer": dict(TINY_WAN), "transformer_2": dict(TINY_WAN)})
    lora = LoRA(alpha=None, down=torch.ones(1, H), up=torch.ones(H, 1))
    model = LoraModel(inst, [Patch(Target(c, "blocks.0.self_attn.q"), lora) for c in ("transformer", "transformer_2")],
                      "comfy")
    keys = set(emit(model, "aitoolkit").tensors)
    assert keys == {f"diffusion_model.transformer_{n}.blocks.0.self_attn.q.{s}" for n in (1, 2)
                    for s in ("lora_A.weight", "lora_B.weight")}
    with pytest.raises(UsageError, match="--split-experts"):
        emit(model, "comfy")


def test_cli_split_join_and_expert(tmp_path, capsys):
    from lorakit.cli import main
    _combined(tmp_path / "c.safetensors", torch.Generator().manual_seed(11))
    assert main(["convert", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "p.safetensors"), "--to", "kohya",
                 "--split-experts"]) == 0
    high, low = tmp_path / "p_high_noise.safetensors", tmp_path / "p_low_noise.safetensors"
    assert main(["convert", str(high), str(low), "-o", str(tmp_path / "j.safetensors"), "--to", "aitoolkit",
                 "--join-experts"]) == 0
    got = _tensors(tmp_path / "j.safetensors")
    assert any(k.startswith("diffusion_model.transformer_2.") for k in got)
    # one file per expert is all kohya can hold: refused with the fix, nothing written
    assert main(["convert", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "k.safetensors"),
                 "--to", "kohya"]) != 0
    assert "--split-experts" in capsys.readouterr().err
    assert not (tmp_path / "k.safetensors").exists()
    write_lora(tmp_path / "u.safetensors", "musubi", torch.Generator().manual_seed(12))
    assert main(["convert", str(tmp_path / "u.safetensors"), "-o", str(tmp_path / "u2.safetensors"), "--to",
                 "diffusers", "--expert", "low_noise"]) == 0
    assert "load_into_transformer_2" in capsys.readouterr().err     # the diffusers warning for the second expert


@pytest.mark.skipif(not (REF / "wan21-t2v-14b-native.json").exists(), reason="reference shape files not available")
def test_full_size_wan22_a14b_pair_and_single_expert(tmp_path):
    """Wan 2.2 A14B: a combined file of two T2V-14B-shaped experts is the A14B variant from its keys; a single
    expert file is A14B when its name tags it, T2V 14B (key-identical) otherwise."""
    from reference import header_only
    from lorakit.formats import parse
    from lorakit.io import open_weights
    native = _ref("wan21-t2v-14b-native")
    linears = {k[: -len(".weight")]: s for k, s in native.items() if k.endswith(".weight") and len(s) == 2}
    combined: dict[str, tuple[int, ...]] = {}
    single: dict[str, tuple[int, ...]] = {}
    for name, (o, i) in linears.items():
        for expert in ("transformer_1", "transformer_2"):
            combined[f"diffusion_model.{expert}.{name}.lora_A.weight"] = (1, i)
            combined[f"diffusion_model.{expert}.{name}.lora_B.weight"] = (o, 1)
        single[f"diffusion_model.{name}.lora_A.weight"], single[f"diffusion_model.{name}.lora_B.weight"] = (1, i), (o, 1)
    with open_weights(header_only(tmp_path / "c.safetensors", combined)) as f:
        p = parse(f)
    assert p.arch.variant == "a14b" and not p.unknown_keys
    assert {e.component for e in p.entries} == {"transformer", "transformer_2"}
    for name, variant, comp in (("lora_low_noise.safetensors", "a14b", "transformer_2"),
                                ("lora_high_noise.safetensors", "a14b", "transformer"),
                                ("lora.safetensors", "t2v-14b", "transformer")):
        with open_weights(header_only(tmp_path / name, single)) as f:
            p = parse(f)
        assert (p.arch.variant, {e.component for e in p.entries}) == (variant, {comp}), name
