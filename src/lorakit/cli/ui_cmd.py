"""lorakit ui [--host H] [--port P] [--output-dir DIR]"""

from __future__ import annotations

import argparse

HELP = "open a local web UI (needs the extra lorakit[ui])"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``ui`` subcommand to the parser."""
    from lorakit.ui import DEFAULT_HOST, DEFAULT_PORT
    p = sub.add_parser("ui", help=HELP, description=HELP + ": inspect, doctor, convert, merge, bake, extract and "
                       "resize in the browser, through the same library calls as the commands. Bound to "
                       f"{DEFAULT_HOST} (this machine only) unless --host says otherwise.")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}; 0.0.0.0 "
                   "exposes the UI and your files to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--output-dir", default="lorakit-ui-out", metavar="DIR",
                   help="folder where outputs given as a bare name are saved (default ./lorakit-ui-out)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the UI server until interrupted."""
    from lorakit.ui import launch
    launch(args.host, args.port, args.output_dir)
    return 0
