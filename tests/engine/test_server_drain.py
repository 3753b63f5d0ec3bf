"""SIGTERM drain of a real `kiln-engine serve` process: the in-flight stream completes, new requests
and readiness get 503 while it drains, and the process exits 0. Also: a drain timeout aborts, and an
idle keep-alive connection stays usable past what proxies in front reuse but does not delay the exit.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

pytest.importorskip("torch")
from kiln_engine.testing.tiny import make_tiny_checkpoint  # noqa: E402

MODEL = "drain-model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # wide and deep enough that a few hundred tokens take seconds on one CPU thread
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("drain") / "ckpt", "llama", seed=5, hidden_size=256, intermediate_size=1024,
        num_hidden_layers=8, max_position_embeddings=2048,
    )  # fmt: skip


def start_server(checkpoint: Path, drain_timeout: float) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln_engine.cli", "serve", "--model", str(checkpoint), "--host", "127.0.0.1",
         "--port", str(port), "--served-model-name", MODEL, "--device", "cpu", "--max-model-len", "1024",
         "--drain-timeout", str(drain_timeout), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.2)


@pytest.fixture()
def stopper() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_sigterm_finishes_in_flight_stream_then_exits_zero(checkpoint: Path, stopper: list) -> None:
    proc, url = start_server(checkpoint, drain_timeout=60)
    stopper.append(proc)
    body = {
        "model": MODEL, "prompt": "Once upon a time", "max_tokens": 300, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    texts: list[str] = []
    usage = None
    finish = None
    with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                texts.append(line)
                if len(texts) == 3:
                    break
        proc.send_signal(signal.SIGTERM)  # mid-stream
        # while draining: readiness and new requests get 503 in the OpenAI error shape
        deadline = time.monotonic() + 10
        while httpx.get(url + "/ready", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "/ready never turned 503"
            time.sleep(0.05)
        rejected = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=5)
        assert rejected.status_code == 503
        assert rejected.json()["error"]["code"] == "draining"
        assert httpx.get(url + "/health", timeout=5).status_code == 200  # alive while draining
        for line in lines:
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: ") :])
                if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                    finish = chunk["choices"][0]["finish_reason"]
                if chunk.get("usage"):
                    usage = chunk["usage"]
            elif line == "data: [DONE]":
                texts.append(line)
    assert finish == "length", "the accepted stream must run to completion"
    assert usage is not None and usage["completion_tokens"] == 300
    assert texts[-1] == "data: [DONE]"
    assert proc.wait(30) == 0


def test_drain_timeout_aborts_what_is_left_and_exits_zero(checkpoint: Path, stopper: list) -> None:
    proc, url = start_server(checkpoint, drain_timeout=1)
    stopper.append(proc)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 1000, "stream": True, "ignore_eos": True}
    finish = None
    started = time.monotonic()
    with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/completions", json=body) as r:
        for i, line in enumerate(r.iter_lines()):
            if i == 2:
                proc.send_signal(signal.SIGTERM)
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: ") :])
                finish = chunk["choices"][0]["finish_reason"] or finish
    assert finish == "abort"
    assert proc.wait(30) == 0
    assert time.monotonic() - started < 15  # 1000 tokens would take far longer: it was cut at the timeout


def test_idle_server_exits_zero_on_sigterm(checkpoint: Path, stopper: list) -> None:
    proc, _ = start_server(checkpoint, drain_timeout=30)
    stopper.append(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


def test_idle_connection_is_kept_past_a_proxys_reuse_and_does_not_delay_exit(
    checkpoint: Path, stopper: list
) -> None:
    proc, url = start_server(checkpoint, drain_timeout=30)
    stopper.append(proc)
    port = int(url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def health() -> int:
        connection.request("GET", "/health")
        response = connection.getresponse()
        response.read()
        return response.status

    assert health() == 200
    assert connection.sock is not None
    local = connection.sock.getsockname()
    # Idle longer than uvicorn's default keep-alive (5 s, at which the server used to close it while
    # clients still reused it), then the same socket must answer: http.client does not reconnect an
    # open connection, so a server-side close shows as RemoteDisconnected here.
    time.sleep(6.5)
    assert health() == 200
    assert connection.sock is not None and connection.sock.getsockname() == local
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert time.monotonic() - started < 10, "an idle keep-alive connection held up the exit"
    connection.close()
