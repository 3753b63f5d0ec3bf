"""`bench/engine_throughput.py --method trtllm`: TensorRT-LLM's perf-overview method (issue 18).

The preset's plumbing, not speed: `--smoke` runs the correctness gate and every row on the host
with a tiny model, and the results file must hold what the GPU run will be judged by.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]


def bench() -> ModuleType:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module("engine_throughput")
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_preset_is_tensorrt_llms_method() -> None:
    et = bench()
    args = argparse.Namespace(smoke=False, kv_cache_dtype="auto", max_num_seqs=1024, modes=["bf16", "fp8"])
    workloads = et.apply_trtllm_preset(args, given=set())
    assert [w.name for w in workloads] == ["128/128", "128/2048", "2048/128", "500/2000", "1000/1000"]
    assert args.requests_per_workload == {
        "128/128": 30_000, "128/2048": 3_000, "2048/128": 3_000, "500/2000": 3_000, "1000/1000": 3_000,
    }  # fmt: skip
    assert (args.kv_cache_dtype, args.max_num_seqs, args.modes) == ("fp8", 4096, ["fp8"])
    # What the caller set explicitly stays.
    args = argparse.Namespace(smoke=False, kv_cache_dtype="bf16", max_num_seqs=512, modes=["bf16"])
    et.apply_trtllm_preset(args, given={"kv_cache_dtype", "max_num_seqs", "modes"})
    assert (args.kv_cache_dtype, args.max_num_seqs, args.modes) == ("bf16", 512, ["bf16"])


def test_smoke_run_writes_gate_rows_device_and_bandwidth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    et = bench()
    out = tmp_path / "trtllm.json"
    assert et.main(["--method", "trtllm", "--smoke", "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["check"]["ok"] is True  # the gate ran in the same process, into the same file
    assert res["kv_cache_dtype"] == "fp8" and res["device"]["name"]
    assert res["device"]["copy_bandwidth_gb_s"] > 0
    rows = res["trtllm_rows"]
    assert [r["workload"] for r in rows] == [r.workload for r in et.TRTLLM_ROWS]
    for row, spec in zip(rows, et.TRTLLM_ROWS, strict=True):
        assert row["requests"] == spec.requests // et.SMOKE_REQUEST_DIVISOR
        assert row["output_tokens_per_s"] > 0 and row["preemptions"] == 0
        assert row["ratio_to_trtllm"] == pytest.approx(row["output_tokens_per_s"] / spec.published)
    table = capsys.readouterr().out
    assert "correctness gate: passed" in table and "29526" in table and "measured copy bandwidth" in table


def test_a_failed_gate_reports_no_throughput(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    et = bench()
    monkeypatch.setattr(et, "run_check", lambda args, root: {"ok": False})
    out = tmp_path / "trtllm.json"
    assert et.main(["--method", "trtllm", "--smoke", "--device", "cpu", "--out", str(out)]) == 1
    res = json.loads(out.read_text())
    assert res["check"] == {"ok": False} and "modes" not in res and "trtllm_rows" not in res


def test_an_option_given_its_default_value_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `--kv-cache-dtype auto` is the option's default: the preset took it for unset and ran fp8.
    et = bench()
    monkeypatch.setattr(et, "run_check", lambda args, root: {"ok": False})  # stop after the settings
    out = tmp_path / "trtllm.json"
    argv = ["--method", "trtllm", "--smoke", "--device", "cpu", "--kv-cache-dtype", "auto", "--out", str(out)]
    et.main(argv)
    assert json.loads(out.read_text())["kv_cache_dtype"] == "auto"


def test_rows_run_under_a_gate_measured_by_an_earlier_process(tmp_path: Path) -> None:
    et = bench()
    gate = tmp_path / "gate.json"
    gate.write_text(json.dumps({"check": {"ok": False, "tiny_chat": {"fast_equals_reference": False}}}))
    out = tmp_path / "rows.json"
    argv = ["--method", "trtllm", "--smoke", "--device", "cpu", "--rows", "128/128", "--gate-file", str(gate)]
    assert et.main([*argv, "--out", str(out)]) == 1
    res = json.loads(out.read_text())
    assert res["check"]["ok"] is False and "modes" not in res  # a failed gate: no throughput
    with pytest.raises(SystemExit):
        et.main(["--method", "trtllm", "--smoke", "--rows", "64/64"])  # not a preset row
