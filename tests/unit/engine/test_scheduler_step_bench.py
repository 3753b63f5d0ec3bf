"""`bench/scheduler_step.py` runs a decode step's host work (no model) and records each part."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[3]


def test_small_run_times_every_part_of_a_full_decode_batch(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        bench = importlib.import_module("scheduler_step")
    finally:
        sys.path.remove(str(ROOT / "bench"))
    out = tmp_path / "s.json"
    # measure() asserts every step schedules all 24 sequences and preempts none.
    assert bench.main(["--num-seqs", "24", "--steps", "5", "--prompt-len", "20", "--out", str(out)]) == 0
    cur = json.loads(out.read_text())["current"]
    assert cur["num_seqs"] == 24 and cur["steps"] == 5
    assert set(cur["median_ms"]) == {"schedule", "build_inputs", "complete_step"}
    assert cur["total_ms_median"] >= max(cur["median_ms"].values()) > 0
