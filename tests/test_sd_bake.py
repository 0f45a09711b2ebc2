"""Bake into SDXL/SD1.5-shaped single-file checkpoints (UNet + both text encoders + VAE in one pass) and diffusers
pipeline folders: every changed tensor equals W + w·(α/r)·up·down computed here from the factors this test wrote
(conv LoRAs reshaped, OpenCLIP's q/v rows of the fused in_proj, the transposed text_projection); everything else
byte-identical, key order and dtypes kept; peak memory does not grow with the model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.cli.main import main
from lorakit.errors import UnsupportedArchitectureError
from lorakit.layouts import resolve
from lorakit.samples.synthetic import PASSTHROUGH_SD, TINY_SD, TINY_TE, write_checkpoint
from peak_rss import measure_bake

C = TINY_SD["sdxl"]["C"]
G = TINY_TE["clip_g"]["D"]
RANK = 4
UNET = "model.diffusion_model."
TE1 = "conditioner.embedders.0.transformer."
TE2 = "conditioner.embedders.1.model."

# (kohya key stem, checkpoint weight key, ΔW shape, row window of the checkpoint tensor, stored transposed)
SDXL_LORA = (
    ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q",
     UNET + "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight", (2 * C, 2 * C), None, False),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
     UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", (2 * C, 2048), None, False),
    ("lora_unet_input_blocks_1_0_in_layers_2", UNET + "input_blocks.1.0.in_layers.2.weight", (C, C, 3, 3), None, False),
    ("lora_unet_output_blocks_5_2_conv", UNET + "output_blocks.5.2.conv.weight", (2 * C, 2 * C, 3, 3), None, False),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
     TE1 + "text_model.encoder.layers.0.self_attn.q_proj.weight", (768, 768), None, False),
    ("lora_te2_text_model_encoder_layers_1_self_attn_q_proj",
     TE2 + "transformer.resblocks.1.attn.in_proj_weight", (G, G), (0, G), False),
    ("lora_te2_text_model_encoder_layers_1_self_attn_v_proj",
     TE2 + "transformer.resblocks.1.attn.in_proj_weight", (G, G), (2 * G, 3 * G), False),
    ("lora_te2_text_projection", TE2 + "text_projection", (G, G), None, True),
)


def _write_lora(path, modules, seed=0) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    g = torch.Generator().manual_seed(seed)
    t, facts = {}, {}
    for i, (stem, _key, shape, _rows, _tr) in enumerate(modules):
        out, rest = shape[0], shape[1:]
        down = torch.randn(RANK, *rest, generator=g) * 0.1
        up = torch.randn(out, RANK, *([1, 1] if len(rest) == 3 else []), generator=g) * 0.1
        alpha = 1.0 + i          # different per module
        t[stem + ".lora_down.weight"], t[stem + ".lora_up.weight"], t[stem + ".alpha"] = down, up, torch.tensor(alpha)
        facts[stem] = (down, up, alpha)
    save_file(t, str(path))
    return facts


def _expected(base: dict[str, torch.Tensor], modules, facts, weight: float) -> dict[str, torch.Tensor]:
    want = {k: v.float().clone() for k, v in base.items()}
    for stem, key, shape, rows, transposed in modules:
        down, up, alpha = facts[stem]
        delta = (up.flatten(1).double() @ down.flatten(1).double() * (alpha / RANK) * weight).float().reshape(shape)
        if transposed:
            delta = delta.T
        if rows is None:
            want[key] += delta
        else:
            want[key][rows[0]:rows[1]] += delta
    return want


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdxl")
    arch = resolve("sdxl")
    base = write_checkpoint(d / "base.safetensors", arch, {"unet": TINY_SD["sdxl"], "clip_l": TINY_TE["clip_l"],
                                                          "clip_g": TINY_TE["clip_g"]},
                            dtype=torch.float16, extra=PASSTHROUGH_SD)
    lora = d / "lora.safetensors"
    facts = _write_lora(lora, SDXL_LORA)
    return d, base, str(lora), facts


def _keys(path) -> list[str]:
    with safe_open(path, "pt") as f:
        return list(f.keys())


def _assert_baked(base_path, out_path, modules, facts, weight) -> None:
    base, out = load_file(base_path), load_file(out_path)
    assert _keys(out_path) == _keys(base_path)              # same layout and key order
    want = _expected(base, modules, facts, weight)
    changed = {key for _s, key, *_ in modules}
    for k, v in out.items():
        assert v.dtype == base[k].dtype, k
        if k in changed:
            err = float((v.float() - want[k]).abs().max())
            assert err <= 2e-3, (k, err)                     # fp16 output: one rounding of W + ΔW
            assert not torch.equal(v, base[k]), k
        else:
            assert torch.equal(v, base[k]), k                # untouched: bit-identical


def test_sdxl_single_file_bake_all_components(sdxl) -> None:
    d, base, lora, facts = sdxl
    out = str(d / "out.safetensors")
    report = lorakit.bake(base, [f"{lora}:0.8"], out, progress=False)
    assert report.changed == len({key for _s, key, *_ in SDXL_LORA})
    _assert_baked(base, out, SDXL_LORA, facts, 0.8)
    for name, _shape in PASSTHROUGH_SD:     # the VAE is copied
        assert torch.equal(load_file(out)[name], load_file(base)[name])
    meta = safe_open(out, "pt").metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_sdxl_bake_cli(sdxl, capsys) -> None:
    d, base, lora, facts = sdxl
    out = str(d / "cli.safetensors")
    assert main(["bake", base, f"{lora}:0.8", "-o", out, "--no-progress"]) == 0
    _assert_baked(base, out, SDXL_LORA, facts, 0.8)


PIPE_PARTS = {"unet": ("unet", UNET, "diffusion_pytorch_model.safetensors"),
              "clip_l": ("text_encoder", TE1, "model.safetensors"),
              "clip_g": ("text_encoder_2", TE2, "model.safetensors")}


def _as_pipeline(d, base: str):
    """The single-file SDXL ``base`` rewritten as a diffusers pipeline folder ``d/pipe`` (unet/, text_encoder/,
    text_encoder_2/ in diffusers/HF names, fused in_proj split into q/k/v, text_projection stored out × in, a vae/);
    returns (folder, {pipeline key: (subfolder, single-file key, rows, transposed)})."""
    arch = resolve("sdxl")
    single = load_file(base)
    pipe = d / "pipe"
    parts = PIPE_PARTS
    names: dict[str, tuple[str, str, tuple[int, int] | None, bool]] = {}   # pipeline key -> (folder, single key, rows, T)
    for comp_name, (folder, prefix, fname) in parts.items():
        comp = arch.components[comp_name]
        tensors = {}
        for spec in comp.modules:
            n_blocks = TINY_TE.get(comp_name, {}).get("layers", 1) if spec.repeat else 1
            for i in range(n_blocks):
                native = spec.native.format(i=i)
                src_w = prefix + spec.tensor_name(native, spec.weight)
                if src_w not in single:
                    continue
                aliases = spec.names("diffusers") if comp_name != "clip_l" else spec.names("native")
                for alias in aliases:
                    name = alias.template.format(i=i)
                    w = single[src_w]
                    w = w.T.contiguous() if spec.transpose else w
                    b = single.get(prefix + spec.tensor_name(native, spec.bias_param)) if spec.bias else None
                    rows = None
                    if alias.rows is not None:
                        n = w.shape[0] // 3
                        start = {"0": 0, "D": n, "2*D": 2 * n}[alias.rows[0]]
                        rows = (start, start + n)
                        w = w[rows[0]:rows[1]].contiguous()
                        b = b[rows[0]:rows[1]].contiguous() if b is not None else None
                    tensors[name + ".weight"] = w
                    names[f"{folder}/{name}.weight"] = (folder, src_w, rows, spec.transpose)
                    if b is not None:
                        tensors[name + ".bias"] = b
        os.makedirs(pipe / folder)
        save_file(tensors, str(pipe / folder / fname))
    os.makedirs(pipe / "vae")
    save_file({"decoder.conv_in.weight": single[PASSTHROUGH_SD[0][0]]}, str(pipe / "vae" / "diffusion_pytorch_model.safetensors"))
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    return pipe, names


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl):
    d, base, _lora, _facts = sdxl
    return _as_pipeline(d, base)


def test_sdxl_pipeline_folder_equals_single_file(sdxl, sdxl_pipe) -> None:
    """The same base as a diffusers pipeline folder: baking gives the single-file result, name by name."""
    d, base, lora, _facts = sdxl
    pipe, names = sdxl_pipe
    single = load_file(base)
    parts = PIPE_PARTS
    out_single, out_pipe = str(d / "single.safetensors"), str(d / "pipe-out")
    lorakit.bake(base, [lora], out_single, progress=False)
    lorakit.bake(str(pipe), [lora], out_pipe, progress=False)
    baked_single = load_file(out_single)
    baked = {folder: load_file(os.path.join(out_pipe, folder, fname)) for folder, _p, fname in parts.values()}
    checked = 0
    for key, (folder, src, rows, transposed) in names.items():
        got = baked[folder][key.split("/", 1)[1]]
        ref = baked_single[src]
        ref = ref.T if transposed else ref
        ref = ref[rows[0]:rows[1]] if rows else ref
        assert torch.allclose(got.float(), ref.float(), atol=2e-3), key
        checked += 1
    assert checked > 800
    assert torch.equal(load_file(os.path.join(out_pipe, "vae", "diffusion_pytorch_model.safetensors"))
                       ["decoder.conv_in.weight"], single[PASSTHROUGH_SD[0][0]])


def test_doctor_diff_extract_read_pipeline_folders_as_the_single_file(sdxl, sdxl_pipe, tmp_path) -> None:
    """doctor --base, diff and extract take a pipeline folder as one model (its unet/ and text-encoder subfolders):
    each gives what it gives for the same weights in one single-file checkpoint."""
    d, base, lora, _facts = sdxl
    pipe, _names = sdxl_pipe
    single_out, pipe_out = str(tmp_path / "s.safetensors"), str(tmp_path / "p")
    lorakit.bake(base, [f"{lora}:0.8"], single_out, progress=False)
    lorakit.bake(str(pipe), [f"{lora}:0.8"], pipe_out, progress=False)

    by_single, by_pipe = lorakit.doctor([lora], base), lorakit.doctor([lora], str(pipe))
    (ds,), (dp,) = by_single.loras, by_pipe.loras
    assert dp.verdict == ds.verdict and dp.to_json()["coverage"] == ds.to_json()["coverage"]
    assert set(by_pipe.base["components"]) == {"unet", "clip_l", "clip_g"}

    r_single, r_pipe = lorakit.diff(base, single_out), lorakit.diff(str(pipe), pipe_out)
    # the single file's VAE is compared too ("passthrough"); the pipeline's vae/ is no component subfolder
    assert set(r_pipe.components) == set(r_single.components) - {"passthrough"} == {"unet", "clip_l", "clip_g"}
    for c in r_pipe.components:
        a, b = r_single.components[c], r_pipe.components[c]
        assert b["relative_difference"] == pytest.approx(a["relative_difference"], rel=1e-3), c
    with pytest.raises(lorakit.LorakitError, match="LoRA.*base model|base model.*LoRA"):
        lorakit.diff(str(pipe), lora)

    e_single, e_pipe = str(tmp_path / "es.safetensors"), str(tmp_path / "ep.safetensors")
    lorakit.extract(base, single_out, e_single, rank=8, seed=0, progress=False)
    lorakit.extract(str(pipe), pipe_out, e_pipe, rank=8, seed=0, progress=False)
    same = lorakit.diff(e_single, e_pipe)      # same modules, same deltas (up to the SVD's fp32 rounding)
    assert not same.only_in_a and not same.only_in_b and same.shared >= 5
    assert same.total["relative_difference"] < 1e-4, same.total


def test_sd1_lora_into_sdxl_base_is_refused(sdxl, tmp_path) -> None:
    _d, base, _lora, _f = sdxl
    lora = tmp_path / "sd1.safetensors"
    _write_lora(lora, (("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", "", (320, 768), None,
                        False),
                       ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "", (768, 768), None, False)))
    with pytest.raises(UnsupportedArchitectureError, match="SD 1.x LoRA.*SDXL model"):
        lorakit.bake(base, [str(lora)], str(tmp_path / "o.safetensors"), progress=False)
    assert not (tmp_path / "o.safetensors").exists()


def test_sd1_single_file_bake(tmp_path) -> None:
    arch = resolve("sd1")
    base = write_checkpoint(tmp_path / "sd1.safetensors", arch, {"unet": TINY_SD["sd1"], "clip_l": TINY_TE["clip_l"]},
                            dtype=torch.float32, extra=PASSTHROUGH_SD)
    c = TINY_SD["sd1"]["C"]
    unet, te = "model.diffusion_model.", "cond_stage_model.transformer."
    modules = (
        ("lora_unet_down_blocks_0_attentions_0_proj_in", unet + "input_blocks.1.1.proj_in.weight", (c, c, 1, 1), None,
         False),
        ("lora_unet_down_blocks_0_resnets_0_conv1", unet + "input_blocks.1.0.in_layers.2.weight", (c, c, 3, 3), None,
         False),
        ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_v",
         unet + "output_blocks.5.1.transformer_blocks.0.attn2.to_v.weight", (4 * c, 768), None, False),
        ("lora_te_text_model_encoder_layers_1_mlp_fc1", te + "text_model.encoder.layers.1.mlp.fc1.weight",
         (TINY_TE["clip_l"]["FF"], 768), None, False),
    )
    lora = tmp_path / "lora.safetensors"
    facts = _write_lora(lora, modules, seed=3)
    out = str(tmp_path / "out.safetensors")
    lorakit.bake(base, [str(lora)], out, progress=False)
    _assert_baked(base, out, modules, facts, 1.0)
    assert safe_open(out, "pt").metadata()["modelspec.architecture"] == "stable-diffusion-v1"


MEMORY_SCRIPT = r"""
import json, sys, torch
import lorakit
from lorakit.layouts import resolve
from lorakit.samples.synthetic import write_checkpoint
c, folder = int(sys.argv[1]), sys.argv[2]
base, lora, out = folder + "/base.safetensors", folder + "/lora.safetensors", folder + "/out.safetensors"
if sys.argv[3] == "make":
    arch = resolve("sdxl")
    write_checkpoint(base, arch, {"unet": {"C": c, "CTX": 2048, "ADM": 2816, "IN": 4, "OUT": 4}},
                     dtype=torch.bfloat16, fill="zeros")
    from safetensors.torch import save_file
    t = {}
    for b, w in ((4, 2), (7, 4), (1, 1)):   # one module per level, scaled with the width
        stem = f"lora_unet_input_blocks_{b}_1_transformer_blocks_0_attn1_to_q" if b != 1 else "lora_unet_input_blocks_1_0_in_layers_2"
        shape = (w * c, w * c) if b != 1 else (c, c, 3, 3)
        t[stem + ".lora_down.weight"] = torch.randn(4, *shape[1:]).to(torch.bfloat16)
        t[stem + ".lora_up.weight"] = torch.randn(shape[0], 4, *([1, 1] if len(shape) == 4 else [])).to(torch.bfloat16)
    save_file(t, lora)
    sys.exit(0)
"""


def _peak(tmp_path, c: int) -> dict[str, int]:
    folder = tmp_path / f"c{c}"
    folder.mkdir()
    return measure_bake(MEMORY_SCRIPT, str(c), str(folder))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux) for VmHWM")
def test_sdxl_bake_peak_rss_does_not_grow_with_model_size(tmp_path) -> None:
    small, large = _peak(tmp_path, 16), _peak(tmp_path, 64)
    assert large["bytes"] > 5 * small["bytes"] and small["changed"] == large["changed"] == 3
    growth = (large["peak"] - large["before"]) - (small["peak"] - small["before"])
    # the large base is ~7× the small one (hundreds of MB more); the bake's extra peak stays within a few chunks
    assert growth < 0.25 * (large["bytes"] - small["bytes"]), (small, large)
    assert growth < 96 << 20, (small, large)
