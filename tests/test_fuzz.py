"""Header fuzzing: mutated safetensors files may only ever raise LorakitError subclasses, never hang.

A seeded mutator flips header bytes, rewrites the length field, truncates, splices, and edits the
header JSON structurally (dtypes, shapes, offsets, names, metadata). Each case goes through the
library: open_weights + parse + load, inspect (deep), doctor and a dry-run convert. Default: a few
hundred cases; ``LORAKIT_FUZZ_CASES=N`` or the slow test (10,000 cases) for more.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from conftest import report_line
import torch

from lorakit.ops.conversion import convert
from lorakit.ops.diagnose import diagnose
from lorakit.errors import LorakitError
from lorakit.formats import load, parse
from lorakit.ops.inspection import inspect_lora
from lorakit.io import open_weights, save_tensors

CASE_SECONDS = 5.0
DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "I64", "F8_E4M3", "C64", "Q4", "", "f32"]
NAME_TAILS = ["lora_down.weight", "lora_up.weight", "alpha", "lora_A.weight", "lora_B.weight", "lora_B.bias",
              "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w2", "lokr_t2", "dora_scale",
              "diff", "diff_b", "lora_mid.weight", "weight", "bias"]
MODULES = ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1", "lora_unet_img_in",
           "transformer.transformer_blocks.0.attn.to_q", "diffusion_model.double_blocks.0.img_mod.lin",
           "lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_unet_final_layer_adaLN_modulation_1",
           "lycoris_transformer_blocks_0_attn_to_k", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k"]

_counter = {"cases": 0}


def _seeds(folder) -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    out = []
    t = {}
    for stem, (o, i) in {"lora_unet_double_blocks_0_img_attn_qkv": (96, 32), "lora_unet_single_blocks_1_linear1": (224, 32),
                         "lora_unet_final_layer_adaLN_modulation_1": (64, 32),
                         "lora_te1_text_model_encoder_layers_0_mlp_fc1": (48, 24)}.items():
        t[stem + ".lora_down.weight"] = torch.randn(2, i, generator=g)
        t[stem + ".lora_up.weight"] = torch.randn(o, 2, generator=g).to(torch.bfloat16)
        t[stem + ".alpha"] = torch.tensor(1.0)
    meta = {"ss_network_dim": "2", "ss_tag_frequency": json.dumps({"a": {"tok": 3}}), "software": '{"name": "x"}',
            "sshs_model_hash": "0" * 64}
    out.append(_bytes(folder, "k", t, meta))
    t = {}
    for name, (o, i) in {"transformer.transformer_blocks.0.attn.to_q": (32, 32),
                         "transformer.single_transformer_blocks.0.proj_mlp": (128, 32),
                         "transformer.norm_out.linear": (64, 32)}.items():
        t[name + ".lora_A.weight"] = torch.randn(3, i, generator=g)
        t[name + ".lora_B.weight"] = torch.randn(o, 3, generator=g)
    out.append(_bytes(folder, "d", t, {"lora_adapter_metadata": json.dumps({"transformer.r": 3,
                                                                             "transformer.lora_alpha": 6})}))
    t = {"lycoris_transformer_blocks_0_attn_to_k.lokr_w1": torch.randn(4, 4, generator=g),
         "lycoris_transformer_blocks_0_attn_to_k.lokr_w2": torch.randn(8, 8, generator=g),
         "lycoris_transformer_blocks_0_attn_to_v.hada_w1_a": torch.randn(32, 2, generator=g),
         "lycoris_transformer_blocks_0_attn_to_v.hada_w1_b": torch.randn(2, 32, generator=g),
         "lycoris_transformer_blocks_0_attn_to_v.hada_w2_a": torch.randn(32, 2, generator=g),
         "lycoris_transformer_blocks_0_attn_to_v.hada_w2_b": torch.randn(2, 32, generator=g),
         "lycoris_transformer_blocks_0_attn_to_v.alpha": torch.tensor(2.0)}
    out.append(_bytes(folder, "l", t, None))
    return out


def _bytes(folder, name, tensors, meta) -> bytes:
    p = os.path.join(folder, f"seed_{name}.safetensors")
    save_tensors(p, tensors, meta)
    with open(p, "rb") as fh:
        return fh.read()


def _split(data: bytes) -> tuple[int, bytes, bytes]:
    n = int.from_bytes(data[:8], "little")
    return n, data[8:8 + n], data[8 + n:]


def _pack(header: bytes, body: bytes) -> bytes:
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + body


def _rand_value(rng: random.Random) -> object:
    return rng.choice([0, 1, -1, 2 ** 31, 2 ** 63, 2 ** 70, 3.5, "x", None, True, [], {}, [1], [[1]], -7,
                       rng.randrange(0, 4096)])


def _json_edit(rng: random.Random, header: bytes, body: bytes) -> bytes:
    obj = json.loads(header)
    names = [k for k in obj if k != "__metadata__"]
    op = rng.randrange(12)
    name = rng.choice(names) if names else None
    entry = obj.get(name) if name else None
    if op == 0 and entry:
        entry["dtype"] = rng.choice(DTYPES)
    elif op == 1 and entry:
        shape = list(entry["shape"])
        choice = rng.randrange(5)
        if choice == 0 and shape:
            shape[rng.randrange(len(shape))] = _rand_value(rng)
        elif choice == 1:
            shape.append(rng.choice([1, 2, 0]))
        elif choice == 2 and shape:
            shape.pop()
        elif choice == 3:
            shape = list(reversed(shape))
        else:
            shape = _rand_value(rng)
        entry["shape"] = shape
    elif op == 2 and entry:
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b, a], [a, b + rng.choice([-4, 4, 2])], [0, b - a], [a, a],
                                            [len(body), len(body) + b - a], _rand_value(rng), [a]])
    elif op == 3 and entry:
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    elif op == 4 and name:
        new = rng.choice(MODULES) + "." + rng.choice(NAME_TAILS)
        obj[new] = obj.pop(name)
    elif op == 5 and name:
        obj[name + "_copy" if rng.random() < 0.5 else rng.choice(MODULES) + ".lora_down.weight"] = dict(obj[name])
    elif op == 6 and name:
        del obj[name]
    elif op == 7:
        meta = obj.setdefault("__metadata__", {})
        meta[rng.choice(["ss_network_dim", "ss_tag_frequency", "software", "meta", "lora_adapter_metadata",
                         "alpha", "modelspec.architecture", "ss_base_model_version"])] = rng.choice(
            ["{", "[1, 2]", '{"transformer.lora_alpha": "x", "transformer.alpha_pattern": {"(": 1}}',
             '{"a": [1]}', "schnell", "chroma", "nan", "1e309", '{"trigger_words": 5}', _rand_value(rng)])
    elif op == 8:
        obj["__metadata__"] = _rand_value(rng)
    elif op == 9 and entry:
        entry[rng.choice(["extra", "dtype"])] = _rand_value(rng)
    elif op == 10 and len(names) >= 2:
        a, b = rng.sample(names, 2)
        obj[a], obj[b] = obj[b], obj[a]
    else:
        obj = rng.choice([[], "x", 1, None, {"": {}}])
    return _pack(json.dumps(obj).encode(), body)


def mutate(rng: random.Random, data: bytes) -> bytes:
    n, header, body = _split(data)
    if len(data) < 16 or not header:      # already destroyed by an earlier mutation: grow some junk
        return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    op = rng.randrange(8)
    if op == 0:   # byte flips inside the header
        h = bytearray(header)
        for _ in range(rng.randint(1, 8)):
            h[rng.randrange(len(h))] = rng.randrange(256)
        return data[:8] + bytes(h) + body
    if op == 1:   # length field
        new = rng.choice([0, 1, 7, n - 1, n + 1, n + 8, n - 8, len(data), len(data) - 8, 2 ** 63, 2 ** 64 - 1,
                          100 * 1024 * 1024 + 1, rng.randrange(2 ** 64)])
        return (new % 2 ** 64).to_bytes(8, "little") + data[8:]
    if op == 2:   # truncation
        return data[:rng.randrange(len(data))]
    if op == 3:   # splice random bytes into the header
        pos = rng.randrange(len(header) + 1)
        junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        return _pack(header[:pos] + junk + header[pos:], body)
    if op == 4:   # data-section corruption (NaN/Inf/garbage values)
        b = bytearray(body)
        for _ in range(rng.randint(1, 32)):
            if b:
                b[rng.randrange(len(b))] = rng.choice([0xFF, 0x7F, 0x80, 0x00])
        return data[:8 + n] + bytes(b)
    try:
        return _json_edit(rng, header, body)
    except (ValueError, TypeError, AttributeError, KeyError):   # an earlier mutation broke the JSON: flip bytes
        return _pack(header[::-1], body) if rng.random() < 0.1 else data[:-1]


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def exercise(path: str) -> None:
    with open_weights(path) as f:
        parsed = parse(f)
        load(parsed)
    inspect_lora(path, deep=True)
    convert(path, None, "kohya", dry_run=True, allow_partial=True, allow_lossy=True)


def run_cases(tmp_path, cases: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    seeds = _seeds(str(tmp_path))
    target = str(tmp_path / "case.safetensors")
    outcomes: dict[str, int] = {}
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i in range(cases):
            data = rng.choice(seeds)
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                data = mutate(rng, data)
            with open(target, "wb") as fh:
                fh.write(data)
            start = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                exercise(target)
                d = diagnose(target)          # doctor never raises for a bad LoRA: it returns a verdict
                outcome = "ok/" + d.verdict
            except LorakitError as exc:
                outcome = type(exc).__name__
            except _Timeout:
                pytest.fail(f"fuzz case {i} (seed {seed}) exceeded {CASE_SECONDS}s")
            except Exception as exc:  # noqa: BLE001 - the point of the test
                keep = tmp_path / f"crash_{i}.safetensors"
                keep.write_bytes(data)
                pytest.fail(f"fuzz case {i} (seed {seed}) raised {type(exc).__name__}: {exc} — input kept at {keep}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            assert time.perf_counter() - start < CASE_SECONDS
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            _counter["cases"] += 1
    finally:
        signal.signal(signal.SIGALRM, old)
    return outcomes


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    report_line(request, f"fuzz: {_counter['cases']} header-mutation cases run, no crash")


def test_fuzz_headers_default(tmp_path) -> None:
    cases = int(os.environ.get("LORAKIT_FUZZ_CASES") or 300)
    outcomes = run_cases(tmp_path, cases, seed=20240611)
    assert sum(outcomes.values()) == cases
    assert len(outcomes) > 3, outcomes          # the mutator reaches many different outcomes
    assert any(k.startswith("ok/") for k in outcomes), outcomes


@pytest.mark.slow
def test_fuzz_headers_10k(tmp_path) -> None:
    outcomes = run_cases(tmp_path, 10_000, seed=7)
    assert sum(outcomes.values()) == 10_000
