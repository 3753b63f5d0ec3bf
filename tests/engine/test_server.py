"""The HTTP server over a real engine on a tiny checkpoint: OpenAI client, errors, metrics, auth,
disconnects, a full KV cache. Real uvicorn on a loopback port, real engine thread.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import pytest

pytestmark = pytest.mark.engine

pytest.importorskip("torch")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from kiln_engine import metric_names as mn  # noqa: E402
from kiln_engine.backends.torch import served_model  # noqa: E402
from kiln_engine.config import EngineConfig  # noqa: E402
from kiln_engine.server.app import ServerSettings, create_app  # noqa: E402
from kiln_engine.testing.tiny import make_tiny_checkpoint  # noqa: E402

MODEL = "tiny-llama"
API_KEY = "s3cret-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AppServer:
    """uvicorn serving an app on a loopback port in a background thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class ThreadServer(AppServer):
    """The tiny model's app (CPU engine with these options) served by `AppServer`."""

    def __init__(self, checkpoint: Path, settings: ServerSettings, **engine: int | bool) -> None:
        config = EngineConfig(device="cpu", **engine)  # type: ignore[arg-type]
        self.model = served_model(checkpoint, MODEL, config)
        super().__init__(create_app(self.model, settings))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "llama", seed=3)


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[ThreadServer]:
    with ThreadServer(checkpoint, ServerSettings(), max_model_len=256) as s:
        yield s


def make_slow_checkpoint(path: Path) -> Path:
    """A wider, deeper tiny model: ~15 ms a token on one CPU thread, so a long stream lasts seconds."""
    return make_tiny_checkpoint(
        path, "llama", seed=5, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
        max_position_embeddings=2048,
    )  # fmt: skip


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    ckpt = make_slow_checkpoint(tmp_path_factory.mktemp("slow") / "slow")
    with ThreadServer(ckpt, ServerSettings(), max_model_len=1024) as s:
        yield s


@pytest.fixture()
def client(server: ThreadServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(values: dict, name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted({"model": MODEL, **labels}.items()))), 0.0)


# ---------------------------------------------------------------------- the official client


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_greedy_matches_the_engine(
    client: openai.OpenAI, server: ThreadServer, checkpoint: Path
) -> None:
    from kiln_engine.engine import LLMEngine
    from kiln_engine.interface import SamplingParams

    prompt = "Hello, world! How are you"
    out = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    tok = server.model.tokenizer
    ids = tok.encode(prompt)
    assert out.usage is not None and out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 12
    offline = LLMEngine(checkpoint, EngineConfig(device="cpu", max_model_len=256))
    expected = offline.generate([ids], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    # a random model can emit partial UTF-8; compare the text without replacement characters
    assert choice.text.replace("\ufffd", "") == tok.decode(expected).replace("\ufffd", "")


def test_streaming_completion_equals_non_streaming(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 10, "temperature": 0}
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1


def test_chat_completion_and_stream(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital?"},
    ]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, seed=1
    )
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage is not None and 1 <= whole.usage.completion_tokens <= 8
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_chat_prompt_uses_the_chat_template(client: openai.OpenAI, server: ThreadServer) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
    tok = server.model.tokenizer
    expected = tok.encode(
        tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False
    )
    assert out.usage is not None and out.usage.prompt_tokens == len(expected)


def test_stop_string_cuts_the_text(client: openai.OpenAI) -> None:
    kwargs = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    full = client.completions.create(max_tokens=24, **kwargs).choices[0].text
    assert len(full) >= 6, full
    stop = full[3:5]
    cut = client.completions.create(max_tokens=24, stop=[stop], **kwargs).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_logprobs_and_seeded_sampling(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=MODEL, prompt="Numbers: 0 1 2", max_tokens=4, temperature=0, logprobs=3
    )
    lp = out.choices[0].logprobs
    assert lp is not None and len(lp.token_logprobs) == len(lp.tokens) >= 1
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 3 for t in lp.top_logprobs)
    kwargs = {"model": MODEL, "prompt": "Numbers", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9}
    a = client.completions.create(seed=7, extra_body={"top_k": 20}, **kwargs).choices[0].text
    b = client.completions.create(seed=7, extra_body={"top_k": 20}, **kwargs).choices[0].text
    assert a == b


# ---------------------------------------------------------------------- bad requests: 400, server stays up

LONG_PROMPT = list(range(10, 10 + 300))  # 300 token ids > max_model_len 256

BAD_REQUESTS = [
    ("/v1/completions", {"model": MODEL, "prompt": LONG_PROMPT}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [5] * 200, "max_tokens": 100}, "max_tokens"),
    ("/v1/completions", {"model": "no-such-model", "prompt": "hi"}, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 2.5}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 17}, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": [1000000]}, "prompt"),
    ("/v1/completions", {"model": MODEL}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
        "messages.0.role",
    ),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, "messages"),
    ("/v1/chat/completions", {"model": 42, "messages": [{"role": "user", "content": "x"}]}, "model"),
]


@pytest.mark.parametrize(
    ("path", "body", "param"), BAD_REQUESTS, ids=[f"{p}:{b}" for p, _, b in BAD_REQUESTS]
)
def test_bad_request_gets_openai_400(server: ThreadServer, path: str, body: dict, param: str) -> None:
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["message"] and "code" in err
    ok = httpx.post(
        server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=30
    )
    assert ok.status_code == 200


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[1, 2, 3]", b"", b'"just a string"', b'{"model": "tiny-llama", "prompt": "hi",']
)
def test_malformed_body_gets_400(server: ThreadServer, raw: bytes) -> None:
    r = httpx.post(server.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_method_have_the_error_shape(server: ThreadServer) -> None:
    r = httpx.get(server.url + "/v1/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="other", prompt="hi")
    assert info.value.status_code == 400


# ---------------------------------------------------------------------- health, metrics


def test_health_and_ready(server: ThreadServer) -> None:
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    r = httpx.get(server.url + "/ready")
    assert r.status_code == 200 and r.json()["model"] == MODEL


def test_metrics_change_as_requests_flow(server: ThreadServer, client: openai.OpenAI) -> None:
    before = metrics(server.url)
    client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})  # fmt: skip
    httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    after = metrics(server.url)
    assert metric(after, mn.TTFT_SECONDS + "_count") == metric(before, mn.TTFT_SECONDS + "_count") + 1
    assert metric(after, mn.E2E_SECONDS + "_count") == metric(before, mn.E2E_SECONDS + "_count") + 1
    assert (
        metric(after, mn.INTER_TOKEN_SECONDS + "_count")
        == metric(before, mn.INTER_TOKEN_SECONDS + "_count") + 4
    )
    assert metric(after, mn.GENERATION_TOKENS) == metric(before, mn.GENERATION_TOKENS) + 5
    assert metric(after, mn.PROMPT_TOKENS) > metric(before, mn.PROMPT_TOKENS)
    assert metric(after, mn.REQUESTS, status="ok") == metric(before, mn.REQUESTS, status="ok") + 1
    assert metric(after, mn.REQUESTS, status="error") == metric(before, mn.REQUESTS, status="error") + 1
    for gauge in (mn.QUEUE_DEPTH, mn.RUNNING_REQUESTS, mn.KV_CACHE_USAGE):
        assert (gauge, (("model", MODEL),)) in after
    assert (mn.PREEMPTIONS, (("model", MODEL),)) in after


def test_prefix_cache_hits_are_counted(server: ThreadServer, client: openai.OpenAI) -> None:
    prompt = [7 + (i % 50) for i in range(100)]  # several full blocks
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    before = metric(metrics(server.url), mn.PREFIX_CACHE_HIT_TOKENS)
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert metric(metrics(server.url), mn.PREFIX_CACHE_HIT_TOKENS) > before


def _wait_idle(url: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if metric(m, mn.RUNNING_REQUESTS) == 0 and metric(m, mn.KV_CACHE_USAGE) == 0:
            return m
        assert time.monotonic() < deadline, f"KV cache not released: {metric(m, mn.KV_CACHE_USAGE)}"
        time.sleep(0.1)


def test_client_disconnect_mid_stream_frees_kv_blocks(slow_server: ThreadServer) -> None:
    before = metrics(slow_server.url)
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 900,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", slow_server.url + "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        got: list[str] = []
        used = 0.0
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(line)
            if len(got) >= 3:
                # still reading: the request holds KV blocks (checked before the client leaves)
                used = metric(metrics(slow_server.url), mn.KV_CACHE_USAGE)
                break
        assert used > 0, "the request should hold KV blocks while it streams"
    # leaving the block closed the connection mid-stream
    after = _wait_idle(slow_server.url)
    aborted = metric(after, mn.REQUESTS, status="aborted") - metric(before, mn.REQUESTS, status="aborted")
    assert aborted == 1
    assert metric(after, mn.GENERATION_TOKENS) - metric(before, mn.GENERATION_TOKENS) < 900
    assert slow_server.app.state.runner.active == 0


def test_non_streaming_disconnect_aborts(slow_server: ThreadServer) -> None:
    before = metrics(slow_server.url)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server.url + "/v1/completions", json=body, timeout=0.3)
    after = _wait_idle(slow_server.url)
    assert metric(after, mn.REQUESTS, status="aborted") == metric(before, mn.REQUESTS, status="aborted") + 1


# ---------------------------------------------------------------------- auth, full KV cache


def test_bearer_token_auth(checkpoint: Path) -> None:
    with ThreadServer(checkpoint, ServerSettings(api_key=API_KEY), max_model_len=128) as s:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
        r = httpx.post(s.url + "/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(s.url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200  # probes stay open
        c = openai.OpenAI(base_url=s.url + "/v1", api_key=API_KEY, max_retries=0)
        assert c.completions.create(**body).usage is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="bad", max_retries=0).models.list()


def test_full_kv_cache_queues_requests_instead_of_failing(checkpoint: Path) -> None:
    # 6 blocks of 16 tokens = 96 tokens of KV cache; each request needs ~60 tokens, so they must queue.
    with ThreadServer(checkpoint, ServerSettings(), max_model_len=96, num_kv_blocks=6, block_size=16) as s:
        results: list[httpx.Response] = []

        def one(i: int) -> None:
            body = {"model": MODEL, "prompt": [20 + i] * 20, "max_tokens": 40, "ignore_eos": True}
            results.append(httpx.post(s.url + "/v1/completions", json=body, timeout=120))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [200] * 5
        assert all(json.loads(r.text)["usage"]["completion_tokens"] == 40 for r in results)
        m = _wait_idle(s.url)
        assert metric(m, mn.REQUESTS, status="ok") == 5
