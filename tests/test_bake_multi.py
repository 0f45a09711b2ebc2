"""Baking into multi-component bases: a toy architecture declared in tests (tests/toyarch.py) with a conv UNet and
a text encoder with fused attention and a transposed projection, in one single-file checkpoint.

Expected weights are computed here by hand from the LoRA's factors (W + w·(α/r)·up@down, reshaped; q rows only of
a fused in_proj; ΔWᵀ for a weight stored in × out); files are read back with ``safetensors``, not lorakit.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.base.checkpoint import open_base
from lorakit.cli.main import main
from lorakit.errors import UnsupportedArchitectureError, CoverageError, UsageError
from lorakit.io import open_weights

from toyarch import (SIZES, TE_PREFIX, UNET_PREFIX, VAE_PREFIX, VAE_SHAPES, delta, lora_modules,  # noqa: F401
                     toy_arch, write_base, write_lora)            # toy_arch: the fixture that registers the toy

W = 0.7            # LoRA strength used throughout
D = SIZES["D"]

# LoRA module -> base key it changes (q_proj: rows 0:D of the fused in_proj)
CHANGED = {
    "lora_unet_conv_in": UNET_PREFIX + "conv_in.weight",
    "lora_unet_mid_block_skip": UNET_PREFIX + "mid.skip.weight",
    "lora_unet_down_blocks_1_attentions_2_proj": UNET_PREFIX + "blocks.1.sub.2.proj.weight",
    "lora_te1_layers_1_self_attn_q_proj": TE_PREFIX + "layers.1.attn.in_proj_weight",
    "lora_te1_text_projection": TE_PREFIX + "text_projection",
}


def _header(path: str) -> list[tuple[str, str, list[int]]]:
    """(key, dtype, shape) in the order of the file's header (raw JSON, no library)."""
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        head = json.loads(fh.read(n))
    return [(k, v["dtype"], v["shape"]) for k, v in head.items() if k != "__metadata__"]


def _expected(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], weight: float,
              modules: tuple[str, ...] = tuple(CHANGED)) -> dict[str, torch.Tensor]:
    want = {}
    for name in modules:
        key = CHANGED[name]
        w0 = base[key].float().clone()
        d = delta(lora, name) * weight
        if name.endswith("q_proj"):
            w0[0:D] += d                       # q rows of [q; k; v]
        elif name.endswith("text_projection"):
            w0 += d.t()                        # stored in × out
        else:
            w0 += d.reshape(w0.shape)
        want[key] = w0.to(base[key].dtype)
    return want


def _check(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(out) == set(base) and all(out[k].dtype == base[k].dtype for k in base)
    for k, v in want.items():
        tol = {"rtol": 1e-5, "atol": 1e-5} if v.dtype == torch.float32 else {"rtol": 1e-3, "atol": 2e-3}
        torch.testing.assert_close(out[k], v, **tol)
        assert not torch.equal(out[k], base[k]), k
    for k in base:
        if k not in want:
            assert torch.equal(out[k], base[k]), k          # untouched: same values, same dtype


@pytest.fixture
def files(tmp_path, toy_arch):
    gen = torch.Generator().manual_seed(7)
    base_path, lora_path = str(tmp_path / "base.safetensors"), str(tmp_path / "lora.safetensors")
    base = write_base(base_path, gen)
    lora = write_lora(lora_path, gen)
    return base_path, base, lora_path, lora


def test_open_base_maps_components(files):
    base_path, base, _lp, _l = files
    with open_weights(base_path) as f:
        bm = open_base(f)
        assert bm.arch.name == "toy" and bm.components() == ["unet", "te"] and bm.component == "unet"
        assert {c: (p.prefix, p.naming) for c, p in bm.parts.items()} == \
            {"unet": (UNET_PREFIX, "native"), "te": (TE_PREFIX, "native")}
        assert bm.arch.params["unet"] == {"C": 8, "IN": 4, "OUT": 6}
        assert bm.arch.params["te"] == {"D": 12, "P": 10, "layers": 2}
        assert sorted(bm.passthrough) == sorted([*VAE_SHAPES, TE_PREFIX + "embed.weight"])
        s = bm.slots[TE_PREFIX + "layers.0.attn.in_proj_weight"]
        assert (s.component, s.module, s.param, s.rows, s.transpose) == ("te", "layers.0.attn", "weight", None, False)
        s = bm.slots[TE_PREFIX + "layers.0.attn.in_proj_bias"]
        assert (s.module, s.param) == ("layers.0.attn", "bias")
        s = bm.slots[TE_PREFIX + "text_projection"]
        assert (s.component, s.module, s.param, s.transpose) == ("te", "text_projection", "weight", True)
        assert bm.module_shape("te", "text_projection") == (10, 12)          # ΔW's out × in, not the file's
        assert bm.module_shape("unet", "conv_in") == (8, 4, 3, 3)
        assert set(bm.by_module()) == {"conv_in", "mid.skip", "head",
                                       *(f"blocks.{b}.sub.{t}.proj" for b in range(2) for t in range(3))}
        assert set(bm.by_module("te")) == {"layers.0.attn", "layers.1.attn", "layers.0.attn.out_proj",
                                           "layers.1.attn.out_proj", "text_projection"}


def test_bake_library(files, tmp_path):
    base_path, base, lora_path, lora = files
    out = str(tmp_path / "out.safetensors")
    r = lorakit.bake(base_path, [(lora_path, W)], out)
    assert r.changed == len(CHANGED) and not r.skipped and not r.not_applied and not r.warnings
    assert r.tensors == len(base) and r.copied == len(base) - len(CHANGED)
    _check(load_file(out), base, _expected(base, lora, W))
    assert _header(out) == _header(base_path)                 # same keys, order, dtypes and shapes


def test_bake_cli_matches_library(files, tmp_path):
    base_path, base, lora_path, lora = files
    lib, cli = str(tmp_path / "lib.safetensors"), str(tmp_path / "cli.safetensors")
    lorakit.bake(base_path, [(lora_path, W)], lib)
    assert main(["bake", base_path, f"{lora_path}:{W}", "-o", cli, "--no-progress"]) == 0
    a, b = load_file(lib), load_file(cli)
    assert _header(cli) == _header(lib) == _header(base_path) and all(torch.equal(a[k], b[k]) for k in a)
    _check(b, base, _expected(base, lora, W))


def test_dry_run_plan_names_fused_rows_and_transpose(files):
    base_path, _b, lora_path, _l = files
    r = lorakit.bake(base_path, [(lora_path, W)], None, dry_run=True)
    plan = {e["tensor"]: e for e in r.plan}
    q = plan[TE_PREFIX + "layers.1.attn.in_proj_weight"]["changes"]
    assert [(c["native"], c["native_rows"]) for c in q] == [("layers.1.attn.weight", [0, D])]
    assert plan[TE_PREFIX + "text_projection"]["action"] == "bake"
    assert all(plan[k]["action"] == "copy" for k in VAE_SHAPES)


def test_component_absent_from_base_is_reported(tmp_path, toy_arch):
    gen = torch.Generator().manual_seed(3)
    base_path, lora_path = str(tmp_path / "unet_only.safetensors"), str(tmp_path / "lora.safetensors")
    base = write_base(base_path, gen, te=False)
    lora = write_lora(lora_path, gen)
    out = str(tmp_path / "out.safetensors")
    r = lorakit.bake(base_path, [(lora_path, W)], out)
    assert r.not_applied == [{"input": lora_path, "component": "te", "modules": 2}]
    assert any("2 te modules not applied" in w and "--component te=FILE:OUT" in w for w in r.warnings)
    unet = tuple(n for n in CHANGED if n.startswith("lora_unet_"))
    _check(load_file(out), base, _expected(base, lora, W, unet))
    # the CLI's exit code says that something was not applied
    assert main(["bake", base_path, f"{lora_path}:{W}", "-o", str(tmp_path / "o2.safetensors"), "--no-progress"]) == 1


def test_separate_component_file(tmp_path, toy_arch):
    """``--component te=FILE:OUT``: the te LoRA modules go into a separate text-encoder file (another prefix)."""
    gen = torch.Generator().manual_seed(5)
    base_path, lora_path = str(tmp_path / "unet_only.safetensors"), str(tmp_path / "lora.safetensors")
    full = write_base(str(tmp_path / "full.safetensors"), gen)
    save_file({k: v for k, v in full.items() if not k.startswith(TE_PREFIX)}, base_path)
    te = {"encoder." + k[len(TE_PREFIX):]: v for k, v in full.items() if k.startswith(TE_PREFIX)}
    te_path = str(tmp_path / "te.safetensors")
    save_file(te, te_path)
    lora = write_lora(lora_path, gen)
    out, te_out = str(tmp_path / "out.safetensors"), str(tmp_path / "te_out.safetensors")
    assert main(["bake", base_path, f"{lora_path}:{W}", "-o", out, "--component", f"te={te_path}:{te_out}",
                 "--no-progress"]) == 0
    want = _expected(full, lora, W)
    got = load_file(te_out)
    renamed = {"encoder." + k[len(TE_PREFIX):]: v for k, v in want.items() if k.startswith(TE_PREFIX)}
    _check(got, te, renamed)
    assert _header(te_out) == _header(te_path)
    unet = {k: v for k, v in want.items() if k.startswith(UNET_PREFIX)}
    _check(load_file(out), load_file(base_path), unet)
    r = lorakit.bake(base_path, [(lora_path, W)], str(tmp_path / "o3.safetensors"),
                     components={"te": (te_path, str(tmp_path / "te3.safetensors"))})
    assert r.text_encoders == [{"component": "te", "file": te_path, "output": str(tmp_path / "te3.safetensors"),
                                "changed": 2}]
    # a recipe's `component:` entries are relative to the recipe's folder
    (tmp_path / "r.yaml").write_text(f"base: unet_only.safetensors\ninputs: [{{path: lora.safetensors, weight: {W}}}]\n"
                                     "output: o4.safetensors\ncomponent: ['te=te.safetensors:te4.safetensors']\n")
    assert main(["bake", "--recipe", str(tmp_path / "r.yaml"), "--no-progress"]) == 0
    a, b = load_file(te_out), load_file(str(tmp_path / "te4.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_component_file_refusals(files, tmp_path):
    base_path, _b, lora_path, _l = files
    with pytest.raises(UsageError, match="already holds the toy text encoder"):
        lorakit.bake(base_path, [lora_path], str(tmp_path / "o.safetensors"),
                     components={"te": (base_path, str(tmp_path / "t.safetensors"))})
    with pytest.raises(UsageError, match="no component 'vae'"):
        lorakit.bake(base_path, [lora_path], str(tmp_path / "o.safetensors"),
                     components={"vae": (base_path, str(tmp_path / "t.safetensors"))})
    with pytest.raises(UsageError, match="without an output"):
        lorakit.bake(base_path, [lora_path], str(tmp_path / "o.safetensors"), components={"te": base_path})
    assert main(["bake", base_path, lora_path, "-o", str(tmp_path / "o.safetensors"), "--component", "te"]) == 2


def test_coverage_error_names_component(tmp_path, toy_arch):
    gen = torch.Generator().manual_seed(9)
    base_path, lora_path = str(tmp_path / "base.safetensors"), str(tmp_path / "lora.safetensors")
    write_base(base_path, gen)
    mods = dict(lora_modules())
    mods["lora_te1_layers_4_self_attn_out_proj"] = ((D, D), 2, 2.0)     # the base's te has 2 layers
    write_lora(lora_path, gen, mods)
    with pytest.raises(CoverageError) as exc:
        lorakit.bake(base_path, [lora_path], str(tmp_path / "o.safetensors"))
    assert any("te:layers.4.attn.out_proj" in m and "beyond the base's 2 layers blocks" in m
               for m in exc.value.unmatched)
    r = lorakit.bake(base_path, [lora_path], str(tmp_path / "o.safetensors"), allow_partial=True)
    assert [(s["component"], s["module"]) for s in r.skipped] == [("te", "te:layers.4.attn.out_proj")]
    assert r.changed == len(CHANGED)


def test_lora_of_another_architecture_is_refused(files, tmp_path):
    """With toy registered next to FLUX.1, each base is still detected as its own architecture, and a LoRA of the
    other one is refused by name (nothing written)."""
    from test_bake_util import make_base, write_kohya_all

    base_path, _b, lora_path, _l = files
    flux_base = make_base(tmp_path, "bfl")
    flux_lora = write_kohya_all(str(tmp_path / "flux_lora.safetensors"), modules=["img_in"])
    with open_weights(flux_base) as f:
        assert open_base(f).arch.name == "flux1"
    for base, lora, msg in ((flux_base, lora_path, "this is a Toy LoRA .* a FLUX.1 model"),
                            (base_path, flux_lora, "this is a FLUX.1 LoRA .* a Toy model")):
        out = str(tmp_path / "o.safetensors")
        with pytest.raises(UnsupportedArchitectureError, match=msg):
            lorakit.bake(base, [lora], out)
        assert not (tmp_path / "o.safetensors").exists()


def _write_pipeline(root, base: dict[str, torch.Tensor], *, sharded_unet: bool) -> None:
    """A diffusers-style pipeline folder of the toy base: unet/ (single file or two shards), text_encoder/, vae/,
    tokenizer/ and model_index.json; component names without their single-file prefixes."""
    def strip(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in base.items() if k.startswith(prefix)}

    for sub in ("unet", "text_encoder", "vae", "tokenizer"):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text(json.dumps({"name": sub}))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "ToyPipeline"}))
    (root / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    unet = strip(UNET_PREFIX)
    if sharded_unet:
        keys = sorted(unet)
        shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
                  "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
        for name, ks in shards.items():
            save_file({k: unet[k] for k in ks}, str(root / "unet" / name))
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in unet.values())},
                 "weight_map": {k: name for name, ks in shards.items() for k in ks}}
        (root / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(unet, str(root / "unet" / "diffusion_pytorch_model.safetensors"))
    save_file(strip(TE_PREFIX), str(root / "text_encoder" / "model.safetensors"))
    save_file(strip(VAE_PREFIX), str(root / "vae" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("sharded_unet", [False, True])
def test_pipeline_folder(files, tmp_path, sharded_unet):
    """A diffusers pipeline folder bakes into a mirror folder: unet/ and text_encoder/ baked (per
    ``Container.folder``), everything else copied byte for byte."""
    import filecmp

    _bp, base, lora_path, lora = files
    pipe, out = tmp_path / "pipe", tmp_path / "baked"
    _write_pipeline(pipe, base, sharded_unet=sharded_unet)
    assert main(["bake", str(pipe), f"{lora_path}:{W}", "-o", str(out), "--no-progress"]) == 0
    want = _expected(base, lora, W)
    for sub, prefix in (("unet", UNET_PREFIX), ("text_encoder", TE_PREFIX)):
        src_files = sorted(p.name for p in (pipe / sub).iterdir())
        assert sorted(p.name for p in (out / sub).iterdir()) == src_files
        got: dict[str, torch.Tensor] = {}
        for name in src_files:
            if name.endswith(".safetensors"):
                got.update(load_file(str(out / sub / name)))
                assert _header(str(out / sub / name)) == _header(str(pipe / sub / name))
        src = {k[len(prefix):]: v for k, v in base.items() if k.startswith(prefix)}
        _check(got, src, {k[len(prefix):]: v for k, v in want.items() if k.startswith(prefix)})
        assert filecmp.cmp(pipe / sub / "config.json", out / sub / "config.json", shallow=False)
    for rel in ("model_index.json", "vae/diffusion_pytorch_model.safetensors", "vae/config.json",
                "tokenizer/vocab.txt", "tokenizer/config.json"):
        assert filecmp.cmp(pipe / rel, out / rel, shallow=False), rel
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in pipe.iterdir())
    # refusals: an output file name, an existing non-empty folder
    assert main(["bake", str(pipe), lora_path, "-o", str(tmp_path / "x.safetensors"), "--no-progress"]) == 2
    assert main(["bake", str(pipe), lora_path, "-o", str(out), "--no-progress"]) == 2


def test_flux_pipeline_folder_bakes_its_transformer(tmp_path):
    """A FLUX.1 pipeline folder: transformer/ (sharded) is baked exactly as the same folder given alone; the text
    encoders, which FLUX.1's containers do not list, are copied and their LoRA modules reported as not applied."""
    import filecmp
    import shutil

    from conftest import TINY_CLIP
    from test_bake_util import make_base, write_kohya_all, write_te_file

    pipe = tmp_path / "pipe"
    pipe.mkdir()
    shutil.move(make_base(tmp_path, "sharded"), pipe / "transformer")
    (pipe / "text_encoder").mkdir()
    write_te_file(str(pipe / "text_encoder" / "model.safetensors"), "clip_l", TINY_CLIP)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    lora = write_kohya_all(str(tmp_path / "k.safetensors"), clip=TINY_CLIP)
    alone, out = tmp_path / "alone", tmp_path / "out"
    r1 = lorakit.bake(pipe / "transformer", [(lora, W)], alone)
    r2 = lorakit.bake(pipe, [(lora, W)], out)
    assert r2.changed == r1.changed > 0 and r2.not_applied == r1.not_applied != []
    assert r1.not_applied[0]["component"] == "clip_l"
    for name in sorted(os.listdir(alone)):
        assert filecmp.cmp(alone / name, out / "transformer" / name, shallow=False), name
    assert sorted(os.listdir(out / "transformer")) == sorted(os.listdir(alone))
    assert filecmp.cmp(pipe / "text_encoder" / "model.safetensors", out / "text_encoder" / "model.safetensors",
                       shallow=False)


def test_separate_component_file_in_split_naming(tmp_path, toy_arch):
    """A separate te file in the "diffusers" naming (q/k/v split out of the fused in_proj, text_projection as a
    Linear ``.weight`` out × in, under a prefix): the q_proj LoRA changes q_proj only (its rows of the native
    in_proj), k/v stay byte-identical; the projection gets ΔW itself (not transposed)."""
    gen = torch.Generator().manual_seed(11)
    full = write_base(str(tmp_path / "full.safetensors"), gen)
    base_path = str(tmp_path / "unet_only.safetensors")
    save_file({k: v for k, v in full.items() if not k.startswith(TE_PREFIX)}, base_path)
    te: dict[str, torch.Tensor] = {}
    pre = "text_encoders.te."
    for i in range(SIZES["layers"]):
        w, b = full[f"{TE_PREFIX}layers.{i}.attn.in_proj_weight"], full[f"{TE_PREFIX}layers.{i}.attn.in_proj_bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            te[f"{pre}layers.{i}.self_attn.{name}.weight"] = w[j * D:(j + 1) * D].clone()
            te[f"{pre}layers.{i}.self_attn.{name}.bias"] = b[j * D:(j + 1) * D].clone()
        for leaf in ("weight", "bias"):
            te[f"{pre}layers.{i}.self_attn.out_proj.{leaf}"] = full[f"{TE_PREFIX}layers.{i}.attn.out_proj.{leaf}"]
    te[pre + "text_projection.weight"] = full[TE_PREFIX + "text_projection"].t().contiguous()   # a Linear: out × in
    te_path, te_out = str(tmp_path / "te.safetensors"), str(tmp_path / "te_out.safetensors")
    save_file(te, te_path)
    lora_path = str(tmp_path / "lora.safetensors")
    lora = write_lora(lora_path, gen)
    r = lorakit.bake(base_path, [(lora_path, W)], str(tmp_path / "o.safetensors"), components={"te": (te_path, te_out)})
    assert r.text_encoders[0]["changed"] == 2 and not r.skipped
    want = _expected(full, lora, W)
    q = want[TE_PREFIX + "layers.1.attn.in_proj_weight"][0:D]
    _check(load_file(te_out), te, {f"{pre}layers.1.self_attn.q_proj.weight": q,
                                   pre + "text_projection.weight": want[TE_PREFIX + "text_projection"].t()})
