"""The ``lorakit`` command: parse, call the library, map errors to exit codes. Nothing else."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from ..errors import LorakitError

# command name -> module under lorakit.cli (each defines register(subparsers))
COMMANDS = ("inspect", "doctor", "convert", "merge", "bake", "extract", "resize", "diff", "meta")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="Detect, convert, merge, bake, extract and resize LoRAs from any trainer (FLUX.1).",
        epilog="Exit codes: 0 ok, 1 partial/warnings, 2 invalid input or refused operation, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:   # every command exists: an ImportError here is a bug, never a silent omission
        importlib.import_module(f".{name}_cmd", __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except LorakitError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"lorakit {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted; no output was written.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # pragma: no cover - e.g. `lorakit inspect x | head`
        return 0
    except Exception as exc:  # a bug: say so in one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"lorakit {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(this is a bug; rerun with --debug and report it)".replace("\n", " "), file=sys.stderr)
        return 70


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
