"""`kiln-engine measure-capacity` against a real `kiln-engine serve` of a tiny model on loopback: the
build's search over HTTP finds the whole batch within a loose TTFT target and none within an
impossible one, writes the build's capacity shape to --result-file, and an unreachable replica gives
a failure result and exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.test_pipeline_parallel_server import wait_status
from tests.engine.test_server import free_port

pytestmark = [pytest.mark.engine, pytest.mark.slow]

pytest.importorskip("torch")
from kiln_engine.testing.tiny import make_tiny_checkpoint  # noqa: E402

MAX_SEQS = 4


@pytest.fixture(scope="module")
def replica_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("cap") / "ckpt", "llama", seed=5)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "kiln_engine.cli", "serve", "--model", str(ckpt), "--served-model-name",
         "tiny", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--max-model-len", "64",
         "--max-num-seqs", str(MAX_SEQS), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_status(url + "/health", 200, [server], timeout=120)
        yield url
    finally:
        server.terminate()
        server.wait(30)


def measure(
    url: str, result_file: Path, ttft_target_ms: float, wait_s: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiln_engine.cli", "measure-capacity", "--url", url, "--max-batch-size",
         str(MAX_SEQS), "--ttft-target-ms", str(ttft_target_ms), "--ttft-percentile", "90",
         "--capacity-budget-seconds", "60", "--wait-seconds", str(wait_s), "--result-file", str(result_file)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_loose_target_admits_the_whole_batch(replica_url: str, tmp_path: Path) -> None:
    done = measure(replica_url, tmp_path / "result.json", ttft_target_ms=60_000)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["ok"] is True and replica_url in result["measuredOn"]
    capacity = result["capacity"]
    assert capacity["maxConcurrency"] == MAX_SEQS
    assert capacity["tokensPerSecond"] > 0
    assert capacity["ttftTargetMs"] == 60_000 and capacity["ttftPercentile"] == 90


def test_impossible_target_admits_nothing(replica_url: str, tmp_path: Path) -> None:
    done = measure(replica_url, tmp_path / "result.json", ttft_target_ms=1)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "result.json").read_text())["capacity"]["maxConcurrency"] == 0


def test_unreachable_replica_fails_with_a_result(tmp_path: Path) -> None:
    done = measure(f"http://127.0.0.1:{free_port()}", tmp_path / "result.json", ttft_target_ms=500, wait_s=0)
    assert done.returncode == 1
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["ok"] is False and result["reason"] == "ReplicaUnavailable"
