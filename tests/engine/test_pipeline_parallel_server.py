"""A replica of two pods on loopback: `kiln-engine serve` twice with KILN_GROUP_INDEX 0 and 1 (the
multi-pod contract), TP1xPP2 and TP2xPP2 artifacts from `kiln-engine build`. Pod 1 answers /health
503 until every rank joined and loaded, then 200; pod 0 answers the OpenAI API with TP=1's tokens
(and logprobs, which cross the pipeline too). SIGTERM drains the group, everyone exits 0; a killed
pod takes the other down with a non-zero exit, so the group restarts together.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

pytest.importorskip("torch")
from kiln_engine.build.pipeline import BuildOptions, run_build  # noqa: E402
from kiln_engine.build.progress import Progress  # noqa: E402
from kiln_engine.server.app import ServerSettings  # noqa: E402
from kiln_engine.testing.tiny import make_tiny_checkpoint  # noqa: E402
from tests.engine.test_server import ThreadServer, free_port  # noqa: E402

PROMPTS = ["Hello, world", "The quick brown fox jumps", "Numbers: 0 1 2", "A"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("pp") / "ckpt", "llama", seed=21, num_hidden_layers=3)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> list[dict[str, Any]]:
    """TP=1, the checkpoint served in this process."""
    with ThreadServer(checkpoint, ServerSettings(), max_model_len=256) as single:
        return complete_all(single.url)


def complete_all(url: str) -> list[dict[str, Any]]:
    """All prompts at once, so the pipeline splits the batch into micro-batches."""
    bodies = [{"model": "tiny-llama", "prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
               "logprobs": 0} for p in PROMPTS]  # fmt: skip
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: httpx.post(url + "/v1/completions", json=b, timeout=120), bodies))
    for r in answers:
        assert r.status_code == 200, r.text
    return [{"text": (c := r.json()["choices"][0])["text"], "tokens": c["logprobs"]["tokens"],
             "logprobs": c["logprobs"]["token_logprobs"]} for r in answers]  # fmt: skip


def start_pod(artifact: Path, index: int, port: int, rendezvous: int) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "KILN_GROUP_SIZE": "2",
           "KILN_GROUP_INDEX": str(index), "KILN_LEADER_ADDRESS": "127.0.0.1",
           "KILN_RENDEZVOUS_PORT": str(rendezvous), "KILN_GROUP_HEARTBEAT_TIMEOUT": "4"}  # fmt: skip
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.Popen(
        [sys.executable, "-m", "kiln_engine.cli", "serve", "--artifact", str(artifact),
         "--served-model-name", "tiny-llama", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
         "--max-model-len", "256", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def wait_status(url: str, status: int, pods: list[subprocess.Popen[str]], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for p in pods:
            assert p.poll() is None, p.stdout.read() if p.stdout else ""
        try:
            if httpx.get(url, timeout=1).status_code == status:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} never answered {status}"
        time.sleep(0.3)


def build(checkpoint: Path, out: Path, tp: int, pp: int) -> Path:
    opts = BuildOptions(model=str(checkpoint), output=str(out), tensor_parallel_size=tp,
                        pipeline_parallel_size=pp, measure_capacity=False)  # fmt: skip
    return run_build(opts, Progress(out=io.StringIO(), bar=False))


@pytest.mark.parametrize(
    ("tp", "end"), [(1, "kill"), (2, "drain"), (1, "leave")], ids=["tp1xpp2", "tp2xpp2", "tp1xpp2-leave"]
)
def test_two_pod_replica_serves_like_tp1(
    tmp_path: Path, checkpoint: Path, reference: list[dict[str, Any]], tp: int, end: str
) -> None:
    artifact = build(checkpoint, tmp_path / "art", tp, 2)
    api, health, rendezvous = free_port(), free_port(), free_port()
    pods: list[subprocess.Popen[str]] = []
    try:
        pods.append(start_pod(artifact, 1, health, rendezvous))  # the follower first: it waits for rank 0
        wait_status(f"http://127.0.0.1:{health}/health", 503, pods)
        pods.insert(0, start_pod(artifact, 0, api, rendezvous))
        wait_status(f"http://127.0.0.1:{api}/ready", 200, pods)
        assert httpx.get(f"http://127.0.0.1:{health}/health").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{health}/v1/models").status_code == 404
        answers = complete_all(f"http://127.0.0.1:{api}")
        assert [a["tokens"] for a in answers] == [r["tokens"] for r in reference]
        assert [a["text"] for a in answers] == [r["text"] for r in reference]
        for a, r in zip(answers, reference, strict=True):
            assert a["logprobs"] == pytest.approx(r["logprobs"], abs=1e-4)
        if end in ("drain", "leave"):
            # drain: SIGTERM to each pod (the group deleted): rank 0 drains, then all stop. leave: pod 1
            # alone is deleted: it asks rank 0 to drain. Either way the request in flight finishes.
            body = {
                "model": "tiny-llama",
                "prompt": "A",
                "max_tokens": 200,
                "temperature": 0,
                "ignore_eos": True,
            }
            with ThreadPoolExecutor(1) as pool:
                asked = pool.submit(
                    httpx.post, f"http://127.0.0.1:{api}/v1/completions", json=body, timeout=60
                )
                time.sleep(0.3)
                for p in pods if end == "drain" else pods[1:]:
                    os.killpg(p.pid, signal.SIGTERM)
                answer = asked.result()
            assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 200
            assert [p.wait(60) for p in pods] == [0, 0]
        else:  # pod 1 dies: pod 0 must notice and exit non-zero, so the whole group restarts
            os.killpg(pods[1].pid, signal.SIGKILL)
            pods[1].wait(10)
            assert pods[0].wait(60) != 0
        for p in pods:
            left = subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True, text=True).stdout.strip()
            assert left == "", "no rank may outlive its pod's first process"
    finally:
        for p in pods:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
