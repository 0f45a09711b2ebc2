"""LoRA entries on loose parameters (FLUX q/k RMSNorm scales): read, write, inspect, bake, extract, merge.

Keys are written out literally here, and every expected delta is computed from the tensors the test
wrote, never through lorakit's own name mapping.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from lorakit.ops.baking import bake
from lorakit.cli.main import main as cli
from lorakit.errors import CoverageError, FormatError, KeyMappingError, LossyConversionError, ShapeMismatchError
from lorakit.ops.extraction import extract
from lorakit.formats import emit, read_lora
from lorakit.ops.inspection import inspect_lora
from lorakit.io import open_weights, save_tensors
from lorakit.ops.merging import merge
from lorakit.lora.model import LoraModel, Patch, Target
from lorakit.lora.adapters import Full, LoRA
from lorakit.samples.synthetic import TINY_FLUX, write_base

D = TINY_FLUX["D"]
H = TINY_FLUX["H"]
Q0 = "double_blocks.0.img_attn.norm.query_norm.scale"
K1S = "single_blocks.1.norm.key_norm.scale"
TXTK1 = "double_blocks.1.txt_attn.norm.key_norm.scale"


def vec(seed: int, n: int = D) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def lora_pair(prefix_down: str, prefix_up: str, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {prefix_down: torch.randn(2, H, generator=g), prefix_up: torch.randn(H, 2, generator=g)}


def loose_patches(model: LoraModel) -> dict[str, torch.Tensor]:
    out = {}
    for p in model.patches:
        if p.target.loose:
            assert isinstance(p.adapter, Full) and p.rows is None and p.bias is None and p.dora is None
            assert p.target.module not in out
            out[p.target.module] = p.adapter.diff
    return out


# ---------------------------------------------------------------------------------------------
# Reading every spelling
# ---------------------------------------------------------------------------------------------

READ_CASES = {
    "kohya-diff": ({"lora_unet_double_blocks_0_img_attn_norm_query_norm_scale.diff": 1,
                    "lora_unet_single_blocks_1_norm_key_norm_scale.diff": 2},
                   {Q0: 1, K1S: 2}, "kohya",
                   ("lora_unet_double_blocks_0_img_attn_proj.lora_down.weight",
                    "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight")),
    "kohya-w_norm": ({"lora_unet_double_blocks_0_img_attn_norm_query_norm.w_norm": 1,
                      "lora_unet_double_blocks_1_txt_attn_norm_key_norm.w_norm": 3},
                     {Q0: 1, TXTK1: 3}, "kohya",
                     ("lora_unet_double_blocks_0_img_attn_proj.lora_down.weight",
                      "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight")),
    "kohya-diffusers-names": ({"lora_unet_transformer_blocks_0_attn_norm_q_weight.diff": 1}, {Q0: 1}, "kohya",
                              ("lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight",
                               "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight")),
    "comfy": ({"diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff": 1,
               "diffusion_model.single_blocks.1.norm.key_norm.scale.diff": 2},
              {Q0: 1, K1S: 2}, "comfy",
              ("diffusion_model.double_blocks.0.img_attn.proj.lora_down.weight",
               "diffusion_model.double_blocks.0.img_attn.proj.lora_up.weight")),
    "diffusers": ({"transformer.transformer_blocks.0.attn.norm_q.weight.diff": 1,
                   "transformer.transformer_blocks.1.attn.norm_added_k.weight.diff": 3,
                   "transformer.single_transformer_blocks.1.attn.norm_k.weight.diff": 2},
                  {Q0: 1, TXTK1: 3, K1S: 2}, "diffusers",
                  ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                   "transformer.transformer_blocks.0.attn.to_q.lora_B.weight")),
    "lycoris-w_norm": ({"lycoris_transformer_blocks_0_attn_norm_q.w_norm": 1}, {Q0: 1}, "lycoris",
                       ("lycoris_transformer_blocks_0_attn_to_q.lora_down.weight",
                        "lycoris_transformer_blocks_0_attn_to_q.lora_up.weight")),
}


@pytest.mark.parametrize("case", sorted(READ_CASES))
@pytest.mark.parametrize("with_lora", [True, False])
def test_read_loose_param_diffs(tmp_path, case, with_lora):
    keys, expect, fmt, (down, up) = READ_CASES[case]
    tensors = {k: vec(seed) for k, seed in keys.items()}
    if with_lora:
        tensors.update(lora_pair(down, up))
    path = save_tensors(tmp_path / "a.safetensors", tensors, {})
    model = read_lora(path)
    assert model.format == fmt and model.unknown_keys == []
    got = loose_patches(model)
    assert sorted(got) == sorted(expect)
    for name, seed in expect.items():
        assert torch.equal(got[name], vec(seed))
    assert "full" in model.adapter_kinds()
    assert model.arch.params["transformer"]["D"] == D          # solved from the diffs' shapes
    assert len(model.loose_targets()) == len(expect)
    assert sum(not p.target.loose for p in model.patches) == (1 if with_lora else 0)


def test_b_norm_and_foreign_suffixes_are_reported_not_read(tmp_path):
    tensors = {"lora_unet_double_blocks_0_img_attn_norm_query_norm.w_norm": vec(1),
               "lora_unet_double_blocks_0_img_attn_norm_query_norm.b_norm": vec(2),     # RMSNorm has no bias
               "lora_unet_double_blocks_0_img_attn_norm_query_norm_scale.alpha": torch.tensor(1.0),
               "lora_unet_img_in.w_norm": vec(3, H)}                                      # a Linear, not a norm
    model = read_lora(save_tensors(tmp_path / "a.safetensors", tensors, {}))
    assert sorted(model.unknown_keys) == sorted(k for k in tensors if not k.endswith(".w_norm") or "img_in" in k)
    assert list(loose_patches(model)) == [Q0]


def test_two_spellings_of_one_parameter_are_refused(tmp_path):
    tensors = {"lora_unet_double_blocks_0_img_attn_norm_query_norm.w_norm": vec(1),
               "lora_unet_double_blocks_0_img_attn_norm_query_norm_scale.diff": vec(2)}
    with pytest.raises(KeyMappingError, match="two spellings"):
        read_lora(save_tensors(tmp_path / "a.safetensors", tensors, {}))


def test_malformed_loose_diffs_are_refused(tmp_path):
    two_d = {"diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff": torch.zeros(D, 2)}
    with pytest.raises(FormatError, match="loose parameter"):
        read_lora(save_tensors(tmp_path / "a.safetensors", two_d, {}))
    # a norm diff whose length contradicts the head width the other norm diffs show
    mixed = {"diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff": vec(1),
             "diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale.diff": vec(2, D + 2)}
    with pytest.raises((ShapeMismatchError, FormatError)):
        read_lora(save_tensors(tmp_path / "b.safetensors", mixed, {}))


# ---------------------------------------------------------------------------------------------
# Writing and round trips
# ---------------------------------------------------------------------------------------------

WRITTEN = {
    "kohya": {Q0: "lora_unet_double_blocks_0_img_attn_norm_query_norm_scale.diff",
              K1S: "lora_unet_single_blocks_1_norm_key_norm_scale.diff",
              TXTK1: "lora_unet_double_blocks_1_txt_attn_norm_key_norm_scale.diff"},
    "comfy": {Q0: "diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff",
              K1S: "diffusion_model.single_blocks.1.norm.key_norm.scale.diff",
              TXTK1: "diffusion_model.double_blocks.1.txt_attn.norm.key_norm.scale.diff"},
    "diffusers": {Q0: "transformer.transformer_blocks.0.attn.norm_q.weight.diff",
                  K1S: "transformer.single_transformer_blocks.1.attn.norm_k.weight.diff",
                  TXTK1: "transformer.transformer_blocks.1.attn.norm_added_k.weight.diff"},
}


@pytest.mark.parametrize("src", ["kohya-w_norm", "comfy", "diffusers"])
@pytest.mark.parametrize("fmt", sorted(WRITTEN))
def test_round_trips(tmp_path, src, fmt):
    keys, _, _, (down, up) = READ_CASES[src]
    tensors = {k: vec(seed).to(torch.bfloat16) for k, seed in keys.items()}
    tensors.update({k: v.to(torch.bfloat16) for k, v in lora_pair(down, up).items()})
    model = read_lora(save_tensors(tmp_path / "in.safetensors", tensors, {}))
    before = loose_patches(model)
    result = emit(model, fmt)
    for name, diff in before.items():
        key = WRITTEN[fmt][name]
        assert torch.equal(result.tensors[key], diff) and result.tensors[key].dtype == torch.bfloat16
        assert not any(k.startswith(key[:-len("diff")]) and k != key for k in result.tensors)   # no alpha etc.
    out = save_tensors(tmp_path / "out.safetensors", result.tensors, {})
    again = read_lora(out)
    assert again.format == fmt and not again.unknown_keys
    after = loose_patches(again)
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[n], before[n]) for n in before)
    # and once more: the written file round-trips to the same bytes
    assert {k: v for k, v in emit(again, fmt).tensors.items()}.keys() == result.tensors.keys()


def test_emit_refuses_factors_on_a_loose_parameter():
    model = read_lora_model_with([Patch(Target("transformer", Q0, loose=True),
                                        LoRA(alpha=None, down=torch.ones(1, 1), up=torch.ones(D, 1)))])
    with pytest.raises(LossyConversionError, match="full diff only"):
        emit(model, "kohya")


def read_lora_model_with(patches):
    from lorakit.layouts import FLUX1
    from lorakit.lora.model import ArchInstance
    return LoraModel(ArchInstance(FLUX1, {"transformer": dict(TINY_FLUX)}), patches, "kohya")


def test_convert_cli_round_trip(tmp_path):
    keys, _, _, (down, up) = READ_CASES["comfy"]
    tensors = {k: vec(s) for k, s in keys.items()} | lora_pair(down, up)
    src = save_tensors(tmp_path / "in.safetensors", tensors, {})
    # exit 1: written, with a warning that diffusers' loader does not apply '.diff' keys (issue 11 item 3)
    assert cli(["convert", src, "--to", "diffusers", "-o", str(tmp_path / "d.safetensors")]) == 1
    with open_weights(tmp_path / "d.safetensors") as f:
        assert torch.equal(f.get(WRITTEN["diffusers"][Q0]), tensors[WRITTEN["comfy"][Q0]])
        assert torch.equal(f.get(WRITTEN["diffusers"][K1S]), tensors[WRITTEN["comfy"][K1S]])


# ---------------------------------------------------------------------------------------------
# inspect / doctor / diff / resize
# ---------------------------------------------------------------------------------------------

def test_inspect_counts_norms_apart(tmp_path, capsys):
    keys, _, _, (down, up) = READ_CASES["kohya-diff"]
    tensors = {k: vec(s) for k, s in keys.items()} | lora_pair(down, up)
    path = save_tensors(tmp_path / "a.safetensors", tensors, {})
    r = inspect_lora(path, deep=True)
    assert r["modules"] == 1 and r["loose_params"] == 2
    assert r["adapters"] == ["full", "lora"]
    tr = r["components"]["transformer"]
    assert tr["present"] == 1 and tr["loose"] == 2 and "beyond_layout" not in tr
    assert r["unknown_key_count"] == 0
    assert cli(["inspect", path]) == 0
    assert "2 norms" in capsys.readouterr().out


def test_doctor_diff_resize_handle_norms(tmp_path, capsys):
    keys, _, _, (down, up) = READ_CASES["kohya-diff"]
    tensors = {k: vec(s) for k, s in keys.items()} | lora_pair(down, up)
    a = save_tensors(tmp_path / "a.safetensors", tensors, {})
    base = write_base(tmp_path / "base.safetensors")
    assert cli(["doctor", a, "--base", base, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    text = json.dumps(rep)
    assert "3/3" in text or '"applies": 3' in text
    small = write_base(tmp_path / "small.safetensors", {**TINY_FLUX, "D": D // 2})
    cli(["doctor", a, "--base", small, "--json"])
    assert "norm scale of another size" in capsys.readouterr().out
    comfy = save_tensors(tmp_path / "c.safetensors", emit(read_lora(a), "comfy").tensors, {})
    assert cli(["diff", a, comfy, "--json"]) == 0                      # the same LoRA in another format
    capsys.readouterr()
    b = save_tensors(tmp_path / "b.safetensors", {**tensors, next(iter(keys)): vec(99)}, {})
    assert cli(["diff", a, b, "--json"]) == 1                          # a changed norm diff is seen
    d = json.loads(capsys.readouterr().out)
    assert not d["equivalent"]
    assert cli(["resize", a, "-o", str(tmp_path / "r.safetensors"), "--rank", "1", "--verify"]) == 0
    kept = loose_patches(read_lora(tmp_path / "r.safetensors"))
    assert torch.equal(kept[Q0], vec(1)) and torch.equal(kept[K1S], vec(2))


# ---------------------------------------------------------------------------------------------
# bake
# ---------------------------------------------------------------------------------------------

BASE_KEYS = {"bfl": {Q0: Q0, K1S: K1S}, "diffusers": {Q0: "transformer_blocks.0.attn.norm_q.weight",
                                                     K1S: "single_transformer_blocks.1.attn.norm_k.weight"}}


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
@pytest.mark.parametrize("src", ["kohya-diff", "diffusers"])
def test_bake_adds_weighted_norm_diffs(tmp_path, layout, src):
    keys, _, _, (down, up) = READ_CASES[src]
    tensors = {k: vec(s) for k, s in keys.items()} | lora_pair(down, up)
    lora = save_tensors(tmp_path / "l.safetensors", tensors, {})
    base = write_base(tmp_path / "base.safetensors", layout=layout)
    out = tmp_path / "out.safetensors"
    rep = bake(base, [(lora, 0.5)], out)
    assert not rep.skipped
    by_native = {Q0: vec(1), K1S: vec(2)}      # both sources carry these two diffs (seeds 1 and 2)
    with open_weights(base) as fb, open_weights(out) as fo:
        for native, key in BASE_KEYS[layout].items():
            assert torch.equal(fo.get(key), fb.get(key) + 0.5 * by_native[native]), key
        # untouched loose parameters are copied unchanged
        other = "double_blocks.0.img_attn.norm.key_norm.scale" if layout == "bfl" \
            else "transformer_blocks.0.attn.norm_k.weight"
        assert torch.equal(fo.get(other), fb.get(other))
    plan = bake(base, [(lora, 0.75)], None, dry_run=True).plan
    natives = {c["native"] for e in plan if e["action"] == "bake" for c in e["changes"]}
    assert Q0 in natives


def test_bake_refuses_norm_diffs_of_another_size(tmp_path):
    tensors = {"diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff": vec(1, D * 2)}
    lora = save_tensors(tmp_path / "l.safetensors", tensors, {})
    base = write_base(tmp_path / "base.safetensors")
    with pytest.raises(CoverageError):
        bake(base, [lora], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(CoverageError, match="nothing to bake"):
        bake(base, [lora], tmp_path / "o.safetensors", allow_partial=True)


# ---------------------------------------------------------------------------------------------
# extract --include-norms
# ---------------------------------------------------------------------------------------------

def _models(tmp_path, tuned_layout: str):
    orig = write_base(tmp_path / "orig.safetensors")
    with open_weights(orig) as f:
        native = {k: f.get(k).clone() for k in f.keys()}
    tuned = dict(native)
    tuned["img_in.weight"] = native["img_in.weight"] + torch.outer(vec(5, H), vec(6, TINY_FLUX["IN"])) * 0.01
    tuned[Q0] = native[Q0] + vec(11) * 0.1
    tuned[K1S] = native[K1S] * 1.5
    if tuned_layout == "bfl":
        path = save_tensors(tmp_path / "tuned.safetensors", tuned, {})
    else:
        tmpl = write_base(tmp_path / "tmpl.safetensors", layout="diffusers", seed=0)
        with open_weights(tmpl) as f:
            dif = {k: f.get(k).clone() for k in f.keys()}
        dif["x_embedder.weight"] = tuned["img_in.weight"]
        dif[BASE_KEYS["diffusers"][Q0]] = tuned[Q0]
        dif[BASE_KEYS["diffusers"][K1S]] = tuned[K1S]
        path = save_tensors(tmp_path / "tuned.safetensors", dif, {})
        # the template and the BFL original share every other tensor (same seed, same order of the data)
    return orig, path, native, tuned


@pytest.mark.parametrize("to", ["kohya", "comfy", "diffusers"])
def test_extract_include_norms_writes_exact_diffs(tmp_path, to):
    orig, tuned_path, native, tuned = _models(tmp_path, "bfl")
    out = tmp_path / "x.safetensors"
    rep = extract(orig, tuned_path, out, rank=2, include_norms=True, to=to, exact=True)
    assert sorted(rep.loose_written) == sorted([Q0, K1S])
    assert all(d["written"] for d in rep.loose_differences)
    assert not any("--include-norms" in w for w in rep.warnings)
    assert any("ComfyUI" in w for w in rep.warnings) == (to != "comfy")   # only comfy keys load in ComfyUI
    with open_weights(out) as f:
        for name in (Q0, K1S):
            assert torch.equal(f.get(WRITTEN[to][name]), tuned[name] - native[name])
        assert sorted(k for k in f.keys() if k.endswith(".diff")) == sorted(WRITTEN[to][n] for n in (Q0, K1S))
    model = read_lora(out)
    assert sorted(loose_patches(model)) == sorted([Q0, K1S])   # unchanged norms are not written
    # bake it back: the norm scales of TUNED are recovered
    back = tmp_path / "back.safetensors"
    bake(orig, [str(out)], back)
    with open_weights(back) as f:
        for name in (Q0, K1S):
            assert torch.equal(f.get(name), native[name] + (tuned[name] - native[name]))
            torch.testing.assert_close(f.get(name), tuned[name], rtol=0, atol=1e-6)


def test_extract_norms_from_a_diffusers_tuned_model(tmp_path):
    orig, tuned_path, native, tuned = _models(tmp_path, "diffusers")
    out = tmp_path / "x.safetensors"
    rep = extract(orig, tuned_path, out, rank=2, include_norms=True, exact=True)
    assert sorted(rep.loose_written) == sorted([Q0, K1S])
    got = loose_patches(read_lora(out))
    assert torch.equal(got[Q0], tuned[Q0] - native[Q0]) and torch.equal(got[K1S], tuned[K1S] - native[K1S])


def test_extract_without_flag_reports_norms(tmp_path, capsys):
    orig, tuned_path, native, tuned = _models(tmp_path, "bfl")
    out = tmp_path / "x.safetensors"
    rep = extract(orig, tuned_path, out, rank=2, exact=True)
    assert not rep.loose_written
    assert sorted(d["name"] for d in rep.loose_differences) == sorted([Q0, K1S])
    assert not any(d["written"] for d in rep.loose_differences)
    assert any("--include-norms" in w for w in rep.warnings)
    assert not loose_patches(read_lora(out))
    with open_weights(out) as f:
        assert not any(k.endswith(".diff") for k in f.keys())
    assert cli(["extract", orig, tuned_path, "-o", str(tmp_path / "c.safetensors"), "--rank", "2",
                "--include-norms", "--json"]) == 1    # warns: kohya spelling of norm diffs (exit 1)
    assert sorted(json.loads(capsys.readouterr().out)["loose_written"]) == sorted([Q0, K1S])


def test_extract_norm_rounding_is_reported(tmp_path):
    orig, tuned_path, native, tuned = _models(tmp_path, "bfl")
    rep = extract(orig, tuned_path, tmp_path / "x.safetensors", rank=2, include_norms=True, exact=True,
                  dtype=torch.bfloat16)
    assert any("rounded" in w and "fp32" in w for w in rep.warnings)


def test_extract_only_norms_changed(tmp_path):
    orig = write_base(tmp_path / "orig.safetensors")
    with open_weights(orig) as f:
        tuned = {k: f.get(k).clone() for k in f.keys()}
    tuned[Q0] = tuned[Q0] + 0.25
    t = save_tensors(tmp_path / "t.safetensors", tuned, {})
    rep = extract(orig, t, tmp_path / "x.safetensors", rank=2, include_norms=True)
    assert rep.loose_written == [Q0] and not rep.modules
    assert list(loose_patches(read_lora(tmp_path / "x.safetensors"))) == [Q0]


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,extra", [("concat", []), ("svd", []), ("ties", ["density"])])
@pytest.mark.parametrize("to", ["kohya", "diffusers"])
def test_merge_sums_norm_diffs_exactly(tmp_path, method, extra, to):
    a_keys, _, _, (down, up) = READ_CASES["kohya-diff"]
    a = save_tensors(tmp_path / "a.safetensors",
                     {k: vec(s) for k, s in a_keys.items()} | lora_pair(down, up, seed=1), {})
    b = save_tensors(tmp_path / "b.safetensors",
                     {"transformer.transformer_blocks.0.attn.norm_q.weight.diff": vec(21),
                      "transformer.transformer_blocks.1.attn.norm_added_k.weight.diff": vec(22)}
                     | lora_pair("transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                                 "transformer.transformer_blocks.0.attn.to_q.lora_B.weight", seed=2), {})
    out = tmp_path / "m.safetensors"
    kw = {"density": 0.5} if extra else {}
    rep = merge([(a, 0.5), (b, -1.5)], out, method=method, to=to, verify=True, dtype=torch.float32, **kw)
    got = loose_patches(read_lora(out))
    assert torch.equal(got[Q0], 0.5 * vec(1) + -1.5 * vec(21))
    assert torch.equal(got[K1S], 0.5 * vec(2))
    assert torch.equal(got[TXTK1], -1.5 * vec(22))
    assert rep.verify is not None
    for name in (Q0, K1S, TXTK1):
        assert rep.verify["modules"][f"transformer:{name}"] == 0.0
    if method != "concat":
        assert any("loose parameter" in w and "weighted sums" in w for w in rep.warnings)


def test_block_vector_multiplies_norms_with_their_block(tmp_path):
    keys = {WRITTEN["kohya"][Q0]: 1, WRITTEN["kohya"][TXTK1]: 3, WRITTEN["kohya"][K1S]: 2}
    a = save_tensors(tmp_path / "a.safetensors", {k: vec(s) for k, s in keys.items()}, {})
    out = tmp_path / "m.safetensors"
    # the file shows 2 double and 2 single blocks: double 0, 1 then single 0, 1
    merge([(a, 1.0)], out, blocks="0.5,1,1,0.25", dtype=torch.float32)
    got = loose_patches(read_lora(out))
    assert torch.equal(got[Q0], 0.5 * vec(1)) and torch.equal(got[K1S], 0.25 * vec(2))
    assert torch.equal(got[TXTK1], vec(3))
    assert os.path.getsize(out) > 0
