"""lorakit.io.memory: loaded state dicts (and an all-zero stand-in) read through the WeightFile interface, so
that open_base / diagnose / extract work on a host's loaded model as on files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorakit.base.checkpoint import open_base
from lorakit.errors import InputFileError, UnsupportedDtypeError
from lorakit.io import open_weights
from lorakit.io.memory import StateDictWeights, ZeroWeights
from lorakit.ops.extraction import extract
from test_bake_util import make_base


def test_a_state_dict_reads_like_its_file(tmp_path):
    path = make_base(tmp_path, "bfl")
    tensors = load_file(path)
    mem = StateDictWeights({"diffusion_model." + k: v for k, v in tensors.items()}, "loaded model")
    with open_weights(path) as f:
        a, b = open_base(f), open_base(mem)
        assert (a.arch.name, a.variant, a.arch.params) == (b.arch.name, b.variant, b.arch.params)
        assert sorted(a.by_module()) == sorted(b.by_module())
    k = next(iter(tensors))
    assert mem.get("diffusion_model." + k) is not None and torch.equal(mem.get("diffusion_model." + k), tensors[k])
    assert mem.shape("diffusion_model." + k) == tuple(tensors[k].shape) and mem.path == "loaded model"


def test_bad_entries_are_refused():
    with pytest.raises(InputFileError, match="not a named tensor"):
        StateDictWeights({"a": [1, 2]}, "m")   # type: ignore[dict-item]
    with pytest.raises(UnsupportedDtypeError, match="complex"):
        StateDictWeights({"a": torch.zeros(2, dtype=torch.complex64)}, "m")


def test_zero_weights_mirror_names_shapes_and_dtypes():
    like = StateDictWeights({"w": torch.ones(3, 2, dtype=torch.bfloat16), "b": torch.ones(3)}, "m")
    z = ZeroWeights(like, "zeros")
    assert z.keys() == ["w", "b"] and z.shape("w") == (3, 2)
    w = z.get("w")
    assert w.dtype == torch.bfloat16 and not w.any()


def test_extract_from_loaded_models_and_from_a_difference_equals_the_files(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "t").mkdir()
    o, t = make_base(tmp_path / "o", "bfl", seed=0), make_base(tmp_path / "t", "bfl", seed=3)
    ref = extract(o, t, tmp_path / "ref.safetensors", rank=2, seed=1)
    orig, tuned = load_file(o), load_file(t)
    mem = extract(StateDictWeights(orig, "original"), StateDictWeights(tuned, "tuned"), tmp_path / "mem.safetensors",
                  rank=2, seed=1)
    diff = StateDictWeights({k: tuned[k] - orig[k] for k in tuned}, "difference")
    dif = extract(ZeroWeights(diff, "zeros"), diff, tmp_path / "dif.safetensors", rank=2, seed=1)
    expected = load_file(str(tmp_path / "ref.safetensors"))
    for name in ("mem", "dif"):
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert len(mem.modules) == len(dif.modules) == len(ref.modules) > 0
    assert mem.original == "original" and dif.tuned == "difference"
