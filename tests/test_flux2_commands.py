"""Every command on tiny FLUX.2 models (dev- and Klein-shaped): inspect, doctor, convert, merge, bake (BFL/ComfyUI and
diffusers bases), extract, resize, diff. Base models come from lorakit's synthetic generator (layout data); the
LoRAs and the expected ΔW are spelled out independently in ``test_flux2_formats`` (hand-typed module tables)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli.main import main
from lorakit.formats import read_lora
from lorakit.layouts import FLUX2
from lorakit.lora.model import Target, dense_deltas
from lorakit.samples.synthetic import TINY_FLUX2, write_base

from test_flux2_formats import SIZES, diffusers_modules, write_lora

VARIANTS = list(SIZES)


def _params(variant: str) -> dict[str, int]:
    s = SIZES[variant]
    p = {k: v for k, v in s.items() if k != "guidance"}
    p.update(D=16, guidance=int(s["guidance"]))
    assert p == TINY_FLUX2[variant]          # the generator's tiny sizes are the ones typed out in the tests
    return p


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> bool:
    return float((got - want).abs().max()) <= tol * max(1e-3, float(want.abs().max()))


@pytest.mark.parametrize("variant", VARIANTS)
def test_inspect_and_doctor(tmp_path, capsys, variant: str) -> None:
    lora, base = str(tmp_path / "l.safetensors"), str(tmp_path / "base.safetensors")
    write_lora(lora, variant, "kohya")
    write_base(base, _params(variant), arch=FLUX2, prefix="model.diffusion_model.")
    assert main(["inspect", lora, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["architecture"], r["format"]) == ("flux2", "kohya")
    assert r["sizes"]["transformer"]["H"] == SIZES[variant]["H"]
    assert main(["doctor", lora, "--base", base, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["base"]["architecture"] == "flux2" and d["base"]["sizes"]["guidance"] == int(SIZES[variant]["guidance"])
    assert [x["verdict"] for x in d["loras"]] == ["OK"]


def test_doctor_flux2_lora_on_flux1_base_will_not_apply(tmp_path, capsys) -> None:
    from lorakit.samples.synthetic import TINY_FLUX

    lora, base = str(tmp_path / "l.safetensors"), str(tmp_path / "flux1.safetensors")
    write_lora(lora, "dev", "kohya")
    write_base(base, TINY_FLUX)                      # FLUX.1-shaped, same hidden size (32)
    assert main(["doctor", lora, "--base", base, "--json"]) == 2
    d = json.loads(capsys.readouterr().out)
    assert d["base"]["architecture"] == "flux1" and d["loras"][0]["verdict"] != "OK"


def test_doctor_names_guidance_on_a_base_without_it(tmp_path, capsys) -> None:
    # a dev LoRA (guidance_in) on a base of the same sizes without a guidance embedder (Klein-like)
    lora, base = str(tmp_path / "l.safetensors"), str(tmp_path / "base.safetensors")
    write_lora(lora, "dev", "kohya")
    write_base(base, {**_params("dev"), "guidance": 0}, arch=FLUX2)
    rc = main(["doctor", lora, "--base", base])
    text = capsys.readouterr().out
    assert rc == 1 and "guidance" in text


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_bake_then_extract(tmp_path, variant: str, layout: str) -> None:
    lora, base = str(tmp_path / "l.safetensors"), str(tmp_path / "base.safetensors")
    want = write_lora(lora, variant, "diffusers" if layout == "bfl" else "kohya")   # fused ⇄ split both ways
    prefix = "diffusion_model." if layout == "bfl" else ""
    write_base(base, _params(variant), arch=FLUX2, layout=layout, prefix=prefix)
    tuned = str(tmp_path / "tuned.safetensors")
    assert main(["bake", base, f"{lora}:0.5", "-o", tuned, "--no-progress"]) == 0
    b, t = load_file(base), load_file(tuned)
    assert set(b) == set(t)
    if layout == "bfl":
        for name, w in want.items():
            assert _close(t[prefix + name + ".weight"] - b[prefix + name + ".weight"], 0.5 * w), name
    else:
        for dname, sp in diffusers_modules(SIZES[variant]).items():
            part = want[sp.native][sp.start:sp.stop]
            if sp.swap:
                h = part.shape[0] // 2
                part = torch.cat([part[h:], part[:h]])
            assert _close(t[dname + ".weight"] - b[dname + ".weight"], 0.5 * part), dname
    assert all(torch.equal(t[k], b[k]) for k in b if "norm" in k and k.endswith(("scale", "norm_q.weight")))
    out = str(tmp_path / "extracted.safetensors")
    assert main(["extract", base, tuned, "--rank", "16", "--exact", "-o", out]) == 0
    model = read_lora(out)
    assert model.arch.name == "flux2"
    got = dense_deltas(model)
    for name, w in want.items():
        assert _close(got[Target("transformer", name)], 0.5 * w, 1e-4), name


def test_merge_resize_diff(tmp_path, capsys) -> None:
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    wa, wb = write_lora(a, "dev", "kohya", seed=1), write_lora(b, "dev", "diffusers", seed=2)
    merged = str(tmp_path / "m.safetensors")
    assert main(["merge", f"{a}:0.5", f"{b}:0.25", "-o", merged]) == 0
    got = dense_deltas(read_lora(merged))
    for name in wa:
        assert _close(got[Target("transformer", name)], 0.5 * wa[name] + 0.25 * wb[name]), name
    small = str(tmp_path / "r.safetensors")
    assert main(["resize", a, "--rank", "1", "-o", small]) == 0
    ranks = {k: v.shape[0] for k, v in load_file(small).items() if k.endswith("lora_down.weight")}
    assert ranks and set(ranks.values()) == {1}
    conv = str(tmp_path / "a_diffusers.safetensors")
    assert main(["convert", a, "--to", "diffusers", "-o", conv]) == 0
    capsys.readouterr()
    assert main(["diff", a, conv]) == 0                   # a kohya file and its diffusers conversion are equivalent
    assert main(["diff", a, b]) == 1
    blocks = str(tmp_path / "blocks.safetensors")
    assert main(["merge", a, "--blocks", "double_blocks=0,MOD=0", "-o", blocks]) == 0
    kept = {p.target.module for p in read_lora(blocks).patches}
    assert kept and not any(m.startswith("double_") for m in kept)


def test_ambiguous_attention_lora_bakes_into_a_flux2_base(tmp_path, capsys) -> None:
    # double-block attention only: the keys and sizes fit FLUX.1 as well (read as FLUX.1 on its own); with a
    # FLUX.2 base, bake and doctor read it as FLUX.2, whose modules it names equally
    from safetensors.torch import save_file

    H = SIZES["klein"]["H"]
    g = torch.Generator().manual_seed(11)
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    down, up = torch.randn(2, H, generator=g), torch.randn(3 * H, 2, generator=g) * 0.1
    lora, base, out = (str(tmp_path / n) for n in ("a.safetensors", "base.safetensors", "baked.safetensors"))
    save_file({stem + ".lora_down.weight": down, stem + ".lora_up.weight": up}, lora)
    write_base(base, _params("klein"), arch=FLUX2)
    assert read_lora(lora).arch.name == "flux1"
    assert main(["doctor", lora, "--base", base]) == 0
    assert main(["bake", base, lora, "-o", out, "--no-progress"]) == 0
    key = "double_blocks.0.img_attn.qkv.weight"
    assert _close(load_file(out)[key] - load_file(base)[key], up @ down)


def test_ambiguous_attention_lora_merges_with_a_flux2_lora(tmp_path) -> None:
    from safetensors.torch import save_file

    H = SIZES["klein"]["H"]
    g = torch.Generator().manual_seed(12)
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    down, up = torch.randn(2, H, generator=g), torch.randn(3 * H, 2, generator=g) * 0.1
    amb, full, out = (str(tmp_path / n) for n in ("amb.safetensors", "full.safetensors", "m.safetensors"))
    save_file({stem + ".lora_down.weight": down, stem + ".lora_up.weight": up}, amb)
    want = write_lora(full, "klein", "diffusers", seed=3)
    assert read_lora(amb).arch.name == "flux1"
    assert main(["merge", amb, f"{full}:0.5", "-o", out]) == 0
    merged = read_lora(out)
    assert merged.arch.name == "flux2"
    got = dense_deltas(merged)
    qkv = "double_blocks.0.img_attn.qkv"
    assert _close(got[Target("transformer", qkv)], up @ down + 0.5 * want[qkv])
    # a FLUX.1-only input (its MLP is 4×hidden) is still refused next to a FLUX.2 one
    f1 = str(tmp_path / "f1.safetensors")
    save_file({"lora_unet_double_blocks_0_img_mlp_0.lora_down.weight": torch.randn(2, H, generator=g),
               "lora_unet_double_blocks_0_img_mlp_0.lora_up.weight": torch.randn(4 * H, 2, generator=g)}, f1)
    assert main(["merge", f1, full, "-o", str(tmp_path / "no.safetensors")]) == 2
