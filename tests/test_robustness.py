"""Robustness suite: classes of bad input across every command.

For each (input class, command): a typed LorakitError (doctor: an INVALID / WILL NOT APPLY verdict
carrying the error type), ONE line on stderr without a traceback, exit code ≠ 0, no output file and
no temporary file left in the folder, inputs byte-identical afterwards. Every command is exercised
(a missing CLI module is a failure, never a skip).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from conftest import report_line
import torch

from lorakit import errors as E
from lorakit.cli import main
from lorakit.cli.main import build_parser
from lorakit.io import save_tensors
from lorakit.samples.synthetic import TINY_FLUX, write_base

H = TINY_FLUX["H"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Good inputs and raw-bytes helpers
# ---------------------------------------------------------------------------------------------

def good_lora(path, seed: int = 0, n: int = 2) -> str:
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(n):
        stem = f"lora_unet_double_blocks_{i}_img_attn_proj"
        t[stem + ".lora_down.weight"] = torch.randn(4, H, generator=g)
        t[stem + ".lora_up.weight"] = torch.randn(H, 4, generator=g)
        t[stem + ".alpha"] = torch.tensor(4.0)
    return save_tensors(path, t, {"ss_network_dim": "4"})


def _parts(path) -> tuple[dict, bytes]:
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_raw(path, header: bytes, body: bytes, length: int | None = None) -> str:
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as fh:
        fh.write((len(header) if length is None else length).to_bytes(8, "little") + header + body)
    return str(path)


def _edit_header(tmp, name: str, fn: Callable[[dict, bytes], None]) -> str:
    header, body = _parts(good_lora(tmp / f"{name}_src.safetensors"))
    os.unlink(tmp / f"{name}_src.safetensors")
    fn(header, body)
    return _write_raw(tmp / f"{name}.safetensors", json.dumps(header).encode(), body)


def _first(header: dict) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


# ---------------------------------------------------------------------------------------------
# Input classes: builder(tmp) -> path of the bad LoRA-position input, expected error, kind
# kind "file": corrupt container (every command, meta and extract included);
#      "lora": a readable file that is not a usable LoRA (LoRA commands);
#      "finite": NaN/Inf (doctor verdict; merge/bake/resize must refuse with NonFiniteError)
# ---------------------------------------------------------------------------------------------

def b_truncated(tmp):
    p = good_lora(tmp / "t_src.safetensors")
    raw = open(p, "rb").read()
    os.unlink(p)
    (tmp / "truncated.safetensors").write_bytes(raw[:-37])
    return str(tmp / "truncated.safetensors")


def b_stub(tmp):
    (tmp / "stub.safetensors").write_bytes(b"\x05\x00\x00")
    return str(tmp / "stub.safetensors")


def b_header_past_eof(tmp):
    header, body = _parts(good_lora(tmp / "h_src.safetensors"))
    os.unlink(tmp / "h_src.safetensors")
    text = json.dumps(header).encode()
    return _write_raw(tmp / "past_eof.safetensors", text, body, length=len(text) + len(body) + 4096)


def b_header_huge(tmp):
    return _write_raw(tmp / "huge.safetensors", b"{}", b"", length=200 * 1024 * 1024)


def b_invalid_json(tmp):
    return _write_raw(tmp / "badjson.safetensors", b'{"a": {"dtype": "F32", "shape": [1], ', b"\0" * 4)


def b_not_object(tmp):
    return _write_raw(tmp / "list.safetensors", b"[1, 2, 3]", b"")


def b_bad_utf8(tmp):
    return _write_raw(tmp / "utf8.safetensors", b'{"\xff\xfe": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
                      b"\0" * 4)


def b_overlap(tmp):
    def f(h, body):
        names = sorted(k for k in h if k != "__metadata__")
        big = [n for n in names if h[n]["shape"] == h[names[-1]]["shape"]]
        h[big[0]]["data_offsets"] = list(h[big[1]]["data_offsets"])
    return _edit_header(tmp, "overlap", f)


def b_out_of_range(tmp):
    def f(h, body):
        n = _first(h)
        size = h[n]["data_offsets"][1] - h[n]["data_offsets"][0]
        h[n]["data_offsets"] = [len(body), len(body) + size]
    return _edit_header(tmp, "range", f)


def b_size_mismatch(tmp):
    def f(h, body):
        n = [k for k in h if k.endswith("lora_up.weight")][0]
        h[n]["shape"] = [H, 5]
    return _edit_header(tmp, "size", f)


def b_unsupported_dtype(tmp):
    def f(h, body):
        n = [k for k in h if k.endswith("lora_up.weight")][0]
        h[n]["dtype"] = "C64"
        h[n]["shape"] = [H, 2]
    return _edit_header(tmp, "dtype", f)


def b_nonstring_metadata(tmp):
    return _edit_header(tmp, "meta", lambda h, body: h.__setitem__("__metadata__", {"ss_network_dim": 4}))


def b_duplicate_json_key(tmp):
    header, body = _parts(good_lora(tmp / "d_src.safetensors"))
    os.unlink(tmp / "d_src.safetensors")
    text = json.dumps(header)
    n = _first(header)
    dup = text[:-1] + ", " + json.dumps(n) + ": " + json.dumps(header[n]) + "}"
    return _write_raw(tmp / "dupkey.safetensors", dup.encode(), body)


def b_bad_shape(tmp):
    return _edit_header(tmp, "shape", lambda h, body: h[_first(h)].__setitem__("shape", [-1, 4]))


def b_missing(tmp):
    return str(tmp / "does_not_exist.safetensors")


def b_folder(tmp):
    (tmp / "afolder").mkdir()
    return str(tmp / "afolder")


def b_bad_index(tmp):
    (tmp / "model.safetensors.index.json").write_text('{"weight_map": {"a": "missing-00001.safetensors"}}')
    return str(tmp / "model.safetensors.index.json")


def b_pickle(tmp):
    p = tmp / "lora.pt"
    torch.save({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(4, H)}, p)
    return str(p)


def b_empty(tmp):
    return save_tensors(tmp / "empty.safetensors", {})


def b_base_as_lora(tmp):
    return write_base(tmp / "base_as_lora.safetensors")


def b_two_spellings(tmp):
    g = torch.Generator().manual_seed(0)
    t = {}
    for stem in ("lora_unet_double_blocks_0_img_attn_proj", "lora_unet_transformer_blocks_0_attn_to_out_0"):
        t[stem + ".lora_down.weight"] = torch.randn(4, H, generator=g)
        t[stem + ".lora_up.weight"] = torch.randn(H, 4, generator=g)
    return save_tensors(tmp / "two_spellings.safetensors", t)


def b_sd3(tmp):
    """An SD3 LoRA in diffusers naming (module names shared with FLUX.1; the hidden size is SD3's 1536)."""
    g = torch.Generator().manual_seed(0)
    t = {}
    for stem in ("transformer.transformer_blocks.0.attn.to_k", "transformer.transformer_blocks.1.attn.add_v_proj"):
        t[stem + ".lora_A.weight"] = torch.randn(2, 1536, generator=g)
        t[stem + ".lora_B.weight"] = torch.randn(1536, 2, generator=g)
    return save_tensors(tmp / "sd3.safetensors", t)


def b_flux2(tmp):
    """A FLUX.2 single-block LoRA whose fused q/k/v+MLP rows (64) cannot be 3·H + 2·M for its 64 inputs."""
    g = torch.Generator().manual_seed(0)
    t = {"transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight": torch.randn(2, 64, generator=g),
         "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_B.weight": torch.randn(64, 2, generator=g)}
    return save_tensors(tmp / "flux2.safetensors", t)


def b_inconsistent_factors(tmp):
    t = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(4, H),
         "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(H, 5)}
    return save_tensors(tmp / "ranks.safetensors", t)


def b_rank_zero(tmp):
    t = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(0, H),
         "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(H, 0),
         "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(1.0)}
    return save_tensors(tmp / "rank0.safetensors", t)


def b_contradicting_sizes(tmp):
    g = torch.Generator().manual_seed(0)
    t = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, H, generator=g),
         "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(H, 4, generator=g),
         "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.randn(4, H, generator=g),
         "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.randn(H + 8, 4, generator=g)}
    return save_tensors(tmp / "contradict.safetensors", t)


def b_nan(tmp):
    p = good_lora(tmp / "nan_src.safetensors")
    from safetensors.torch import load_file
    t = load_file(p)
    os.unlink(p)
    t["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"][1, 1] = float("nan")
    return save_tensors(tmp / "nan.safetensors", t)


def b_inf(tmp):
    p = good_lora(tmp / "inf_src.safetensors")
    from safetensors.torch import load_file
    t = load_file(p)
    os.unlink(p)
    t["lora_unet_double_blocks_1_img_attn_proj.lora_down.weight"][0, 3] = float("-inf")
    return save_tensors(tmp / "inf.safetensors", t)


@dataclass(frozen=True)
class InputClass:
    name: str
    build: Callable
    error: type
    kind: str = "file"


INPUT_CLASSES = [
    InputClass("truncated file", b_truncated, E.HeaderError),
    InputClass("file shorter than the length field", b_stub, E.HeaderError),
    InputClass("header length past EOF", b_header_past_eof, E.HeaderError),
    InputClass("header length > 100 MB", b_header_huge, E.HeaderError),
    InputClass("invalid JSON header", b_invalid_json, E.HeaderError),
    InputClass("header not a JSON object", b_not_object, E.HeaderError),
    InputClass("header not UTF-8", b_bad_utf8, E.HeaderError),
    InputClass("overlapping data offsets", b_overlap, E.HeaderError),
    InputClass("data offsets out of range", b_out_of_range, E.HeaderError),
    InputClass("dtype/shape/byte-size mismatch", b_size_mismatch, E.HeaderError),
    InputClass("unsupported dtype", b_unsupported_dtype, E.UnsupportedDtypeError),
    InputClass("non-string metadata", b_nonstring_metadata, E.HeaderError),
    InputClass("duplicate JSON key", b_duplicate_json_key, E.HeaderError),
    InputClass("negative shape", b_bad_shape, E.HeaderError),
    InputClass("missing file", b_missing, E.InputFileError),
    InputClass("folder without index", b_folder, E.InputFileError),
    InputClass("shard index naming a missing shard", b_bad_index, E.InputFileError),
    InputClass("pickle without --allow-pickle", b_pickle, E.PickleRefusedError),
    InputClass("empty LoRA", b_empty, E.NotALoraError, "lora"),
    InputClass("base model given as LoRA", b_base_as_lora, E.NotALoraError, "lora"),
    InputClass("duplicate modules in two spellings", b_two_spellings, E.KeyMappingError, "lora"),
    InputClass("SD3 LoRA", b_sd3, E.UnsupportedArchitectureError, "lora"),
    InputClass("FLUX.2 LoRA with an impossible fused shape", b_flux2, E.ShapeMismatchError, "lora"),
    InputClass("factor ranks disagree", b_inconsistent_factors, E.FormatError, "lora"),
    InputClass("rank-0 module", b_rank_zero, E.FormatError, "lora"),
    InputClass("module sizes contradict each other", b_contradicting_sizes, E.ShapeMismatchError, "lora"),
    InputClass("NaN in a factor", b_nan, E.NonFiniteError, "finite"),
    InputClass("Inf in a factor", b_inf, E.NonFiniteError, "finite"),
]
OUTPUT_CLASSES = ["output path equal to an input", "output folder missing", "output parent is a file",
                  "output path is a folder", "output folder read-only", "disk full during write",
                  "SIGINT mid-write", "LoRA given as base"]
_seen: set[str] = set()
_runs = {"n": 0}


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    report_line(request, f"robustness: {len(INPUT_CLASSES) + len(OUTPUT_CLASSES)} input classes defined "
                         f"({len(_seen)} exercised in this run), {_runs['n']} command cases")


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

@dataclass
class Env:
    tmp: object
    good: str
    good2: str
    base: str
    base2: str
    out: str


def _env(tmp) -> Env:
    inputs = tmp / "inputs"
    inputs.mkdir(exist_ok=True)
    (tmp / "out").mkdir(exist_ok=True)
    return Env(tmp, good_lora(inputs / "good.safetensors"), good_lora(inputs / "good2.safetensors", seed=1),
               write_base(inputs / "base.safetensors"), write_base(inputs / "base2.safetensors", seed=3),
               str(tmp / "out" / "result.safetensors"))


# command -> (argv builder for a bad LoRA-position input, kinds it applies to)
LORA_COMMANDS: dict[str, tuple[Callable[[Env, str], list[str]], tuple[str, ...]]] = {
    "inspect": (lambda e, bad: ["inspect", bad], ("file", "lora")),
    "convert": (lambda e, bad: ["convert", bad, "-o", e.out, "--to", "kohya"], ("file", "lora")),
    "doctor": (lambda e, bad: ["doctor", bad, "--base", e.base], ("file", "lora", "finite")),
    "diff": (lambda e, bad: ["diff", bad, e.good], ("file", "lora")),
    "meta": (lambda e, bad: ["meta", bad, "--set", "k=v", "-o", e.out], ("file",)),
    "merge": (lambda e, bad: ["merge", e.good, bad, "-o", e.out], ("file", "lora", "finite")),
    "resize": (lambda e, bad: ["resize", bad, "-o", e.out, "--rank", "2"], ("file", "lora", "finite")),
    "bake": (lambda e, bad: ["bake", e.base, bad, "-o", e.out], ("file", "lora", "finite")),
    "extract": (lambda e, bad: ["extract", bad, e.base, "-o", e.out, "--rank", "2"], ("file",)),
}


def _snapshot(folder) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _typed_error(argv: list[str]) -> BaseException | None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except BaseException as exc:  # noqa: BLE001
        return exc
    return None


def _check_cli(argv: list[str], tmp, capsys, *, verdict: str | None = None) -> tuple[int, str, str]:
    before = _snapshot(tmp)
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc != 0, (argv, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert _snapshot(tmp) == before, "inputs changed or output/temporary files were left behind"
    if verdict is None:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, err
        assert lines[0].startswith(f"lorakit {argv[0]}: error:") and "internal error" not in lines[0], lines[0]
    else:
        assert verdict in out, out
    _runs["n"] += 1
    return rc, out, err


# Contract gaps found in other helpers' commands at the time of writing: reported, visible as xfail (not strict,
# so they turn into XPASS once fixed — then delete the entry).
KNOWN_GAPS: dict[tuple[str, str], str] = {}


def _known_gap(request, cmd: str, key: str) -> None:
    reason = KNOWN_GAPS.get((cmd, key))
    if reason:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=False))


@pytest.mark.parametrize("cls", INPUT_CLASSES, ids=[c.name for c in INPUT_CLASSES])
@pytest.mark.parametrize("cmd", list(LORA_COMMANDS))
def test_bad_input(cls: InputClass, cmd: str, tmp_path, capsys, request) -> None:
    build, kinds = LORA_COMMANDS[cmd]
    if cls.kind not in kinds:
        pytest.skip(f"{cls.name} is not an input error for {cmd}")
    _known_gap(request, cmd, cls.kind)
    env = _env(tmp_path)
    bad = cls.build(tmp_path / "inputs")
    argv = build(env, bad)
    _seen.add(cls.name)
    if cmd == "doctor":
        from lorakit.ops.diagnose import doctor
        d = doctor([bad], env.base).loras[0]
        assert d.verdict in ("INVALID", "WILL NOT APPLY"), d.summary
        if d.error:
            assert issubclass(getattr(E, d.error["type"]), cls.error) or cls.kind == "lora", d.error
        else:
            assert cls.kind in ("finite", "lora")
        rc, out, err = _check_cli(argv, tmp_path, capsys, verdict=d.verdict)
        assert rc == 2 and err == ""
        return
    if cmd == "diff" and cls.name == "base model given as LoRA":
        expected: type = E.UsageError           # diff compares models too: a model vs a LoRA is a usage error
    else:
        expected = cls.error
    exc = _typed_error(argv)
    assert isinstance(exc, E.LorakitError), (argv, repr(exc))
    if cmd in ("inspect", "convert", "diff", "meta"):
        assert isinstance(exc, expected), (argv, repr(exc))
    _check_cli(argv, tmp_path, capsys)


def test_nan_is_flagged_by_inspect_deep(tmp_path, capsys) -> None:
    for build in (b_nan, b_inf):
        bad = build(tmp_path)
        assert main(["inspect", "--deep", "--json", bad]) == 0
        assert len(json.loads(capsys.readouterr().out)["deep"]["nonfinite_modules"]) == 1


def test_require_finite_helper() -> None:
    from lorakit.lora.checks import require_finite
    require_finite({"a": torch.ones(3), "i": torch.ones(2, dtype=torch.int64)})
    with pytest.raises(E.NonFiniteError, match="'b'"):
        require_finite({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)})
    with pytest.raises(E.NonFiniteError):
        require_finite(torch.tensor([float("inf")]), name="x")


# ---------------------------------------------------------------------------------------------
# Output classes
# ---------------------------------------------------------------------------------------------

OUTPUT_COMMANDS: dict[str, Callable[[Env, str], list[str]]] = {
    "convert": lambda e, out: ["convert", e.good, "-o", out, "--to", "diffusers"],
    "meta": lambda e, out: ["meta", e.good, "--set", "k=v", "-o", out],
    "merge": lambda e, out: ["merge", e.good, e.good2, "-o", out],
    "resize": lambda e, out: ["resize", e.good, "-o", out, "--rank", "2"],
    "bake": lambda e, out: ["bake", e.base, e.good, "-o", out],
    "extract": lambda e, out: ["extract", e.base, e.base2, "-o", out, "--rank", "2"],
}


def _same_as_input(e: Env, cmd: str) -> str:
    return {"bake": e.base, "extract": e.base}.get(cmd, e.good)


@pytest.mark.parametrize("case", ["output path equal to an input", "output folder missing", "output parent is a file",
                                  "output path is a folder", "output folder read-only", "disk full during write"])
@pytest.mark.parametrize("cmd", list(OUTPUT_COMMANDS))
def test_bad_output(case: str, cmd: str, tmp_path, capsys, monkeypatch, request) -> None:
    _known_gap(request, cmd, case)
    env = _env(tmp_path)
    _seen.add(case)
    if case == "output path equal to an input":
        if cmd == "meta":
            pytest.skip("meta is the one command allowed to replace its input (atomically); see test_meta.py")
        out = _same_as_input(env, cmd)
    elif case == "output folder missing":
        out = str(tmp_path / "no_such_dir" / "x.safetensors")
    elif case == "output parent is a file":
        out = os.path.join(env.good, "x.safetensors")
    elif case == "output path is a folder":
        out = str(tmp_path / "out")
    elif case == "output folder read-only":
        if os.geteuid() == 0:
            pytest.skip("running as root: chmod does not stop root from writing")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = str(ro / "x.safetensors")
    else:
        out = env.out
        real = os.pwrite
        calls = {"n": 0}

        def full(fd, data, offset):
            calls["n"] += 1
            if calls["n"] > 1:       # the header goes through, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", full)
    argv = OUTPUT_COMMANDS[cmd](env, out)
    exc = _typed_error(argv)
    assert isinstance(exc, E.OutputError if cmd in ("convert", "meta") else E.LorakitError), (argv, repr(exc))
    _check_cli(argv, tmp_path, capsys)


@pytest.mark.parametrize("cmd", ["doctor", "bake"])
def test_lora_given_as_base(cmd: str, tmp_path, capsys) -> None:
    env = _env(tmp_path)
    _seen.add("LoRA given as base")
    argv = ["doctor", env.good, "--base", env.good2] if cmd == "doctor" else ["bake", env.good2, env.good, "-o", env.out]
    exc = _typed_error(argv)
    assert isinstance(exc, E.LorakitError), repr(exc)
    if cmd == "doctor":
        assert isinstance(exc, E.NotALoraError)
    _check_cli(argv, tmp_path, capsys)


def _big_lora(path) -> str:
    g = torch.Generator().manual_seed(0)
    t = {}
    for i in range(24):
        stem = f"lora_unet_double_blocks_{i}_img_attn_proj"
        t[stem + ".lora_down.weight"] = torch.randn(4, H, generator=g)
        t[stem + ".lora_up.weight"] = torch.randn(H, 4, generator=g)
    return save_tensors(path, t)


@pytest.mark.parametrize("cmd", ["convert", "meta"])
def test_sigint_mid_write(cmd: str, tmp_path) -> None:
    src = _big_lora(tmp_path / "in.safetensors")
    before = _snapshot(tmp_path)
    out = str(tmp_path / "out.safetensors")
    argv = {"convert": ["convert", src, "-o", out, "--to", "kohya"],
            "meta": ["meta", src, "--set", "k=v"]}[cmd]            # meta: in place, the riskiest case
    env = {**os.environ, "LORAKIT_TEST_SLOW_WRITE": "0.05", "PYTHONPATH": os.path.join(ROOT, "src")}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not [f for f in os.listdir(tmp_path) if f.endswith(".lorakit-tmp")]:
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the command finished before it could be interrupted"
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    _seen.add("SIGINT mid-write")
    _runs["n"] += 1
    assert proc.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err, err
    assert _snapshot(tmp_path) == before        # no output, no temporary file, input untouched


def test_debug_shows_traceback_and_plain_does_not(tmp_path, capsys) -> None:
    bad = b_truncated(tmp_path)
    assert main(["inspect", bad]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["--debug", "inspect", bad]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "HeaderError" in err and err.strip().splitlines()[-1].startswith("lorakit inspect")


def test_internal_errors_are_one_line_with_exit_70(monkeypatch, tmp_path, capsys) -> None:
    import lorakit.ops.inspection as ins     # the library function the inspect command runs (via its batch task)
    monkeypatch.setattr(ins, "inspect_lora", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    assert main(["inspect", good_lora(tmp_path / "g.safetensors")]) == 70
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error" in err[0] and "boom" in err[0]


def test_error_hierarchy_exit_codes() -> None:
    for name in dir(E):
        obj = getattr(E, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == E.__name__:
            assert issubclass(obj, E.LorakitError), name
            assert obj.exit_code in (2, 130)
