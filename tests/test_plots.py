"""Pictures: ``inspect --plot``, ``diff --plot`` and ``doctor --plot`` draw per-block numbers with the
architecture's block names. Checked on the figure itself (its tick texts and bar heights), against the numbers
``--json`` reports and against ‖s·B·A‖_F computed densely here."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from lorakit.cli.main import main

pytest.importorskip("matplotlib")

# SDXL kohya modules: block (LoRA Block Weight id, or component) -> (key stem, ΔW shape)
SDXL = {"IN04": ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", (640, 2048)),
        "M00": ("lora_unet_middle_block_1_transformer_blocks_9_ff_net_2", (1280, 5120)),
        "OUT02": ("lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_q", (1280, 1280)),
        "clip_l": ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", (768, 768))}


def _sdxl(path, scale_up: dict[str, float] | None = None) -> tuple[str, dict[str, float]]:
    """An SDXL LoRA (rank 2, α 1: scale 1/2) and each block's ‖ΔW‖_F computed densely."""
    g = torch.Generator().manual_seed(3)
    t, norms = {}, {}
    for block, (stem, (o, i)) in SDXL.items():
        down = torch.randn(2, i, generator=g)
        up = torch.randn(o, 2, generator=g) * (scale_up or {}).get(block, 1.0)
        t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"] = down, up
        t[f"{stem}.alpha"] = torch.tensor(1.0)
        norms[block] = float(torch.linalg.matrix_norm(0.5 * up.double() @ down.double()))
    save_file(t, str(path))
    return str(path), norms


@pytest.fixture
def figures(monkeypatch) -> list:
    """Every figure the CLI saves (captured on the way to the file, which is still written)."""
    import lorakit.ops.plots as plots
    seen: list = []
    real = plots.save_figure

    def capture(fig, path):
        seen.append(fig)
        return real(fig, path)
    monkeypatch.setattr(plots, "save_figure", capture)
    return seen


def _bars(ax) -> tuple[list[str], list[float]]:
    return [t.get_text() for t in ax.get_xticklabels()], [p.get_height() for p in ax.patches]


def test_inspect_plot_labels_and_values(tmp_path, figures, capsys) -> None:
    path, dense = _sdxl(tmp_path / "x.safetensors")
    png = tmp_path / "s.png"
    assert main(["inspect", path, "--plot", str(png), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels, heights = _bars(figures[0].axes[0])
    assert labels == ["IN04", "M00", "OUT02", "clip_l"]          # the scheme's block ids, then the text encoder
    blocks = {b["block"]: b["norm"] for b in report["strength"]["blocks"]}
    assert list(blocks) == labels and heights == [blocks[b] for b in labels]       # the figure is the JSON
    for b in labels:
        assert blocks[b] == pytest.approx(dense[b], rel=1e-5)                     # and the JSON is ‖s·B·A‖_F


def test_diff_plot_per_block(tmp_path, figures, capsys) -> None:
    a, na = _sdxl(tmp_path / "a.safetensors")
    b, nb = _sdxl(tmp_path / "b.safetensors", {"M00": 3.0})
    assert main(["diff", a, b, "--plot", str(tmp_path / "d.png"), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    top, bottom = figures[0].axes[:2]
    labels = [t.get_text() for t in bottom.get_xticklabels()]
    assert labels == ["IN04", "M00", "OUT02", "clip_l"] == list(rep["slots"])
    bars_a = [p.get_height() for p in top.patches if p.get_gid() == "a"]
    heights = [p.get_height() for p in top.patches]
    assert heights[:4] == [rep["slots"][k]["norm_a"] for k in labels]
    assert heights[4:] == [rep["slots"][k]["norm_b"] for k in labels]
    assert bars_a == heights[:4]
    assert rep["slots"]["M00"]["norm_b"] == pytest.approx(3 * na["M00"], rel=1e-5)
    assert rep["slots"]["IN04"]["norm_b"] == pytest.approx(nb["IN04"], rel=1e-5)
    assert [p.get_height() for p in bottom.patches] == pytest.approx([1.0] * 4)      # same directions


def test_doctor_plot_marks_what_applies(tmp_path, figures, capsys) -> None:
    from lorakit.samples.synthetic import write_base
    base = write_base(tmp_path / "base.safetensors")                     # tiny FLUX.1: hidden 32, 2 double blocks
    g = torch.Generator().manual_seed(0)
    t = {}
    for blk in (0, 1, 5):                                                 # block 5 is not in the base
        stem = f"lora_unet_double_blocks_{blk}_img_attn_proj"
        t[f"{stem}.lora_down.weight"] = torch.randn(2, 32, generator=g)
        t[f"{stem}.lora_up.weight"] = torch.randn(32, 2, generator=g)
    save_file(t, str(tmp_path / "l.safetensors"))
    rc = main(["doctor", str(tmp_path / "l.safetensors"), "--base", base, "--plot", str(tmp_path / "p.png"), "--json"])
    d = json.loads(capsys.readouterr().out)["loras"][0]
    assert rc != 0 and (tmp_path / "p.png").exists()
    ax = figures[0].axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["D00", "D01", "D05"]
    applies = [p.get_height() for p in ax.patches if p.get_gid() == "applies"]
    heights = [p.get_height() for p in ax.patches]
    assert heights[:3] == [1, 1, 0] and heights[3:6] == [0, 0, 1]         # applies / will not apply
    assert applies == heights[:3]
    assert [(b["block"], b["applies"], b["not_applied"]) for b in d["coverage"]["blocks"]] == \
        [("D00", 1, 0), ("D01", 1, 0), ("D05", 0, 1)]


def test_clear_message_without_matplotlib(tmp_path, monkeypatch, capsys) -> None:
    path, _ = _sdxl(tmp_path / "x.safetensors")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["inspect", path, "--plot", str(tmp_path / "s.png")]) == 2
    assert "lorakit[plot]" in capsys.readouterr().err and not (tmp_path / "s.png").exists()


def test_heatmap_of_repeated_blocks(tmp_path, figures, capsys) -> None:
    g = torch.Generator().manual_seed(1)
    t, dense = {}, {}
    for blk in (0, 3):
        for part, native, (o, i) in (("img_attn_proj", "img_attn.proj", (32, 32)),
                                     ("txt_mlp_0", "txt_mlp.0", (128, 32))):
            stem = f"lora_unet_double_blocks_{blk}_{part}"
            down, up = torch.randn(2, i, generator=g), torch.randn(o, 2, generator=g)
            t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"] = down, up
            dense[(f"D{blk:02d}", native)] = float(torch.linalg.matrix_norm(up.double() @ down.double()))
    save_file(t, str(tmp_path / "f.safetensors"))
    assert main(["inspect", str(tmp_path / "f.safetensors"), "--plot", str(tmp_path / "f.png"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    heat = figures[0].axes[1]
    cols = [x.get_text() for x in heat.get_xticklabels()]
    rows = [y.get_text() for y in heat.get_yticklabels()]
    assert cols == ["D00", "D03"] and sorted(rows) == ["img_attn.proj", "txt_mlp.0"]
    grid = heat.get_images()[0].get_array()
    for (blk, part), value in dense.items():
        assert float(grid[rows.index(part)][cols.index(blk)]) == pytest.approx(value, rel=1e-5)
    assert {(c["block"], c["part"]) for c in report["strength"]["cells"]} == set(dense)
