"""--blocks on SD 1.x and SDXL LoRAs: LoRA-Block-Weight vectors (17/26, 12/20), presets, block-id and native
selectors, and merges that scale each module's ΔW by its multiplier.

Every expected multiplier is written by hand from LoRA Block Weight's tables (sd-webui-lora-block-weight
``BLOCKID26/17/12/20``, ``DEF_WEIGHT_PRESET``, ``to26``: ids a short vector does not list get 0; BASE = the text
encoders; ``time_embed``/``label_emb``/``out`` are in no block and keep 1) and the LDM block of each module; the
test LoRAs are written with safetensors directly and merged deltas are recomputed from the output's raw tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.ops.blocks import parse_blocks
from lorakit.errors import UsageError
from lorakit.formats import read_lora
from lorakit.lora.model import Target

RANK = 4
NO_BLOCK = "-"          # a module in no LBW block (time/label embedding, conv_out)


@dataclass(frozen=True)
class Mod:
    """A kohya LoRA module: key stem, component, native (single-file) name, ΔW shape, its LBW block."""

    stem: str
    component: str
    native: str
    shape: tuple[int, ...]
    block: str


# SD 1.x, kohya spelling (diffusers module names); blocks from LBW's LDM table: down_blocks.i.*.j -> IN(3i+j+1),
# down_blocks.i.downsamplers -> IN(3i+3), up_blocks.i.*.j -> OUT(3i+j)
SD1 = (
    Mod("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "unet",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q", (320, 320), "IN01"),
    Mod("lora_unet_down_blocks_0_downsamplers_0_conv", "unet", "input_blocks.3.0.op", (320, 320, 3, 3), "IN03"),
    Mod("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k", "unet",
        "input_blocks.5.1.transformer_blocks.0.attn2.to_k", (640, 768), "IN05"),
    Mod("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", "unet",
        "middle_block.1.transformer_blocks.0.attn1.to_q", (1280, 1280), "M00"),
    Mod("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0", "unet",
        "output_blocks.5.1.transformer_blocks.0.attn1.to_out.0", (1280, 1280), "OUT05"),
    Mod("lora_unet_up_blocks_3_attentions_0_transformer_blocks_0_ff_net_2", "unet",
        "output_blocks.9.1.transformer_blocks.0.ff.net.2", (320, 1280), "OUT09"),
    Mod("lora_unet_time_embedding_linear_1", "unet", "time_embed.0", (1280, 320), NO_BLOCK),
    Mod("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "clip_l",
        "text_model.encoder.layers.0.self_attn.q_proj", (768, 768), "BASE"),
)

# SDXL, kohya spelling (SGM module names); 2048-wide cross-attention context, lora_te2_ = OpenCLIP-bigG
SDXL = (
    Mod("lora_unet_input_blocks_1_0_in_layers_2", "unet", "input_blocks.1.0.in_layers.2", (320, 320, 3, 3), "IN01"),
    Mod("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "unet",
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q", (640, 640), "IN04"),
    Mod("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_v", "unet",
        "input_blocks.4.1.transformer_blocks.1.attn2.to_v", (640, 2048), "IN04"),
    Mod("lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k", "unet",
        "middle_block.1.transformer_blocks.9.attn2.to_k", (1280, 2048), "M00"),
    Mod("lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2", "unet",
        "output_blocks.0.1.transformer_blocks.0.ff.net.2", (1280, 5120), "OUT00"),
    Mod("lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_q", "unet",
        "output_blocks.5.1.transformer_blocks.1.attn1.to_q", (640, 640), "OUT05"),
    Mod("lora_unet_output_blocks_5_2_conv", "unet", "output_blocks.5.2.conv", (640, 640, 3, 3), "OUT05"),
    Mod("lora_unet_output_blocks_8_0_skip_connection", "unet", "output_blocks.8.0.skip_connection",
        (320, 640, 1, 1), "OUT08"),
    Mod("lora_unet_label_emb_0_0", "unet", "label_emb.0.0", (1280, 2816), NO_BLOCK),
    Mod("lora_unet_out_2", "unet", "out.2", (4, 320, 3, 3), NO_BLOCK),
    Mod("lora_te1_text_model_encoder_layers_0_mlp_fc1", "clip_l", "text_model.encoder.layers.0.mlp.fc1",
        (3072, 768), "BASE"),
    Mod("lora_te2_text_model_encoder_layers_0_self_attn_out_proj", "clip_g", "transformer.resblocks.0.attn.out_proj",
        (1280, 1280), "BASE"),
)


# SD 2.x: SD1's levels, a 1024-wide context and OpenCLIP-H under lora_te_ (HF names, 1024 wide)
SD2 = (
    Mod("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", "unet",
        "input_blocks.4.1.transformer_blocks.0.attn2.to_k", (640, 1024), "IN04"),
    Mod("lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_attn1_to_q", "unet",
        "output_blocks.7.1.transformer_blocks.0.attn1.to_q", (640, 640), "OUT07"),
    Mod("lora_te_text_model_encoder_layers_0_self_attn_out_proj", "clip_h", "transformer.resblocks.0.attn.out_proj",
        (1024, 1024), "BASE"),
)


def write(path, mods: tuple[Mod, ...], seed: int) -> dict[str, torch.Tensor]:
    """Write a kohya LoRA; return ΔW per key stem, computed here from the factors."""
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for i, m in enumerate(mods):
        out, rest = m.shape[0], m.shape[1:]
        down = torch.randn(RANK, *rest, generator=g)
        up = torch.randn(out, RANK, *((1, 1) if rest[1:] else ()), generator=g)
        alpha = 2.0 + i
        tensors |= {f"{m.stem}.lora_down.weight": down, f"{m.stem}.lora_up.weight": up,
                    f"{m.stem}.alpha": torch.tensor(alpha)}
        deltas[m.stem] = raw_delta(down, up, alpha, m.shape)
    save_file(tensors, str(path))
    return deltas


def raw_delta(down: torch.Tensor, up: torch.Tensor, alpha: float, shape: tuple[int, ...]) -> torch.Tensor:
    return ((alpha / down.shape[0]) * up.flatten(1).double() @ down.flatten(1).double()).reshape(shape)


def output_deltas(path, mods: tuple[Mod, ...]) -> dict[str, torch.Tensor]:
    """ΔW per key stem of a written kohya file, from its raw tensors (factors, or a full ``.diff``: concat merges
    write convolution modules densified)."""
    t = load_file(str(path))
    out = {}
    for m in mods:
        if f"{m.stem}.lora_down.weight" in t:
            out[m.stem] = raw_delta(t[f"{m.stem}.lora_down.weight"], t[f"{m.stem}.lora_up.weight"],
                                    float(t[f"{m.stem}.alpha"]), m.shape)
        elif f"{m.stem}.diff" in t:
            out[m.stem] = t[f"{m.stem}.diff"].double()
    return out


@pytest.fixture(scope="module")
def sd1_arch(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1") / "a.safetensors"
    write(path, SD1, seed=1)
    model = read_lora(str(path))
    assert model.arch.name == "sd1" and not model.unknown_keys
    return model.arch


@pytest.fixture(scope="module")
def sdxl_arch(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "a.safetensors"
    write(path, SDXL, seed=2)
    model = read_lora(str(path))
    assert model.arch.name == "sdxl" and not model.unknown_keys
    return model.arch


def multipliers(spec: str, arch, mods: tuple[Mod, ...]) -> dict[str, float]:
    """Multiplier per LBW block of the fixture's modules (every module of a block must agree)."""
    bw = parse_blocks(spec, arch)
    got: dict[str, set[float]] = {}
    for m in mods:
        got.setdefault(m.block, set()).add(bw.multiplier(Target(m.component, m.native)))
    assert all(len(v) == 1 for v in got.values()), got
    return {block: v.pop() for block, v in got.items()}


# ---------------------------------------------------------------------------------------------
# SDXL: 12 / 20 values, presets by id
# ---------------------------------------------------------------------------------------------

def test_sdxl_12_values(sdxl_arch):
    # BASE, IN04, IN05, IN07, IN08, M00, OUT00, OUT01, OUT02, OUT03, OUT04, OUT05
    spec = "0.5,2,3,4,5,1.5,0.25,7,8,9,10,-1"
    assert parse_blocks(spec, sdxl_arch).kind == "lbw"
    assert multipliers(spec, sdxl_arch, SDXL) == {
        "BASE": 0.5, "IN04": 2, "M00": 1.5, "OUT00": 0.25, "OUT05": -1,
        "IN01": 0, "OUT08": 0,          # not in the 12 ids: 0
        NO_BLOCK: 1}


def test_sdxl_20_values(sdxl_arch):
    # BASE, IN00…IN08, M00, OUT00…OUT08 -> 20, 21, …, 39
    spec = ",".join(str(20 + k) for k in range(20))
    assert multipliers(spec, sdxl_arch, SDXL) == {
        "BASE": 20, "IN01": 22, "IN04": 25, "M00": 30, "OUT00": 31, "OUT05": 36, "OUT08": 39, NO_BLOCK: 1}


# 17-value SD1 presets (BASE,IN01,IN02,IN04,IN05,IN07,IN08,M00,OUT03…OUT11) spread over SDXL's ids as LBW's to26
# does: SDXL's OUT00 is not among them, so it gets 0 even with ALL
@pytest.mark.parametrize("preset,want", [
    ("ALL", {"BASE": 1, "IN01": 1, "IN04": 1, "M00": 1, "OUT00": 0, "OUT05": 1, "OUT08": 1}),
    ("NONE", {"BASE": 0, "IN01": 0, "IN04": 0, "M00": 0, "OUT00": 0, "OUT05": 0, "OUT08": 0}),
    ("INS", {"BASE": 1, "IN01": 1, "IN04": 1, "M00": 0, "OUT00": 0, "OUT05": 0, "OUT08": 0}),
    ("MIDD", {"BASE": 1, "IN01": 0, "IN04": 0, "M00": 1, "OUT00": 0, "OUT05": 1, "OUT08": 0}),
    ("OUTALL", {"BASE": 1, "IN01": 0, "IN04": 0, "M00": 0, "OUT00": 0, "OUT05": 1, "OUT08": 1}),
    ("ALL0.5", {"BASE": 0.5, "IN01": 0.5, "IN04": 0.5, "M00": 0.5, "OUT00": 0, "OUT05": 0.5, "OUT08": 0.5}),
])
def test_sdxl_presets_by_id(sdxl_arch, preset, want):
    assert multipliers(preset, sdxl_arch, SDXL) == {**want, NO_BLOCK: 1}


# ---------------------------------------------------------------------------------------------
# SD 1.x: presets, 17 and 26 values
# ---------------------------------------------------------------------------------------------

_SD1_BLOCKS = ("BASE", "IN01", "IN03", "IN05", "M00", "OUT05", "OUT09")


@pytest.mark.parametrize("preset,values", [     # per _SD1_BLOCKS; IN03 is not among the 17 ids: always 0
    ("NONE", (0, 0, 0, 0, 0, 0, 0)),
    ("ALL", (1, 1, 0, 1, 1, 1, 1)),
    ("INS", (1, 1, 0, 0, 0, 0, 0)),        # BASE, IN01, IN02, IN04
    ("IND", (1, 0, 0, 1, 0, 0, 0)),        # BASE, IN05, IN07, IN08
    ("INALL", (1, 1, 0, 1, 0, 0, 0)),
    ("MIDD", (1, 0, 0, 1, 1, 1, 0)),       # BASE, IN05, IN07, IN08, M00, OUT03…OUT06
    ("OUTD", (1, 0, 0, 0, 0, 1, 0)),       # BASE, OUT03…OUT06
    ("OUTS", (1, 0, 0, 0, 0, 0, 1)),       # BASE, OUT07…OUT11
    ("outall", (1, 0, 0, 0, 0, 1, 1)),     # names are case-insensitive
    ("ALL0.5", (0.5, 0.5, 0, 0.5, 0.5, 0.5, 0.5)),
])
def test_sd1_presets(sd1_arch, preset, values):
    assert parse_blocks(preset, sd1_arch).kind == "preset"
    assert multipliers(preset, sd1_arch, SD1) == {**dict(zip(_SD1_BLOCKS, values)), NO_BLOCK: 1}


def test_sd1_17_and_26_values(sd1_arch):
    # BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03, OUT04, OUT05, OUT06, OUT07, OUT08, OUT09, OUT10, OUT11
    v17 = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.1,1.2,1.3,1.4,1.5,1.6,1.7,1.8"
    assert multipliers(v17, sd1_arch, SD1) == {
        "BASE": 0.1, "IN01": 0.2, "IN03": 0, "IN05": 0.5, "M00": 0.8, "OUT05": 1.2, "OUT09": 1.6, NO_BLOCK: 1}
    # BASE, IN00…IN11, M00, OUT00…OUT11 -> 10, 11, …, 35
    v26 = ",".join(str(10 + k) for k in range(26))
    assert multipliers(v26, sd1_arch, SD1) == {
        "BASE": 10, "IN01": 12, "IN03": 14, "IN05": 16, "M00": 23, "OUT05": 29, "OUT09": 33, NO_BLOCK: 1}


def test_sd2_takes_the_sd1_vectors_and_base_is_openclip_h(tmp_path):
    path = tmp_path / "sd2.safetensors"
    write(path, SD2, seed=8)
    arch = read_lora(str(path)).arch
    assert arch.name == "sd2"
    assert multipliers("OUTS", arch, SD2) == {"BASE": 1, "IN04": 0, "OUT07": 1}
    assert multipliers("BASE=0.25", arch, SD2) == {"BASE": 0.25, "IN04": 1, "OUT07": 1}
    v26 = ",".join(str(10 + k) for k in range(26))          # BASE=10, IN04=15, OUT07=31
    assert multipliers(v26, arch, SD2) == {"BASE": 10, "IN04": 15, "OUT07": 31}
    with pytest.raises(UsageError, match="accepted lengths are: 17 = .*; 26 = "):
        parse_blocks(",".join(["1"] * 12), arch)


@pytest.mark.parametrize("arch_name,n,accepted", [
    ("sd1", 12, (17, 26)), ("sd1", 20, (17, 26)), ("sd1", 61, (17, 26)),
    ("sdxl", 17, (12, 20)), ("sdxl", 26, (12, 20)),
])
def test_wrong_lengths_list_the_accepted_ones(sd1_arch, sdxl_arch, arch_name, n, accepted):
    arch = {"sd1": sd1_arch, "sdxl": sdxl_arch}[arch_name]
    with pytest.raises(UsageError) as err:
        parse_blocks(",".join(["1"] * n), arch)
    text = str(err.value)
    assert f"has {n} values" in text
    assert f"accepted lengths are: {accepted[0]} = " in text and f"; {accepted[1]} = " in text
    assert "BASE" in text and "OUT05" in text
    assert all(f"{k} = " not in text for k in (12, 17, 20, 26, 61) if k not in accepted)


# ---------------------------------------------------------------------------------------------
# selectors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,want", [
    ("IN04=0.5,OUT05=0", {"IN04": 0.5, "OUT05": 0}),
    ("in04=0.5,m00=3", {"IN04": 0.5, "M00": 3}),
    ("input_blocks.4=0.5,output_blocks.5.2=2", None),     # native names: checked per module below
    ("unet=0", {b: 0 for b in ("IN01", "IN04", "M00", "OUT00", "OUT05", "OUT08", NO_BLOCK)}),
    ("unet=0,M00=2", {b: 0 for b in ("IN01", "IN04", "OUT00", "OUT05", "OUT08", NO_BLOCK)} | {"M00": 2}),
    ("BASE=0", {"BASE": 0}),
    ("clip_l=0", None),
])
def test_sdxl_selectors(sdxl_arch, spec, want):
    bw = parse_blocks(spec, sdxl_arch)
    assert bw.kind == "selectors"
    by_module = {
        "input_blocks.4=0.5,output_blocks.5.2=2": {"input_blocks.4.1.transformer_blocks.0.attn1.to_q": 0.5,
                                                   "input_blocks.4.1.transformer_blocks.1.attn2.to_v": 0.5,
                                                   "output_blocks.5.2.conv": 2},
        "clip_l=0": {"text_model.encoder.layers.0.mlp.fc1": 0},
    }.get(spec, {})
    for m in SDXL:
        expected = by_module.get(m.native, 1.0) if want is None else want.get(m.block, 1.0)
        assert bw.multiplier(Target(m.component, m.native)) == expected, m.native


@pytest.mark.parametrize("spec,needle", [
    ("IN09=1", "no block or module 'IN09'"),               # SDXL has input blocks 0-8 only
    ("input_blocks.12=1", "no block or module 'input_blocks.12'"),
    ("down_blocks.1=0", "no block or module 'down_blocks.1'.*IN00…IN08, M00, OUT00…OUT08"),   # single-file names
    ("OUTAL", "did you mean 'OUTALL'"),
    ("1,2,x", "not a number"),
])
def test_sdxl_bad_specs(sdxl_arch, spec, needle):
    with pytest.raises(UsageError, match=needle):
        parse_blocks(spec, sdxl_arch)


# ---------------------------------------------------------------------------------------------
# merges: the output's ΔW is m·ΔW per module (modules at 0 left out)
# ---------------------------------------------------------------------------------------------

def _check_merge(out, mods, inputs, mult):
    got = output_deltas(out, mods)
    want = {}
    for m in mods:
        if mult[m.block] != 0:
            want[m.stem] = mult[m.block] * sum(w * d[m.stem] for w, d in inputs)
    assert set(got) == set(want)
    for stem, ref in want.items():
        assert float((got[stem] - ref).norm() / ref.norm()) < 1e-5, stem


def test_sd1_merge_with_preset(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    da, db = write(a, SD1, seed=3), write(b, SD1, seed=4)
    out = tmp_path / "out.safetensors"
    report = lorakit.merge([(str(a), 1.0), (str(b), 0.5)], str(out), blocks="MIDD", dtype="fp32")
    assert report.architecture == "sd1"
    # MIDD = BASE, IN05, IN07, IN08, M00, OUT03…OUT06 at 1, the other ids at 0; time_embed in no block: 1
    mult = {"BASE": 1, "IN01": 0, "IN03": 0, "IN05": 1, "M00": 1, "OUT05": 1, "OUT09": 0, NO_BLOCK: 1}
    _check_merge(out, SD1, [(1.0, da), (0.5, db)], mult)


def test_sd1_merge_26_values_through_cli(tmp_path):
    from lorakit.cli import main
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    da, db = write(a, SD1, seed=5), write(b, SD1, seed=6)
    out = tmp_path / "out.safetensors"
    values = [0.0] * 26
    # BASE=-0.5, IN01=2, IN03=0.25, IN05=0, M00=3, OUT05=0.75, OUT09=1.5 (index in BLOCKID26 order)
    for index, v in ((0, -0.5), (2, 2), (4, 0.25), (6, 0), (13, 3), (19, 0.75), (23, 1.5)):
        values[index] = v
    spec = ",".join(map(str, values))
    assert main(["merge", f"{a}:1", f"{b}:-1", "-o", str(out), f"--blocks={spec}", "--dtype", "fp32"]) == 0
    mult = {"BASE": -0.5, "IN01": 2, "IN03": 0.25, "IN05": 0, "M00": 3, "OUT05": 0.75, "OUT09": 1.5, NO_BLOCK: 1}
    _check_merge(out, SD1, [(1.0, da), (-1.0, db)], mult)


def test_sdxl_merge_with_12_values(tmp_path):
    a = tmp_path / "a.safetensors"
    da = write(a, SDXL, seed=7)
    out = tmp_path / "out.safetensors"
    lorakit.merge([(str(a), 1.0)], str(out), blocks="0.5,2,3,4,5,1.5,0.25,7,8,9,10,-1", dtype="fp32")
    mult = {"BASE": 0.5, "IN04": 2, "M00": 1.5, "OUT00": 0.25, "OUT05": -1, "IN01": 0, "OUT08": 0, NO_BLOCK: 1}
    _check_merge(out, SDXL, [(1.0, da)], mult)


def test_flux_block_ids_work_as_selectors_too():
    from conftest import TINY
    from lorakit.layouts import FLUX1
    from lorakit.lora.model import ArchInstance
    arch = ArchInstance(FLUX1, {"transformer": dict(TINY)})
    bw = parse_blocks("D01=0.5,S00=2,IN=3,TE=0,clip_l=4", arch)
    want = {("transformer", "double_blocks.1.img_attn.qkv"): 0.5, ("transformer", "double_blocks.0.img_attn.qkv"): 1,
            ("transformer", "single_blocks.0.linear1"): 2, ("transformer", "single_blocks.0.norm.query_norm.scale"): 2,
            ("transformer", "txt_in"): 3, ("transformer", "final_layer.linear"): 1,
            ("t5", "encoder.block.0.layer.0.SelfAttention.q"): 0,
            ("clip_l", "text_model.encoder.layers.0.mlp.fc1"): 4}       # clip_l=4 comes after TE=0
    for (comp, module), value in want.items():
        assert bw.multiplier(Target(comp, module)) == value, module
