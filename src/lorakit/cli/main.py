"""The ``lorakit`` command: parse, call the library, map errors to exit codes. Nothing else."""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
import traceback
from typing import NoReturn

from lorakit.errors import LorakitError
from lorakit.layouts import available, resolve

# command name -> module under lorakit.cli (each defines register(subparsers))
COMMANDS = ("inspect", "doctor", "convert", "merge", "bake", "extract", "resize", "diff", "meta", "scan", "ui")


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``usage: …`` on one line, the error, and a hint (exit 2)."""

    def short_usage(self) -> str:
        parts = [self.prog]
        if any(a.option_strings for a in self._actions):
            parts.append("[options]")
        for a in self._actions:
            if a.option_strings or a.help == argparse.SUPPRESS or isinstance(a, argparse._SubParsersAction):
                continue
            name = a.metavar or a.dest
            parts.append(f"{name} …" if a.nargs in ("+", "*") else str(name))
        if any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            parts.append("COMMAND …")
        return "usage: " + " ".join(parts)

    def error(self, message: str) -> "NoReturn":
        hint = f"run '{self.prog} --help' for the options."
        unknown = [w for w in message.replace(",", " ").split() if w.startswith("-")]
        if message.startswith("unrecognized arguments") and unknown:
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(unknown[0].split("=")[0], known, n=1)
            if close:
                hint = f"did you mean {close[0]}? ({hint})"
        self.exit(2, f"{self.short_usage()}\n{self.prog}: error: {message}\nhint: {hint}\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``lorakit`` argument parser with every subcommand registered (``only``: just that one — a run of one
    command imports only its own module, which keeps header-only commands fast)."""
    from lorakit import __version__
    parser = Parser(
        prog="lorakit",
        description="Detect, convert, merge, bake, extract and resize LoRAs from any trainer ("
                    + ", ".join(resolve(n).label for n in available()) + ").",
        epilog="Exit codes: 0 ok, 1 partial/warnings, 2 invalid input or refused operation, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS if only is None else (only,):   # an ImportError here is a bug, never a silent omission
        importlib.import_module(f".{name}_cmd", __package__).register(sub)
    for p in sub.choices.values():   # --debug also after the command (`lorakit inspect x --debug`)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the command and map lorakit errors to exit codes (see the parser epilog)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra:   # an unknown option is reported by the command it was given to, with that command's usage
        sub = parser._subparsers._group_actions[0].choices.get(args.command) if args.command else None  # type: ignore[union-attr]
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
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
