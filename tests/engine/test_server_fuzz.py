"""Bad input and load against the real server: generated request bodies (hypothesis) never produce a
5xx or a non-OpenAI error shape; hundreds of concurrent streams, some abandoned mid-way, all finish or
abort and leave the KV cache fully released.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kiln_engine import metric_names as mn  # noqa: E402
from kiln_engine.server.app import ServerSettings  # noqa: E402
from kiln_engine.testing.tiny import make_tiny_checkpoint  # noqa: E402
from tests.engine.test_server import MODEL, ThreadServer, metric, metrics  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny", "llama", seed=9)
    with ThreadServer(ckpt, ServerSettings(), max_model_len=128, num_kv_blocks=24, block_size=16) as s:
        yield s


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly plausible values, sometimes anything JSON."""
    return st.one_of(valid, valid, json_values)


completion_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": field(st.sampled_from([MODEL, "other", ""])),
        "prompt": field(st.one_of(st.text(max_size=200), st.lists(st.integers(-5, 500), max_size=200))),
        "max_tokens": field(st.integers(-3, 10**9)),
        "temperature": field(st.floats(-1, 3, allow_nan=False)),
        "top_p": field(st.floats(-0.5, 1.5, allow_nan=False)),
        "top_k": field(st.integers(-3, 1000)),
        "n": field(st.integers(-1, 3)),
        "stop": field(st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=20))),
        "seed": field(st.integers(-(2**70), 2**70)),
        "logprobs": field(st.integers(-1, 30)),
        "stream": field(st.booleans()),
        "echo": field(st.booleans()),
    },
)
chat_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": field(st.sampled_from([MODEL, "other"])),
        "messages": field(
            st.lists(
                st.fixed_dictionaries(
                    {"role": field(st.sampled_from(["user", "system", "assistant", "robot"])),
                     "content": field(st.text(max_size=100))}
                ),
                max_size=4,
            )
        ),
        "max_tokens": field(st.integers(-3, 300)),
        "max_completion_tokens": field(st.integers(-3, 300)),
        "logprobs": field(st.booleans()),
        "top_logprobs": field(st.integers(-1, 30)),
        "stream": field(st.booleans()),
        "temperature": field(st.floats(0, 2, allow_nan=False)),
    },
)  # fmt: skip


def check(r: httpx.Response) -> None:
    assert r.status_code in (200, 400), (r.status_code, r.text[:500])
    if r.status_code == 400:
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and isinstance(err["message"], str) and err["message"]
        assert set(err) == {"message", "type", "param", "code"}
    elif r.headers["content-type"].startswith("text/event-stream"):
        lines = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        for line in lines[:-1]:
            assert "error" not in json.loads(line[6:]), line


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=completion_bodies)
def test_fuzzed_completions(server: ThreadServer, body: dict) -> None:
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 0:
        body["max_tokens"] = min(body["max_tokens"], 24) if random.random() < 0.9 else body["max_tokens"]
    check(httpx.post(server.url + "/v1/completions", json=body, timeout=60))


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=chat_bodies)
def test_fuzzed_chat(server: ThreadServer, body: dict) -> None:
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and body[key] > 24:
            body[key] = 24
    check(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200))
def test_fuzzed_raw_bytes(server: ThreadServer, raw: bytes) -> None:
    r = httpx.post(server.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code in (200, 400) and (r.status_code == 200 or "error" in r.json())


def test_server_is_healthy_and_released_after_fuzzing(server: ThreadServer) -> None:
    assert httpx.get(server.url + "/ready").status_code == 200
    m = metrics(server.url)
    assert metric(m, mn.KV_CACHE_USAGE) == 0 and metric(m, mn.RUNNING_REQUESTS) == 0
    assert server.app.state.runner.active == 0


def test_hundreds_of_concurrent_streams_some_abandoned(server: ThreadServer) -> None:
    n = 300

    async def one(i: int, client: httpx.AsyncClient) -> str:
        body = {"model": MODEL, "prompt": f"request {i}", "max_tokens": 6, "stream": True, "ignore_eos": True}
        async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    seen += 1
                    if i % 5 == 0 and seen == 2:
                        return "abandoned"  # leaves the stream mid-way
                if line == "data: [DONE]":
                    return "done"
        return "cut"

    async def main() -> list[str]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(i, client) for i in range(n)))

    before = metrics(server.url)
    results = asyncio.run(main())
    assert results.count("done") + results.count("abandoned") == n
    deadline = time.monotonic() + 30
    while True:
        m = metrics(server.url)
        if (
            metric(m, mn.KV_CACHE_USAGE) == 0
            and metric(m, mn.RUNNING_REQUESTS) == 0
            and metric(m, mn.QUEUE_DEPTH) == 0
        ):
            break
        assert time.monotonic() < deadline, "KV cache not released after the streams"
        time.sleep(0.2)
    finished = sum(
        metric(m, mn.REQUESTS, status=s) - metric(before, mn.REQUESTS, status=s) for s in ("ok", "aborted")
    )
    assert finished == n
    assert server.app.state.runner.active == 0
    assert httpx.get(server.url + "/ready").status_code == 200
