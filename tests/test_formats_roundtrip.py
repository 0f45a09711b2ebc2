"""Every readable format -> internal -> every writable format -> internal, on tiny FLUX.1 LoRAs.

Fixture files are written key by key here (with the reference ``safetensors`` package), independently of
lorakit's emitter and layout tables: the module tables below are typed out from ``flux.md`` §3/§4/§5, and the
expected dense deltas are computed here from the factors with the formulas of ``formats.md`` §7.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from lorakit.ops.conversion import convert
from lorakit.errors import LossyConversionError
from lorakit.formats import read_lora
from lorakit.ops.inspection import format_report, inspect_lora
from lorakit.lora.model import LoraModel, dense_deltas

H, M, IN, OUT, CTX, VEC, T = 32, 128, 16, 16, 24, 20, 8
NDOUBLE = NSINGLE = 2
CLIP_D, CLIP_FF = 24, 48
T5_D, T5_INNER, T5_FF = 28, 32, 40
WRITABLE = ("kohya", "diffusers", "comfy")


# ---------------------------------------------------------------------------------------------
# Independent module tables (tiny sizes)
# ---------------------------------------------------------------------------------------------

def native_modules() -> dict[str, tuple[int, int]]:
    """BFL Linear name -> (out, in)."""
    mods = {"img_in": (H, IN), "txt_in": (H, CTX), "time_in.in_layer": (H, T), "time_in.out_layer": (H, H),
            "vector_in.in_layer": (H, VEC), "vector_in.out_layer": (H, H), "guidance_in.in_layer": (H, T),
            "guidance_in.out_layer": (H, H)}
    for i in range(NDOUBLE):
        for s in ("img", "txt"):
            mods[f"double_blocks.{i}.{s}_mod.lin"] = (6 * H, H)
            mods[f"double_blocks.{i}.{s}_attn.qkv"] = (3 * H, H)
            mods[f"double_blocks.{i}.{s}_attn.proj"] = (H, H)
            mods[f"double_blocks.{i}.{s}_mlp.0"] = (M, H)
            mods[f"double_blocks.{i}.{s}_mlp.2"] = (H, M)
    for j in range(NSINGLE):
        mods[f"single_blocks.{j}.modulation.lin"] = (3 * H, H)
        mods[f"single_blocks.{j}.linear1"] = (3 * H + M, H)
        mods[f"single_blocks.{j}.linear2"] = (H, H + M)
    mods["final_layer.adaLN_modulation.1"] = (2 * H, H)
    mods["final_layer.linear"] = (OUT, H)
    return mods


@dataclass(frozen=True)
class Split:
    native: str
    start: int
    stop: int
    swap: bool = False


def diffusers_modules() -> dict[str, Split]:
    """diffusers Linear name -> the BFL weight and rows it addresses."""
    nat = native_modules()
    one = {"x_embedder": "img_in", "context_embedder": "txt_in",
           "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
           "proj_out": "final_layer.linear"}
    out = {d: Split(n, 0, nat[n][0]) for d, n in one.items()}
    out["norm_out.linear"] = Split("final_layer.adaLN_modulation.1", 0, 2 * H, swap=True)
    for i in range(NDOUBLE):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for k, part in enumerate("qkv"):
            out[d + f"attn.to_{part}"] = Split(b + "img_attn.qkv", k * H, (k + 1) * H)
            out[d + f"attn.add_{part}_proj"] = Split(b + "txt_attn.qkv", k * H, (k + 1) * H)
        for dn, bn in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                       ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                       ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
                       ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin")):
            out[d + dn] = Split(b + bn, 0, nat[b + bn][0])
    for j in range(NSINGLE):
        b, d = f"single_blocks.{j}.", f"single_transformer_blocks.{j}."
        for k, part in enumerate("qkv"):
            out[d + f"attn.to_{part}"] = Split(b + "linear1", k * H, (k + 1) * H)
        out[d + "proj_mlp"] = Split(b + "linear1", 3 * H, 3 * H + M)
        out[d + "proj_out"] = Split(b + "linear2", 0, H)
        out[d + "norm.linear"] = Split(b + "modulation.lin", 0, 3 * H)
    return out


def clip_modules() -> dict[str, tuple[int, int]]:
    mods = {}
    for i in range(2):
        p = f"text_model.encoder.layers.{i}."
        for s in ("q_proj", "k_proj", "v_proj", "out_proj"):
            mods[p + "self_attn." + s] = (CLIP_D, CLIP_D)
        mods[p + "mlp.fc1"] = (CLIP_FF, CLIP_D)
        mods[p + "mlp.fc2"] = (CLIP_D, CLIP_FF)
    return mods


def t5_modules() -> dict[str, tuple[int, int]]:
    mods = {}
    for i in range(2):
        p = f"encoder.block.{i}."
        for s in "qkv":
            mods[p + "layer.0.SelfAttention." + s] = (T5_INNER, T5_D)
        mods[p + "layer.0.SelfAttention.o"] = (T5_D, T5_INNER)
        mods[p + "layer.1.DenseReluDense.wi_0"] = (T5_FF, T5_D)
        mods[p + "layer.1.DenseReluDense.wi_1"] = (T5_FF, T5_D)
        mods[p + "layer.1.DenseReluDense.wo"] = (T5_D, T5_FF)
    return mods


def flat(name: str) -> str:
    return name.replace(".", "_")


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    h = t.shape[0] // 2
    return torch.cat([t[h:], t[:h]])


# ---------------------------------------------------------------------------------------------
# Fixture builder: writes keys and accumulates the expected native deltas (float64)
# ---------------------------------------------------------------------------------------------

@dataclass
class Fixture:
    name: str
    fmt: str
    adapters: list[str]
    gen: torch.Generator
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    weights: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    biases: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    lossy: dict[str, set[str]] = field(default_factory=dict)   # target format -> refused module labels
    filename: str | None = None
    extra_files: dict[str, str] = field(default_factory=dict)

    def rand(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float32) * scale

    # -- placement of an expected delta -------------------------------------------------------
    def place(self, comp: str, native: str, delta: torch.Tensor, rows: tuple[int, int] | None = None,
              swap: bool = False, bias: bool = False) -> None:
        shapes = {"transformer": native_modules, "clip_l": clip_modules, "t5": t5_modules}[comp]()
        out, inp = shapes[native]
        table = self.biases if bias else self.weights
        full = table.setdefault((comp, native), torch.zeros((out,) if bias else (out, inp), dtype=torch.float64))
        d = swap_halves(delta) if swap else delta
        s, e = rows if rows else (0, out)
        full[s:e] += d.double()

    # -- factor families ------------------------------------------------------------------------
    def lora(self, stem: str, out: int, inp: int, r: int, *, alpha: float | None = None, store_alpha: bool = True,
             down: str = "lora_down.weight", up: str = "lora_up.weight", scale: float | None = None) -> torch.Tensor:
        a = self.rand(r, inp) / math.sqrt(inp)
        b = self.rand(out, r) * 0.1
        self.tensors[f"{stem}.{down}"] = a
        self.tensors[f"{stem}.{up}"] = b
        if alpha is not None and store_alpha:
            self.tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
        c = scale if scale is not None else ((alpha / r) if alpha is not None else 1.0)
        return c * (b.double() @ a.double())

    def loha(self, stem: str, out: int, inp: int, r: int, *, alpha: float | None = None) -> torch.Tensor:
        w1a, w1b, w2a, w2b = self.rand(out, r), self.rand(r, inp), self.rand(out, r), self.rand(r, inp)
        for k, v in (("hada_w1_a", w1a), ("hada_w1_b", w1b), ("hada_w2_a", w2a), ("hada_w2_b", w2b)):
            self.tensors[f"{stem}.{k}"] = v * 0.3
        if alpha is not None:
            self.tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
        c = (alpha / r) if alpha is not None else 1.0
        return c * ((0.3 * w1a.double()) @ (0.3 * w1b.double())) * ((0.3 * w2a.double()) @ (0.3 * w2b.double()))

    def lokr(self, stem: str, w1_shape: tuple[int, int], w2_shape: tuple[int, int], *, r: int | None,
             alpha: float | None) -> torch.Tensor:
        """w1 always full; w2 full when ``r`` is None (then scale 1), else decomposed (scale α/r)."""
        w1 = self.rand(*w1_shape) * 0.3
        self.tensors[f"{stem}.lokr_w1"] = w1
        if r is None:
            w2 = self.rand(*w2_shape) * 0.3
            self.tensors[f"{stem}.lokr_w2"] = w2
            w2d, c = w2.double(), 1.0
        else:
            w2a, w2b = self.rand(w2_shape[0], r) * 0.3, self.rand(r, w2_shape[1]) * 0.3
            self.tensors[f"{stem}.lokr_w2_a"] = w2a
            self.tensors[f"{stem}.lokr_w2_b"] = w2b
            w2d = w2a.double() @ w2b.double()
            c = (alpha / r) if alpha is not None else 1.0
        if alpha is not None:
            self.tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
        return c * torch.kron(w1.double(), w2d)

    def full(self, stem: str, out: int, inp: int | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        diff = None
        if inp is not None:
            diff = self.rand(out, inp) * 0.01
            self.tensors[f"{stem}.diff"] = diff
        diff_b = self.rand(out) * 0.01
        self.tensors[f"{stem}.diff_b"] = diff_b
        return (diff.double() if diff is not None else None), diff_b.double()


ALPHAS = (2.0, 3.0, 8.0, 4.0)   # rank 4: scales 0.5, 0.75 (not a power of two), 2, 1


def case_kohya_lora(f: Fixture) -> None:
    for n, (name, (o, i)) in enumerate(native_modules().items()):
        alpha = ALPHAS[n % len(ALPHAS)]
        f.place("transformer", name, f.lora("lora_unet_" + flat(name), o, i, 4, alpha=alpha))
    for name, (o, i) in clip_modules().items():
        f.place("clip_l", name, f.lora("lora_te1_" + flat(name), o, i, 4, alpha=2.0))
    for name, (o, i) in t5_modules().items():
        f.place("t5", name, f.lora("lora_te3_" + flat(name), o, i, 2, alpha=1.0))
    f.metadata.update({"ss_network_module": "networks.lora_flux", "ss_network_dim": "4", "ss_network_alpha": "Dynamic"})


def diffusers_labels(natives: set[str], rows: dict[str, tuple[int, int]] | None = None) -> set[str]:
    """Labels of the diffusers modules that address the given BFL weights (within ``rows`` when given)."""
    rows = rows or {}
    return {f"transformer:{d}" for d, sp in diffusers_modules().items() if sp.native in natives
            and (sp.native not in rows or (rows[sp.native][0] <= sp.start and sp.stop <= rows[sp.native][1]))}


def case_kohya_loha(f: Fixture) -> None:
    mods = native_modules()
    names = ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "final_layer.adaLN_modulation.1",
             "double_blocks.1.txt_mlp.0", "img_in")
    for n, name in enumerate(names):
        o, i = mods[name]
        f.place("transformer", name, f.loha("lora_unet_" + flat(name), o, i, 3, alpha=(1.5, None, 6.0, 3.0, 2.0)[n]))
    # every LoHa module is written as exact plain LoRA factors (rank 3·3) by default, diffusers included (issue 11)


def case_kohya_lokr(f: Fixture) -> None:
    # img qkv (96 x 32): w1 3x4 (x) w2 32x8 -> blocks of 32 rows, aligned with q/k/v.
    f.place("transformer", "double_blocks.0.img_attn.qkv",
            f.lokr("lora_unet_double_blocks_0_img_attn_qkv", (3, 4), (32, 8), r=2, alpha=1.0))
    # linear1 (224 x 32): w1 7x2 (x) w2 32x16, both full (scale 1); aligned with q/k/v/mlp. Its exact plain rank
    # 2·16 = 32 holds 32·(224 + 32) = 8192 numbers > 224·32 = 7168 dense: refused as plain LoRA (issue 11).
    f.place("transformer", "single_blocks.0.linear1",
            f.lokr("lora_unet_single_blocks_0_linear1", (7, 2), (32, 16), r=None, alpha=None))
    # txt qkv: w1 4x2 (x) w2 24x16: blocks of 24 rows do not align with the 32-row q/k/v windows.
    f.place("transformer", "double_blocks.0.txt_attn.qkv",
            f.lokr("lora_unet_double_blocks_0_txt_attn_qkv", (4, 2), (24, 16), r=2, alpha=3.0))
    # final layer with a swap: w1 2x2 (x) w2 32x16 -> halves swap exactly.
    f.place("transformer", "final_layer.adaLN_modulation.1",
            f.lokr("lora_unet_final_layer_adaLN_modulation_1", (2, 2), (32, 16), r=4, alpha=2.0))
    # the others become exact plain LoRA factors (ranks 3·2, 2·2, 2·4), so the txt qkv whose blocks do not align
    # with the q/k/v windows splits exactly too; only linear1 (too large as plain LoRA) is refused, everywhere
    f.lossy["kohya"] = f.lossy["comfy"] = {"transformer:single_blocks.0.linear1"}
    f.lossy["diffusers"] = diffusers_labels({"single_blocks.0.linear1"})
    assert len(f.lossy["diffusers"]) == 4


def case_kohya_full(f: Fixture) -> None:
    mods = native_modules()
    for name in ("double_blocks.0.img_attn.proj", "single_blocks.0.linear1", "final_layer.adaLN_modulation.1",
                 "img_in", "double_blocks.1.txt_attn.qkv"):
        o, i = mods[name]
        diff, diff_b = f.full("lora_unet_" + flat(name), o, i)
        f.place("transformer", name, diff)
        f.place("transformer", name, diff_b, bias=True)
    diff, diff_b = f.full("lora_unet_txt_in", H, None)         # a bias-only module
    f.place("transformer", "txt_in", diff_b, bias=True)


def case_kohya_trailing_underscore(f: Fixture) -> None:
    d = diffusers_modules()
    for n, name in enumerate(("single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                              "single_transformer_blocks.0.proj_mlp", "transformer_blocks.1.attn.to_v",
                              "transformer_blocks.1.attn.to_out.0", "norm_out.linear")):
        sp = d[name]
        o, i = sp.stop - sp.start, native_modules()[sp.native][1]
        delta = f.lora("lora_unet_" + flat(name) + "_", o, i, 4, alpha=ALPHAS[n % 4])
        f.place("transformer", sp.native, delta, (sp.start, sp.stop), sp.swap)


def case_comfy_updown(f: Fixture) -> None:
    for n, (name, (o, i)) in enumerate(native_modules().items()):
        f.place("transformer", name, f.lora("diffusion_model." + name, o, i, 4, alpha=ALPHAS[n % 4]))
    for name, (o, i) in clip_modules().items():
        f.place("clip_l", name, f.lora("text_encoders.clip_l.transformer." + name, o, i, 2, alpha=4.0))


def case_comfy_ab(f: Fixture) -> None:
    for name, (o, i) in native_modules().items():
        f.place("transformer", name, f.lora("diffusion_model." + name, o, i, 4, down="lora_A.weight",
                                            up="lora_B.weight"))


def _diffusers_all(f: Fixture, prefix: str, *, r: int = 4, alpha: Callable[[int, str], float | None] = lambda n, m: None,
                   store_alpha: bool = True, scale: Callable[[str, int], float] | None = None,
                   down: str = "lora_A.weight", up: str = "lora_B.weight", flatten: bool = False,
                   rank: Callable[[str], int] | None = None) -> None:
    nat = native_modules()
    for n, (name, sp) in enumerate(diffusers_modules().items()):
        rr = rank(name) if rank else r
        o, i = sp.stop - sp.start, nat[sp.native][1]
        stem = prefix + (flat(name) if flatten else name)
        delta = f.lora(stem, o, i, rr, alpha=alpha(n, name), store_alpha=store_alpha, down=down, up=up,
                       scale=scale(name, rr) if scale else None)
        f.place("transformer", sp.native, delta, (sp.start, sp.stop), sp.swap)


def case_diffusers_plain(f: Fixture) -> None:
    _diffusers_all(f, "transformer.")
    for name, (o, i) in clip_modules().items():
        f.place("clip_l", name, f.lora("text_encoder." + name, o, i, 4, down="lora_A.weight", up="lora_B.weight"))
    f.metadata["software"] = json.dumps({"name": "ai-toolkit"})


def case_diffusers_alpha_tensors(f: Fixture) -> None:
    _diffusers_all(f, "transformer.", alpha=lambda n, m: ALPHAS[n % 4])


def case_diffusers_metadata(f: Fixture) -> None:
    pattern = {"transformer_blocks.0.attn.to_q": 2.0, "single_transformer_blocks.1.proj_mlp": 16.0}
    ranks = {"single_transformer_blocks.0.proj_out": 2}

    def scale(name: str, r: int) -> float:
        return pattern.get(name, 8.0) / r

    _diffusers_all(f, "transformer.", scale=scale, rank=lambda m: ranks.get(m, 4))
    f.metadata["lora_adapter_metadata"] = json.dumps({
        "transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": pattern,
        "transformer.rank_pattern": ranks, "transformer.use_rslora": False, "transformer.peft_type": "LORA",
        "transformer.target_modules": ["to_q"]}, indent=2, sort_keys=True)


def case_diffusers_rslora(f: Fixture) -> None:
    _diffusers_all(f, "transformer.", scale=lambda name, r: 8.0 / math.sqrt(r))
    f.metadata["lora_adapter_metadata"] = json.dumps({
        "transformer.r": 4, "transformer.lora_alpha": 8, "transformer.use_rslora": True,
        "transformer.alpha_pattern": {}, "transformer.rank_pattern": {}})


def case_diffusers_lora_bias(f: Fixture) -> None:
    """PEFT ``lora_bias``: ``lora_B.bias`` adds ``scale·bias`` to the module bias."""
    nat = native_modules()
    for name in ("transformer_blocks.0.attn.to_k", "single_transformer_blocks.1.proj_mlp", "norm_out.linear",
                 "transformer_blocks.1.ff.net.2"):
        sp = diffusers_modules()[name]
        o, i = sp.stop - sp.start, nat[sp.native][1]
        f.place("transformer", sp.native, f.lora("transformer." + name, o, i, 4, down="lora_A.weight",
                                                 up="lora_B.weight", scale=6.0 / 4), (sp.start, sp.stop), sp.swap)
        b = f.rand(o) * 0.1
        f.tensors[f"transformer.{name}.lora_B.bias"] = b
        f.place("transformer", sp.native, b.double() * 6.0 / 4, (sp.start, sp.stop), sp.swap, bias=True)
    f.metadata["lora_adapter_metadata"] = json.dumps({"transformer.r": 4, "transformer.lora_alpha": 6,
                                                      "transformer.lora_bias": True})


def case_peft_base_model(f: Fixture) -> None:
    _diffusers_all(f, "base_model.model.", scale=lambda name, r: 8.0 / r)
    f.filename = "peftdir/adapter_model.safetensors"
    f.extra_files["peftdir/adapter_config.json"] = json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"})


def case_peft_transformer_base_model(f: Fixture) -> None:
    _diffusers_all(f, "transformer.base_model.model.")


def case_peft_default(f: Fixture) -> None:
    _diffusers_all(f, "", down="lora_A.default.weight", up="lora_B.default.weight")


def case_xlabs(f: Fixture) -> None:
    for i in range(NDOUBLE):
        for lora, native in (("qkv_lora1", "img_attn.qkv"), ("qkv_lora2", "txt_attn.qkv"),
                             ("proj_lora1", "img_attn.proj"), ("proj_lora2", "txt_attn.proj")):
            o = 3 * H if "qkv" in lora else H
            delta = f.lora(f"double_blocks.{i}.processor.{lora}", o, H, 4, down="down.weight", up="up.weight")
            f.place("transformer", f"double_blocks.{i}.{native}", delta)
    for j in range(NSINGLE):
        delta = f.lora(f"single_blocks.{j}.processor.qkv_lora", 3 * H, H, 4, down="down.weight", up="up.weight")
        f.place("transformer", f"single_blocks.{j}.linear1", delta, (0, 3 * H))   # first 3H rows only
        delta = f.lora(f"single_blocks.{j}.processor.proj_lora", H, H + M, 4, down="down.weight", up="up.weight")
        f.place("transformer", f"single_blocks.{j}.linear2", delta)


def case_onetrainer(f: Fixture) -> None:
    _diffusers_all(f, "lora_transformer_", alpha=lambda n, m: ALPHAS[n % 4], down="lora_down.weight",
                   up="lora_up.weight", flatten=True)
    for name, (o, i) in clip_modules().items():
        f.place("clip_l", name, f.lora("lora_te1_" + flat(name), o, i, 4, alpha=1.0))


def case_lycoris(f: Fixture) -> None:
    # LoKr on the three split parts of a fused qkv (w1 2x4 (x) w2 16x8 = 32 x 32 each)
    for k, part in enumerate("qkv"):
        delta = f.lokr(f"lycoris_transformer_blocks_0_attn_to_{part}", (2, 4), (16, 8), r=2, alpha=1.0 + k)
        f.place("transformer", "double_blocks.0.img_attn.qkv", delta, (k * H, (k + 1) * H))
    # LoHa alone on the MLP window of linear1 (exact in fused formats by zero rows)
    f.place("transformer", "single_blocks.0.linear1", f.loha("lycoris_single_transformer_blocks_0_proj_mlp", M, H, 3,
                                                             alpha=1.5), (3 * H, 3 * H + M))
    # LoKr alone on a window aligned with its blocks (rows [64, 96) of single linear1 = to_v)
    f.place("transformer", "single_blocks.1.linear1",
            f.lokr("lycoris_single_transformer_blocks_1_attn_to_v", (2, 4), (16, 8), r=None, alpha=None), (2 * H, 3 * H))
    # LoHa on a 1:1 module
    f.place("transformer", "double_blocks.0.img_attn.proj", f.loha("lycoris_transformer_blocks_0_attn_to_out_0", H, H,
                                                                   2, alpha=4.0))
    # every module becomes exact plain LoRA factors (issue 11): the three LoKr parts (different second factors)
    # then fuse block-diagonally into one qkv for kohya/comfy, and diffusers reads them all: nothing is lossy


def case_diffsynth(f: Fixture) -> None:
    _diffusers_all(f, "")


CASES: dict[str, tuple[str, list[str], Callable[[Fixture], None]]] = {
    "kohya_lora": ("kohya", ["lora"], case_kohya_lora),
    "kohya_loha": ("kohya", ["loha"], case_kohya_loha),
    "kohya_lokr": ("kohya", ["lokr"], case_kohya_lokr),
    "kohya_full": ("kohya", ["full"], case_kohya_full),
    "kohya_trailing_underscore": ("kohya", ["lora"], case_kohya_trailing_underscore),
    "comfy_updown": ("comfy", ["lora"], case_comfy_updown),
    "comfy_AB": ("comfy", ["lora"], case_comfy_ab),
    "diffusers_plain": ("diffusers", ["lora"], case_diffusers_plain),
    "diffusers_alpha_tensors": ("diffusers", ["lora"], case_diffusers_alpha_tensors),
    "diffusers_metadata": ("diffusers", ["lora"], case_diffusers_metadata),
    "diffusers_rslora": ("diffusers", ["lora"], case_diffusers_rslora),
    "diffusers_lora_bias": ("diffusers", ["lora"], case_diffusers_lora_bias),
    "peft_base_model": ("peft", ["lora"], case_peft_base_model),
    "peft_transformer_base_model": ("peft", ["lora"], case_peft_transformer_base_model),
    "peft_default": ("peft", ["lora"], case_peft_default),
    "xlabs": ("xlabs", ["lora"], case_xlabs),
    "onetrainer": ("onetrainer", ["lora"], case_onetrainer),
    "lycoris": ("lycoris", ["loha", "lokr"], case_lycoris),
    "diffsynth": ("diffsynth", ["lora"], case_diffsynth),
}


def build(name: str, tmp_path) -> tuple[Fixture, str]:
    from safetensors.torch import save_file

    fmt, adapters, fn = CASES[name]
    f = Fixture(name, fmt, adapters, torch.Generator().manual_seed(sum(map(ord, name))))
    fn(f)
    path = tmp_path / (f.filename or f"{name}.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    for rel, text in f.extra_files.items():
        (tmp_path / rel).write_text(text)
    save_file(f.tensors, str(path), metadata=f.metadata or None)
    return f, str(path)


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------

def model_state(model: LoraModel) -> tuple[dict, dict]:
    weights = {(t.component, t.module): d.double() for t, d in dense_deltas(model).items()
               if any(p.adapter is not None for p in model.by_target()[t])}
    biases: dict[tuple[str, str], torch.Tensor] = {}
    for p in model.patches:
        if p.bias is None:
            continue
        key = (p.target.component, p.target.module)
        out = model.arch.module_map(p.target.component)[p.target.module].out
        full = biases.setdefault(key, torch.zeros(out, dtype=torch.float64))
        s, e = p.rows if p.rows else (0, out)
        full[s:e] += p.bias.double().reshape(-1)
    return weights, biases


def max_rel_error(got: dict, want: dict) -> float:
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))
    worst = 0.0
    for k, w in want.items():
        g = got[k]
        assert tuple(g.shape) == tuple(w.shape), (k, g.shape, w.shape)
        worst = max(worst, float((g - w).abs().max()) / max(float(w.abs().max()), 1e-30))
    return worst


def check_model(model: LoraModel, f: Fixture, tol: float = 1e-6) -> None:
    weights, biases = model_state(model)
    assert max_rel_error(weights, f.weights) <= tol
    assert max_rel_error(biases, f.biases) <= tol


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_read_detect_and_dense(case: str, tmp_path) -> None:
    f, path = build(case, tmp_path)
    report = inspect_lora(path)
    assert report["format"] == f.fmt
    assert report["adapters"] == f.adapters
    assert report["unknown_key_count"] == 0
    assert report["architecture"] == "flux1"
    assert format_report(report).startswith(path)
    deep = inspect_lora(path, deep=True)["deep"]
    assert deep["nonfinite_modules"] == [] and deep["zero_up_modules"] == []
    assert len(deep["delta_norms"]) == report["modules"]
    model = read_lora(path)
    assert model.format == f.fmt
    assert model.unknown_keys == []
    check_model(model, f)


@pytest.mark.parametrize("target", WRITABLE)
@pytest.mark.parametrize("case", list(CASES))
def test_convert_roundtrip(case: str, target: str, tmp_path) -> None:
    f, path = build(case, tmp_path)
    out = str(tmp_path / f"out_{target}.safetensors")
    refused = f.lossy.get(target)
    if refused:
        with pytest.raises(LossyConversionError) as exc:
            convert(path, out, target)
        assert set(exc.value.modules) == refused
        assert not os.path.exists(out)
        report = convert(path, out, target, allow_lossy=True)
        assert {m for m, _ in report.lossy} == refused
        assert all(0 <= err < 1e-5 for _, err in report.lossy)
        tol = 1e-5
    else:
        report = convert(path, out, target)
        assert report.lossy == []
        tol = 1e-6
    back = read_lora(out)
    assert back.format == target
    assert back.unknown_keys == []
    check_model(back, f, tol)
    # and once more through every writable format: internal form is stable
    for second in WRITABLE:
        if f.lossy.get(second):
            continue
        out2 = str(tmp_path / f"out_{target}_{second}.safetensors")
        convert(out, out2, second, allow_lossy=bool(refused))
        check_model(read_lora(out2), f, tol)


def test_lossy_svd_rank_cap_reports_error(tmp_path) -> None:
    """--lossy-rank truncates the SVD and reports a real, non-zero relative error per module (here the three LoKr
    parts on one fused qkv kept as LoKr by keep_algo, which kohya cannot fuse into one LoKr)."""
    f, path = build("lycoris", tmp_path)
    out = str(tmp_path / "capped.safetensors")
    report = convert(path, out, "kohya", allow_lossy=True, lossy_rank=1, keep_algo=True)
    assert [m for m, _ in report.lossy] == ["transformer:double_blocks.0.img_attn.qkv"]
    err = report.lossy[0][1]
    assert 0.01 < err < 1
    back, _ = model_state(read_lora(out))
    want = f.weights[("transformer", "double_blocks.0.img_attn.qkv")]
    got = back[("transformer", "double_blocks.0.img_attn.qkv")]
    assert abs(float((got - want).norm() / want.norm()) - err) < 1e-4


def test_dora_magnitudes_survive_fuse_split_and_swap(tmp_path) -> None:
    """kohya ``dora_scale`` (out, 1) <-> PEFT ``lora_magnitude_vector`` (out,), through split/fuse and the swap."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(11)
    t, mags = {}, {}
    for name, (o, i) in (("double_blocks.0.img_attn.qkv", (3 * H, H)), ("final_layer.adaLN_modulation.1", (2 * H, H)),
                         ("single_blocks.0.linear1", (3 * H + M, H))):
        stem = "lora_unet_" + flat(name)
        t[stem + ".lora_down.weight"] = torch.randn(4, i, generator=g)
        t[stem + ".lora_up.weight"] = torch.randn(o, 4, generator=g)
        t[stem + ".alpha"] = torch.tensor(2.0)
        mags[name] = torch.rand(o, 1, generator=g) + 0.5
        t[stem + ".dora_scale"] = mags[name]
    src = str(tmp_path / "dora.safetensors")
    save_file(t, src)
    assert inspect_lora(src)["adapters"] == ["dora", "lora"]

    def native_mags(path: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for p in read_lora(path).patches:
            full = out.setdefault(p.target.module, torch.zeros(native_modules()[p.target.module][0]))
            s, e = p.rows if p.rows else (0, full.shape[0])
            full[s:e] = p.dora.reshape(-1)
        return out

    want = {k: v.reshape(-1) for k, v in mags.items()}
    assert all(torch.equal(native_mags(src)[k], want[k]) for k in want)
    diff = str(tmp_path / "d.safetensors")
    convert(src, diff, "diffusers")
    d = load_file_(diff)
    assert torch.equal(d["transformer.norm_out.linear.lora_magnitude_vector"], swap_halves(want["final_layer.adaLN_modulation.1"]))
    assert torch.equal(d["transformer.single_transformer_blocks.0.proj_mlp.lora_magnitude_vector"],
                       want["single_blocks.0.linear1"][3 * H:])
    back = str(tmp_path / "k.safetensors")
    convert(diff, back, "kohya")
    got = native_mags(back)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert load_file_(back)["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"].shape == (3 * H, 1)
    check = Fixture("dora", "kohya", ["lora"], g)
    for name, (o, i) in (("double_blocks.0.img_attn.qkv", (3 * H, H)), ("final_layer.adaLN_modulation.1", (2 * H, H)),
                         ("single_blocks.0.linear1", (3 * H + M, H))):
        stem = "lora_unet_" + flat(name)
        check.place("transformer", name, 0.5 * (t[stem + ".lora_up.weight"].double() @ t[stem + ".lora_down.weight"].double()))
    check_model(read_lora(back), check)


def load_file_(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(path)


def test_stored_alpha_zero_means_rank(write_st) -> None:
    """sd-scripts and LyCORIS treat ``.alpha`` = 0 as α = r (scale 1), which is how such a file was trained."""
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(4, H, generator=g), torch.randn(H, 4, generator=g)
    path = write_st({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": down,
                     "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": up,
                     "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(0.0)})
    (delta,) = dense_deltas(read_lora(path)).values()
    assert torch.allclose(delta, up @ down, rtol=1e-6, atol=0)
