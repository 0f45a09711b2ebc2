"""Nothing lost, nothing read or written outside what the user named (issue 11, item 6 "data loss and
security first"): shard names confined to the index's folder, every file an input reads protected from
the output, special files never replaced, symlinks followed consistently, checked short reads in the copy
fallback, the header limit on write, stale temporary files cleaned by exact pattern, names within
NAME_MAX. Fixtures are written with the reference ``safetensors`` package or raw bytes, never lorakit's writer.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.cli.main import main
from lorakit.errors import HeaderError, InputFileError, LorakitError, OutputError
from lorakit.io import check_output_path, open_weights
from lorakit.io.header import MAX_HEADER_BYTES
from lorakit.io.tempfiles import TEMP_SUFFIX, host_tag, is_temp_name, temp_name
from lorakit.layouts import expand
from lorakit.ops.metaedit import edit_metadata

from test_bake_util import INDEX, SHARDS, TRANSFORMER, make_base, write_kohya_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"H": 32, "M": 128, "IN": 16, "OUT": 16, "CTX": 24, "VEC": 20, "T": 8, "D": 16, "double": 2, "single": 2}


def _state(path) -> tuple[bytes, int, int]:
    """Bytes, mtime (ns) and inode of a file: what 'untouched' means."""
    st = os.stat(path)
    with open(path, "rb") as fh:
        return fh.read(), st.st_mtime_ns, st.st_ino


def _old(path) -> None:
    """Set an old mtime so that a rewrite within the same clock tick is still noticed."""
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))


def _lora(tmp_path, name="lora.safetensors") -> str:
    first = next(iter(expand(TRANSFORMER, TINY))).name
    return write_kohya_all(str(tmp_path / name), modules=[first])


def _no_temps(folder) -> bool:
    return not [n for n in os.listdir(folder) if TEMP_SUFFIX in n]


def _one_line(err: str) -> bool:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return len(lines) == 1 and "Traceback" not in err and "internal error" not in err


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------------------------------------
# Sharded indexes: shard names are plain file names in the index's folder
# ---------------------------------------------------------------------------------------------

def _rewrite_index(folder: str, fn) -> str:
    path = os.path.join(folder, INDEX)
    with open(path) as fh:
        index = json.load(fh)
    fn(index)
    with open(path, "w") as fh:
        json.dump(index, fh)
    return path


@pytest.mark.parametrize("escape", ["../victim.safetensors", "ABS", "sub/inner.safetensors", "..", ".", ""])
def test_index_shard_names_outside_the_folder_are_refused(tmp_path, escape, capsys):
    base = make_base(tmp_path, "sharded")
    # a valid safetensors file outside the model folder holding one of the base's tensors: what the old
    # reader opened and what the old sharded bake wrote over (tmpdir/../victim = the output's parent)
    shard0 = load_file(os.path.join(base, SHARDS[0]))
    key = sorted(shard0)[0]
    victim = str(tmp_path / "victim.safetensors")
    save_file({key: shard0[key]}, victim)
    os.makedirs(os.path.join(base, "sub"))
    save_file({key: shard0[key]}, os.path.join(base, "sub", "inner.safetensors"))
    _old(victim)
    before = _state(victim)
    name = victim if escape == "ABS" else escape
    _rewrite_index(base, lambda ix: ix["weight_map"].__setitem__(key, name))
    with pytest.raises(HeaderError, match="not a plain file name"):
        open_weights(base)
    out = str(tmp_path / "baked")
    lora = _lora(tmp_path)
    assert main(["bake", base, lora, "-o", out]) == 2
    err = capsys.readouterr().err
    assert _one_line(err) and "plain file name" in err
    assert _state(victim) == before
    assert not os.path.exists(out) and _no_temps(tmp_path)


def test_index_pointing_at_a_system_file_quotes_nothing_from_it(tmp_path, capsys):
    base = make_base(tmp_path, "sharded")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:SECRET-CONTENT:/root:/bin/bash\n" * 20)
    _rewrite_index(base, lambda ix: ix["weight_map"].update({k: str(secret) for k in list(ix["weight_map"])[:1]}))
    for cmd in (["inspect", base], ["diff", base, base]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert _one_line(err) and "SECRET" not in err and "root:x" not in err and "plain file name" in err


@pytest.mark.parametrize("case", ["int", "list", "null", "meta_list", "meta_str", "not_object", "no_map",
                                  "dup_key", "deep"])
def test_malformed_index_is_a_typed_one_line_error(tmp_path, case, capsys):
    base = make_base(tmp_path, "sharded")
    path = os.path.join(base, INDEX)
    with open(path) as fh:
        index = json.load(fh)
    first = sorted(index["weight_map"])[0]
    if case in ("int", "list", "null"):
        index["weight_map"][first] = {"int": 3, "list": [SHARDS[0]], "null": None}[case]
        text = json.dumps(index)
    elif case.startswith("meta_"):
        index["metadata"] = [1, 2] if case == "meta_list" else "total_size"
        text = json.dumps(index)
    elif case == "not_object":
        text = json.dumps([index])
    elif case == "no_map":
        text = json.dumps({"metadata": {}})
    elif case == "dup_key":   # one tensor listed twice: json.load would keep the last silently
        text = json.dumps(index)[:-2] + f', "{first}": "{SHARDS[1]}"' + "}}"
    else:
        text = '{"weight_map": {}, "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with open(path, "w") as fh:
        fh.write(text)
    with pytest.raises(HeaderError):
        open_weights(base)
    assert main(["inspect", base]) == 2
    assert _one_line(capsys.readouterr().err)


def test_one_shard_under_two_names_and_a_tensor_in_two_shards(tmp_path, capsys):
    base = make_base(tmp_path, "sharded")
    # the same file under a second name (a hard link): every tensor of it would be read twice
    os.link(os.path.join(base, SHARDS[0]), os.path.join(base, "again.safetensors"))
    first = load_file(os.path.join(base, SHARDS[0]))
    _rewrite_index(base, lambda ix: ix["weight_map"].update({sorted(first)[0]: "again.safetensors"}))
    with pytest.raises(HeaderError, match="twice"):
        open_weights(base)
    # a tensor stored in both shard files (the old bake: "internal error … planned tensors never written";
    # the old diff silently picked one)
    os.makedirs(tmp_path / "two")
    base2 = make_base(tmp_path / "two", "sharded")
    s0, s1 = (load_file(os.path.join(base2, s)) for s in SHARDS)
    k = sorted(s0)[0]
    s1[k] = s0[k] + 1
    save_file(s1, os.path.join(base2, SHARDS[1]), metadata={"format": "pt"})
    with pytest.raises(HeaderError, match="two shards"):
        open_weights(base2)
    for cmd in (["diff", base2, base2], ["bake", base2, _lora(tmp_path), "-o", str(tmp_path / "o")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert _one_line(err) and "two shards" in err
    assert not os.path.exists(tmp_path / "o")


def test_index_that_misplaces_a_tensor(tmp_path):
    base = make_base(tmp_path, "sharded")
    s0 = load_file(os.path.join(base, SHARDS[0]))
    _rewrite_index(base, lambda ix: ix["weight_map"].update({sorted(s0)[0]: SHARDS[1]}))
    with pytest.raises(HeaderError, match="puts tensor"):
        open_weights(base)


# ---------------------------------------------------------------------------------------------
# Every file an input reads is an input
# ---------------------------------------------------------------------------------------------

def test_extract_refuses_an_output_that_is_one_of_the_originals_shards(tmp_path, capsys):
    base = make_base(tmp_path, "sharded")
    tuned = make_base(tmp_path, "bfl", seed=7)
    shard = os.path.join(base, SHARDS[1])
    _old(shard)
    before = _state(shard)
    for orig in (os.path.join(base, INDEX), base):
        with pytest.raises(OutputError, match="same as input"):
            lorakit.extract(orig, tuned, shard, rank=4)
        assert main(["extract", orig, tuned, "-o", shard, "--rank", "4"]) == 2
        assert _one_line(capsys.readouterr().err)
    assert _state(shard) == before and _no_temps(base)


def test_meta_copy_from_is_an_input(tmp_path):
    a, b = _lora(tmp_path, "a.safetensors"), _lora(tmp_path, "b.safetensors")
    _old(b)
    before = _state(b)
    with pytest.raises(OutputError, match="same as input"):
        edit_metadata(a, set_items={"k": "v"}, copy_from=b, output=b)
    assert main(["meta", a, "--copy-from", b, "-o", b]) == 2
    assert _state(b) == before and _no_temps(tmp_path)
    # copying from the file itself, in place, is still an in-place edit
    r = edit_metadata(a, set_items={"k": "v"}, copy_from=a)
    assert r.in_place


def test_convert_never_replaces_the_peft_config_its_alphas_come_from(tmp_path, capsys):
    # PEFT's save_pretrained layout (peft/peft_model.py: adapter_model.safetensors + adapter_config.json,
    # keys from get_peft_model_state_dict: "base_model.model.<module>.lora_A.weight")
    d = tmp_path / "peft"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"base_model.model.transformer_blocks.0.attn.to_k.lora_A.weight": torch.randn(4, 32, generator=g),
               "base_model.model.transformer_blocks.0.attn.to_k.lora_B.weight": torch.randn(32, 4, generator=g)},
              str(d / "adapter_model.safetensors"))
    cfg = d / "adapter_config.json"
    cfg.write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    _old(cfg)
    before = _state(cfg)
    with pytest.raises(OutputError, match="adapter_config.json"):
        lorakit.convert(str(d / "adapter_model.safetensors"), str(cfg), to="kohya")
    assert main(["convert", str(d / "adapter_model.safetensors"), "-o", str(cfg), "--to", "kohya"]) == 2
    assert _one_line(capsys.readouterr().err)
    assert _state(cfg) == before and _no_temps(d)


@pytest.mark.parametrize("cmd", ["bake", "merge"])
@pytest.mark.parametrize("how", ["recipe-output", "dash-o"])
def test_a_recipe_is_never_its_own_output(tmp_path, cmd, how, capsys):
    lora = _lora(tmp_path)
    recipe = tmp_path / "r.yaml"
    body = {"inputs": [os.path.basename(lora)]}
    if cmd == "bake":
        body["base"] = os.path.basename(make_base(tmp_path, "bfl"))
    if how == "recipe-output":
        body["output"] = "r.yaml"
    recipe.write_text(json.dumps(body))      # JSON is YAML
    _old(recipe)
    before = _state(recipe)
    argv = [cmd, "--recipe", str(recipe)] + (["-o", str(recipe)] if how == "dash-o" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert _one_line(err) and "recipe" in err
    assert _state(recipe) == before and _no_temps(tmp_path)


def test_bake_text_encoder_file_is_an_input(tmp_path):
    from test_bake_util import TINY_CLIP, write_te_file
    base = make_base(tmp_path, "bfl")
    clip = write_te_file(str(tmp_path / "clip.safetensors"), "clip_l", TINY_CLIP)
    lora = write_kohya_all(str(tmp_path / "l.safetensors"), clip=TINY_CLIP)
    _old(clip)
    before = _state(clip)
    with pytest.raises(OutputError):
        lorakit.bake(base, [lora], str(tmp_path / "o.safetensors"), clip_l=clip, clip_l_out=clip, progress=False)
    with pytest.raises(OutputError):
        lorakit.bake(base, [lora], clip, clip_l=clip, clip_l_out=str(tmp_path / "c2.safetensors"), progress=False)
    assert _state(clip) == before and _no_temps(tmp_path)


# ---------------------------------------------------------------------------------------------
# Special files and symlinks as -o
# ---------------------------------------------------------------------------------------------

def test_fifo_output_is_refused_and_stays_a_fifo(tmp_path, capsys):
    lora = _lora(tmp_path)
    fifo = str(tmp_path / "out.safetensors")
    os.mkfifo(fifo)
    for argv in (["convert", lora, "-o", fifo, "--to", "diffusers"], ["meta", lora, "--set", "a=b", "-o", fifo],
                 ["resize", lora, "-o", fifo, "--rank", "2"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert _one_line(err) and "FIFO" in err
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert _no_temps(tmp_path)


def test_character_device_output_is_refused_before_anything_is_written():
    # only the check itself: a regression must not be able to replace the system's /dev/null
    with pytest.raises(OutputError, match="character device"):
        check_output_path("/dev/null")


def test_fifo_input_is_refused_without_blocking(tmp_path):
    fifo = str(tmp_path / "in.safetensors")
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "lorakit", "inspect", fifo], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
    assert proc.returncode == 2 and _one_line(proc.stderr) and "regular file" in proc.stderr


def test_symlinks_are_followed_meta_in_place_edits_the_target(tmp_path):
    real = _lora(tmp_path, "real.safetensors")
    link = str(tmp_path / "link.safetensors")
    os.symlink("real.safetensors", link)
    edit_metadata(link, set_items={"note": "edited"})
    assert os.path.islink(link) and os.readlink(link) == "real.safetensors"
    with open_weights(real) as f:
        assert f.metadata["note"] == "edited"
    # -o through a symlink: the link stays, its target gets the new content
    other = _lora(tmp_path, "other.safetensors")
    target = str(tmp_path / "target.safetensors")
    save_file({"x": torch.zeros(1)}, target)
    out_link = str(tmp_path / "out_link.safetensors")
    os.symlink(target, out_link)
    lorakit.convert(other, out_link, to="diffusers")
    assert os.path.islink(out_link)
    assert any(k.endswith("lora_A.weight") for k in load_file(target))
    # a symlink to an input is that input; a dangling link is refused
    link_to_input = str(tmp_path / "to_input.safetensors")
    os.symlink(other, link_to_input)
    with pytest.raises(OutputError, match="same as input"):
        lorakit.convert(other, link_to_input, to="kohya")
    dangling = str(tmp_path / "dangling.safetensors")
    os.symlink(str(tmp_path / "nowhere" / "x.safetensors"), dangling)
    with pytest.raises(OutputError, match="dangling"):
        lorakit.convert(other, dangling, to="kohya")
    assert _no_temps(tmp_path)


# ---------------------------------------------------------------------------------------------
# Short reads in the cross-device copy fallback
# ---------------------------------------------------------------------------------------------

def test_base_truncated_during_a_cross_device_bake_publishes_nothing(tmp_path, monkeypatch):
    base = make_base(tmp_path, "bfl")
    lora = _lora(tmp_path)
    out = str(tmp_path / "out.safetensors")
    calls = {"copy": 0, "pread": 0}

    def cross_device(src, dst, count, offset_src=None, offset_dst=None):
        calls["copy"] += 1          # the output is on another filesystem: the kernel copy is refused
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    real_pread = os.pread

    def truncated(fd, n, offset):
        # the header (offsets 0 and 8) was read intact; the data section is gone by the time it is copied
        # (what pread returns after the file was truncated underneath: b""). Tensors the bake changes are
        # read with preadv and stay intact, so only the copy fallback sees the truncation.
        if offset > 8:
            calls["pread"] += 1
            return b""
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "copy_file_range", cross_device)
    monkeypatch.setattr(os, "pread", truncated)
    with pytest.raises(InputFileError, match="ended"):
        lorakit.bake(base, [lora], out, progress=False)
    assert calls["copy"] >= 1 and calls["pread"] >= 1
    assert not os.path.exists(out) and _no_temps(tmp_path)


def test_short_pread_in_the_copy_fallback_is_an_error(tmp_path, monkeypatch):
    from lorakit.io.ranges import copy_slow
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(bytes(range(256)) * 64)
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: real_pread(fd, min(n, 100), off) if off < 1000 else b"")
    with open(src, "rb") as fs, open(dst, "wb") as fd:
        with pytest.raises(InputFileError, match="early"):
            copy_slow(fs.fileno(), fd.fileno(), 4096, 0, 0, str(src))
        monkeypatch.setattr(os, "pread", real_pread)
        copy_slow(fs.fileno(), fd.fileno(), 4096, 10, 0, str(src))   # short reads that do arrive are fine
    assert dst.read_bytes()[:4096] == (bytes(range(256)) * 64)[10:4106]


# ---------------------------------------------------------------------------------------------
# Never write a header lorakit would refuse to read
# ---------------------------------------------------------------------------------------------

def _raw_with_header_size(path: str, src: str, n: int) -> str:
    """``src``'s tensors with a ``notes`` metadata value sized so that the header is exactly ``n`` bytes."""
    with open(src, "rb") as fh:
        raw = fh.read()
    hn = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + hn])
    header["__metadata__"] = {**header.get("__metadata__", {}), "notes": ""}
    fill = n - len(json.dumps(header).encode())
    header["__metadata__"]["notes"] = "x" * fill
    text = json.dumps(header).encode()
    assert len(text) == n
    with open(path, "wb") as fh:
        fh.write(n.to_bytes(8, "little") + text + raw[8 + hn:])
    return path


def test_meta_set_and_convert_refuse_headers_past_the_read_limit(tmp_path, capsys):
    src = _lora(tmp_path, "src.safetensors")
    near = _raw_with_header_size(str(tmp_path / "near.safetensors"), src, MAX_HEADER_BYTES - 16)
    with open_weights(near) as f:       # lorakit reads it (the limit is inclusive)
        assert len(f.metadata["notes"]) > MAX_HEADER_BYTES - 10_000
    _old(near)
    before = _state(near)
    with pytest.raises(OutputError, match="limit"):
        edit_metadata(near, set_items={"more": "y" * 64})
    assert main(["convert", near, "-o", str(tmp_path / "c.safetensors"), "--to", "diffusers"]) == 2
    assert _one_line(capsys.readouterr().err)
    assert _state(near) == before
    assert not os.path.exists(tmp_path / "c.safetensors") and _no_temps(tmp_path)
    # deleting a key from a near-limit file still works (it shrinks the header)
    edit_metadata(near, delete=["notes"])
    with open_weights(near) as f:
        assert "notes" not in f.metadata


# ---------------------------------------------------------------------------------------------
# Temporary names: NAME_MAX, exact pattern, stale ones cleaned
# ---------------------------------------------------------------------------------------------

def test_a_legal_252_byte_output_name_works(tmp_path):
    lora = _lora(tmp_path)
    for stem in ("a" * 240, "é" * 120):                        # 252 bytes, ASCII and two-byte UTF-8
        out = str(tmp_path / (stem + ".safetensors"))
        assert len(os.fsencode(os.path.basename(out))) == 252
        lorakit.convert(lora, out, to="diffusers")
        assert os.path.isfile(out)
        name = temp_name(os.path.basename(out), str(tmp_path))
        assert len(os.fsencode(name)) <= 255 and is_temp_name(name)
    assert _no_temps(tmp_path)


def test_stale_temp_files_are_removed_by_exact_pattern_only(tmp_path, capsys):
    lora = _lora(tmp_path)
    dead, tag = _dead_pid(), host_tag()
    stale = tmp_path / f".out.safetensors.{tag}-{dead}-0123abcd{TEMP_SUFFIX}"
    stale.write_bytes(b"half a file")
    stale_dir = tmp_path / f".sharded.{tag}-{dead}-89abcdef{TEMP_SUFFIX}"
    stale_dir.mkdir()
    (stale_dir / SHARDS[0]).write_bytes(b"half a shard")
    alive = tmp_path / f".out.safetensors.{tag}-{os.getppid()}-0123abcd{TEMP_SUFFIX}"
    alive.write_bytes(b"someone is writing me")
    foreign = tmp_path / f".out.safetensors.{'0' * 8 if tag != '0' * 8 else '1' * 8}-{dead}-0123abcd{TEMP_SUFFIX}"
    foreign.write_bytes(b"another host's (or container's) pid")
    keep = [alive, foreign, tmp_path / f".out.safetensors.{dead}{TEMP_SUFFIX}",      # not the exact pattern
            tmp_path / f"out.safetensors.{tag}-{dead}-0123abcd{TEMP_SUFFIX}",        # no leading dot
            tmp_path / f".x.{tag}-{dead}-0123abcd{TEMP_SUFFIX}.bak", tmp_path / "mine.safetensors"]
    for p in keep[2:]:
        p.write_bytes(b"user data")
    link = tmp_path / f".l.{tag}-{dead}-0123abcd{TEMP_SUFFIX}"
    os.symlink(str(tmp_path / "mine.safetensors"), link)
    keep.append(link)
    states = {p: os.lstat(p).st_mtime_ns for p in keep}
    lorakit.convert(lora, str(tmp_path / "out.safetensors"), to="diffusers")
    err = capsys.readouterr().err
    assert not stale.exists() and not stale_dir.exists()
    assert str(stale) in err and str(stale_dir) in err and err.count("warning: removed") == 2
    for p, mtime in states.items():
        assert os.path.lexists(p) and os.lstat(p).st_mtime_ns == mtime, p


def _kill_mid_write(argv: list[str], folder) -> str:
    env = {**os.environ, "LORAKIT_TEST_SLOW_WRITE": "0.2", "PYTHONPATH": os.path.join(ROOT, "src")}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    found: list[str] = []
    while time.time() < deadline and not found and proc.poll() is None:
        found = [n for n in os.listdir(folder) if n.endswith(TEMP_SUFFIX)]
        time.sleep(0.01)
    assert found and proc.poll() is None, "the command finished before it could be killed"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert str(proc.pid) in found[0] and is_temp_name(found[0])
    return os.path.join(str(folder), found[0])


@pytest.mark.parametrize("layout", ["bfl", "sharded"])
def test_sigkill_mid_bake_leaves_a_temp_that_the_next_run_removes(tmp_path, layout, capsys):
    base = make_base(tmp_path, layout)
    lora = _lora(tmp_path)
    out_dir = tmp_path / "outs"
    out_dir.mkdir()
    out = str(out_dir / ("baked" if layout == "sharded" else "baked.safetensors"))
    left = _kill_mid_write(["bake", base, lora, "-o", out, "--no-progress"], out_dir)
    assert os.path.lexists(left) and not os.path.exists(out)
    assert main(["bake", base, lora, "-o", out, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert not os.path.lexists(left) and f"removed {left!r}" in err
    assert sorted(os.listdir(out_dir)) == [os.path.basename(out)]
