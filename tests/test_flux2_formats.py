"""FLUX.2 LoRA spellings on tiny dev- and Klein-shaped models: every read format -> every write format -> read back.

The fixture files are written key by key here with the reference ``safetensors`` package; the module tables are
typed out from ``shared/reference/shapes/README.md`` (FLUX.2 map), not taken from lorakit's layout, and the
expected ΔW of every BFL weight is computed here from the factors (``(α/r)·B·A``, ``kron(w1, w2)``), with the
diffusers row windows and the final layer's half swap applied by hand.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

from lorakit.errors import LossyConversionError, UnsupportedArchitectureError
from lorakit.formats import read_lora
from lorakit.lora.model import Target, dense_deltas
from lorakit.ops.conversion import convert

SIZES = {
    "dev": {"H": 32, "M": 96, "IN": 16, "OUT": 16, "CTX": 24, "T": 8, "double": 2, "single": 2, "guidance": True},
    "klein": {"H": 48, "M": 144, "IN": 16, "OUT": 16, "CTX": 40, "T": 8, "double": 1, "single": 2, "guidance": False},
}
WRITABLE = ("kohya", "comfy", "diffusers")


def native_modules(s: dict) -> dict[str, tuple[int, int]]:
    """BFL Linear name -> (out, in)."""
    H, M = s["H"], s["M"]
    mods = {"img_in": (H, s["IN"]), "txt_in": (H, s["CTX"]), "time_in.in_layer": (H, s["T"]),
            "time_in.out_layer": (H, H), "double_stream_modulation_img.lin": (6 * H, H),
            "double_stream_modulation_txt.lin": (6 * H, H), "single_stream_modulation.lin": (3 * H, H),
            "final_layer.adaLN_modulation.1": (2 * H, H), "final_layer.linear": (s["OUT"], H)}
    if s["guidance"]:
        mods.update({"guidance_in.in_layer": (H, s["T"]), "guidance_in.out_layer": (H, H)})
    for i in range(s["double"]):
        for st in ("img", "txt"):
            b = f"double_blocks.{i}.{st}_"
            mods.update({b + "attn.qkv": (3 * H, H), b + "attn.proj": (H, H), b + "mlp.0": (2 * M, H),
                         b + "mlp.2": (H, M)})
    for j in range(s["single"]):
        mods.update({f"single_blocks.{j}.linear1": (3 * H + 2 * M, H), f"single_blocks.{j}.linear2": (H, H + M)})
    return mods


@dataclass(frozen=True)
class Split:
    native: str
    start: int
    stop: int
    swap: bool = False


def diffusers_modules(s: dict) -> dict[str, Split]:
    """diffusers Linear name -> the BFL weight and rows it addresses."""
    H = s["H"]
    nat = native_modules(s)
    one = {"x_embedder": "img_in", "context_embedder": "txt_in",
           "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
           "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
           "single_stream_modulation.linear": "single_stream_modulation.lin", "proj_out": "final_layer.linear"}
    if s["guidance"]:
        one.update({"time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
                    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer"})
    out = {d: Split(n, 0, nat[n][0]) for d, n in one.items()}
    out["norm_out.linear"] = Split("final_layer.adaLN_modulation.1", 0, 2 * H, swap=True)
    for i in range(s["double"]):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for k, part in enumerate("qkv"):
            out[d + f"attn.to_{part}"] = Split(b + "img_attn.qkv", k * H, (k + 1) * H)
            out[d + f"attn.add_{part}_proj"] = Split(b + "txt_attn.qkv", k * H, (k + 1) * H)
        for dn, bn in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                       ("ff.linear_in", "img_mlp.0"), ("ff.linear_out", "img_mlp.2"),
                       ("ff_context.linear_in", "txt_mlp.0"), ("ff_context.linear_out", "txt_mlp.2")):
            out[d + dn] = Split(b + bn, 0, nat[b + bn][0])
    for j in range(s["single"]):
        b, d = f"single_blocks.{j}.", f"single_transformer_blocks.{j}."
        out[d + "attn.to_qkv_mlp_proj"] = Split(b + "linear1", 0, nat[b + "linear1"][0])
        out[d + "attn.to_out"] = Split(b + "linear2", 0, nat[b + "linear2"][0])
    return out


# ---------------------------------------------------------------------------------------------
# Fixture files, spelled by hand
# ---------------------------------------------------------------------------------------------

def _lora(out: int, inp: int, r: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(r, inp, generator=g) / inp ** 0.5, torch.randn(out, r, generator=g) * 0.1


def _flat(name: str) -> str:
    return name.replace(".", "_")


@dataclass(frozen=True)
class Style:
    naming: str                      # "native" | "diffusers"
    stem: Callable[[str], str]
    down: str
    up: str
    alpha: bool


STYLES = {
    "kohya": Style("native", lambda n: "lora_unet_" + _flat(n), "lora_down.weight", "lora_up.weight", True),
    "musubi_diffusers": Style("diffusers", lambda n: "lora_unet_" + _flat(n), "lora_down.weight",
                              "lora_up.weight", True),
    "comfy": Style("native", lambda n: "diffusion_model." + n, "lora_down.weight", "lora_up.weight", True),
    "aitoolkit": Style("native", lambda n: "diffusion_model." + n, "lora_A.weight", "lora_B.weight", False),
    "comfy_diffusers": Style("diffusers", lambda n: "diffusion_model." + n, "lora_A.weight", "lora_B.weight", True),
    "diffusers": Style("diffusers", lambda n: "transformer." + n, "lora_A.weight", "lora_B.weight", False),
    "fal": Style("native", lambda n: "base_model.model." + n, "lora_A.weight", "lora_B.weight", False),
    "peft": Style("diffusers", lambda n: "base_model.model." + n, "lora_A.weight", "lora_B.weight", False),
    "bfl": Style("native", lambda n: n, "lora_A.weight", "lora_B.weight", True),
    "diffsynth": Style("diffusers", lambda n: n, "lora_A.weight", "lora_B.weight", False),
    "onetrainer": Style("diffusers", lambda n: "lora_transformer_" + _flat(n), "lora_down.weight", "lora_up.weight",
                        True),
}
EXPECT_FORMAT = {"kohya": "kohya", "musubi_diffusers": "kohya", "comfy": "comfy", "aitoolkit": "comfy",
                 "comfy_diffusers": "comfy", "diffusers": "diffusers", "fal": "peft", "peft": "peft", "bfl": "bfl",
                 "diffsynth": "diffsynth", "onetrainer": "onetrainer", "lycoris_lokr": "lycoris",
                 "comfy_lokr_fused": "comfy"}


def _place(want: dict[str, torch.Tensor], nat: dict[str, tuple[int, int]], sp: Split, delta: torch.Tensor) -> None:
    full = want.setdefault(sp.native, torch.zeros(nat[sp.native]))
    if sp.swap:
        h = delta.shape[0] // 2
        delta = torch.cat([delta[h:], delta[:h]])
    full[sp.start:sp.stop] += delta


def write_lora(path, variant: str, style_name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a LoRA on every Linear of the tiny model in one spelling; return the expected ΔW per BFL weight."""
    s = SIZES[variant]
    g = torch.Generator().manual_seed(seed)
    nat = native_modules(s)
    tensors: dict[str, torch.Tensor] = {}
    want: dict[str, torch.Tensor] = {}
    if style_name == "lycoris_lokr":
        # SimpleTuner LyCORIS: flattened diffusers names, LoKr with a full w1 and a rank-1 w2 (α = 2 -> scale 2)
        for n, (name, sp) in enumerate(diffusers_modules(s).items()):
            out, inp = sp.stop - sp.start, nat[sp.native][1]
            stem = "lycoris_" + _flat(name)
            a = 4 if out % 4 == 0 else 2
            w1 = torch.randn(a, 2, generator=g)
            w2a, w2b = torch.randn(out // a, 1, generator=g), torch.randn(1, inp // 2, generator=g) * 0.1
            tensors.update({stem + ".lokr_w1": w1, stem + ".lokr_w2_a": w2a, stem + ".lokr_w2_b": w2b,
                            stem + ".alpha": torch.tensor(2.0)})
            _place(want, nat, sp, 2.0 * torch.kron(w1, w2a @ w2b))
    elif style_name == "comfy_lokr_fused":
        # AI-Toolkit/LyCORIS LoKr on the BFL (fused) modules: qkv and linear1 included
        for name, (out, inp) in nat.items():
            if inp < 16:
                continue        # time_in/guidance_in.in_layer: its exact plain LoRA would exceed the dense weight
            stem = "diffusion_model." + name
            w1 = torch.randn(4, 4, generator=g)
            w2a, w2b = torch.randn(out // 4, 2, generator=g), torch.randn(2, inp // 4, generator=g) * 0.1
            tensors.update({stem + ".lokr_w1": w1, stem + ".lokr_w2_a": w2a, stem + ".lokr_w2_b": w2b,
                            stem + ".alpha": torch.tensor(1.0)})
            _place(want, nat, Split(name, 0, out), 0.5 * torch.kron(w1, w2a @ w2b))
    else:
        st = STYLES[style_name]
        if st.naming == "native":
            mods = [(name, Split(name, 0, o), i) for name, (o, i) in nat.items()]
        else:
            mods = [(name, sp, nat[sp.native][1]) for name, sp in diffusers_modules(s).items()]
        for n, (name, sp, inp) in enumerate(mods):
            r = 2 + n % 3
            down, up = _lora(sp.stop - sp.start, inp, r, g)
            stem = st.stem(name)
            tensors[f"{stem}.{st.down}"], tensors[f"{stem}.{st.up}"] = down, up
            scale = 1.0
            if st.alpha:
                alpha = (1.0, 2.0, 8.0)[n % 3]
                tensors[f"{stem}.alpha"] = torch.tensor(alpha)
                scale = alpha / r
            _place(want, nat, sp, scale * up @ down)
    save_file(tensors, str(path))
    return want


def check(path, want: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    model = read_lora(path)
    assert model.arch.name == "flux2" and model.unknown_keys == []
    got = dense_deltas(model)
    assert {t.module for t in got} == set(want)
    for name, w in want.items():
        d = got[Target("transformer", name)]
        assert d.shape == w.shape, name
        assert float((d - w).abs().max()) <= tol * float(w.abs().max()), name


# every spelling on the dev-shaped model; the Klein-shaped one (other sizes, no guidance embedder) on one spelling
# of each naming and adapter kind
CASES = [("dev", st) for st in EXPECT_FORMAT] + [("klein", st) for st in ("kohya", "diffusers", "fal",
                                                                         "musubi_diffusers", "comfy_lokr_fused")]


@pytest.mark.parametrize("variant,style", CASES)
def test_every_spelling_reads_and_converts_to_every_writer(tmp_path, variant: str, style: str) -> None:
    src = tmp_path / f"{style}.safetensors"
    want = write_lora(src, variant, style)
    model = read_lora(src)
    assert model.format == EXPECT_FORMAT[style]
    check(src, want)
    for fmt in WRITABLE:
        out = tmp_path / f"{style}_{fmt}.safetensors"
        convert(src, out, to=fmt)
        assert read_lora(out).format == fmt
        check(out, want)


def test_variants_and_block_counts(tmp_path) -> None:
    for variant, s in SIZES.items():
        path = tmp_path / f"{variant}.safetensors"
        write_lora(path, variant, "kohya")
        inst = read_lora(path).arch
        p = inst.params["transformer"]
        assert (p["H"], p["M"], p["double"], p["single"]) == (s["H"], s["M"], s["double"], s["single"])
        assert p.get("guidance", 1) == (1 if s["guidance"] else p.get("guidance", 1))


# ---------------------------------------------------------------------------------------------
# Flattened names restored from the layout's module names (no heuristics)
# ---------------------------------------------------------------------------------------------

def test_musubi_flattened_names_with_underscores_are_read_exactly(tmp_path) -> None:
    s = SIZES["dev"]
    H, M = s["H"], s["M"]
    g = torch.Generator().manual_seed(5)
    cases = {  # flattened stem -> (BFL weight, rows, out, in)
        "lora_unet_transformer_blocks_1_attn_to_q": ("double_blocks.1.img_attn.qkv", (0, H), H, H),
        "lora_unet_transformer_blocks_1_attn_to_v": ("double_blocks.1.img_attn.qkv", (2 * H, 3 * H), H, H),
        "lora_unet_transformer_blocks_0_attn_add_k_proj": ("double_blocks.0.txt_attn.qkv", (H, 2 * H), H, H),
        "lora_unet_transformer_blocks_0_attn_to_out_0": ("double_blocks.0.img_attn.proj", None, H, H),
        "lora_unet_transformer_blocks_0_ff_context_linear_in": ("double_blocks.0.txt_mlp.0", None, 2 * M, H),
        "lora_unet_transformer_blocks_1_ff_linear_out": ("double_blocks.1.img_mlp.2", None, H, M),
        "lora_unet_single_transformer_blocks_1_attn_to_qkv_mlp_proj": ("single_blocks.1.linear1", None,
                                                                       3 * H + 2 * M, H),
        "lora_unet_single_transformer_blocks_0_attn_to_out": ("single_blocks.0.linear2", None, H, H + M),
        "lora_unet_double_blocks_0_img_mlp_0": ("double_blocks.0.img_mlp.0", None, 2 * M, H),
        "lora_unet_double_blocks_1_txt_attn_qkv": ("double_blocks.1.txt_attn.qkv", None, 3 * H, H),
        "lora_unet_double_stream_modulation_img_lin": ("double_stream_modulation_img.lin", None, 6 * H, H),
        "lora_unet_time_guidance_embed_guidance_embedder_linear_1": ("guidance_in.in_layer", None, H, s["T"]),
        "lora_unet_final_layer_adaLN_modulation_1": ("final_layer.adaLN_modulation.1", None, 2 * H, H),
    }
    tensors = {}
    for stem, (_, _, o, i) in cases.items():
        tensors[stem + ".lora_down.weight"], tensors[stem + ".lora_up.weight"] = _lora(o, i, 2, g)
        tensors[stem + ".alpha"] = torch.tensor(2.0)
    path = tmp_path / "musubi.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora_flux_2"})
    model = read_lora(path)
    assert model.format == "kohya" and model.arch.name == "flux2" and model.unknown_keys == []
    by_source = {p.source: p for p in model.patches}
    assert set(by_source) == set(cases)
    for stem, (native, rows, o, i) in cases.items():
        p = by_source[stem]
        assert p.target.module == native and p.rows == rows, stem
        want = tensors[stem + ".lora_up.weight"] @ tensors[stem + ".lora_down.weight"]
        assert torch.allclose(p.dense(), want, rtol=0, atol=1e-7), stem


def test_a_near_miss_flattened_name_is_not_guessed(tmp_path) -> None:
    g = torch.Generator().manual_seed(6)
    t = {}
    for stem in ("lora_unet_transformer_blocks_0_attn_to_q", "lora_unet_transformer_blocks_0_ff_contextlinear_in"):
        t[stem + ".lora_down.weight"], t[stem + ".lora_up.weight"] = _lora(32, 32, 2, g)
    path = tmp_path / "near.safetensors"
    save_file(t, str(path))
    model = read_lora(path)
    assert model.unknown_keys == sorted(k for k in t if "contextlinear" in k)


# ---------------------------------------------------------------------------------------------
# LoKr over the fused q/k/v
# ---------------------------------------------------------------------------------------------

def test_fused_lokr_kept_exactly_with_keep_algo(tmp_path) -> None:
    src = tmp_path / "lokr.safetensors"
    want = write_lora(src, "dev", "comfy_lokr_fused")
    for fmt in ("comfy", "kohya"):
        out = tmp_path / f"kept_{fmt}.safetensors"
        convert(src, out, to=fmt, keep_algo=True)
        from safetensors import safe_open
        with safe_open(str(out), "pt") as fh:
            keys = set(fh.keys())
        stem = ("diffusion_model.double_blocks.0.img_attn.qkv" if fmt == "comfy"
                else "lora_unet_double_blocks_0_img_attn_qkv")
        assert {stem + ".lokr_w1", stem + ".lokr_w2_a", stem + ".lokr_w2_b"} <= keys
        check(out, want)


def test_split_lokr_onto_fused_qkv_keep_algo_refused_plain_exact(tmp_path) -> None:
    # three LoKr modules (to_q, to_k, to_v) with their own factors are no single LoKr on the fused qkv
    src = tmp_path / "lycoris.safetensors"
    want = write_lora(src, "dev", "lycoris_lokr")
    with pytest.raises(LossyConversionError, match="LoKr"):
        convert(src, tmp_path / "no.safetensors", to="comfy", keep_algo=True)
    assert not (tmp_path / "no.safetensors").exists()
    out = tmp_path / "plain.safetensors"
    convert(src, out, to="comfy")          # exact plain LoRA factors, block-diagonal on the fused weight
    check(out, want)


@pytest.mark.parametrize("pair", list(itertools.product(["dev", "klein"], WRITABLE)))
def test_writer_spelling(tmp_path, pair) -> None:
    variant, fmt = pair
    src = tmp_path / "k.safetensors"
    write_lora(src, variant, "kohya")
    out = tmp_path / f"o_{fmt}.safetensors"
    convert(src, out, to=fmt)
    from safetensors import safe_open
    with safe_open(str(out), "pt") as fh:
        keys = set(fh.keys())
    s = SIZES[variant]
    if fmt == "kohya":
        assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in keys
        assert "lora_unet_double_stream_modulation_txt_lin.alpha" in keys
    elif fmt == "comfy":
        assert "diffusion_model.double_blocks.0.txt_attn.qkv.lora_up.weight" in keys
    else:
        assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight" in keys
        assert "transformer.transformer_blocks.0.attn.add_v_proj.lora_B.weight" in keys
        assert ("transformer.time_guidance_embed.guidance_embedder.linear_2.lora_A.weight" in keys) == s["guidance"]
        assert not any(".alpha" in k for k in keys)


def test_lokr_only_klein_file_is_told_from_flux1_by_its_composed_shape(tmp_path) -> None:
    # no LoRA factor to read sizes from: the Kronecker factors compose 18432 × 3072 (SwiGLU 2·3·3072 rows), which
    # read as FLUX.1 would be an MLP of 6×hidden
    g = torch.Generator().manual_seed(8)
    stem = "diffusion_model.double_blocks.0.img_mlp.0"
    t = {stem + ".lokr_w1": torch.randn(6, 4, generator=g), stem + ".lokr_w2_a": torch.randn(3072, 1, generator=g),
         stem + ".lokr_w2_b": torch.randn(1, 768, generator=g), stem + ".alpha": torch.tensor(1.0)}
    path = tmp_path / "lokr.safetensors"
    save_file(t, str(path))
    model = read_lora(path)
    assert (model.arch.name, model.arch.variant, model.format) == ("flux2", "klein-4b", "comfy")
    assert model.patches[0].adapter.weight_shape == (18432, 3072)


def test_flux1_lora_is_not_read_as_flux2(tmp_path) -> None:
    # FLUX.1's single-block linear1 (3H + 4H rows) also parses under FLUX.2's BFL names; FLUX.2 defers it
    g = torch.Generator().manual_seed(9)
    t = {}
    for stem, o in (("lora_unet_single_blocks_0_linear1", 7 * 32), ("lora_unet_double_blocks_0_img_mlp_0", 4 * 32)):
        t[stem + ".lora_down.weight"], t[stem + ".lora_up.weight"] = _lora(o, 32, 2, g)
    path = tmp_path / "f1.safetensors"
    save_file(t, str(path))
    model = read_lora(path)
    assert model.arch.name == "flux1"
    with pytest.raises(UnsupportedArchitectureError, match="FLUX.1") as exc:
        read_lora(path, arch="flux2")
    assert "--arch flux1" in (getattr(exc.value, "hint", "") or "")


def test_fal_kontext_flux1_file_stays_flux1(tmp_path) -> None:
    # fal's PEFT container with BFL names exists for FLUX.1 Kontext too (qkv 3·3072, linear1 3·3072 + 4·3072)
    g = torch.Generator().manual_seed(10)
    t = {}
    for stem, o in (("base_model.model.double_blocks.0.img_attn.qkv", 3 * 3072),
                    ("base_model.model.single_blocks.0.linear1", 7 * 3072)):
        t[stem + ".lora_A.weight"], t[stem + ".lora_B.weight"] = _lora(o, 3072, 1, g)
    path = tmp_path / "kontext.safetensors"
    save_file(t, str(path))
    model = read_lora(path)
    assert (model.arch.name, model.format, model.unknown_keys) == ("flux1", "peft", [])
