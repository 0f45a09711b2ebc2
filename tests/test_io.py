"""lorakit.io: byte-identical writing, header-level reading, shards, pickle opt-in, atomic output."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from lorakit.errors import HeaderError, OutputError, PickleRefusedError
from lorakit.io import SafetensorsWriter, ShardedFile, open_weights, save_tensors

ALL_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.float8_e5m2, torch.float8_e4m3fn, torch.int16, torch.uint16,
              torch.float16, torch.bfloat16, torch.int32, torch.uint32, torch.float32, torch.float64, torch.int64,
              torch.uint64]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def _tensors() -> dict[str, torch.Tensor]:
    out = {}
    for n, dt in enumerate(ALL_DTYPES):
        name = str(dt).replace("torch.", "")
        out[f"m.{name}.w"] = _sample(dt, (3, 5), n)
        out[f"m.{name}.scalar"] = _sample(dt, (), n + 100)
        out[f"a.{name}.empty"] = torch.empty((0,), dtype=dt)
        out[f"z.{name}.empty2d"] = torch.empty((4, 0), dtype=dt)
    out["lora_unet_x.alpha"] = torch.tensor(8.0)
    return out


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}, {"ünï": "cödé ✓ " + json.dumps({"a": [1]})}])
def test_golden_bytes_match_safetensors(tmp_path, metadata) -> None:
    tensors = _tensors()
    path = tmp_path / "out.safetensors"
    save_tensors(path, tensors, metadata)
    assert path.read_bytes() == st_save(tensors, metadata=metadata)


def _split(data: bytes) -> tuple[dict, int, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), n, data[8 + n:]


def test_golden_bytes_with_several_metadata_keys(tmp_path) -> None:
    """safetensors orders ``__metadata__`` keys by a per-process hash (random), lorakit sorts them: the
    header is the same JSON with the same length and the data section is byte-identical."""
    tensors = _tensors()
    meta = {"format": "pt", "ss_network_dim": "16", "modelspec.title": "x", "zz": "1"}
    path = tmp_path / "out.safetensors"
    save_tensors(path, tensors, meta)
    mine, ref = _split(path.read_bytes()), _split(st_save(tensors, metadata=meta))
    assert mine == ref
    assert list(mine[0]) == list(ref[0])             # tensor order in the header is the same too
    assert list(mine[0]["__metadata__"]) == sorted(meta)


def test_writer_accepts_any_order_and_matches(tmp_path) -> None:
    tensors = _tensors()
    entries = [(k, _code(v), tuple(v.shape)) for k, v in tensors.items()]
    path = tmp_path / "stream.safetensors"
    with SafetensorsWriter(path, entries, {"k": "v"}) as w:
        for name in reversed(sorted(tensors)):
            w.write(name, tensors[name])
    assert path.read_bytes() == st_save(tensors, metadata={"k": "v"})


def _code(t: torch.Tensor) -> str:
    from lorakit.dtypes import dtype_code
    return dtype_code(t.dtype)


def test_read_back_everything(tmp_path) -> None:
    tensors = _tensors()
    path = str(tmp_path / "ref.safetensors")
    save_file(tensors, path, metadata={"hello": "world"})
    with open_weights(path) as f:
        assert set(f.keys()) == set(tensors)
        assert f.metadata == {"hello": "world"}
        for k, v in tensors.items():
            assert f.shape(k) == tuple(v.shape)
            got = f.get(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))


def test_writer_refuses_to_overwrite_input(tmp_path) -> None:
    path = tmp_path / "in.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    before = path.read_bytes()
    with pytest.raises(OutputError, match="never overwrites"):
        save_tensors(path, {"a": torch.ones(2)}, inputs=[path])
    assert path.read_bytes() == before


def test_failed_write_leaves_nothing(tmp_path) -> None:
    path = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(path, [("a", "F32", (2,)), ("b", "F32", (2,))]) as w:
            w.write("a", torch.zeros(2))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_sharded_folder_and_index(tmp_path) -> None:
    folder = tmp_path / "transformer"
    folder.mkdir()
    shard1 = {"x_embedder.weight": torch.randn(4, 3), "x_embedder.bias": torch.randn(4)}
    shard2 = {"proj_out.weight": torch.randn(2, 4).to(torch.bfloat16)}
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    save_file(shard1, str(folder / names[0]), metadata={"format": "pt"})
    save_file(shard2, str(folder / names[1]), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {**{k: names[0] for k in shard1}, **{k: names[1] for k in shard2}}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    for target in (folder, folder / "diffusion_pytorch_model.safetensors.index.json"):
        with open_weights(target) as f:
            assert isinstance(f, ShardedFile)
            assert set(f.keys()) == set(shard1) | set(shard2)
            assert f.shard_of["proj_out.weight"] == names[1]
            assert f.shard_names == names
            for k, v in {**shard1, **shard2}.items():
                assert torch.equal(f.get(k), v)
    # an index naming a tensor the shards lack is refused
    index["weight_map"]["missing.weight"] = names[0]
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HeaderError, match="missing"):
        open_weights(folder)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_needs_opt_in(tmp_path, suffix) -> None:
    path = str(tmp_path / f"lora{suffix}")
    data = {"lora_unet_x.lora_down.weight": torch.randn(2, 3), "lora_unet_x.alpha": torch.tensor(1.0)}
    torch.save(data, path)
    with pytest.raises(PickleRefusedError, match="pickle"):
        open_weights(path)
    with open_weights(path, allow_pickle=True) as f:
        assert set(f.keys()) == set(data)
        assert torch.equal(f.get("lora_unet_x.lora_down.weight"), data["lora_unet_x.lora_down.weight"])


def test_pickle_state_dict_wrapper(tmp_path) -> None:
    path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, path)
    with open_weights(path, allow_pickle=True) as f:
        assert f.keys() == ["w"]


def test_safetensors_header_starting_like_pickle(tmp_path) -> None:
    """An 8-byte header length whose first byte is 0x80 (or 'PK') is still safetensors."""
    path = tmp_path / "x.safetensors"
    for pad in range(0, 400, 8):
        meta = {"pad": "p" * pad}
        save_file({"a": torch.zeros(1)}, str(path), metadata=meta)
        if path.read_bytes()[0] == 0x80:
            break
    else:  # pragma: no cover
        pytest.skip("could not build a header length starting with 0x80")
    with open_weights(path) as f:
        assert f.keys() == ["a"]


def test_header_offsets_checked(tmp_path) -> None:
    body = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 8)
    with pytest.raises(HeaderError, match="needs 8 bytes"):
        open_weights(path)
    body = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                       "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}).encode()
    path.write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 8)
    with pytest.raises(HeaderError, match="overlap"):
        open_weights(path)
