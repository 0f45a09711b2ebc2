"""Batches: several files, folders and globs through one runner — a record per file with its own verdict, the
run's exit code the worst, one bad file never stopping the rest, every good output written, --jobs in parallel
processes giving the same records."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.cli.main import main
from lorakit.ops.batch import Item, Record, expand_inputs, plan_outputs, run_batch

H = 32


def _flux_lora(path, seed: int, extra: dict[str, torch.Tensor] | None = None) -> str:
    """A kohya FLUX.1 LoRA on two modules (written with the reference safetensors package)."""
    g = torch.Generator().manual_seed(seed)
    t = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(4, H, generator=g),
         "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(H, 4, generator=g),
         "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(2.0),
         "lora_unet_single_blocks_1_linear2.lora_down.weight": torch.randn(4, H + 4 * H, generator=g),
         "lora_unet_single_blocks_1_linear2.lora_up.weight": torch.randn(H, 4, generator=g)}
    save_file({**t, **(extra or {})}, str(path))
    return str(path)


SDXL_MODULES = {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k": (640, 2048),
                "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2": (1280, 5120),
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)}


def _sdxl_lora(path) -> str:
    g = torch.Generator().manual_seed(5)
    t = {}
    for stem, (o, i) in SDXL_MODULES.items():
        t[f"{stem}.lora_down.weight"] = torch.randn(2, i, generator=g)
        t[f"{stem}.lora_up.weight"] = torch.randn(o, 2, generator=g)
    save_file(t, str(path))
    return str(path)


@pytest.fixture
def folder(tmp_path) -> dict[str, str]:
    """good1, good2 (FLUX.1), sdxl, a truncated copy of good1, a harmless pickle named .safetensors, a base."""
    from lorakit.samples.synthetic import write_base
    d = tmp_path / "in"
    d.mkdir()
    f = {"good1": _flux_lora(d / "good1.safetensors", 1), "good2": _flux_lora(d / "good2.safetensors", 2),
         "sdxl": _sdxl_lora(d / "sdxl.safetensors")}
    raw = open(f["good1"], "rb").read()
    (d / "trunc.safetensors").write_bytes(raw[:len(raw) - 100])
    f["trunc"] = str(d / "trunc.safetensors")
    torch.save({"w": torch.zeros(2)}, d / "pickled.safetensors")
    f["pickled"] = str(d / "pickled.safetensors")
    f["base"] = write_base(d / "base.safetensors")
    f["dir"] = str(d)
    return f


def _records(capsys) -> dict[str, dict]:
    out = json.loads(capsys.readouterr().out)
    return {os.path.basename(r["file"]): r for r in out["files"]}


def test_inspect_folder_one_record_per_file(folder, capsys) -> None:
    rc = main(["inspect", folder["dir"], "--json"])
    r = _records(capsys)
    assert sorted(r) == ["base.safetensors", "good1.safetensors", "good2.safetensors", "pickled.safetensors",
                         "sdxl.safetensors", "trunc.safetensors"]
    assert r["good1.safetensors"]["status"] == "ok" and r["good1.safetensors"]["result"]["architecture"] == "flux1"
    assert r["sdxl.safetensors"]["status"] == "ok" and r["sdxl.safetensors"]["result"]["architecture"] == "sdxl"
    assert r["trunc.safetensors"]["error"]["type"] == "HeaderError"
    assert r["pickled.safetensors"]["error"]["type"] == "PickleRefusedError"      # by content, not by name
    assert r["base.safetensors"]["error"]["type"] == "NotALoraError"
    assert rc == 2 and all(x["exit_code"] == 2 for x in r.values() if x["status"] == "error")


def test_convert_folder_writes_every_good_output(folder, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    rc = main(["convert", folder["dir"], "--to", "diffusers", "-o", str(out), "--json"])
    r = _records(capsys)
    assert rc == 2
    assert sorted(os.listdir(out)) == ["good1.safetensors", "good2.safetensors", "sdxl.safetensors"]
    for name in ("good1", "good2", "sdxl"):
        assert r[f"{name}.safetensors"]["status"] == "ok"
        assert r[f"{name}.safetensors"]["output"] == str(out / f"{name}.safetensors")
        assert load_file(str(out / f"{name}.safetensors"))
        assert main(["diff", folder[name], str(out / f"{name}.safetensors")]) == 0    # each one exact
    capsys.readouterr()
    assert {r[n]["status"] for n in ("trunc.safetensors", "pickled.safetensors", "base.safetensors")} == {"error"}


def test_doctor_folder_verdicts_and_worst_exit(folder, capsys) -> None:
    rc = main(["doctor", folder["dir"], "--json"])
    out = json.loads(capsys.readouterr().out)
    v = {os.path.basename(d["file"]): d["verdict"] for d in out["loras"]}
    assert v == {"base.safetensors": "INVALID", "good1.safetensors": "OK", "good2.safetensors": "OK",
                 "pickled.safetensors": "INVALID", "sdxl.safetensors": "OK", "trunc.safetensors": "INVALID"}
    assert rc == 2 == out["exit_code"]


def test_exit_is_the_worst_and_globs(folder, tmp_path, capsys) -> None:
    partial = _flux_lora(tmp_path / "in" / "odd.safetensors", 3, {"something_else.weight": torch.zeros(2)})
    rc = main(["inspect", os.path.join(folder["dir"], "good*.safetensors"), partial, "--json"])
    r = _records(capsys)
    assert sorted(r) == ["good1.safetensors", "good2.safetensors", "odd.safetensors"]
    assert r["odd.safetensors"]["status"] == "warning" and r["odd.safetensors"]["exit_code"] == 1
    assert rc == 1


def test_resize_and_meta_batches(folder, tmp_path, capsys) -> None:
    out = tmp_path / "small"
    files = [folder["good1"], folder["good2"], folder["trunc"]]
    assert main(["resize", *files, "--rank", "2", "-o", str(out)]) == 2
    text = capsys.readouterr().out
    assert text.count("OK ") == 2 and "ERROR" in text
    for name in ("good1", "good2"):
        t = load_file(str(out / f"{name}.safetensors"))
        assert {v.shape[0] for k, v in t.items() if k.endswith("lora_down.weight")} == {2}
    assert main(["meta", folder["good1"], folder["good2"], "--set", "ss_output_name=x", "-o", str(tmp_path / "m")]) == 0
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m" / "good2.safetensors"), "pt") as f:
        assert f.metadata()["ss_output_name"] == "x"
    with safe_open(folder["good2"], "pt") as f:
        assert "ss_output_name" not in (f.metadata() or {})         # inputs untouched


def test_names_kept_recursive_and_collisions_refused(tmp_path) -> None:
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    for p in ("a/x.safetensors", "a/sub/y.safetensors", "b/x.safetensors", "a/notes.txt"):
        (tmp_path / p).write_bytes(b"")
    flat = expand_inputs([str(tmp_path / "a")])
    assert [os.path.basename(p) for p, _ in flat] == ["x.safetensors"]
    deep = expand_inputs([str(tmp_path / "a")], recursive=True)
    items = plan_outputs(deep, str(tmp_path / "out"))
    assert [i.output for i in items] == [str(tmp_path / "out" / "x.safetensors"),
                                         str(tmp_path / "out" / "sub" / "y.safetensors")]
    from lorakit.errors import UsageError
    with pytest.raises(UsageError, match="would both be written"):
        plan_outputs(expand_inputs([str(tmp_path / "a"), str(tmp_path / "b")]), str(tmp_path / "out"))


def _boom(item: Item) -> Record:
    if item.path.endswith("2"):
        raise RuntimeError("a bug")
    return Record(item.path, "ok", 0, "fine")


def test_runner_survives_bugs_and_runs_parallel_processes(folder) -> None:
    seen: list[tuple[int, int, str]] = []
    rep = run_batch(_boom, [Item("f1"), Item("f2"), Item("f3")], progress=lambda d, t, f: seen.append((d, t, f)))
    assert [r.status for r in rep.records] == ["ok", "error", "ok"] and rep.exit_code == 70
    assert seen == [(1, 3, "f1"), (2, 3, "f2"), (3, 3, "f3")]           # progress over the batch
    from lorakit.ops.batch_tasks import InspectTask
    items = [Item(folder[k]) for k in ("good1", "trunc", "sdxl", "good2")]
    one = run_batch(InspectTask(), items)
    two = run_batch(InspectTask(), items, jobs=2)
    assert [r.to_json() for r in two.records] == [r.to_json() for r in one.records]
    assert [r.status for r in two.records] == ["ok", "error", "ok", "ok"] and two.exit_code == 2


def test_doctor_jobs_gives_the_same_report(folder, capsys) -> None:
    assert main(["doctor", folder["dir"], "--json"]) == 2
    one = json.loads(capsys.readouterr().out)
    assert main(["doctor", folder["dir"], "--json", "--jobs", "2"]) == 2
    two = json.loads(capsys.readouterr().out)
    assert two == one
