"""Knowledge as data: shared code (everything under src/lorakit/ except layouts/) names no model family's
components, modules or architectures. Docstrings and comments may explain with examples; code and the strings
it prints may not (they come from the layout data). The sample generators (samples/: synthetic models, the
demo) build models of named architectures on purpose and are exempt."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"
NAMES = re.compile(r"\b(transformer|clip_l|clip_g|clip_h|t5|unet|double_blocks|single_blocks|img_attn|txt_attn|"
                   r"input_blocks|output_blocks|middle_block|flux1|sdxl|sd1|sd2)\b")
EXEMPT_FOLDERS = {"layouts", "samples"}
ALLOWED: set[tuple[str, str]] = set()   # (file, name) kept on purpose: none


def _docstring(toks: list[tokenize.TokenInfo], i: int) -> bool:
    """A string token that is a statement of its own (module/class/function docstring or a bare string)."""
    before = toks[i - 1].type if i else tokenize.NEWLINE
    after = toks[i + 1].type if i + 1 < len(toks) else tokenize.NEWLINE
    return before in (tokenize.INDENT, tokenize.DEDENT, tokenize.NEWLINE, tokenize.NL) and \
        after in (tokenize.NEWLINE, tokenize.NL)


def offenders() -> list[str]:
    found = []
    middle = getattr(tokenize, "FSTRING_MIDDLE", None)
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] in EXEMPT_FOLDERS:
            continue
        toks = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
        for i, tok in enumerate(toks):
            if tok.type == tokenize.STRING and _docstring(toks, i):
                continue
            if tok.type in (tokenize.STRING, tokenize.NAME) or tok.type == middle:
                for m in NAMES.finditer(tok.string):
                    if (rel.as_posix(), m.group(1)) not in ALLOWED:
                        found.append(f"{rel}:{tok.start[0]}: {m.group(1)} in {tok.string[:80]!r}")
    return found


def test_shared_code_names_no_architecture() -> None:
    assert offenders() == []


def test_the_guard_can_fail(tmp_path, monkeypatch) -> None:
    (tmp_path / "shared.py").write_text('"""A docstring may say transformer."""\nCOMPONENT = "transformer"\n')
    (tmp_path / "layouts").mkdir()
    (tmp_path / "layouts" / "x.py").write_text('NAME = "double_blocks"\n')
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path)
    assert offenders() == ["shared.py:2: transformer in '\"transformer\"'"]
