"""The Gradio screens of ``lorakit ui``: one tab per operation, each a thin form over :mod:`lorakit.ui.calls`.

Every run goes through :class:`lorakit.ui.jobs.Job` (worker thread, progress bar, Cancel button); errors are
shown as the library's one-line message with its fix. Element ids (``elem_id``) are stable: the browser test
and users' scripts address them.
"""

import os
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from lorakit.formats import WRITABLE
from lorakit.ops.blocks import BLOCKS_HELP
from lorakit.ops.merging import merge_methods
from lorakit.ui import calls, reports
from lorakit.ui.jobs import CANCELLED, Job, JobBoard, one_line

MAX_ROWS = 8              # LoRA rows of the merge and bake screens
SHOWN_ROWS = 2            # rows visible before "Add a LoRA" or an upload
POLL_SECONDS = 0.1

Outputs = tuple[Any, ...]


class Screens:
    """The app's state shared by all sessions: the output folder and the running jobs."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = os.path.abspath(output_dir)
        self.board = JobBoard()

    # -- running a job ------------------------------------------------------------------------
    def run(self, tab: str, request: gr.Request | None, progress: gr.Progress, call: Callable[[Any], Any],
            summarize: Callable[[Any], str], saved: Callable[[Any], str | None],
            download: bool = True) -> Iterator[Outputs]:
        """Run ``call(progress_hook)`` as a job; yields (status, report JSON, saved path, download) updates."""
        session = getattr(request, "session_hash", None) or "local"
        job: Job[Any] = Job(call).start()
        self.board.put(session, tab, job)
        try:
            yield "running…", None, "", None
            for snap in job.poll(POLL_SECONDS):
                if not snap.finished and snap.fraction is not None:
                    progress(snap.fraction, desc=snap.item or tab)
        finally:   # also when gradio closes this generator (the page was closed): stop the job with it
            if not job.snapshot().finished:
                job.cancel()
            self.board.drop(session, tab, job)
        snap = job.snapshot()
        if snap.cancelled:
            yield CANCELLED, None, "", None
        elif snap.error is not None:
            yield snap.error, None, "", None
        else:
            path = saved(job.result)
            yield (summarize(job.result) + (f"\nsaved: {path}" if path else ""), reports.as_json(job.result),
                   path or "", path if download and path else None)

    def cancel(self, tab: str, request: gr.Request | None) -> str:
        session = getattr(request, "session_hash", None) or "local"
        return "cancelling…" if self.board.cancel(session, tab) else "nothing is running."

    def now(self, call: Callable[[], Any]) -> tuple[Any, str | None]:
        """A quick call (inspect, doctor): (result, None) or (None, one-line error)."""
        try:
            return call(), None
        except Exception as exc:  # noqa: BLE001 - shown in one line
            return None, one_line(exc)


def _canceller(s: Screens, tab: str) -> Callable[[gr.Request], str]:
    """The Cancel button's handler for ``tab`` (gradio passes the request by its annotation)."""
    def cancel(request: gr.Request) -> str:
        return s.cancel(tab, request)
    return cancel


def _file_picker(label: str, elem_id: str, *, upload: bool = True) -> gr.Textbox:
    """A path box with an optional upload next to it; an upload fills the box with the uploaded file's path."""
    with gr.Row():
        path = gr.Textbox(label=f"{label} (path)", elem_id=f"{elem_id}-path", scale=3,
                          placeholder="/path/to/file.safetensors")
        if upload:
            up = gr.File(label=f"{label} (upload)", elem_id=f"{elem_id}-upload", type="filepath", scale=2,
                         file_types=[".safetensors", ".sft"], height=90)
            up.upload(lambda f: f or "", inputs=up, outputs=path)
    return path


def _lora_rows(prefix: str) -> tuple[list[gr.Textbox], list[gr.Slider]]:
    """Up to MAX_ROWS LoRA rows (path + strength slider), a multi-file upload that fills them and "Add a LoRA"."""
    paths: list[gr.Textbox] = []
    weights: list[gr.Slider] = []
    rows: list[gr.Row] = []
    upload = gr.File(label="LoRAs (upload one or more)", file_count="multiple", type="filepath",
                     elem_id=f"{prefix}-upload", file_types=[".safetensors", ".sft"], height=90)
    for i in range(MAX_ROWS):
        with gr.Row(visible=i < SHOWN_ROWS) as row:
            paths.append(gr.Textbox(label=f"LoRA {i + 1} (path)", elem_id=f"{prefix}-path-{i}", scale=3))
            weights.append(gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="strength",
                                     elem_id=f"{prefix}-weight-{i}", scale=2))
        rows.append(row)
    shown = gr.State(SHOWN_ROWS)
    add = gr.Button("Add a LoRA", elem_id=f"{prefix}-add", size="sm")

    def fill(files: list[str] | None, *current: str) -> list[Any]:
        files = list(files or [])
        values = [files[i] if i < len(files) else current[i] for i in range(MAX_ROWS)]
        count = max(SHOWN_ROWS, min(MAX_ROWS, len(files)), *(i + 1 for i, v in enumerate(values) if v))
        return [*values, *(gr.update(visible=i < count) for i in range(MAX_ROWS)), count]

    def more(count: int) -> list[Any]:
        count = min(MAX_ROWS, count + 1)
        return [*(gr.update(visible=i < count) for i in range(MAX_ROWS)), count]

    upload.upload(fill, inputs=[upload, *paths], outputs=[*paths, *rows, shown])
    add.click(more, inputs=shown, outputs=[*rows, shown])
    return paths, weights


def _result_area(prefix: str, *, download: bool = True) -> tuple[gr.Textbox, gr.JSON, gr.Textbox, gr.File]:
    """(status, report, saved path, download): the outputs :meth:`Screens.run` yields, in that order."""
    status = gr.Textbox(label="result", elem_id=f"{prefix}-status", lines=3, interactive=False)
    saved = gr.Textbox(label="saved to", elem_id=f"{prefix}-saved", interactive=False)
    file = gr.File(label="download", elem_id=f"{prefix}-download", interactive=False, height=70, visible=download)
    with gr.Accordion("full report (JSON)", open=False):
        report = gr.JSON(elem_id=f"{prefix}-report")
    return status, report, saved, file


def _run_buttons(prefix: str) -> tuple[gr.Button, gr.Button]:
    with gr.Row():
        go = gr.Button("Run", variant="primary", elem_id=f"{prefix}-run")
        stop = gr.Button("Cancel", variant="stop", elem_id=f"{prefix}-cancel")
    return go, stop


def build_app(output_dir: str) -> gr.Blocks:
    """The ``lorakit ui`` app writing into ``output_dir`` (bare output names are saved there)."""
    s = Screens(output_dir)
    with gr.Blocks(title="lorakit") as app:
        gr.Markdown(f"# lorakit\nInspect, diagnose, convert, merge, bake, extract and resize LoRAs. Outputs are "
                    f"written to a temporary file and renamed when complete; bare names are saved in "
                    f"`{s.output_dir}`.")
        with gr.Tabs():
            with gr.Tab("Inspect", id="inspect"):
                _inspect_tab(s)
            with gr.Tab("Doctor", id="doctor"):
                _doctor_tab(s)
            with gr.Tab("Convert", id="convert"):
                _convert_tab(s)
            with gr.Tab("Merge", id="merge", elem_id="tab-merge"):
                _merge_tab(s)
            with gr.Tab("Bake", id="bake"):
                _bake_tab(s)
            with gr.Tab("Extract", id="extract"):
                _extract_tab(s)
            with gr.Tab("Resize", id="resize"):
                _resize_tab(s)
    return app


def _inspect_tab(s: Screens) -> None:
    from lorakit.ops.inspection import format_report
    path = _file_picker("LoRA", "inspect")
    deep = gr.Checkbox(label="deep (read every tensor: NaN/Inf, zero ups, norms, hashes)", value=False)
    go = gr.Button("Inspect", variant="primary", elem_id="inspect-run")
    status = gr.Textbox(label="report", elem_id="inspect-status", lines=12, interactive=False)
    plot = gr.Image(label="strength per block (‖ΔW‖ from the factors)", elem_id="inspect-plot", type="pil",
                    interactive=False)
    table = gr.Dataframe(headers=reports.COVERAGE_HEADERS, label="coverage per module group",
                         elem_id="inspect-coverage", interactive=False)
    with gr.Accordion("full report (JSON)", open=False):
        report = gr.JSON(elem_id="inspect-report")

    def run(p: str, d: bool) -> Outputs:
        result, err = s.now(lambda: calls.run_inspect(calls.input_path(p, "LoRA"), deep=d))
        if err is not None:
            return err, None, None, None
        return (format_report(result), reports.picture("strength", result), reports.coverage_rows(result),
                reports.as_json(result))

    go.click(run, inputs=[path, deep], outputs=[status, plot, table, report])


def _doctor_tab(s: Screens) -> None:
    from lorakit.ops.diagnose import format_report
    lora = _file_picker("LoRA", "doctor")
    base = _file_picker("base model (optional: checks that every module applies)", "doctor-base", upload=False)
    go = gr.Button("Diagnose", variant="primary", elem_id="doctor-run")
    status = gr.Textbox(label="verdict", elem_id="doctor-status", lines=10, interactive=False)
    plot = gr.Image(label="what applies, per block", elem_id="doctor-plot", type="pil", interactive=False)
    with gr.Accordion("full report (JSON)", open=False):
        report = gr.JSON(elem_id="doctor-report")

    def run(p: str, b: str) -> Outputs:
        result, err = s.now(lambda: calls.run_doctor([calls.input_path(p, "LoRA")], calls.optional_text(b)))
        if err is not None:
            return err, None, None
        return (format_report(result), reports.picture("doctor", result.loras[0].to_json()),
                reports.as_json(result))

    go.click(run, inputs=[lora, base], outputs=[status, plot, report])


def _convert_tab(s: Screens) -> None:
    path = _file_picker("LoRA", "convert")
    with gr.Row():
        to = gr.Dropdown(list(WRITABLE), value=WRITABLE[0], label="target format", elem_id="convert-to")
        dtype = gr.Dropdown(list(calls.DTYPES), value=calls.KEEP, label="dtype", elem_id="convert-dtype")
        lossy = gr.Checkbox(label="allow lossy (re-factor what the target cannot hold; error reported)")
    out = gr.Textbox(label="save as", value="converted.safetensors", elem_id="convert-output")
    go, stop = _run_buttons("convert")
    outputs = _result_area("convert")

    def run(p: str, t: str, d: str, lo: bool, o: str, request: gr.Request,
            progress: gr.Progress = gr.Progress()) -> Iterator[Outputs]:
        target = calls.output_path(o, s.output_dir, "converted.safetensors")
        yield from s.run("convert", request, progress,
                         lambda hook: calls.run_convert(calls.input_path(p, "LoRA"), target, t, d, lo, hook),
                         reports.convert_summary, lambda r: r.output)

    go.click(run, inputs=[path, to, dtype, lossy, out], outputs=list(outputs))
    stop.click(_canceller(s, "convert"), inputs=None, outputs=outputs[0])


def _merge_tab(s: Screens) -> None:
    paths, weights = _lora_rows("merge")
    methods = list(merge_methods())
    with gr.Row():
        method = gr.Dropdown(methods, value="concat", label="method", elem_id="merge-method")
        rank = gr.Number(value=0, precision=0, label="rank (0: default)", elem_id="merge-rank")
        conv_rank = gr.Number(value=0, precision=0, label="conv rank (0: default)", elem_id="merge-conv-rank")
        to = gr.Dropdown(list(WRITABLE), value="kohya", label="format", elem_id="merge-to")
        dtype = gr.Dropdown(list(calls.DTYPES), value=calls.KEEP, label="dtype", elem_id="merge-dtype")
    with gr.Row():
        density = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="density (ties/dare; 0: not set)",
                            elem_id="merge-density")
        seed = gr.Number(value=0, precision=0, label="seed (dare)", elem_id="merge-seed")
    blocks = gr.Textbox(label="block weights (optional)", elem_id="merge-blocks",
                        placeholder="a preset, a vector of numbers, or SELECTOR=VALUE,… (syntax below)")
    with gr.Accordion("block weight syntax", open=False):
        gr.Markdown("```\n" + BLOCKS_HELP + "\n```")
    out = gr.Textbox(label="save as", value="merged.safetensors", elem_id="merge-output")
    go, stop = _run_buttons("merge")
    outputs = _result_area("merge")

    def merge_run(data: dict[Any, Any], request: gr.Request,
                  progress: gr.Progress = gr.Progress()) -> Iterator[Outputs]:
        inputs = calls.weighted_inputs([data[p] for p in paths], [data[w] for w in weights])
        target = calls.output_path(data[out], s.output_dir, "merged.safetensors")
        dens = float(data[density]) if data[density] else None
        yield from s.run("merge", request, progress, lambda hook: calls.run_merge(
            inputs, target, method=data[method], rank=calls.optional_int(data[rank]),
            conv_rank=calls.optional_int(data[conv_rank]), to=data[to], blocks=calls.optional_text(data[blocks]),
            dtype=data[dtype], density=dens, seed=int(data[seed] or 0), progress=hook),
            reports.merge_summary, lambda r: r.output)

    go.click(merge_run, inputs={*paths, *weights, method, rank, conv_rank, to, dtype, density, seed, blocks, out},
             outputs=list(outputs))
    stop.click(_canceller(s, "merge"), inputs=None, outputs=outputs[0])


def _bake_tab(s: Screens) -> None:
    base = _file_picker("base model", "bake-base", upload=False)
    paths, weights = _lora_rows("bake")
    with gr.Row():
        dtype = gr.Dropdown(list(calls.DTYPES), value=calls.KEEP, label="dtype of the baked weights",
                            elem_id="bake-dtype")
        partial = gr.Checkbox(label="allow partial (bake the modules that fit, report the rest)")
    out = gr.Textbox(label="save as", value="baked.safetensors", elem_id="bake-output")
    go, stop = _run_buttons("bake")
    outputs = _result_area("bake", download=False)    # a baked model is as large as the base: saved path only

    def bake_run(data: dict[Any, Any], request: gr.Request,
                 progress: gr.Progress = gr.Progress()) -> Iterator[Outputs]:
        inputs = calls.weighted_inputs([data[p] for p in paths], [data[w] for w in weights])
        target = calls.output_path(data[out], s.output_dir, "baked.safetensors")
        yield from s.run("bake", request, progress, lambda hook: calls.run_bake(
            calls.input_path(data[base], "base model"), inputs, target, dtype=data[dtype],
            allow_partial=bool(data[partial]), progress=hook), reports.bake_summary, lambda r: r.output,
            download=False)

    go.click(bake_run, inputs={base, *paths, *weights, dtype, partial, out}, outputs=list(outputs))
    stop.click(_canceller(s, "bake"), inputs=None, outputs=outputs[0])


def _dynamic(method: str, param: float | None) -> str | None:
    return f"{method}:{param}" if method and method != "off" and param else None


DYNAMIC = ("off", "sv_ratio", "sv_fro", "sv_cumulative")


def _extract_tab(s: Screens) -> None:
    original = _file_picker("original (base) model", "extract-original", upload=False)
    tuned = _file_picker("fine-tuned model", "extract-tuned", upload=False)
    with gr.Row():
        rank = gr.Number(value=16, precision=0, label="rank (the cap with dynamic)", elem_id="extract-rank")
        conv_rank = gr.Number(value=0, precision=0, label="conv rank (0: leave k×k convolutions out)",
                              elem_id="extract-conv-rank")
        dyn = gr.Dropdown(list(DYNAMIC), value="off", label="dynamic rank", elem_id="extract-dynamic")
        param = gr.Number(value=0.9, label="dynamic parameter", elem_id="extract-dynamic-param")
    with gr.Row():
        to = gr.Dropdown(list(WRITABLE), value="kohya", label="format", elem_id="extract-to")
        dtype = gr.Dropdown(list(calls.DTYPES), value=calls.KEEP, label="dtype", elem_id="extract-dtype")
    out = gr.Textbox(label="save as", value="extracted.safetensors", elem_id="extract-output")
    go, stop = _run_buttons("extract")
    outputs = _result_area("extract")

    def run(o_: str, t_: str, r: float, c: float, dm: str, dp: float, fmt: str, d: str, name: str,
            request: gr.Request, progress: gr.Progress = gr.Progress()) -> Iterator[Outputs]:
        target = calls.output_path(name, s.output_dir, "extracted.safetensors")
        yield from s.run("extract", request, progress, lambda hook: calls.run_extract(
            calls.input_path(o_, "original model"), calls.input_path(t_, "fine-tuned model"), target,
            rank=calls.optional_int(r), conv_rank=calls.optional_int(c), dynamic=_dynamic(dm, dp), to=fmt, dtype=d,
            progress=hook), reports.extract_summary, lambda rep: rep.output)

    go.click(run, inputs=[original, tuned, rank, conv_rank, dyn, param, to, dtype, out], outputs=list(outputs))
    stop.click(_canceller(s, "extract"), inputs=None, outputs=outputs[0])


def _resize_tab(s: Screens) -> None:
    path = _file_picker("LoRA", "resize")
    with gr.Row():
        rank = gr.Number(value=8, precision=0, label="new rank (the cap with dynamic; 0: none)", elem_id="resize-rank")
        conv_rank = gr.Number(value=0, precision=0, label="conv rank (0: the rank)", elem_id="resize-conv-rank")
        dyn = gr.Dropdown(list(DYNAMIC), value="off", label="dynamic rank", elem_id="resize-dynamic")
        param = gr.Number(value=0.9, label="dynamic parameter", elem_id="resize-dynamic-param")
        dtype = gr.Dropdown(list(calls.DTYPES), value=calls.KEEP, label="dtype", elem_id="resize-dtype")
    out = gr.Textbox(label="save as", value="resized.safetensors", elem_id="resize-output")
    go, stop = _run_buttons("resize")
    outputs = _result_area("resize")

    def run(p: str, r: float, c: float, dm: str, dp: float, d: str, name: str, request: gr.Request,
            progress: gr.Progress = gr.Progress()) -> Iterator[Outputs]:
        target = calls.output_path(name, s.output_dir, "resized.safetensors")
        yield from s.run("resize", request, progress, lambda hook: calls.run_resize(
            calls.input_path(p, "LoRA"), target, rank=calls.optional_int(r), conv_rank=calls.optional_int(c),
            dynamic=_dynamic(dm, dp), dtype=d, progress=hook), reports.resize_summary, lambda rep: rep.output)

    go.click(run, inputs=[path, rank, conv_rank, dyn, param, dtype, out], outputs=list(outputs))
    stop.click(_canceller(s, "resize"), inputs=None, outputs=outputs[0])
