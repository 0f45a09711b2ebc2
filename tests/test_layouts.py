"""Layout data: counts, fused row windows, name resolution, size solving, no numbers outside layouts/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lorakit.layouts import FLUX1, NameIndex, evaluate, expand, solve
from lorakit.samples.synthetic import TINY_FLUX, base_tensors, full_flux_params

TRANSFORMER = FLUX1.components["transformer"]
PARAM_SETS = {"full": full_flux_params(), "tiny": dict(TINY_FLUX), "schnell": full_flux_params(guidance=False)}


def test_full_size_counts() -> None:
    p = full_flux_params()
    assert len(base_tensors(p, "bfl")) == 780
    assert len(base_tensors(p, "diffusers")) == 1160
    mods = list(expand(TRANSFORMER, p))
    assert len(mods) == 314
    assert sum(m.group in ("double_blocks", "single_blocks") for m in mods) == 304
    assert sum(len(m.spec.names("diffusers")) for m in mods) == 504
    clip, t5 = FLUX1.components["clip_l"], FLUX1.components["t5"]
    assert len(list(expand(clip, clip.presets[0].params))) == 72
    assert len(list(expand(t5, t5.presets[0].params))) == 168
    schnell = full_flux_params(guidance=False)
    assert len(list(expand(TRANSFORMER, schnell))) == 312
    chroma = {**p, "modulation": 0}
    assert len(list(expand(TRANSFORMER, chroma))) == 314 - 77


@pytest.mark.parametrize("which", list(PARAM_SETS))
@pytest.mark.parametrize("naming", ["diffusers", "xlabs"])
def test_alias_windows(which: str, naming: str) -> None:
    """Every fused module's split aliases tile its rows exactly (diffusers); XLabs windows stay inside."""
    p = PARAM_SETS[which]
    fused = 0
    for m in expand(TRANSFORMER, p):
        aliases = m.spec.names(naming)
        windows = []
        for a in aliases:
            if a.rows is None:
                windows.append((0, m.out))
            else:
                s = evaluate(a.rows[0], p)
                windows.append((s, s + evaluate(a.rows[1], p)))
        windows.sort()
        if naming == "diffusers":
            assert windows, m.name
            assert windows[0][0] == 0 and windows[-1][1] == m.out, m.name
            assert all(x[1] == y[0] for x, y in zip(windows, windows[1:])), m.name
            fused += len(windows) > 1
        else:
            assert all(0 <= s < e <= m.out for s, e in windows), m.name
    if naming == "diffusers":
        assert fused == 2 * p["double"] + p["single"]


def test_known_windows_full_size() -> None:
    p = full_flux_params()
    idx = NameIndex(TRANSFORMER, "diffusers", flat=False)
    for name, native, rows in (("single_transformer_blocks.3.proj_mlp", "single_blocks.3.linear1", (9216, 21504)),
                               ("transformer_blocks.0.attn.add_v_proj", "double_blocks.0.txt_attn.qkv", (6144, 9216)),
                               ("transformer_blocks.18.attn.to_k", "double_blocks.18.img_attn.qkv", (3072, 6144))):
        m = idx.match(name)
        assert m is not None and m.native == native
        s = evaluate(m.alias.rows[0], p)
        assert (s, s + evaluate(m.alias.rows[1], p)) == rows
    m = idx.match("norm_out.linear")
    assert m.native == "final_layer.adaLN_modulation.1" and m.alias.swap_halves and m.alias.rows is None
    x = NameIndex(TRANSFORMER, "xlabs", flat=False).match("single_blocks.5.processor.qkv_lora")
    assert x.native == "single_blocks.5.linear1" and (evaluate(x.alias.rows[0], p), evaluate(x.alias.rows[1], p)) == (0, 9216)


@pytest.mark.parametrize("component", list(FLUX1.components))
def test_every_alias_template_resolves_back(component: str) -> None:
    comp = FLUX1.components[component]
    params = {**(comp.presets[0].params if comp.presets else {}), **{f: 1 for f in comp.flags}}
    count = 0
    for naming in ("native", *comp.namings):
        for flat in (False, True):
            idx = NameIndex(comp, naming, flat=flat)
            for m in expand(comp, params):
                for alias in m.spec.names(naming):
                    name = idx.name_of(m.spec, alias, m.index)
                    hit = idx.match(name)
                    assert hit is not None, (naming, flat, name)
                    assert (hit.spec, hit.alias, hit.index) == (m.spec, alias, m.index), name
                    assert hit.native == m.name
                    count += 1
    assert count > 0


def test_index_rejects_leading_zeros_and_partial_names() -> None:
    idx = NameIndex(TRANSFORMER, "native", flat=True)
    assert idx.match("double_blocks_01_img_attn_qkv") is None
    assert idx.match("double_blocks_1_img_attn_qkv_extra") is None
    assert idx.match("double_blocks_1_img_attn_qkv").native == "double_blocks.1.img_attn.qkv"


def test_solve_sizes() -> None:
    got = solve([("3*H+M", 21504), ("H", 3072), ("H+M", 15360)], {})
    assert got == {"H": 3072, "M": 12288}
    assert solve([("3*H", 100)], {}) == {}          # not an integer solution
    assert evaluate("3*H+M", {"H": 2}, default=-1) == -1


def test_no_architecture_numbers_outside_layouts() -> None:
    """Knowledge as data: FLUX sizes and block counts appear only under src/lorakit/layouts/."""
    src = Path(__file__).resolve().parents[1] / "src" / "lorakit"
    pattern = re.compile(r"(?<![\w.])(3072|12288|21504|18432|9216|15360)(?![\w.])|range\((19|38)\)")
    offenders = []
    for path in src.rglob("*.py"):
        if "layouts" in path.relative_to(src).parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code) and '"""' not in code:
                offenders.append(f"{path.relative_to(src)}:{n}: {line.strip()}")
    assert offenders == []
