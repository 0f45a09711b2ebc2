"""``lorakit merge`` / ``lorakit resize`` on SD1.5 and SDXL kohya LoRAs with convolution (LoCon) modules.

Every expected value is computed here from the factors the test wrote (float64 ``up @ down · α/r``, the weighted sum,
the SVD of the sum reshaped to ``(out, in·k·k)`` — ``torch.linalg.svd`` of the small core of the stacked factors,
which is the exact SVD of the sum — and PEFT's ``ties`` for the ties case) and compared with the tensors of the
written file as read back by ``safetensors``, never through lorakit's reader.

Rank rules checked (sd-scripts): ``merge --conv-rank`` applies to kernels larger than 1×1 (``svd_merge_lora.py``);
``resize --conv-rank`` to every convolution, 1×1 included (``resize_lora.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from peft.utils.merge_utils import ties as peft_ties
from safetensors.torch import load_file, save_file

from lorakit.cli import main
from lorakit.errors import ArchitectureError, UsageError
from lorakit.ops.merging import merge
from lorakit.ops.resizing import resize


@dataclass(frozen=True)
class Mod:
    """A module as kohya spells it, the native target lorakit reports it under, and its ΔW shape."""

    stem: str
    target: str
    shape: tuple[int, ...]

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.shape[2:]


SD1 = (
    Mod("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "unet:input_blocks.1.1.transformer_blocks.0.attn1.to_q", (320, 320)),
    Mod("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",      # SD1 context width 768
        "unet:input_blocks.1.1.transformer_blocks.0.attn2.to_k", (320, 768)),
    Mod("lora_unet_down_blocks_0_attentions_0_proj_in", "unet:input_blocks.1.1.proj_in", (320, 320, 1, 1)),
    Mod("lora_unet_down_blocks_0_resnets_0_conv1", "unet:input_blocks.1.0.in_layers.2", (320, 320, 3, 3)),
    Mod("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "clip_l:text_model.encoder.layers.0.self_attn.q_proj", (768, 768)),
)
SDXL = (
    Mod("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v",                # SDXL context width 2048
        "unet:input_blocks.4.1.transformer_blocks.0.attn2.to_v", (640, 2048)),
    Mod("lora_unet_input_blocks_4_1_proj_in", "unet:input_blocks.4.1.proj_in", (640, 640)),   # Linear in SDXL
    Mod("lora_unet_input_blocks_1_0_in_layers_2", "unet:input_blocks.1.0.in_layers.2", (320, 320, 3, 3)),
    Mod("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "clip_l:text_model.encoder.layers.0.self_attn.q_proj", (768, 768)),
    Mod("lora_te2_text_model_encoder_layers_0_self_attn_out_proj",
        "clip_g:transformer.resblocks.0.attn.out_proj", (1280, 1280)),
)
ARCHS = {"sd1": SD1, "sdxl": SDXL}
SD1_SMALL = SD1[1:4]      # to_k (identifies SD1), a 1×1 and a 3×3 conv: for the slower dense / CLI cases
RANKS = (4, 6)            # input ranks (different, so that concat's rank is their sum)
WEIGHTS = (0.7, -0.3)
RANK, CONV_RANK = 3, 2


Factors = tuple[torch.Tensor, torch.Tensor]       # (U out×r, D r×in·k·k), float64, ΔW = U @ D


def write(path, mods: tuple[Mod, ...], rank: int, seed: int) -> dict[str, Factors]:
    """A kohya LoRA (alpha ≠ rank); returns each module's flattened factors with α/r folded into U."""
    g = torch.Generator().manual_seed(seed)
    tensors, factors = {}, {}
    for i, m in enumerate(mods):
        down = torch.randn(rank, *m.shape[1:], generator=g)
        up = torch.randn(m.shape[0], rank, *([1] * len(m.kernel)), generator=g) * 0.1
        alpha = rank / 2 + i
        tensors |= {f"{m.stem}.lora_down.weight": down, f"{m.stem}.lora_up.weight": up,
                    f"{m.stem}.alpha": torch.tensor(alpha)}
        factors[m.stem] = (up.flatten(1).double() * (alpha / rank), down.flatten(1).double())
    save_file(tensors, str(path))
    return factors


def weighted_sum(parts: list[dict[str, Factors]], weights, stem: str) -> Factors:
    """Stacked factors of ``Σ w_i·ΔW_i``: ``[w_1·U_1 | w_2·U_2] @ [D_1; D_2]``."""
    return (torch.cat([w * p[stem][0] for w, p in zip(weights, parts)], dim=1),
            torch.cat([p[stem][1] for p in parts], dim=0))


def dense(f: Factors, shape: tuple[int, ...]) -> torch.Tensor:
    return (f[0] @ f[1]).reshape(shape)


def read_deltas(path) -> dict[str, torch.Tensor]:
    """ΔW per kohya stem of a written file, from its raw tensors."""
    t = load_file(str(path))
    out = {}
    for key, down in t.items():
        if key.endswith(".lora_down.weight"):
            stem = key[: -len(".lora_down.weight")]
            up = t[f"{stem}.lora_up.weight"]
            r = down.shape[0]
            scale = float(t[f"{stem}.alpha"]) / r if f"{stem}.alpha" in t else 1.0
            d = up.flatten(1).double() @ down.flatten(1).double() * scale
            out[stem] = d.reshape(up.shape[0], *down.shape[1:])
    return out


def svd(d: torch.Tensor | Factors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a dense (out, …) delta flattened to (out, in·k·k), or of ``U @ D`` through the QRs of its factors."""
    if isinstance(d, torch.Tensor):
        return torch.linalg.svd(d.flatten(1), full_matrices=False)
    (qu, ru), (qd, rd) = torch.linalg.qr(d[0]), torch.linalg.qr(d[1].T)
    u, s, vh = torch.linalg.svd(ru @ rd.T)
    return qu @ u, s, vh @ qd.T


def truncation(d: torch.Tensor | Factors, k: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, float]:
    """The best rank-k approximation of ``d`` (as (out, in·k·k)), reshaped to ``shape``, and its relative error."""
    u, s, vh = svd(d)
    approx = (u[:, :k] * s[:k]) @ vh[:k]
    return approx.reshape(shape), math.sqrt(float(s[k:].square().sum() / s.square().sum()))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return float((a.double() - b.double()).norm() / b.double().norm()) < tol


def make_pair(tmp_path, arch: str, mods: tuple[Mod, ...]):
    paths = [tmp_path / f"{arch}_{i}.safetensors" for i in range(2)]
    parts = [write(p, mods, r, seed=17 + i) for i, (p, r) in enumerate(zip(paths, RANKS))]
    summed = {m.stem: weighted_sum(parts, WEIGHTS, m.stem) for m in mods}
    return arch, mods, paths, parts, summed


@pytest.fixture(params=sorted(ARCHS))
def pair(request, tmp_path):
    return make_pair(tmp_path, request.param, ARCHS[request.param])


@pytest.fixture
def small_pair(tmp_path):
    return make_pair(tmp_path, "sd1", SD1_SMALL)


def inputs(paths) -> list[str]:
    return [f"{p}:{w}" for p, w in zip(paths, WEIGHTS)]


def test_concat_is_the_exact_weighted_sum_with_4d_conv_factors(pair, tmp_path) -> None:
    arch, mods, paths, _, summed = pair
    out = tmp_path / "concat.safetensors"
    report = merge(inputs(paths), out, method="concat", dtype="fp32")
    assert report.architecture == arch
    got, raw = read_deltas(out), load_file(str(out))
    assert set(got) == {m.stem for m in mods}
    for m in mods:
        assert close(got[m.stem], dense(summed[m.stem], m.shape)), m.stem
        assert raw[f"{m.stem}.lora_down.weight"].shape == (sum(RANKS), *m.shape[1:])
        assert raw[f"{m.stem}.lora_up.weight"].shape == (m.shape[0], sum(RANKS), *([1] * len(m.kernel)))


def merged_rank(m: Mod) -> int:
    """sd-scripts svd_merge_lora: new_conv_rank for kernels other than 1×1, new_rank otherwise."""
    return CONV_RANK if math.prod(m.kernel) > 1 else RANK


def test_svd_truncates_linear_to_rank_and_3x3_to_conv_rank(pair, tmp_path) -> None:
    _, mods, paths, _, summed = pair
    out = tmp_path / "svd.safetensors"
    report = merge(inputs(paths), out, method="svd", rank=RANK, conv_rank=CONV_RANK, dtype="fp32", verify=True)
    got, raw = read_deltas(out), load_file(str(out))
    stats = {s.module: s for s in report.modules}
    for m in mods:
        k = merged_rank(m)
        expected, err = truncation(summed[m.stem], k, m.shape)
        assert raw[f"{m.stem}.lora_down.weight"].shape == (k, *m.shape[1:]), m.stem
        assert raw[f"{m.stem}.lora_up.weight"].shape == (m.shape[0], k, *([1] * len(m.kernel))), m.stem
        assert close(got[m.stem], expected, 1e-4), m.stem
        assert stats[m.target].rank == k
        assert stats[m.target].relative_error == pytest.approx(err, rel=1e-4), m.stem
        assert report.verify["modules"][m.target] == pytest.approx(err, rel=1e-3), m.stem
        assert stats[m.target].kernel == (m.kernel or None)
    assert report.conv_rank == CONV_RANK


def test_svd_without_conv_rank_gives_3x3_the_rank(small_pair, tmp_path) -> None:
    _, mods, paths, _, summed = small_pair
    out = tmp_path / "svd.safetensors"
    merge(inputs(paths), out, method="svd", rank=RANK, dtype="fp32")
    got = read_deltas(out)
    for m in mods:
        assert close(got[m.stem], truncation(summed[m.stem], RANK, m.shape)[0], 1e-4), m.stem


def test_ties_on_conv_deltas_matches_peft_then_truncation(small_pair, tmp_path) -> None:
    _, mods, paths, parts, _ = small_pair
    out = tmp_path / "ties.safetensors"
    merge(inputs(paths), out, method="ties", density=0.5, rank=RANK, conv_rank=CONV_RANK, dtype="fp32")
    got = read_deltas(out)
    for m in mods:
        task = [dense(p[m.stem], m.shape).float() for p in parts]       # PEFT's task tensors, 4-D for convs
        ref = peft_ties(task, torch.tensor(WEIGHTS), 0.5, "total").double()
        assert close(got[m.stem], truncation(ref, merged_rank(m), m.shape)[0], 1e-4), m.stem


def test_concat_of_a_tucker_locon_is_exact_plain_4d_factors(small_pair, tmp_path) -> None:
    """A LoCon with a Tucker ``lora_mid`` (r, r, 3, 3) joins concat exactly, as plain (r, in, 3, 3) factors."""
    _, mods, paths, parts, _ = small_pair
    conv = next(m for m in mods if math.prod(m.kernel) > 1)
    tucker = tmp_path / "tucker.safetensors"
    tensors = load_file(str(paths[1]))
    g = torch.Generator().manual_seed(3)
    r, alpha = 5, 2.5
    down, mid = torch.randn(r, conv.shape[1], 1, 1, generator=g), torch.randn(r, r, 3, 3, generator=g)
    up = torch.randn(conv.shape[0], r, 1, 1, generator=g) * 0.1
    tensors |= {f"{conv.stem}.lora_down.weight": down, f"{conv.stem}.lora_mid.weight": mid,
                f"{conv.stem}.lora_up.weight": up, f"{conv.stem}.alpha": torch.tensor(alpha)}
    save_file(tensors, str(tucker))
    # LyCORIS' Tucker delta: ΔW[p, c, y, x] = Σ_ij up[p, i] · mid[i, j, y, x] · down[j, c] · α/r
    tucker_dw = torch.einsum("pi,ijyx,jc->pcyx", up.flatten(1).double(), mid.double(), down.flatten(1).double()) \
        * (alpha / r)
    out = tmp_path / "concat.safetensors"
    merge([f"{paths[0]}:{WEIGHTS[0]}", f"{tucker}:{WEIGHTS[1]}"], out, method="concat", dtype="fp32")
    raw = load_file(str(out))
    assert f"{conv.stem}.lora_mid.weight" not in raw
    assert raw[f"{conv.stem}.lora_down.weight"].shape == (RANKS[0] + r, *conv.shape[1:])
    expected = WEIGHTS[0] * dense(parts[0][conv.stem], conv.shape) + WEIGHTS[1] * tucker_dw
    assert close(read_deltas(out)[conv.stem], expected)


def test_conv_rank_without_convolutions_warns(tmp_path) -> None:
    from lorakit.samples.synthetic import write_sdscripts_lora
    a, b = write_sdscripts_lora(tmp_path / "a.safetensors"), write_sdscripts_lora(tmp_path / "b.safetensors", seed=3)
    report = merge([a, b], tmp_path / "m.safetensors", method="svd", rank=2, conv_rank=2)
    assert any("--conv-rank had no effect" in w for w in report.warnings)


def test_merging_sd1_with_sdxl_is_refused_naming_both(tmp_path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write(a, SD1, 4, 1)
    write(b, SDXL, 4, 2)
    for method in ("concat", "svd"):
        with pytest.raises(ArchitectureError) as e:
            merge([str(a), str(b)], tmp_path / "m.safetensors", method=method)
        assert "sd1" in str(e.value) and "sdxl" in str(e.value)
    assert not (tmp_path / "m.safetensors").exists()


def test_concat_refuses_conv_rank(small_pair, tmp_path) -> None:
    _, _, paths, _, _ = small_pair
    with pytest.raises(UsageError):
        merge(inputs(paths), tmp_path / "x.safetensors", method="concat", conv_rank=2)


@pytest.mark.parametrize("flag", ["--conv-rank", "--conv_dim", "--new_conv_rank"])
def test_merge_cli_conv_rank_spellings(small_pair, tmp_path, flag) -> None:
    _, mods, paths, _, summed = small_pair
    out = tmp_path / "cli.safetensors"
    assert main(["merge", *inputs(paths), "-o", str(out), "--method", "svd", "--rank", str(RANK),
                 flag, str(CONV_RANK), "--dtype", "fp32"]) == 0
    got = read_deltas(out)
    for m in mods:
        assert close(got[m.stem], truncation(summed[m.stem], merged_rank(m), m.shape)[0], 1e-4), m.stem


# ---------------------------------------------------------------------------------------------------------------
# resize
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_resize_conv_rank_alone_leaves_linear_untouched(tmp_path, arch) -> None:
    mods = ARCHS[arch]
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    factors = write(src, mods, 6, 5)
    report = resize(src, out, conv_rank=CONV_RANK, dtype="fp32")
    before, after = load_file(str(src)), load_file(str(out))
    got = read_deltas(out)
    stats = {m.target: m for m in report.modules}
    for m in mods:
        if m.kernel:          # sd-scripts resize_lora: every 4-D lora_down (1×1 too) takes new_conv_rank
            expected, err = truncation(factors[m.stem], CONV_RANK, m.shape)
            assert after[f"{m.stem}.lora_down.weight"].shape == (CONV_RANK, *m.shape[1:])
            assert after[f"{m.stem}.lora_up.weight"].shape == (m.shape[0], CONV_RANK, 1, 1)
            assert close(got[m.stem], expected, 1e-4), m.stem
            assert stats[m.target].relative_error == pytest.approx(err, rel=1e-4)
            assert stats[m.target].conv
        else:
            for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
                assert torch.equal(after[f"{m.stem}.{suffix}"], before[f"{m.stem}.{suffix}"]), m.stem
            assert stats[m.target].path == "unchanged" and stats[m.target].relative_error == 0.0


def test_resize_rank_and_conv_rank_and_cli_spellings(tmp_path) -> None:
    src = tmp_path / "in.safetensors"
    factors = write(src, SD1, 6, 9)
    outs = []
    for flag in ("--conv-rank", "--new_conv_rank"):
        out = tmp_path / f"out{flag}.safetensors"
        assert main(["resize", str(src), "-o", str(out), "--rank", str(RANK), flag, str(CONV_RANK),
                     "--dtype", "fp32"]) == 0
        outs.append(out)
    got = read_deltas(outs[0])
    for m in SD1:
        k = CONV_RANK if m.kernel else RANK
        assert close(got[m.stem], truncation(factors[m.stem], k, m.shape)[0], 1e-4), m.stem
    a, b = load_file(str(outs[0])), load_file(str(outs[1]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resize_dynamic_applies_to_conv_capped_by_conv_rank(tmp_path) -> None:
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write(src, SD1, 6, 11)
    report = resize(src, out, dynamic="sv_fro:0.999999", rank=5, conv_rank=CONV_RANK, dtype="fp32")
    ranks = {m.target: m.rank_out for m in report.modules}
    for m in SD1:           # sv_fro ≈ 1 keeps everything: the caps decide
        assert ranks[m.target] == (CONV_RANK if m.kernel else 5), m.target
