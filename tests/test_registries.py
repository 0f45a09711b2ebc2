"""Registries for merge methods and adapter kinds: a registered method is usable through ``lorakit.merge`` and the
CLI, a registered adapter kind is what parse.py looks up, duplicates are refused.

Expected values are derived here from the tensors the test writes (torch matmuls), not from lorakit."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.lora import adapter_kinds
from lorakit.lora.adapter_kinds import AdapterKind, get_kind, kind_of, kinds, register_kind, unregister_kind
from lorakit.lora.adapters import Full, LoHa, LoKr, LoRA
from lorakit.cli import main
from lorakit.cli.merge_cmd import method_help, recipe_schema
from lorakit.errors import UsageError
from lorakit.formats.parse import ModuleEntry, _build_adapter, _complete
from lorakit.ops.merging import (Contribution, MergeOptions, ModuleStat, get_merge_method, merge_method, merge_methods,
                             register_merge_method, unregister_merge_method)
from lorakit.lora.model import Patch, Target

H = 32                      # tiny FLUX hidden size (conftest.TINY)
MODULE = "lora_unet_double_blocks_0_img_attn_proj"


# ---------------------------------------------------------------------------------------------
# merge methods
# ---------------------------------------------------------------------------------------------

def _dense_sum(target: Target, contribs: list[Contribution], shape: tuple[int, ...], options: MergeOptions,
               weights: Sequence[float], multiplier: float) -> tuple[list[Patch], ModuleStat]:
    """A toy method: the weighted sum as one full diff."""
    total = torch.zeros(shape)
    for c in contribs:
        total += c.coef * c.adapter.dense().reshape(shape)       # type: ignore[union-attr]
    return [Patch(target, Full(alpha=None, diff=total), None)], ModuleStat(str(target), 0)


@pytest.fixture
def toy_method() -> Iterator[str]:
    name = "toy_dense_sum"
    merge_method(name, help="toy: the weighted sum as a full diff", exact=True)(_dense_sum)
    try:
        yield name
    finally:
        unregister_merge_method(name)
    assert name not in merge_methods()


def _kohya_lora(write_st, seed: int, rank: int, alpha: float) -> tuple[str, torch.Tensor]:
    """One kohya FLUX module; returns the path and its ΔW = (α/r)·up@down computed here."""
    g = torch.Generator().manual_seed(seed)
    down, up = torch.randn(rank, H, generator=g), torch.randn(H, rank, generator=g)
    path = write_st({f"{MODULE}.lora_down.weight": down, f"{MODULE}.lora_up.weight": up,
                     f"{MODULE}.alpha": torch.tensor(alpha)})
    return path, (alpha / rank) * up @ down


def test_builtin_methods_in_order() -> None:
    assert merge_methods()[:5] == ("concat", "svd", "ties", "dare_linear", "dare_ties")
    assert get_merge_method("concat").exact and not get_merge_method("svd").exact
    assert get_merge_method("ties").needs_density and get_merge_method("dare_ties").random


def test_registered_method_merges_through_the_api(write_st, tmp_path, toy_method) -> None:
    a, da = _kohya_lora(write_st, 1, rank=2, alpha=1.0)
    b, db = _kohya_lora(write_st, 2, rank=3, alpha=6.0)
    out = str(tmp_path / "out.safetensors")
    report = lorakit.merge([(a, 0.5), (b, -2.0)], out, method=toy_method, dtype="fp32")
    assert report.method == toy_method
    tensors = load_file(out)
    assert set(tensors) == {f"{MODULE}.diff"}
    torch.testing.assert_close(tensors[f"{MODULE}.diff"], 0.5 * da - 2.0 * db, rtol=1e-5, atol=1e-6)


def test_registered_method_is_a_cli_choice(write_st, tmp_path, toy_method, capsys) -> None:
    assert toy_method in recipe_schema()["method"].choices
    assert f"{toy_method}: toy: the weighted sum as a full diff" in method_help()
    a, da = _kohya_lora(write_st, 3, rank=2, alpha=2.0)
    out = str(tmp_path / "cli.safetensors")
    assert main(["merge", f"{a}:3", "-o", out, "--method", toy_method, "--dtype", "fp32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == toy_method
    torch.testing.assert_close(load_file(out)[f"{MODULE}.diff"], 3 * da, rtol=1e-5, atol=1e-6)


def test_unregistered_method_is_refused_by_api_and_cli(write_st, tmp_path, capsys) -> None:
    a, _ = _kohya_lora(write_st, 4, rank=2, alpha=2.0)
    with pytest.raises(UsageError, match="unknown merge method 'toy_dense_sum'") as exc:
        lorakit.merge([a], str(tmp_path / "x.safetensors"), method="toy_dense_sum")
    assert exc.value.hint == "use one of: concat, svd, ties, dare_linear, dare_ties."
    with pytest.raises(SystemExit):
        main(["merge", a, "-o", str(tmp_path / "y.safetensors"), "--method", "toy_dense_sum"])
    assert "invalid choice" in capsys.readouterr().err


def test_option_checks_follow_the_registry(write_st, tmp_path, toy_method) -> None:
    """A method that declares no options refuses them, with the messages the built-in methods give."""
    a, _ = _kohya_lora(write_st, 5, rank=2, alpha=2.0)
    out = str(tmp_path / "o.safetensors")
    with pytest.raises(UsageError, match=f"^{toy_method} is exact and its rank is the sum"):
        lorakit.merge([a], out, method=toy_method, rank=2)
    with pytest.raises(UsageError, match=f"--density applies to ties/dare_linear/dare_ties, not to {toy_method}"):
        lorakit.merge([a], out, method=toy_method, density=0.5)
    with pytest.raises(UsageError, match=f"--seed applies to dare_linear and dare_ties .* not to {toy_method}"):
        lorakit.merge([a], out, method=toy_method, seed=1)


def test_duplicate_merge_method_raises(toy_method) -> None:
    with pytest.raises(ValueError, match="registered twice"):
        merge_method("concat", help="again")(_dense_sum)
    with pytest.raises(ValueError, match="registered twice"):
        register_merge_method(get_merge_method(toy_method))
    with pytest.raises(ValueError, match="unknown option"):
        merge_method("toy_bad_option", help="x", options=("temperature",))(_dense_sum)
    assert "toy_bad_option" not in merge_methods()


# ---------------------------------------------------------------------------------------------
# adapter kinds
# ---------------------------------------------------------------------------------------------

def _entry(**shapes: tuple[int, ...]) -> ModuleEntry:
    """A parsed module with only keys and shapes (the family/completeness/building functions read nothing else)."""
    return ModuleEntry("m", "transformer", "kohya", None,           # type: ignore[arg-type]
                       keys={r: f"m.{r}" for r in shapes}, shapes=dict(shapes))


def test_builtin_kinds_identify_roles() -> None:
    assert kinds()[:6] == ("lora", "loha", "lokr", "set", "full", "bias")
    assert _entry(down=(2, 4), up=(4, 2), mid=(2, 2, 3, 3)).family == "lora"
    assert _entry(hada_w1_a=(4, 2)).family == "loha"                 # identified, not complete
    assert not _complete(_entry(hada_w1_a=(4, 2)))
    assert _complete(_entry(lokr_w1=(2, 2), lokr_w2_a=(2, 1), lokr_w2_b=(1, 2)))
    assert not _complete(_entry(lokr_w1=(2, 2), lokr_w2_a=(2, 1)))
    assert _entry(diff=(4, 4), diff_b=(4,)).family == "full"
    assert _entry(diff_b=(4,)).family == "bias" and _complete(_entry(diff_b=(4,)))
    assert _entry(down=(2, 4)).family == "incomplete" and not _complete(_entry(down=(2, 4)))
    assert _entry(alpha=()).family == "incomplete"


def test_builtin_kinds_build_adapters() -> None:
    g = torch.Generator().manual_seed(0)
    t = {r: torch.randn(*s, generator=g) for r, s in
         {"hada_w1_a": (4, 2), "hada_w1_b": (2, 6), "hada_w2_a": (4, 3), "hada_w2_b": (3, 6)}.items()}
    loha = _build_adapter(_entry(**{r: tuple(v.shape) for r, v in t.items()}), t, 4.0)
    assert isinstance(loha, LoHa)
    want = (4.0 / 2) * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    torch.testing.assert_close(loha.dense(), want)
    lk = {"lokr_w1": torch.randn(2, 3, generator=g), "lokr_w2": torch.randn(5, 7, generator=g)}
    lokr = _build_adapter(_entry(lokr_w1=(2, 3), lokr_w2=(5, 7)), lk, None)
    assert isinstance(lokr, LoKr)
    torch.testing.assert_close(lokr.dense(), torch.kron(lk["lokr_w1"], lk["lokr_w2"]))
    lo = {"down": torch.randn(2, 6, generator=g), "up": torch.randn(4, 2, generator=g)}
    assert isinstance(_build_adapter(_entry(down=(2, 6), up=(4, 2)), lo, None), LoRA)
    assert _build_adapter(_entry(diff_b=(4,)), {"diff_b": torch.zeros(4)}, None) is None
    assert _build_adapter(_entry(down=(2, 6)), {"down": lo["down"]}, None) is None


@pytest.fixture
def toy_kind() -> Iterator[AdapterKind]:
    """A toy kind: ΔW = outer(toy_u, toy_v) as a full diff, identified by ``toy_u`` and ``toy_v``."""
    kind = register_kind(AdapterKind(
        "toy_outer", frozenset({"toy_u", "toy_v"}),
        lambda t, alpha: Full(alpha=None, diff=torch.outer(t["toy_u"], t["toy_v"])), match="any",
        requires=((frozenset({"toy_u", "toy_v"}),),)))
    try:
        yield kind
    finally:
        unregister_kind(kind.name)
    assert kind.name not in kinds()


def test_registered_kind_is_what_parse_looks_up(toy_kind) -> None:
    assert kinds()[-1] == "toy_outer" and get_kind("toy_outer") is toy_kind
    assert kind_of({"toy_u"}) is toy_kind
    half, whole = _entry(toy_u=(4,)), _entry(toy_u=(4,), toy_v=(3,))
    assert half.family == whole.family == "toy_outer"
    assert not _complete(half) and _complete(whole)
    u, v = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([2.0, 0.0, -1.0])
    adapter = _build_adapter(whole, {"toy_u": u, "toy_v": v}, None)
    assert isinstance(adapter, Full)
    torch.testing.assert_close(adapter.dense(), torch.tensor([[2.0, 0.0, -1.0], [-4.0, 0.0, 2.0],
                                                              [1.0, 0.0, -0.5], [6.0, 0.0, -3.0]]))
    # built-in kinds are tried first: a registered kind cannot take over a LoRA module
    assert _entry(down=(2, 4), up=(4, 2), toy_u=(4,)).family == "lora"


def test_duplicate_kind_raises(toy_kind) -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register_kind(AdapterKind("lora", frozenset({"down", "up"}), lambda t, a: None))
    with pytest.raises(ValueError, match="registered twice"):
        register_kind(toy_kind)
    with pytest.raises(ValueError, match="registered twice"):
        register_kind(AdapterKind(adapter_kinds.INCOMPLETE, frozenset({"x"}), lambda t, a: None))
    with pytest.raises(ValueError, match="match must be"):
        register_kind(AdapterKind("toy_bad", frozenset({"x"}), lambda t, a: None, match="some"))
    assert "toy_bad" not in kinds()



def test_registered_kind_parses_a_file(toy_kind, write_st, monkeypatch) -> None:
    """End to end: a file with the toy kind's keys reads into its adapter. The key suffixes are not part of the
    kind registry (they live in :mod:`lorakit.formats.spec`, which has no ``register_suffix`` yet), so the test
    adds them to spec's vocabulary with monkeypatch (restored afterwards)."""
    from lorakit.formats import read_lora, spec
    monkeypatch.setitem(spec.SUFFIXES, "toy_u", ("toy_outer", "toy_u"))
    monkeypatch.setitem(spec.SUFFIXES, "toy_v", ("toy_outer", "toy_v"))
    monkeypatch.setattr(spec, "_BY_LENGTH", sorted(spec.SUFFIXES, key=len, reverse=True))
    g = torch.Generator().manual_seed(7)
    u, v = torch.randn(H, generator=g), torch.randn(H, generator=g)
    down, up = torch.randn(2, H, generator=g), torch.randn(3 * H, 2, generator=g)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    path = write_st({f"{MODULE}.toy_u": u, f"{MODULE}.toy_v": v,
                     f"{qkv}.lora_down.weight": down, f"{qkv}.lora_up.weight": up})
    model = read_lora(path, allow_partial=False)
    by_module = {p.target.module: p.adapter for p in model.patches}
    assert set(by_module) == {"double_blocks.0.img_attn.proj", "double_blocks.0.img_attn.qkv"}
    toy = by_module["double_blocks.0.img_attn.proj"]
    assert isinstance(toy, Full)
    torch.testing.assert_close(toy.dense(), torch.outer(u, v))
    torch.testing.assert_close(by_module["double_blocks.0.img_attn.qkv"].dense(), up @ down)
