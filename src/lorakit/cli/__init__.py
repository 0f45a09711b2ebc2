"""Command-line interface (thin: argument parsing and error mapping only)."""

from lorakit.cli.main import main

__all__ = ["main"]
