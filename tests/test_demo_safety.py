"""The demo never removes or replaces files it did not create (issue 11, item 4): it writes only into a
folder it creates (or an existing empty one) and refuses a non-empty one, touching nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lorakit.samples.demo import cli, prepare_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snapshot(folder) -> dict[str, tuple[bytes, int]]:
    out = {}
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = (fh.read(), os.stat(p).st_mtime_ns)
    return out


def test_demo_refuses_a_folder_holding_a_users_file(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "my_lora.safetensors").write_bytes(b"my precious LoRA, not even valid safetensors")
    (folder / "tiny_flux_base.safetensors").write_bytes(b"a file with the name the demo writes")
    (folder / "notes.txt").write_text("keep me")
    for p in folder.iterdir():
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    before = _snapshot(folder)
    assert cli([str(folder)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(folder) == before


def test_demo_refuses_a_file_as_folder(tmp_path, capsys):
    f = tmp_path / "demo-out"
    f.write_bytes(b"x")
    assert cli([str(f)]) == 2
    assert f.read_bytes() == b"x"


def test_demo_writes_only_into_the_fresh_folder_it_creates(tmp_path):
    neighbour = tmp_path / "my_lora.safetensors"
    neighbour.write_bytes(b"next to the demo folder")
    os.utime(neighbour, ns=(1_000_000_000, 1_000_000_000))
    before = _snapshot(tmp_path)
    folder = tmp_path / "fresh"
    proc = subprocess.run([sys.executable, "-m", "lorakit.samples.demo", str(folder)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("fresh" + os.sep)} == before
    assert "fresh/aitoolkit_style.safetensors" in after
    # a second run into the same (now non-empty) folder refuses and changes nothing
    again = subprocess.run([sys.executable, "-m", "lorakit.samples.demo", str(folder)], capture_output=True, text=True,
                           timeout=600, env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
    assert again.returncode == 2 and "not empty" in again.stderr
    assert _snapshot(tmp_path) == after


def test_existing_empty_folder_is_accepted(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    prepare_folder(str(folder))
    assert os.listdir(folder) == []


def test_demo_help_mentions_the_rule(capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["--help"])
    assert exc.value.code == 0
    assert "must be empty" in capsys.readouterr().out
