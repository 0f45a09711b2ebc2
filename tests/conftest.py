"""Shared fixtures: tiny FLUX sizes, a seeded generator, a tmp file writer that does not use lorakit.

Keep this file small and generic; area-specific helpers live in the test modules.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import pytest
import torch

# Tiny FLUX.1 sizes (hidden 32, MLP 128, 2 + 2 blocks). Written out here rather than imported so that the
# tests do not depend on lorakit's own numbers.
TINY = {"H": 32, "M": 128, "IN": 16, "OUT": 16, "CTX": 24, "VEC": 20, "T": 8, "D": 16, "double": 2, "single": 2}
TINY_CLIP = {"D": 24, "FF": 48, "layers": 2}
TINY_T5 = {"D": 28, "INNER": 32, "FF": 40, "blocks": 2}


def pytest_configure(config: pytest.Config) -> None:
    # Tiny tensors gain nothing from intra-op threads, and on a busy 2-core box OpenMP barriers make each
    # small matmul ~200x slower (5 ms instead of 20 us). Benchmarks set their own thread count.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slow`` tests run only when selected explicitly (``-m slow``) or with LORAKIT_SLOW=1."""
    expr = config.getoption("-m") or ""
    if ("slow" in expr and "not slow" not in expr) or os.environ.get("LORAKIT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or LORAKIT_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny() -> dict[str, int]:
    return dict(TINY)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def write_st(tmp_path) -> Callable[..., str]:
    """Write a dict of tensors with the reference ``safetensors`` package (independent of lorakit's writer)."""
    from safetensors.torch import save_file

    counter = [0]

    def _write(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
               name: str | None = None) -> str:
        counter[0] += 1
        path = str(tmp_path / (name or f"in{counter[0]}.safetensors"))
        save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=dict(metadata or {}))
        return path

    return _write


def report_line(request: pytest.FixtureRequest, text: str) -> None:
    """Print a summary line into pytest's output (outside capture), e.g. how many cases ran."""
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    cap = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and cap is not None:
        with cap.global_and_fixture_disabled():
            tr.write_line(text)
