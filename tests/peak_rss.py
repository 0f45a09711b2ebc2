"""Shared by the bounded-memory tests: run a bake in a fresh subprocess and read its high-water mark (VmHWM).

A test's script prepares its files when its third argument is ``make``, and otherwise falls through to
:data:`BAKE_AND_MEASURE`, which bakes ``lora`` into ``base`` (variables the script defines) and prints one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys

BAKE_AND_MEASURE = r"""
def hwm():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM")) * 1024
before = hwm()
report = lorakit.bake(base, [lora], out, progress=False)
print(json.dumps({"before": before, "peak": hwm(), "bytes": report.bytes_in, "changed": report.changed}))
"""


def measure_bake(script: str, *args: str, timeout: int = 300) -> dict[str, int]:
    """Run ``script`` twice in fresh interpreters: ``make`` (prepare files), then the measured bake."""
    cmd = [sys.executable, "-c", script + BAKE_AND_MEASURE, *args]
    subprocess.run([*cmd, "make"], check=True, timeout=timeout)
    res = subprocess.run([*cmd, "bake"], check=True, timeout=timeout, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])
