"""The OpenAI proxy the TensorRT-LLM backend serves behind, tested against a real OpenAI-compatible
upstream (Kiln's own torch server standing in for trtllm-serve): same API, 400s, metric names,
disconnect propagation and drain.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.engine

pytest.importorskip("torch")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from kiln_engine import metric_names as mn  # noqa: E402
from kiln_engine.server.app import ServerSettings  # noqa: E402
from kiln_engine.server.drain import DrainingServer  # noqa: E402
from kiln_engine.server.proxy import UpstreamSettings, create_proxy_app, stats_from_iteration_json  # noqa: E402
from tests.engine.test_server import ThreadServer, free_port, make_slow_checkpoint, metric, metrics  # noqa: E402

SERVED = "front-name"


class ProxyThread:
    """The proxy app under Kiln's DrainingServer in a thread (SIGTERM is delivered via handle_exit)."""

    def __init__(self, upstream_url: str, api_key: str | None = None, drain_timeout_s: float = 30.0) -> None:
        self.app = create_proxy_app(
            SERVED, UpstreamSettings(url=upstream_url), api_key=api_key, drain_timeout_s=drain_timeout_s
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = DrainingServer(config, self.app.state.drain)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ProxyThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    ckpt = make_slow_checkpoint(tmp_path_factory.mktemp("up") / "slow")
    with ThreadServer(ckpt, ServerSettings(), max_model_len=1024) as s:
        yield s


@pytest.fixture(scope="module")
def proxy(upstream: ThreadServer) -> Iterator[ProxyThread]:
    with ProxyThread(upstream.url) as p:
        yield p


def pmetric(values: dict, name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted({"model": SERVED, **labels}.items()))), 0.0)


def test_openai_client_through_the_proxy(proxy: ProxyThread, upstream: ThreadServer) -> None:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == [SERVED]
    kwargs = {"model": SERVED, "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
    whole = client.completions.create(**kwargs)
    assert whole.model == SERVED and whole.usage is not None and whole.usage.completion_tokens >= 1
    direct = httpx.post(upstream.url + "/v1/completions", json={**kwargs, "model": "tiny-llama"}).json()
    assert whole.choices[0].text == direct["choices"][0]["text"]
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert all(c.usage is None for c in chunks), "usage only when the client asked for it"
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    chat = client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert chat.choices[0].message.role == "assistant"


@pytest.mark.parametrize(
    "body",
    [{"model": "other", "prompt": "hi"}, {"model": SERVED, "prompt": "hi", "top_p": 0}, {"model": SERVED}],
)
def test_bad_requests_get_400_at_the_proxy(proxy: ProxyThread, body: dict) -> None:
    r = httpx.post(proxy.url + "/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_proxy_exports_the_same_metric_names(proxy: ProxyThread) -> None:
    before = metrics(proxy.url)
    body = {"model": SERVED, "prompt": "Hello", "max_tokens": 6, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", proxy.url + "/v1/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    after = metrics(proxy.url)
    assert pmetric(after, mn.TTFT_SECONDS + "_count") == pmetric(before, mn.TTFT_SECONDS + "_count") + 1
    assert pmetric(after, mn.INTER_TOKEN_SECONDS + "_count") > pmetric(
        before, mn.INTER_TOKEN_SECONDS + "_count"
    )
    assert pmetric(after, mn.E2E_SECONDS + "_count") == pmetric(before, mn.E2E_SECONDS + "_count") + 1
    assert pmetric(after, mn.GENERATION_TOKENS) == pmetric(before, mn.GENERATION_TOKENS) + 6
    assert pmetric(after, mn.PROMPT_TOKENS) > pmetric(before, mn.PROMPT_TOKENS)
    assert pmetric(after, mn.REQUESTS, status="ok") == pmetric(before, mn.REQUESTS, status="ok") + 1
    for gauge in (mn.QUEUE_DEPTH, mn.RUNNING_REQUESTS, mn.KV_CACHE_USAGE):
        assert (gauge, (("model", SERVED),)) in after


def test_disconnect_through_the_proxy_aborts_upstream(proxy: ProxyThread, upstream: ThreadServer) -> None:
    before = metrics(upstream.url)
    body = {
        "model": SERVED,
        "prompt": "Once upon a time",
        "max_tokens": 900,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=30) as http, http.stream("POST", proxy.url + "/v1/completions", json=body) as r:
        n = 0
        for line in r.iter_lines():
            n += line.startswith("data: ")
            if n >= 3:
                assert upstream.app.state.runner.active == 1
                break
    deadline = time.monotonic() + 20
    while upstream.app.state.runner.active or metric(metrics(upstream.url), mn.KV_CACHE_USAGE) > 0:
        assert time.monotonic() < deadline, "upstream request was not aborted"
        time.sleep(0.1)
    after = metrics(upstream.url)
    assert metric(after, mn.REQUESTS, status="aborted") == metric(before, mn.REQUESTS, status="aborted") + 1


def test_auth_at_the_proxy(upstream: ThreadServer) -> None:
    with ProxyThread(upstream.url, api_key="k") as p:
        assert httpx.get(p.url + "/v1/models").status_code == 401
        assert httpx.get(p.url + "/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
        assert httpx.get(p.url + "/ready").status_code == 200


def test_drain_finishes_the_stream_rejects_new_work_and_stops(upstream: ThreadServer) -> None:
    p = ProxyThread(upstream.url).__enter__()
    try:
        body = {"model": SERVED, "prompt": "Hi", "max_tokens": 120, "stream": True, "ignore_eos": True}
        finish = None
        with httpx.Client(timeout=60) as http, http.stream("POST", p.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    break
            p.server.handle_exit(signal.SIGTERM, None)
            deadline = time.monotonic() + 5
            while httpx.get(p.url + "/ready").status_code != 503:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            rejected = httpx.post(p.url + "/v1/completions", json={"model": SERVED, "prompt": "x"})
            assert rejected.status_code == 503 and rejected.json()["error"]["code"] == "draining"
            for line in lines:
                if line.startswith("data: {"):
                    finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
        assert finish == "length"
        p.thread.join(20)
        assert not p.thread.is_alive(), "the proxy should exit once drained"
    finally:
        p.__exit__()


def test_iteration_stats_to_engine_stats() -> None:
    stats = stats_from_iteration_json(
        [{"numActiveRequests": 1}, {"numActiveRequests": 3, "numQueuedRequests": 2,
                                    "kvCacheStats": {"maxNumBlocks": 100, "usedNumBlocks": 25}}]
    )  # fmt: skip
    assert stats is not None
    assert (stats.running, stats.waiting, stats.kv_blocks_total, stats.kv_blocks_used) == (3, 2, 100, 25)
    assert stats_from_iteration_json([]) is None and stats_from_iteration_json({"x": 1}) is None


def test_unreachable_upstream_is_not_ready(tmp_path: Path) -> None:
    with ProxyThread(f"http://127.0.0.1:{free_port()}") as p:
        r = httpx.get(p.url + "/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_down"
