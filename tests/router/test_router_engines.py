"""The router in front of real `kiln-engine serve` processes on a tiny checkpoint, all over loopback
HTTP: prefix affinity (seen in the engines' own prefix-cache counters), streaming passthrough equal
to the engine's own output, and a replica SIGKILLed under load failing none of the requests that had
not started streaming.
"""

from __future__ import annotations

import asyncio
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
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from kiln_engine import metric_names as engine_names  # noqa: E402
from kiln_engine.testing.tiny import make_tiny_checkpoint  # noqa: E402
from kiln_router import metrics as router_names  # noqa: E402
from kiln_router.pick import Policy, block_hashes, rank  # noqa: E402

MODEL = "tiny"
ENGINES = 2  # enough to show affinity and a kill; each costs seconds of CPU to start
POLICY = Policy(block_chars=32, affinity_blocks=8)  # a 256-character affinity prefix
WORDS = ("the quick brown fox jumps over the lazy dog while a paged cache stores keys and values").split()  # noqa: SIM905


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(proc: subprocess.Popen[str], url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not become ready"
        time.sleep(0.2)


def spawn(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class Engines:
    """`ENGINES` engine processes and one router process in front of them."""

    def __init__(self, checkpoint: Path) -> None:
        self.urls: list[str] = []
        self.procs: dict[str, subprocess.Popen[str]] = {}
        for _ in range(ENGINES):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            self.urls.append(url)
            self.procs[url] = spawn(
                [sys.executable, "-m", "kiln_engine.cli", "serve", "--model", str(checkpoint), "--host",
                 "127.0.0.1", "--port", str(port), "--served-model-name", MODEL, "--device", "cpu",
                 "--max-model-len", "1024", "--drain-timeout", "0", "--log-level", "warning"]
            )  # fmt: skip
        port = free_port()
        self.router = f"http://127.0.0.1:{port}"
        self.router_proc = spawn(
            [sys.executable, "-m", "kiln_router.cli", "serve", "--endpoints", ",".join(self.urls), "--host",
             "127.0.0.1", "--port", str(port), "--block-chars", str(POLICY.block_chars), "--affinity-blocks",
             str(POLICY.affinity_blocks), "--scrape-interval", "0.2", "--log-level", "warning"]
        )  # fmt: skip

    def wait(self) -> Engines:
        for url, proc in self.procs.items():
            wait_ready(proc, url)
        wait_ready(self.router_proc, self.router)
        return self

    def stop(self) -> None:
        for proc in [*self.procs.values(), self.router_proc]:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("router") / "tiny", "llama", seed=3)
    running = Engines(checkpoint)
    try:
        yield running.wait()
    finally:
        running.stop()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def engine_counter(url: str, name: str, **labels: str) -> float:
    return scrape(url).get((name, tuple(sorted({"model": MODEL, **labels}.items()))), 0.0)


def served(url: str) -> float:
    return engine_counter(url, engine_names.REQUESTS, status="ok")


def words(seed: int, n: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * (seed + 3)) % len(WORDS)] for i in range(n))


def complete(base: str, prompt: str, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(base + "/v1/completions", json=body, timeout=120)


# ------------------------------------------------------------------------------- affinity


def test_requests_sharing_a_long_prefix_land_on_one_engine_and_hit_its_prefix_cache(engines: Engines) -> None:
    shared = words(1, 80)  # ~400 characters: more than the affinity prefix
    assert len(shared) > POLICY.block_chars * POLICY.affinity_blocks
    served_before = {u: served(u) for u in engines.urls}
    hits_before = {u: engine_counter(u, engine_names.PREFIX_CACHE_HIT_TOKENS) for u in engines.urls}
    for i in range(6):
        assert complete(engines.router, f"{shared} question {i}: {words(i + 10, 5)}").status_code == 200
    served_now = {u: served(u) - served_before[u] for u in engines.urls}
    hits = {u: engine_counter(u, engine_names.PREFIX_CACHE_HIT_TOKENS) - hits_before[u] for u in engines.urls}
    target = max(served_now, key=lambda u: served_now[u])
    assert served_now[target] == 6, served_now
    assert hits[target] > 0 and all(hits[u] == 0 for u in engines.urls if u != target), hits
    # the engine the router chose is the one its rendezvous ranking names: a second router agrees
    assert (
        target == rank(block_hashes(shared, POLICY.block_chars, POLICY.affinity_blocks)[-1], engines.urls)[0]
    )


def test_different_prefixes_spread_over_the_engines(engines: Engines) -> None:
    before = {u: served(u) for u in engines.urls}
    for i in range(12):
        assert complete(engines.router, f"{i} {words(i + 20, 70)}").status_code == 200
    assert sum(1 for u in engines.urls if served(u) > before[u]) >= 2


# ------------------------------------------------------------------------------- passthrough


def events(text: str) -> list[dict]:
    """The SSE events of a stream, without the fields that differ per request (id, created)."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            event.pop("id", None)
            event.pop("created", None)
            out.append(event)
    assert text.rstrip().endswith("data: [DONE]")
    return out


def test_a_stream_through_the_router_equals_the_engines_own(engines: Engines) -> None:
    prompt = words(5, 60)
    body = {"max_tokens": 24, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    request = {"model": MODEL, "prompt": prompt, "temperature": 0, **body}
    with httpx.stream("POST", engines.router + "/v1/completions", json=request, timeout=60) as via_router:
        reads = list(via_router.iter_raw())  # a proxy that buffered would hand it over in one read
    direct = complete(engines.urls[0], prompt, **body)
    assert via_router.status_code == direct.status_code == 200
    assert len(reads) > 1
    assert via_router.headers["content-type"] == direct.headers["content-type"]
    assert events(b"".join(reads).decode()) == events(direct.text)
    assert len(events(direct.text)) >= 24


def test_chat_and_models_pass_through(engines: Engines) -> None:
    messages = [{"role": "system", "content": words(2, 60)}, {"role": "user", "content": "hello"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0}
    via_router = httpx.post(engines.router + "/v1/chat/completions", json=body, timeout=60).json()
    direct = httpx.post(engines.urls[1] + "/v1/chat/completions", json=body, timeout=60).json()
    assert via_router["choices"] == direct["choices"]
    assert httpx.get(engines.router + "/v1/models").json()["data"][0]["id"] == MODEL


def test_bad_bodies_get_a_400_from_the_router_and_errors_of_engines_pass_through(engines: Engines) -> None:
    bad = httpx.post(engines.router + "/v1/completions", content=b"{not json", timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    # a body the router can route but the engine refuses: the engine's own 400 reaches the client
    refused = complete(engines.router, words(3, 60), max_tokens=-1)
    assert refused.status_code == complete(engines.urls[0], words(3, 60), max_tokens=-1).status_code == 400


# ------------------------------------------------------------------------------- a replica killed


async def stream_once(client: httpx.AsyncClient, base: str, prompt: str) -> tuple[bool, bool]:
    """(got at least one event, ended with [DONE]) for one streamed request; raises if it broke."""
    got_bytes = False
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 48, "ignore_eos": True, "stream": True}
    try:
        async with client.stream("POST", base + "/v1/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            text = ""
            async for chunk in response.aiter_text():
                got_bytes = True
                text += chunk
        return got_bytes, text.rstrip().endswith("data: [DONE]")
    except httpx.HTTPError:
        return got_bytes, False


async def whole_once(client: httpx.AsyncClient, base: str, prompt: str) -> int:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 48, "ignore_eos": True}
    response = await client.post(base + "/v1/completions", json=body)
    return response.status_code if response.status_code != 200 else (
        200 if response.json()["usage"]["completion_tokens"] == 48 else -1)  # fmt: skip


async def busy(client: httpx.AsyncClient, url: str) -> None:
    """Returns once the engine at `url` reports requests running or waiting."""
    gauges = (engine_names.RUNNING_REQUESTS, engine_names.QUEUE_DEPTH)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = (await client.get(url + "/metrics")).text
        if any(line.startswith(gauges) and float(line.rsplit(" ", 1)[1]) > 0 for line in text.splitlines()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{url} never had a request in flight")


def test_sigkill_of_an_engine_fails_no_request_that_had_not_started_streaming(engines: Engines) -> None:
    """Runs last: it kills one of the module's engines."""
    shared = words(7, 80)  # one prefix, so the victim (its affinity target) holds requests when it dies
    victim = rank(block_hashes(shared, POLICY.block_chars, POLICY.affinity_blocks)[-1], engines.urls)[0]
    retries_before = sum(v for (n, _), v in scrape(engines.router).items() if n == router_names.RETRIES)

    async def load() -> tuple[list[int], list[tuple[bool, bool]]]:
        async with httpx.AsyncClient(timeout=120) as client:
            whole = [
                asyncio.ensure_future(whole_once(client, engines.router, f"{shared} {i}")) for i in range(8)
            ]
            streams = [asyncio.ensure_future(stream_once(client, engines.router, f"{shared} s{i}"))
                       for i in range(8)]  # fmt: skip
            await busy(client, victim)  # kill it with requests on it, however fast the machine
            engines.procs[victim].send_signal(signal.SIGKILL)
            later = [asyncio.ensure_future(whole_once(client, engines.router, f"{shared} late{i}"))
                     for i in range(6)]  # fmt: skip
            return list(await asyncio.gather(*whole, *later)), list(await asyncio.gather(*streams))

    codes, streams = asyncio.run(load())
    assert engines.procs[victim].wait(10) == -signal.SIGKILL
    assert codes == [200] * len(codes)  # none of them had a byte when the engine died: all retried
    broken = [s for s in streams if not s[1]]
    assert all(got_bytes for got_bytes, _ in broken)  # only streams already under way may break
    retries = (
        sum(v for (n, _), v in scrape(engines.router).items() if n == router_names.RETRIES) - retries_before
    )
    assert retries >= 1  # the kill did catch requests on the victim
