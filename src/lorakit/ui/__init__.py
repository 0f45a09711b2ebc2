"""``lorakit ui``: a local web UI (Gradio, the optional extra ``lorakit[ui]``) over the library's operations.

The screens call the same library functions as the commands (:mod:`lorakit.ui.calls`); long jobs run in a
worker thread with progress and cancellation (:mod:`lorakit.ui.jobs`); what is shown of each report is in
:mod:`lorakit.ui.reports`; the screens themselves are in :mod:`lorakit.ui.app` (the only module that imports
gradio).
"""

from __future__ import annotations

import os

from lorakit.errors import UsageError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
INSTALL_HINT = "install the UI extra: pip install 'lorakit[ui]'."


def require_gradio() -> None:
    """Refuse, in one line with the fix, when the optional UI dependency is missing."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError("the web UI needs gradio, which is not installed.", hint=INSTALL_HINT) from None


def launch(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, output_dir: str = "lorakit-ui-out", *,
           block: bool = True) -> object:
    """Start the UI on ``host:port`` (local only by default) writing bare output names into ``output_dir``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")    # a local tool sends nothing anywhere
    require_gradio()
    from lorakit.ops.metadata import record_command_line
    from lorakit.ui.app import build_app
    record_command_line(False)      # files written from the UI were not made by "lorakit ui --port …"
    folder = os.path.abspath(os.path.expanduser(output_dir))
    os.makedirs(folder, exist_ok=True)
    app = build_app(folder)
    app.queue()
    try:
        app.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=False,
                   allowed_paths=[folder], prevent_thread_lock=not block, quiet=not block)
    except OSError as exc:      # the port is taken, or the address is not this machine's
        raise UsageError(f"cannot serve the UI on {host}:{port} ({' '.join(str(exc).split())}).",
                         hint="pick a free --port, or a --host address of this machine.") from None
    return app
