"""Qwen-Image and Z-Image LoRAs: every readable spelling -> every writable format -> read back, exactly.

Fixture files are written key by key here with ``safetensors``; the module tables (tiny sizes) and the Z-Image
diffusers ⇄ ComfyUI map (fused ``attention.qkv`` = to_q, to_k, to_v rows) are typed out from the reference shapes
README, and the expected deltas are computed here from the factors (ΔW = α/r · up @ down), independently of
lorakit's layout tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.formats import read_lora
from lorakit.lora.model import dense_deltas
from lorakit.ops.conversion import convert

H, M, IN, OUT, CTX, T, R = 32, 128, 16, 16, 24, 256, 4
ZM, ZT, ZF, ZTM, ZCAP = 85, 32, 256, 64, 20
WRITABLE = ("kohya", "comfy", "diffusers")
TOL = 1e-6


def flat(name: str) -> str:
    return name.replace(".", "_")


# ---------------------------------------------------------------------------------------------
# Module tables (by hand)
# ---------------------------------------------------------------------------------------------

def qwen_modules() -> dict[str, tuple[int, int]]:
    """Qwen-Image Linear name (diffusers = native) -> (out, in)."""
    mods = {"img_in": (H, IN), "txt_in": (H, CTX), "time_text_embed.timestep_embedder.linear_1": (H, T),
            "time_text_embed.timestep_embedder.linear_2": (H, H)}
    for i in range(2):
        b = f"transformer_blocks.{i}."
        mods[b + "img_mod.1"] = mods[b + "txt_mod.1"] = (6 * H, H)
        for s in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            mods[b + "attn." + s] = (H, H)
        for s in ("img_mlp", "txt_mlp"):
            mods[b + s + ".net.0.proj"] = (M, H)
            mods[b + s + ".net.2"] = (H, M)
    mods["norm_out.linear"] = (2 * H, H)
    mods["proj_out"] = (OUT, H)
    return mods


def zimage_modules() -> dict[str, tuple[int, int]]:
    """Z-Image diffusers Linear name -> (out, in): 2 layers, one noise and one context refiner block."""
    mods = {"all_x_embedder.2-1": (H, IN), "t_embedder.mlp.0": (ZTM, ZF), "t_embedder.mlp.2": (ZT, ZTM),
            "cap_embedder.1": (H, ZCAP), "all_final_layer.2-1.linear": (OUT, H),
            "all_final_layer.2-1.adaLN_modulation.1": (H, ZT)}
    for block in ("layers.0", "layers.1", "noise_refiner.0", "context_refiner.0"):
        for s in ("to_q", "to_k", "to_v", "to_out.0"):
            mods[f"{block}.attention.{s}"] = (H, H)
        mods[f"{block}.feed_forward.w1"] = mods[f"{block}.feed_forward.w3"] = (ZM, H)
        mods[f"{block}.feed_forward.w2"] = (H, ZM)
        if not block.startswith("context"):
            mods[f"{block}.adaLN_modulation.0"] = (4 * H, ZT)
    return mods


def zimage_native(name: str) -> tuple[str, int]:
    """diffusers name -> (ComfyUI name, row offset in it)."""
    for k, s in enumerate(("to_q", "to_k", "to_v")):
        if name.endswith(".attention." + s):
            return name[: -len(s)] + "qkv", k * H
    if name.endswith(".attention.to_out.0"):
        return name[: -len("to_out.0")] + "out", 0
    if name == "all_x_embedder.2-1":
        return "x_embedder", 0
    if name.startswith("all_final_layer.2-1."):
        return "final_layer." + name[len("all_final_layer.2-1."):], 0
    return name, 0


def zimage_native_modules() -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for name, (o, i) in zimage_modules().items():
        native, start = zimage_native(name)
        have = out.get(native, (0, i))
        out[native] = (max(have[0], start + o), i)
    return out


# ---------------------------------------------------------------------------------------------
# Fixture files
# ---------------------------------------------------------------------------------------------

class Fixture:
    def __init__(self, seed: int, native_shapes: dict[str, tuple[int, int]]) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.tensors: dict[str, torch.Tensor] = {}
        self.shapes = native_shapes
        self.expected: dict[str, torch.Tensor] = {}

    def lora(self, stem: str, native: str, start: int, out: int, inp: int, *, down: str, up: str,
             alpha: float | None) -> None:
        a = torch.randn(R, inp, generator=self.gen) / math.sqrt(inp)
        b = torch.randn(out, R, generator=self.gen) * 0.1
        self.tensors[f"{stem}.{down}"], self.tensors[f"{stem}.{up}"] = a, b
        if alpha is not None:
            self.tensors[f"{stem}.alpha"] = torch.tensor(alpha)
        full = self.expected.setdefault(native, torch.zeros(self.shapes[native], dtype=torch.float64))
        full[start:start + out] += (alpha / R if alpha is not None else 1.0) * (b.double() @ a.double())


Spelling = tuple[str, Callable[[str], str], str, str, bool]   # (format, stem(name), down, up, has alpha)
KOHYA, PEFT = ("lora_down.weight", "lora_up.weight"), ("lora_A.weight", "lora_B.weight")

QWEN_SPELLINGS: dict[str, Spelling] = {
    "musubi": ("kohya", lambda n: "lora_unet_" + flat(n), *KOHYA, True),
    "comfyui": ("comfy", lambda n: "diffusion_model." + n, *KOHYA, True),
    "ai-toolkit": ("comfy", lambda n: "diffusion_model." + n, *PEFT, False),
    "diffusers": ("diffusers", lambda n: "transformer." + n, *PEFT, False),
    "diffsynth-peft": ("peft", lambda n: n, "lora_A.default.weight", "lora_B.default.weight", False),
    "diffsynth": ("diffsynth", lambda n: n, *PEFT, False),
    "peft": ("peft", lambda n: "base_model.model." + n, *PEFT, False),
    "lycoris": ("lycoris", lambda n: "lycoris_" + flat(n), *KOHYA, True),
}

# Z-Image: (format, naming the stems use: "diffusers" split or "comfy" fused, stem(name), down, up, alpha)
ZIMAGE_SPELLINGS: dict[str, tuple[str, str, Callable[[str], str], str, str, bool]] = {
    "musubi": ("kohya", "diffusers", lambda n: "lora_unet_" + flat(n), *KOHYA, True),
    "kohya-double-underscore": ("kohya", "diffusers", lambda n: "lora_unet__" + flat(n), *KOHYA, True),
    "kohya-comfy-names": ("kohya", "comfy", lambda n: "lora_unet_" + flat(n), *KOHYA, True),
    "comfyui-fused": ("comfy", "comfy", lambda n: "diffusion_model." + n, *KOHYA, True),
    "ai-toolkit": ("comfy", "diffusers", lambda n: "diffusion_model." + n, *PEFT, False),
    "diffusers": ("diffusers", "diffusers", lambda n: "transformer." + n, *PEFT, False),
    "diffsynth": ("diffsynth", "diffusers", lambda n: n, *PEFT, False),
    "lycoris": ("lycoris", "diffusers", lambda n: "lycoris_" + flat(n), *KOHYA, True),
}

ALPHAS = (2.0, 3.0, 8.0, 4.0)


def qwen_fixture(spelling: str) -> Fixture:
    fmt, stem, down, up, has_alpha = QWEN_SPELLINGS[spelling]
    fx = Fixture(11, qwen_modules())
    for n, (name, (o, i)) in enumerate(qwen_modules().items()):
        fx.lora(stem(name), name, 0, o, i, down=down, up=up, alpha=ALPHAS[n % 4] if has_alpha else None)
    return fx


def zimage_fixture(spelling: str) -> Fixture:
    fmt, naming, stem, down, up, has_alpha = ZIMAGE_SPELLINGS[spelling]
    fx = Fixture(12, zimage_native_modules())
    mods = zimage_modules() if naming == "diffusers" else zimage_native_modules()
    for n, (name, (o, i)) in enumerate(mods.items()):
        native, start = zimage_native(name) if naming == "diffusers" else (name, 0)
        fx.lora(stem(name), native, start, o, i, down=down, up=up, alpha=ALPHAS[n % 4] if has_alpha else None)
    return fx


# what lorakit writes, by hand: (stem of a native module's parts) per target format
def qwen_written(fmt: str) -> set[str]:
    stem = {"kohya": lambda n: "lora_unet_" + flat(n), "comfy": lambda n: "diffusion_model." + n,
            "diffusers": lambda n: "transformer." + n}[fmt]
    return {stem(n) for n in qwen_modules()}


def zimage_written(fmt: str) -> set[str]:
    if fmt == "comfy":     # ComfyUI's own names, fused qkv
        return {"diffusion_model." + n for n in zimage_native_modules()}
    stem = {"kohya": lambda n: "lora_unet_" + flat(n), "diffusers": lambda n: "transformer." + n}[fmt]
    return {stem(n) for n in zimage_modules()}


def _stems(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}


def _check(path: Path, fx: Fixture, family: str, fmt: str) -> None:
    model = read_lora(path, allow_partial=False)
    assert (model.format, model.arch.spec.name) == (fmt, family)
    assert model.unknown_keys == []
    got = {t.module: d for t, d in dense_deltas(model).items()}
    assert set(got) == set(fx.expected)
    for name, want in fx.expected.items():
        err = float((got[name].double() - want).abs().max())
        assert err <= TOL * float(want.abs().max()), (name, err)


CASES = [("qwen-image", s) for s in QWEN_SPELLINGS] + [("z-image", s) for s in ZIMAGE_SPELLINGS]


@pytest.mark.parametrize("family,spelling", CASES)
def test_every_spelling_reads_and_converts_to_every_format(tmp_path, family: str, spelling: str) -> None:
    fx = qwen_fixture(spelling) if family == "qwen-image" else zimage_fixture(spelling)
    fmt = (QWEN_SPELLINGS[spelling] if family == "qwen-image" else ZIMAGE_SPELLINGS[spelling])[0]
    src = tmp_path / "src.safetensors"
    save_file(fx.tensors, str(src))
    _check(src, fx, family, fmt)
    for target in WRITABLE:
        out = tmp_path / f"out.{target}.safetensors"
        convert(src, out, to=target)
        written = load_file(str(out))
        want = qwen_written(target) if family == "qwen-image" else zimage_written(target)
        assert _stems(written) == want, sorted(_stems(written) ^ want)[:6]
        _check(out, fx, family, target)
        # and (from the musubi file) back again through every format: still the same deltas
        for again in WRITABLE if spelling == "musubi" else ():
            back = tmp_path / f"back.{target}.{again}.safetensors"
            convert(out, back, to=again)
            _check(back, fx, family, again)


def test_zimage_fused_qkv_split_keeps_each_part_and_alpha(tmp_path) -> None:
    """ComfyUI fused qkv (rank 4, α 2) -> split: each of to_q/to_k/to_v gets the shared down and its rows of up
    (rank 4, α 2); split -> fused stacks the downs (rank 12) and places the ups block-diagonally."""
    gen = torch.Generator().manual_seed(5)
    down, up = torch.randn(4, H, generator=gen), torch.randn(3 * H, 4, generator=gen)
    src = tmp_path / "comfy.safetensors"
    save_file({"diffusion_model.layers.1.attention.qkv.lora_down.weight": down,
               "diffusion_model.layers.1.attention.qkv.lora_up.weight": up,
               "diffusion_model.layers.1.attention.qkv.alpha": torch.tensor(2.0)}, str(src))
    out = tmp_path / "kohya.safetensors"
    convert(src, out, to="kohya")
    t = load_file(str(out))
    for k, s in enumerate(("to_q", "to_k", "to_v")):
        stem = f"lora_unet_layers_1_attention_{s}"
        assert torch.equal(t[stem + ".lora_down.weight"], down)
        assert torch.equal(t[stem + ".lora_up.weight"], up[k * H:(k + 1) * H])
        assert float(t[stem + ".alpha"]) == 2.0
    assert len(t) == 9
    fused = tmp_path / "fused.safetensors"
    convert(out, fused, to="comfy")
    f = load_file(str(fused))
    assert set(f) == {"diffusion_model.layers.1.attention.qkv." + s for s in ("lora_down.weight",
                                                                             "lora_up.weight", "alpha")}
    d = f["diffusion_model.layers.1.attention.qkv.lora_up.weight"].double() @ \
        f["diffusion_model.layers.1.attention.qkv.lora_down.weight"].double()
    d *= float(f["diffusion_model.layers.1.attention.qkv.alpha"]) / \
        f["diffusion_model.layers.1.attention.qkv.lora_down.weight"].shape[0]
    want = (up.double() @ down.double()) * 0.5
    assert float((d - want).abs().max()) <= TOL * float(want.abs().max())


@pytest.mark.parametrize("module,native", [
    ("lora_unet_transformer_blocks_0_img_mlp_net_0_proj", "transformer_blocks.0.img_mlp.net.0.proj"),
    ("lora_unet_transformer_blocks_1_txt_mlp_net_2", "transformer_blocks.1.txt_mlp.net.2"),
    ("lora_unet_transformer_blocks_0_attn_to_q", "transformer_blocks.0.attn.to_q"),
    ("lora_unet_transformer_blocks_1_attn_add_q_proj", "transformer_blocks.1.attn.add_q_proj"),
    ("lora_unet_transformer_blocks_0_attn_to_add_out", "transformer_blocks.0.attn.to_add_out"),
    ("lora_unet_transformer_blocks_0_img_mod_1", "transformer_blocks.0.img_mod.1"),
    ("lora_unet_time_text_embed_timestep_embedder_linear_1", "time_text_embed.timestep_embedder.linear_1"),
    ("lora_unet_norm_out_linear", "norm_out.linear"),
])
def test_musubi_flattened_names_with_underscores_read_exactly(tmp_path, module: str, native: str) -> None:
    """The dots come back from the layout's own module names (no n-gram heuristics): each flattened name
    resolves to exactly one module, the right one, and is written back as it came."""
    o, i = qwen_modules()[native]
    gen = torch.Generator().manual_seed(9)
    tensors = {module + ".lora_down.weight": torch.randn(2, i, generator=gen),
               module + ".lora_up.weight": torch.randn(o, 2, generator=gen), module + ".alpha": torch.tensor(1.0),
               # a second module so that the file is unambiguously Qwen-Image (no FLUX.1 reading has img_mlp)
               "lora_unet_transformer_blocks_1_img_mlp_net_2.lora_down.weight": torch.randn(2, M, generator=gen),
               "lora_unet_transformer_blocks_1_img_mlp_net_2.lora_up.weight": torch.randn(H, 2, generator=gen)}
    path = tmp_path / "musubi.safetensors"
    save_file(tensors, str(path))
    model = read_lora(path, allow_partial=False)
    assert model.arch.spec.name == "qwen-image" and model.format == "kohya"
    assert {p.target.module for p in model.patches} == {native, "transformer_blocks.1.img_mlp.net.2"}
    out = tmp_path / "diffusers.safetensors"
    convert(path, out, to="diffusers")
    assert "transformer." + native + ".lora_A.weight" in load_file(str(out))
    back = tmp_path / "kohya.safetensors"
    convert(out, back, to="kohya")
    assert module + ".lora_down.weight" in load_file(str(back))


def test_unknown_flattened_name_is_reported_not_guessed(tmp_path) -> None:
    """``img_mlp_net_0_proj`` exists; ``img_mlp_net_1_proj`` does not: it is reported as not understood."""
    gen = torch.Generator().manual_seed(4)
    tensors = {}
    for stem, o, i in (("lora_unet_transformer_blocks_0_img_mlp_net_0_proj", M, H),
                       ("lora_unet_transformer_blocks_0_img_mlp_net_1_proj", M, H)):
        tensors[stem + ".lora_down.weight"] = torch.randn(2, i, generator=gen)
        tensors[stem + ".lora_up.weight"] = torch.randn(o, 2, generator=gen)
    path = tmp_path / "musubi.safetensors"
    save_file(tensors, str(path))
    model = read_lora(path)
    assert model.arch.spec.name == "qwen-image"
    assert model.unknown_keys == sorted(k for k in tensors if "net_1_proj" in k)


def test_zimage_lokr_on_fused_qkv_converts_exactly(tmp_path) -> None:
    """A LyCORIS LoKr on ComfyUI's fused qkv (ΔW = α/r · kron(w1, w2a @ w2b), by hand) becomes exact plain factors
    in every format, split into to_q/to_k/to_v where the format splits; --keep-algo keeps it a LoKr for comfy."""
    gen = torch.Generator().manual_seed(6)
    w1, w2a, w2b = torch.randn(6, 4, generator=gen), torch.randn(16, 2, generator=gen), torch.randn(2, 8, generator=gen)
    stem = "diffusion_model.layers.0.attention.qkv"
    src = tmp_path / "lokr.safetensors"
    save_file({stem + ".lokr_w1": w1, stem + ".lokr_w2_a": w2a, stem + ".lokr_w2_b": w2b,
               stem + ".alpha": torch.tensor(1.0)}, str(src))
    want = torch.kron(w1.double(), w2a.double() @ w2b.double()) * 0.5
    assert want.shape == (3 * H, H)
    for target in WRITABLE:
        out = tmp_path / f"{target}.safetensors"
        convert(src, out, to=target)
        model = read_lora(out, allow_partial=False)
        assert {p.adapter.kind for p in model.patches} == {"lora"}
        got = dense_deltas(model)
        (delta,) = got.values()
        assert float((delta.double() - want).abs().max()) <= TOL * float(want.abs().max())
        assert len(model.patches) == (1 if target == "comfy" else 3)
    kept = tmp_path / "kept.safetensors"
    convert(src, kept, to="comfy", keep_algo=True)
    assert set(load_file(str(kept))) == {stem + s for s in (".lokr_w1", ".lokr_w2_a", ".lokr_w2_b", ".alpha")}
