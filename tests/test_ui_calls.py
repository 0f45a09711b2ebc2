"""The UI's library calls (lorakit.ui.calls/jobs/reports) without a browser: each screen's call writes the
same bytes as the matching command with the same options, a cancelled job leaves no file, errors are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import save_file

from lorakit.cli import main
from lorakit.errors import Interrupted, UsageError
from lorakit.ui import calls, reports
from lorakit.ui.jobs import CANCELLED, Job, JobBoard, one_line
from test_bake_util import make_base

MODULES = {"lora_unet_double_blocks_0_img_attn_proj": (32, 32), "lora_unet_double_blocks_1_txt_mlp_0": (128, 32),
           "lora_unet_single_blocks_0_linear2": (32, 160)}


def _lora(path, rank: int, seed: int) -> str:
    """A tiny kohya-style FLUX.1 LoRA written by safetensors itself."""
    gen = torch.Generator().manual_seed(seed)
    t = {}
    for name, (out, inp) in MODULES.items():
        t[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=gen)
        t[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=gen) * 0.1
        t[f"{name}.alpha"] = torch.tensor(rank / 2)
    save_file(t, str(path))
    return str(path)


@pytest.fixture
def two(tmp_path):
    return _lora(tmp_path / "a.safetensors", 4, 1), _lora(tmp_path / "b.safetensors", 2, 2)


def _same(ui_dir, cli_dir, name: str) -> None:
    assert (ui_dir / name).read_bytes() == (cli_dir / name).read_bytes()


@pytest.fixture
def dirs(tmp_path):
    ui, cli = tmp_path / "ui", tmp_path / "cli"
    ui.mkdir()
    cli.mkdir()
    return ui, cli


def test_merge_svd_with_blocks_equals_the_cli(two, dirs):
    a, b = two
    ui, cli = dirs
    r = calls.run_merge(calls.weighted_inputs([a, b, "  "], [0.7, -0.3, 1.0]), str(ui / "m.safetensors"),
                        method="svd", rank=3, conv_rank=None, to="diffusers", blocks="double_blocks.1=0.5",
                        dtype="fp16", density=None, seed=0, progress=None)
    assert main(["merge", f"{a}:0.7", f"{b}:-0.3", "-o", str(cli / "m.safetensors"), "--method", "svd", "--rank", "3",
                 "--to", "diffusers", "--blocks", "double_blocks.1=0.5", "--dtype", "fp16"]) in (0, 1)
    _same(ui, cli, "m.safetensors")
    assert "svd" in reports.merge_summary(r) and "blocks: double_blocks.1=0.5" in reports.merge_summary(r)


def test_merge_dare_passes_the_seed_and_density(two, dirs):
    a, b = two
    ui, cli = dirs
    calls.run_merge(calls.weighted_inputs([a, b], [1, 1]), str(ui / "d.safetensors"), method="dare_linear", rank=4,
                    conv_rank=None, to="kohya", blocks=None, dtype=calls.KEEP, density=0.5, seed=7, progress=None)
    assert main(["merge", a, b, "-o", str(cli / "d.safetensors"), "--method", "dare_linear", "--rank", "4",
                 "--density", "0.5", "--seed", "7"]) in (0, 1)
    _same(ui, cli, "d.safetensors")


def test_convert_resize_equal_the_cli(two, dirs):
    a, _ = two
    ui, cli = dirs
    calls.run_convert(a, str(ui / "c.safetensors"), "comfy", "bf16", False, None)
    assert main(["convert", a, "-o", str(cli / "c.safetensors"), "--to", "comfy", "--dtype", "bf16"]) in (0, 1)
    _same(ui, cli, "c.safetensors")
    r = calls.run_resize(a, str(ui / "r.safetensors"), rank=2, conv_rank=None, dynamic=None, dtype=calls.KEEP,
                         progress=None)
    assert main(["resize", a, "-o", str(cli / "r.safetensors"), "--rank", "2"]) in (0, 1)
    _same(ui, cli, "r.safetensors")
    assert "→ 2" in reports.resize_summary(r)


def test_extract_and_bake_equal_the_cli(tmp_path, two, dirs):
    a, _ = two
    ui, cli = dirs
    (tmp_path / "o").mkdir()
    (tmp_path / "t").mkdir()
    o = make_base(tmp_path / "o", "bfl", seed=0)
    t = make_base(tmp_path / "t", "bfl", seed=1)
    r = calls.run_extract(o, t, str(ui / "x.safetensors"), rank=2, conv_rank=None, dynamic=None, to="kohya",
                          dtype=calls.KEEP, progress=None)
    assert main(["extract", o, t, "-o", str(cli / "x.safetensors"), "--rank", "2"]) in (0, 1)
    _same(ui, cli, "x.safetensors")
    assert "alpha written" in reports.extract_summary(r)
    b = calls.run_bake(o, calls.weighted_inputs([a], [0.8]), str(ui / "baked.safetensors"), dtype=calls.KEEP,
                       allow_partial=False, progress=None)
    assert main(["bake", o, f"{a}:0.8", "-o", str(cli / "baked.safetensors")]) in (0, 1)
    _same(ui, cli, "baked.safetensors")
    assert "2 of" not in reports.bake_summary(b) and "3 of 3 modules applied" in reports.bake_summary(b)


def test_a_cancelled_bake_leaves_no_file(tmp_path, two, monkeypatch):
    import lorakit.ops.baking.pipeline as pipeline
    monkeypatch.setattr(pipeline, "SLOW_WRITE_HOOK", 0.02)    # the writers' public test hook: a bake of ~1.7 s
    a, _ = two
    base = make_base(tmp_path, "bfl")
    out = tmp_path / "out"
    out.mkdir()
    started = threading.Event()

    def call(hook):
        def progress(done, total, item=""):
            started.set()
            hook(done, total, item)
        return calls.run_bake(base, calls.weighted_inputs([a], [1.0]), str(out / "baked.safetensors"),
                              dtype=calls.KEEP, allow_partial=False, progress=progress)

    job = Job(call).start()
    assert started.wait(30)
    board = JobBoard()
    board.put("s", "bake", job)
    assert board.cancel("s", "bake")
    snap = job.wait(60)
    assert snap.finished and snap.cancelled and snap.error is None and job.result is None
    assert os.listdir(out) == []           # neither the output nor a temporary file
    assert not board.cancel("s", "bake")   # nothing runs any more


def test_a_job_reports_progress_and_its_result():
    seen = []

    def call(hook):
        for i in range(3):
            hook(i, 3, f"m{i}")
            seen.append(i)
        hook(3, 3)
        return "done"

    job = Job(call).start()
    snap = job.wait(10)
    assert job.result == "done" and snap.finished and not snap.cancelled and snap.fraction == 1.0
    assert seen == [0, 1, 2]


def test_a_cancel_at_the_last_step_lets_the_job_finish():
    job: Job[str] = Job(lambda hook: (job.cancel(), hook(1, 1), "written")[-1])
    job.start()
    snap = job.wait(10)
    assert job.result == "written" and not snap.cancelled


def test_errors_are_one_line_with_the_fix(tmp_path):
    job = Job(lambda hook: calls.run_merge(calls.weighted_inputs([str(tmp_path / "nope.safetensors")], [1.0]),
                                           str(tmp_path / "o.safetensors"), method="concat", rank=None,
                                           conv_rank=None, to="kohya", blocks=None, dtype="keep", density=None,
                                           seed=None, progress=hook)).start()
    snap = job.wait(10)
    assert snap.error is not None and snap.error.startswith("error: ") and "nope.safetensors" in snap.error
    assert "\n" not in snap.error and not os.path.exists(tmp_path / "o.safetensors")
    assert one_line(UsageError("bad.", hint="do this.")) == "error: bad. Fix: do this."
    assert one_line(ValueError("x\ny")).startswith("internal error: ValueError: x y (this is a bug")
    assert one_line(Interrupted(CANCELLED)) == f"error: {CANCELLED}"


def test_ui_values_map_to_library_arguments(tmp_path):
    assert calls.optional_int(0) is None and calls.optional_int(None) is None and calls.optional_int(4.0) == 4
    assert calls.output_path("x.safetensors", str(tmp_path), "d.safetensors") == str(tmp_path / "x.safetensors")
    assert calls.output_path("", str(tmp_path), "d.safetensors") == str(tmp_path / "d.safetensors")
    assert calls.output_path("/abs/y.safetensors", str(tmp_path), "d") == "/abs/y.safetensors"
    with pytest.raises(UsageError, match="no LoRA given"):
        calls.input_path("  ", "LoRA")
    with pytest.raises(UsageError, match="no LoRA to merge"):
        calls.run_merge([], "o", method="concat", rank=None, conv_rank=None, to="kohya", blocks=None, dtype="keep",
                        density=None, seed=None, progress=None)


def test_coverage_rows_come_from_the_inspect_report(two):
    from lorakit.ops.inspection import inspect_lora
    rows = reports.coverage_rows(inspect_lora(two[0]))
    present = {(r[1], r[2]) for r in rows if r[2]}
    assert sum(r[2] for r in rows) == len(MODULES)
    assert all(r[3] and r[2] <= r[3] for r in rows if r[3]) and present
    assert reports.coverage_rows({"components": {"x": {"label": "X", "present": 0, "total": None}}}) == \
        [["X", "(all)", 0, None, "?"]]


def test_the_app_builds_with_its_element_ids(tmp_path):
    pytest.importorskip("gradio", reason="gradio not installed (pip install 'lorakit[ui]')")
    from lorakit.ui.app import build_app
    app = build_app(str(tmp_path))
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    for op in ("convert", "merge", "bake", "extract", "resize"):
        assert {f"{op}-run", f"{op}-cancel", f"{op}-status", f"{op}-saved"} <= ids
    assert {"inspect-run", "inspect-coverage", "doctor-run", "merge-upload", "merge-weight-0"} <= ids


def test_ui_command_is_registered_and_bound_to_localhost():
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src")}
    out = subprocess.run([sys.executable, "-m", "lorakit", "ui", "--help"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "127.0.0.1" in out.stdout and "--port" in out.stdout


def test_missing_gradio_is_a_one_line_error(monkeypatch, capsys):
    import builtins
    real = builtins.__import__

    def no_gradio(name, *a, **k):
        if name == "gradio" or name.startswith("gradio."):
            raise ImportError("No module named 'gradio'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    assert main(["ui", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "lorakit ui: error: the web UI needs gradio, which is not installed. Fix: install the " \
                          "UI extra: pip install 'lorakit[ui]'."


def test_a_busy_port_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gradio", reason="gradio not installed (pip install 'lorakit[ui]')")
    import socket
    from lorakit.ops import metadata
    monkeypatch.setattr(metadata, "_RECORD_COMMAND", True)    # launch() turns it off: restored after the test
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["ui", "--port", str(port), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lorakit ui: error: cannot serve the UI on 127.0.0.1:{port}")
    assert "Fix: pick a free --port" in err[0]


def test_the_ui_does_not_record_its_own_command_line(monkeypatch):
    from lorakit.ops import metadata
    monkeypatch.setattr(metadata, "_RECORD_COMMAND", True)
    monkeypatch.setattr(metadata.sys, "argv", ["/usr/bin/lorakit", "ui", "--port", "7860"])
    assert json.loads(metadata.provenance("merge", []))["command"] == "lorakit ui --port 7860"
    metadata.record_command_line(False)       # what lorakit.ui.launch does before serving
    assert "command" not in json.loads(metadata.provenance("merge", []))


def test_a_screen_run_yields_progress_and_result_and_stops_with_its_page(tmp_path):
    pytest.importorskip("gradio", reason="gradio not installed (pip install 'lorakit[ui]')")
    from lorakit.ui.app import Screens
    s = Screens(str(tmp_path))
    seen: list[float] = []
    gate = threading.Event()

    def call(hook):
        hook(1, 4, "a")
        gate.wait(10)
        hook(2, 4, "b")
        return "result"

    gen = s.run("t", None, lambda f, desc=None: seen.append(f), call, lambda r: f"did {r}", lambda r: None)
    assert next(gen)[0] == "running…"
    gate.set()
    last = list(gen)[-1]
    assert last[0] == "did result" and last[2] == "" and seen and 0 < seen[0] <= 0.5

    stopped = threading.Event()

    def slow(hook):
        for i in range(1000):
            try:
                hook(i, 1000, "")
            except Interrupted:
                stopped.set()
                raise
            threading.Event().wait(0.01)
        return "never"

    gen = s.run("t", None, lambda f, desc=None: None, slow, str, lambda r: None)
    next(gen)
    gen.close()                  # gradio closes the generator when the page goes away
    assert stopped.wait(10)


def test_inspect_equals_the_cli_and_draws_the_library_picture(two, capsys):
    a, _ = two
    r = calls.run_inspect(a)
    assert main(["inspect", a, "--strength", "--json"]) == 0
    assert reports.as_json(r) == json.loads(capsys.readouterr().out)
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install 'lorakit[plot]')")
    img = reports.picture("strength", r)
    assert img is not None and img.size[0] > 100 and img.size[1] > 100
    assert reports.picture("strength", {"strength": {"blocks": []}}) is None
    d = calls.run_doctor([a], None).loras[0].to_json()
    assert reports.picture("doctor", d) is not None and reports.picture("doctor", {"coverage": {}}) is None
