"""Command-line interface (thin: argument parsing and error mapping only)."""

from .main import main

__all__ = ["main"]
