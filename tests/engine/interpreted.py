"""Runs a test script under Triton's interpreter, in a fresh Python process: the interpreter is
chosen when triton is imported, so the kernel tests cannot switch to it inside pytest's process."""

from __future__ import annotations

import os
import subprocess
import sys


def interpret(script: str, *args: str, timeout: int = 900) -> str:
    """The script's stdout; fails the test, showing the end of its output, unless it exits 0 with a
    last line ending in "ok", or starting with the word "ok" (a count after it: "ok 30")."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    last = (r.stdout.strip().splitlines() or [""])[-1]
    passed = last.endswith("ok") or last.split()[:1] == ["ok"]
    assert r.returncode == 0 and passed, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout
