"""The one exception hierarchy of lorakit.

Every error a user can cause is a :class:`LorakitError`. Messages name the file, the key and the
shapes involved and end with a fix hint; the CLI prints ``str(error)`` on one line and exits with
``error.exit_code``. Anything else escaping the library is a bug.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterable, Sequence

MAX_MESSAGE_CHARS = 2000     # an error is one readable line, whatever the user's values hold

_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother = 3, 80, 80
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 6


def brief(value: object, limit: int = 120) -> str:
    """A bounded repr of a user value for messages: nested and shared structures are cut, never expanded."""
    text = _BRIEF.repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _preview(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(x) for x in items[:limit])
    more = len(items) - limit
    return shown + (f" … and {more} more" if more > 0 else "")


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None) -> None:
        self.message = message
        self.path = path
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        message = self.message if len(self.message) <= MAX_MESSAGE_CHARS else \
            self.message[:MAX_MESSAGE_CHARS - 1] + "…"
        text = f"{self.path}: {message}" if self.path else message
        if self.hint:
            text += f" Fix: {self.hint}"
        return " ".join(text.split())


class UsageError(LorakitError):
    """Bad arguments or option combinations."""


class InputFileError(LorakitError):
    """A file that cannot be opened or is not what it claims to be (missing, truncated, corrupt)."""


class HeaderError(InputFileError):
    """A safetensors header that is malformed or inconsistent with the file."""


class PickleRefusedError(InputFileError):
    """A pickle checkpoint given without the explicit opt-in."""


class UnsupportedDtypeError(InputFileError):
    """A tensor dtype lorakit cannot read or write."""


class OutputError(LorakitError):
    """The output cannot be written (missing folder, read-only, same path as an input, disk full)."""


class FormatError(LorakitError):
    """A LoRA whose keys do not fit any registered format."""


class UnknownFormatError(FormatError):
    def __init__(self, path: str | None, unknown: Sequence[str], nearest: str | None, *, total: int) -> None:
        self.unknown = list(unknown)
        self.nearest = nearest
        near = f"; nearest known format: {nearest}" if nearest else ""
        super().__init__(
            f"{len(unknown)} of {total} keys are not understood ({_preview(self.unknown)}){near}.",
            path=path,
            hint="run `lorakit inspect --json` to see which keys were recognised; if this is a new trainer's "
            "layout, please report it with the key list.",
        )


class AmbiguousFormatError(FormatError):
    def __init__(self, path: str | None, candidates: Sequence[str]) -> None:
        self.candidates = list(candidates)
        super().__init__(
            f"the keys fit several formats equally well: {', '.join(candidates)}.",
            path=path,
            hint="pass --from FORMAT to choose one.",
        )


class NotALoraError(FormatError):
    """A base model (or other weights file) given where a LoRA was expected."""


class ArchitectureError(LorakitError):
    """An architecture or variant lorakit does not support, or a mismatch between two files."""


class UnsupportedArchitectureError(ArchitectureError):
    pass


class ShapeMismatchError(ArchitectureError):
    def __init__(self, key: str, expected: Iterable[int], got: Iterable[int], *, path: str | None = None,
                 hint: str | None = None) -> None:
        self.key = key
        self.expected = tuple(expected)
        self.got = tuple(got)
        super().__init__(f"{key}: expected shape {list(self.expected)}, got {list(self.got)}.", path=path, hint=hint)


class KeyMappingError(LorakitError):
    """Keys that a conversion, merge or bake could not place."""

    def __init__(self, message: str, keys: Sequence[str], *, path: str | None = None, hint: str | None = None):
        self.keys = list(keys)
        super().__init__(f"{message} ({len(self.keys)}: {_preview(self.keys)})", path=path, hint=hint)


class LossyConversionError(LorakitError):
    """The target cannot hold the input exactly and --allow-lossy was not given."""

    def __init__(self, modules: Sequence[str], reason: str, *, path: str | None = None,
                 hint: str | None = None) -> None:
        self.modules = list(modules)
        super().__init__(
            f"{reason}: {len(self.modules)} module(s) ({_preview(self.modules)}) cannot be written exactly.",
            path=path,
            hint=hint or "pass --allow-lossy to re-factor them by SVD (the relative error of each is reported), "
            "or choose another --to format.",
        )


class CoverageError(LorakitError):
    """A merge into a base model that would apply only part of the LoRA, or nothing at all."""

    def __init__(self, message: str, unmatched: Sequence[str], *, path: str | None = None, hint: str | None = None):
        self.unmatched = list(unmatched)
        super().__init__(f"{message} ({len(self.unmatched)} unmatched: {_preview(self.unmatched)})", path=path,
                         hint=hint)


class NonFiniteError(LorakitError):
    """NaN or Inf values where a computation needs finite numbers."""


class MemoryBudgetError(LorakitError):
    """An operation that would need more memory than the machine has available (refused before allocating)."""


class MergeError(LorakitError):
    """A merge that cannot be carried out as asked."""


class RecipeError(UsageError):
    """A malformed recipe file."""


class Interrupted(LorakitError):
    exit_code = 130
