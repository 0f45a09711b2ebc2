"""Every command on tiny Wan models: bake a Wan 2.2 expert pair (each expert changes only by its own half), a
single-expert LoRA given for the other expert is reported, extract a pair from two tuned experts, merge pairs,
doctor names the I2V-only modules of a Wan 2.1 I2V LoRA on a Wan 2.2 base, inspect/resize/diff run.

Bases come from lorakit's synthetic writer (layout data); LoRAs and expected deltas are spelled by hand."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorakit.errors import CoverageError
from lorakit.formats import read_lora
from lorakit.layouts import WAN
from lorakit.samples.synthetic import TINY_WAN, TINY_WAN_I2V, write_component, write_wan_pair

H, FF, R, IN = 32, 64, 2, 4
MODS = [("blocks.0.self_attn.q", (H, H)), ("blocks.1.ffn.0", (FF, H)), ("blocks.1.cross_attn.o", (H, H)),
        ("patch_embedding", (H, IN, 1, 2, 2))]      # the Conv3d: a 5-D LoRA down, up (out, r, 1, 1, 1)


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _lora(gen: torch.Generator, stem) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """kohya-style factors (alpha 4, rank 2: scale 2) on MODS; returns (tensors, native -> ΔW)."""
    t: dict[str, torch.Tensor] = {}
    want: dict[str, torch.Tensor] = {}
    for name, shape in MODS:
        tail = shape[2:]
        down = torch.randn(R, *shape[1:], generator=gen)
        up = torch.randn(shape[0], R, *([1] * len(tail)), generator=gen) * 0.1
        s = stem(name)
        t[f"{s}.lora_down.weight"], t[f"{s}.lora_up.weight"], t[f"{s}.alpha"] = down, up, torch.tensor(4.0)
        want[name] = (up.flatten(1) @ down.flatten(1)).reshape(shape) * 2.0
    return t, want


def _combined(path, gen) -> dict[str, dict[str, torch.Tensor]]:
    t, want = {}, {}
    for comp, tag in (("transformer", "transformer_1"), ("transformer_2", "transformer_2")):
        part, want[comp] = _lora(gen, lambda n, tag=tag: f"diffusion_model.{tag}.{n}")
        t.update(part)
    save_file(t, str(path))
    return want


@pytest.fixture
def pair(tmp_path):
    return write_wan_pair(tmp_path, TINY_WAN)


def test_bake_pair_changes_each_expert_by_its_own_half(tmp_path, pair):
    from lorakit.ops.baking import bake
    high, low = pair
    want = _combined(tmp_path / "c.safetensors", torch.Generator().manual_seed(1))
    out_h, out_l = tmp_path / "high_baked.safetensors", tmp_path / "low_baked.safetensors"
    r = bake(high, [str(tmp_path / "c.safetensors")], str(out_h), components={"transformer_2": (low, str(out_l))})
    assert not r.not_applied and not r.skipped
    assert _tensors(out_h)["patch_embedding.weight"].shape == (H, IN, 1, 2, 2)
    for base, out, comp in ((high, out_h, "transformer"), (low, out_l, "transformer_2")):
        b, o = _tensors(base), _tensors(out)
        assert set(b) == set(o)
        for k in b:
            mod = k[: -len(".weight")]
            if k.endswith(".weight") and mod in want[comp]:
                assert torch.allclose(o[k] - b[k], want[comp][mod], atol=1e-6), k
            else:
                assert torch.equal(o[k], b[k]), k


def test_bake_pair_from_two_split_files(tmp_path, pair):
    """The same as one combined file: a high-noise and a low-noise file (told apart by their names)."""
    from lorakit.ops.baking import bake
    high, low = pair
    gen = torch.Generator().manual_seed(2)
    th, wh = _lora(gen, lambda n: f"diffusion_model.{n}")
    tl, wl = _lora(gen, lambda n: f"diffusion_model.{n}")
    save_file(th, str(tmp_path / "x_high_noise.safetensors"))
    save_file(tl, str(tmp_path / "x_low_noise.safetensors"))
    out_h, out_l = tmp_path / "h.safetensors", tmp_path / "l.safetensors"
    bake(high, [str(tmp_path / "x_high_noise.safetensors"), str(tmp_path / "x_low_noise.safetensors")], str(out_h),
         components={"transformer_2": (low, str(out_l))})
    k = "blocks.0.self_attn.q.weight"
    assert torch.allclose(_tensors(out_h)[k] - _tensors(high)[k], wh["blocks.0.self_attn.q"], atol=1e-6)
    assert torch.allclose(_tensors(out_l)[k] - _tensors(low)[k], wl["blocks.0.self_attn.q"], atol=1e-6)


def test_low_noise_lora_on_the_high_noise_base_is_reported(tmp_path, pair):
    from lorakit.ops.baking import bake
    high, low = pair
    t, _ = _lora(torch.Generator().manual_seed(3), lambda n: f"lora_unet_{n.replace('.', '_')}")
    save_file(t, str(tmp_path / "style_low_noise.safetensors"))
    for partial in (False, True):      # nothing of it applies to the high-noise expert: refused, naming the flag
        with pytest.raises(CoverageError, match="--low-noise"):
            bake(high, [str(tmp_path / "style_low_noise.safetensors")], str(tmp_path / "o.safetensors"),
                 allow_partial=partial)
    assert not (tmp_path / "o.safetensors").exists()
    # on the low-noise expert's own file (named low_noise_model) it applies
    r = bake(low, [str(tmp_path / "style_low_noise.safetensors")], str(tmp_path / "o2.safetensors"))
    assert not r.not_applied and r.changed == len(MODS)


def test_extract_pair_from_two_tuned_experts(tmp_path, pair):
    from lorakit.ops.extraction import extract
    high, low = pair
    gen = torch.Generator().manual_seed(4)
    (tmp_path / "tuned").mkdir()
    tuned = {}
    for base, name in ((high, "high_noise_model"), (low, "low_noise_model")):
        t = _tensors(base)
        delta = torch.randn(H, 1, generator=gen) @ torch.randn(1, H, generator=gen)
        t["blocks.0.self_attn.q.weight"] = t["blocks.0.self_attn.q.weight"] + delta
        # the tuned low-noise file's name does not say which expert it is: it takes its base's
        tuned[name] = (str(tmp_path / "tuned" / ("ft_a.safetensors" if "low" in name else f"{name}.safetensors")),
                       delta)
        save_file(t, tuned[name][0])
    for base, name, comp in ((high, "high_noise_model", "transformer"), (low, "low_noise_model", "transformer_2")):
        out = tmp_path / f"x_{name}.safetensors"
        extract(base, tuned[name][0], str(out), rank=1, exact=True, to="comfy")
        m = read_lora(out, allow_partial=False)
        assert m.components() == [comp]
        assert m.metadata["lorakit.expert"] == ("high_noise" if comp == "transformer" else "low_noise")
        (p,) = m.patches
        assert torch.allclose(p.dense(), tuned[name][1], atol=1e-5)


def test_merge_pairs_with_pairs(tmp_path):
    from lorakit.ops.merging import merge
    gen = torch.Generator().manual_seed(5)
    a = _combined(tmp_path / "a.safetensors", gen)
    b = _combined(tmp_path / "b.safetensors", gen)
    merge([(str(tmp_path / "a.safetensors"), 1.0), (str(tmp_path / "b.safetensors"), 0.5)],
          str(tmp_path / "m.safetensors"), method="concat", to="aitoolkit")
    m = read_lora(tmp_path / "m.safetensors", allow_partial=False)
    from lorakit.lora.model import dense_deltas
    got = dense_deltas(m)
    for comp in ("transformer", "transformer_2"):
        for name in a[comp]:
            want = a[comp][name] + 0.5 * b[comp][name]
            g = next(d for t, d in got.items() if t.component == comp and t.module == name)
            assert torch.allclose(g, want, atol=1e-5), (comp, name)


def test_doctor_names_i2v_modules_on_a_wan22_base(tmp_path):
    """A Wan 2.1 I2V LoRA (k_img/v_img, img_emb) on a T2V-shaped (Wan 2.2 expert) base: doctor names the I2V-only
    modules and says why."""
    from lorakit.ops.diagnose import doctor
    base = write_component(tmp_path / "wan2.2_t2v_high_noise.safetensors", WAN, "transformer", TINY_WAN)
    gen = torch.Generator().manual_seed(6)
    t = {}
    for name, o, i in (("blocks.0.self_attn.q", H, H), ("blocks.0.cross_attn.k_img", H, H),
                       ("blocks.1.cross_attn.v_img", H, H), ("img_emb.proj.1", 20, 20)):
        t[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(R, i, generator=gen)
        t[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(o, R, generator=gen)
    save_file(t, str(tmp_path / "i2v.safetensors"))
    report = doctor([str(tmp_path / "i2v.safetensors")], str(base))
    text = str(report.to_json() if hasattr(report, "to_json") else report)
    for name in ("k_img", "v_img", "img_emb"):
        assert name in text
    assert "image-to-video" in text


def test_inspect_resize_diff_run_on_wan(tmp_path):
    from lorakit.ops.diffing import diff
    from lorakit.ops.inspection import inspect_lora
    from lorakit.ops.resizing import resize
    _combined(tmp_path / "c.safetensors", torch.Generator().manual_seed(7))
    info = inspect_lora(str(tmp_path / "c.safetensors"))
    assert info["architecture"] == "wan" and info["format"] == "aitoolkit"
    assert set(info["components"]) == {"transformer", "transformer_2"}
    t, _ = _lora(torch.Generator().manual_seed(11), lambda n: f"diffusion_model.{n}")
    save_file(t, str(tmp_path / "one_low_noise.safetensors"))
    assert set(inspect_lora(str(tmp_path / "one_low_noise.safetensors"))["components"]) == {"transformer_2"}
    r = resize(str(tmp_path / "c.safetensors"), str(tmp_path / "r.safetensors"), rank=1)   # the Conv3d too
    assert read_lora(tmp_path / "r.safetensors").components() == ["transformer", "transformer_2"]
    d = diff(str(tmp_path / "c.safetensors"), str(tmp_path / "r.safetensors"))
    assert d is not None and r is not None


def test_i2v_base_and_lora_sizes():
    assert TINY_WAN_I2V["i2v"] == 1


def test_merge_split_pairs_and_join_extracted(tmp_path):
    """Four single-expert files (two pairs, told apart by their names) merge into one combined file, each expert
    getting only its own files' deltas."""
    from lorakit.lora.model import dense_deltas
    from lorakit.ops.merging import merge
    gen = torch.Generator().manual_seed(8)
    want: dict[str, torch.Tensor] = {}
    items = []
    for pair, w in (("a", 1.0), ("b", -0.5)):
        for tag, comp in (("high_noise", "transformer"), ("low_noise", "transformer_2")):
            t, d = _lora(gen, lambda n: f"lora_unet_{n.replace('.', '_')}")
            path = tmp_path / f"{pair}_{tag}.safetensors"
            save_file(t, str(path))
            items.append((str(path), w))
            for name, delta in d.items():
                want[f"{comp}:{name}"] = want.get(f"{comp}:{name}", 0) + w * delta
    merge(items, str(tmp_path / "m.safetensors"), to="aitoolkit")
    got = {str(t): d for t, d in dense_deltas(read_lora(tmp_path / "m.safetensors")).items()}
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.allclose(got[k].reshape(v.shape), v, atol=1e-5), k
    # the same merge written as a pair (and verified from the two files)
    r = merge(items, str(tmp_path / "p.safetensors"), to="kohya", split_experts=True, verify=True)
    assert r.verify is not None and r.verify["max_relative_error"] <= 1e-6
    assert len(r.verify["modules"]) == len(want)         # both files' modules were checked
    for tag, comp in (("high_noise", "transformer"), ("low_noise", "transformer_2")):
        m = read_lora(tmp_path / f"p_{tag}.safetensors", allow_partial=False)
        assert m.components() == [comp]
        for t, d in dense_deltas(m).items():
            v = want[str(t)]
            assert torch.allclose(d.reshape(v.shape), v, atol=1e-5), t


def test_doctor_reports_a_low_noise_lora_on_the_high_noise_base(tmp_path, pair):
    from lorakit.ops.diagnose import doctor
    high, _low = pair
    t, _ = _lora(torch.Generator().manual_seed(9), lambda n: f"diffusion_model.{n}")
    save_file(t, str(tmp_path / "style_low_noise.safetensors"))
    report = doctor([str(tmp_path / "style_low_noise.safetensors")], high)
    text = str(report.to_json())
    assert "low-noise expert" in text and "transformer_2" in text


def test_bake_a_diffusers_wan22_pipeline_folder(tmp_path):
    """A Wan 2.2 A14B diffusers pipeline (transformer/ = high noise, transformer_2/ = low noise): a combined LoRA bakes
    each expert's half into its own subfolder; everything else is copied."""
    import json
    from lorakit.ops.baking import bake
    pipe = tmp_path / "pipe"
    for sub in ("transformer", "transformer_2", "vae"):
        (pipe / sub).mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    files = {}
    for sub, seed in (("transformer", 1), ("transformer_2", 2)):
        files[sub] = write_component(pipe / sub / "diffusion_pytorch_model.safetensors", WAN, "transformer", TINY_WAN,
                                     naming="diffusers", seed=seed)
        (pipe / sub / "config.json").write_text("{}")
    save_file({"x": torch.zeros(2)}, str(pipe / "vae" / "diffusion_pytorch_model.safetensors"))
    want = _combined(tmp_path / "c.safetensors", torch.Generator().manual_seed(10))
    bake(str(pipe), [str(tmp_path / "c.safetensors")], str(tmp_path / "out"))
    for sub, comp in (("transformer", "transformer"), ("transformer_2", "transformer_2")):
        b = _tensors(files[sub])
        o = _tensors(tmp_path / "out" / sub / "diffusion_pytorch_model.safetensors")
        k = "blocks.0.attn1.to_q.weight"
        assert torch.allclose(o[k] - b[k], want[comp]["blocks.0.self_attn.q"], atol=1e-6)
        assert torch.equal(o["blocks.0.attn1.to_k.weight"], b["blocks.0.attn1.to_k.weight"])
    assert (tmp_path / "out" / "vae" / "diffusion_pytorch_model.safetensors").exists()


def _pipeline(folder, seed: int, edit=None) -> dict[str, str]:
    import json
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    files = {}
    for k, sub in enumerate(("transformer", "transformer_2")):
        (folder / sub).mkdir()
        files[sub] = write_component(folder / sub / "diffusion_pytorch_model.safetensors", WAN, "transformer",
                                     TINY_WAN, naming="diffusers", seed=seed + k)
        (folder / sub / "config.json").write_text("{}")
    return files


def test_extract_a_pair_from_two_pipeline_folders(tmp_path):
    """ORIGINAL and TUNED Wan 2.2 pipelines (both experts tuned differently): one combined file, or a pair."""
    from lorakit.ops.extraction import extract
    orig = _pipeline(tmp_path / "orig", 1)
    tuned = _pipeline(tmp_path / "tuned", 1)
    gen = torch.Generator().manual_seed(12)
    deltas = {}
    for sub, comp in (("transformer", "transformer"), ("transformer_2", "transformer_2")):
        t = _tensors(tuned[sub])
        deltas[comp] = torch.randn(H, 1, generator=gen) @ torch.randn(1, H, generator=gen)
        t["blocks.1.attn2.to_v.weight"] = t["blocks.1.attn2.to_v.weight"] + deltas[comp]
        save_file(t, tuned[sub])
    extract(str(tmp_path / "orig"), str(tmp_path / "tuned"), str(tmp_path / "c.safetensors"), rank=1, exact=True,
            to="aitoolkit")
    m = read_lora(tmp_path / "c.safetensors", allow_partial=False)
    assert m.format == "aitoolkit" and m.components() == ["transformer", "transformer_2"]
    extract(str(tmp_path / "orig"), str(tmp_path / "tuned"), str(tmp_path / "x.safetensors"), rank=1, exact=True,
            to="kohya", split_experts=True)
    for tag, comp in (("high_noise", "transformer"), ("low_noise", "transformer_2")):
        m = read_lora(tmp_path / f"x_{tag}.safetensors", allow_partial=False)
        assert m.components() == [comp]
        (p,) = m.patches
        assert p.target.module == "blocks.1.cross_attn.v"
        assert torch.allclose(p.dense(), deltas[comp], atol=1e-5)
