"""The engine's HTTP API under hostile clients, against a real `kiln-engine serve` process: fuzzed from
its own OpenAPI description (schemathesis), oversized and absurd requests, a thousand concurrent
streams with clients that vanish mid-way. Afterwards the server is healthy, answers a normal request,
and its KV cache is fully released.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

pytest.importorskip("torch")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from kiln_engine import metric_names as mn  # noqa: E402
from tests.reliability.engine_process import TINY_CHAT, EngineProcess  # noqa: E402
from tests.reliability.report import Report  # noqa: E402

MODEL = "tiny-chat"
POST_EXAMPLES = 40  # per operation and generation mode
STREAMS = int(os.environ.get("KILN_RELIABILITY_STREAMS", "1000"))
CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    log = tmp_path_factory.mktemp("engine-api") / "serve.log"
    args = [
        "--model",
        str(TINY_CHAT),
        "--device",
        "cpu",
        "--served-model-name",
        MODEL,
        "--log-level",
        "warning",
    ]
    with EngineProcess(args, log) as process:
        yield process
    assert process.process is not None and process.process.returncode == 0, process.output()[-3000:]


def error_shape_problem(response: httpx.Response | Any) -> str | None:
    """Why a response breaks the API's error contract (no 5xx; 4xx in the OpenAI error shape), or None."""
    status = response.status_code
    if status >= 500:
        return f"HTTP {status}: {response.text[:300]}"
    if status < 400:
        return None
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status} without an OpenAI error body: {response.text[:300]}"
    if set(error) != {"message", "type", "param", "code"} or not (
        isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    ):
        return f"HTTP {status} error body not in the OpenAI shape: {error}"
    return None


def assert_healthy_and_released(engine: EngineProcess, timeout: float = 60) -> dict[str, float]:
    """The server answers /health and a real request, and holds no KV blocks, running or queued requests."""
    assert engine.alive, engine.output()[-3000:]
    assert httpx.get(engine.url + "/health", timeout=10).status_code == 200
    answer = httpx.post(
        engine.url + "/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4}, timeout=60
    )
    assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"], answer.text
    deadline = time.monotonic() + timeout
    while True:
        m = engine.metrics()
        held = {k: m.get(k, 0.0) for k in (mn.KV_CACHE_USAGE, mn.RUNNING_REQUESTS, mn.QUEUE_DEPTH)}
        if not any(held.values()):
            return m
        assert time.monotonic() < deadline, f"not released after {timeout} s: {held}"
        time.sleep(0.2)


# ------------------------------------------------------------------------------ OpenAPI fuzzing


def _aim(case: Any) -> Any:
    """Half the bodies name the served model (and a small max_tokens), so they reach the engine."""
    if isinstance(case.body, dict) and hash(json.dumps(case.body, sort_keys=True, default=str)) % 2:
        case.body["model"] = MODEL
        for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            if isinstance(case.body.get(key), int) and case.body[key] > 32:
                case.body[key] = 32
    return case


def fuzz(op: Any, mode: GenerationMode, url: str, statuses: Counter[int], problems: list[str]) -> None:
    """Send `op`'s generated cases to `url`; count statuses; record (and fail on) broken contracts."""

    @settings(
        max_examples=POST_EXAMPLES,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=op.as_strategy(generation_mode=mode).map(_aim))
    def run(case: Any) -> None:
        response = case.call(base_url=url, timeout=120)
        statuses[response.status_code] += 1
        problem = error_shape_problem(response)
        if problem is None:
            try:
                case.validate_response(response, checks=CONFORMANCE)
            except BaseException as exc:  # schemathesis raises a group of its failures
                problem = str(exc)[:500]
        if problem:
            problems.append(f"{op.label} {mode.value}: {problem}")
        assert not problem, problem

    run()


def test_openapi_fuzzing_finds_no_5xx_and_only_openai_errors(
    engine: EngineProcess, reliability_report: Report
) -> None:
    schema = schemathesis.openapi.from_url(engine.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert labels >= {
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "POST /v1/responses",
        "GET /health",
    }, labels
    total = Counter[str]()
    problems: list[str] = []
    for op in operations:
        modes = [GenerationMode.POSITIVE]
        if op.method.upper() == "POST":  # operations without inputs have no invalid ones
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            statuses = Counter[int]()
            earlier = len(problems)
            try:
                fuzz(op, mode, engine.url, statuses, problems)
            finally:
                cases = sum(statuses.values())
                total[str(mode.value)] += cases
                shown = ", ".join(f"{s} x{n}" for s, n in sorted(statuses.items()))
                reliability_report.record(
                    f"engine API: schemathesis {op.label} ({mode.value})",
                    cases,
                    len(problems) - earlier,
                    shown,
                )
    assert not problems
    assert total["positive"] > 0 and total["negative"] > 0
    assert_healthy_and_released(engine)


# ------------------------------------------------------------------------------ oversized and absurd


def _body(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, **fields}).encode()


ABSURD: dict[str, bytes] = {
    "15 MB prompt": _body(prompt="hi " * 5_000_000, max_tokens=4),
    "1 MB single-word prompt": _body(prompt="x" * 1_000_000),
    "200k prompt token ids": _body(prompt=list(range(100)) * 2000),
    "token ids outside the vocabulary": _body(prompt=[10**12, -1], max_tokens=2),
    "20k chat messages": _body(messages=[{"role": "user", "content": "hi"}] * 20_000),
    "max_tokens 2**64": _body(prompt="hi", max_tokens=2**64),
    "max_tokens 10**400": _body(prompt="hi", max_tokens=10**400),
    "max_tokens 0": _body(prompt="hi", max_tokens=0),
    "max_tokens -1": _body(prompt="hi", max_tokens=-1),
    "max_tokens 1e400 (inf)": b'{"model": "tiny-chat", "prompt": "hi", "max_tokens": 1e400}',
    "max_tokens as a string": _body(prompt="hi", max_tokens="100"),
    "max_completion_tokens 10**12": _body(
        messages=[{"role": "user", "content": "hi"}], max_completion_tokens=10**12
    ),
    "seed 2**200": _body(prompt="hi", seed=2**200, max_tokens=2),
    "temperature NaN": b'{"model": "tiny-chat", "prompt": "hi", "temperature": NaN}',
    "10k stop strings": _body(prompt="hi", stop=["a"] * 10_000),
    "logprobs 10**9": _body(prompt="hi", logprobs=10**9),
    "n 1000": _body(prompt="hi", n=1000),
    "lone surrogate prompt": b'{"model": "tiny-chat", "prompt": "\\ud800", "max_tokens": 2}',
    "invalid UTF-8": b'{"model": "tiny-chat", "prompt": "\xff\xfe"}',
    "10k-deep JSON nesting": b'{"model": "tiny-chat", "prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    "truncated JSON": _body(prompt="hi")[:-3],
    "JSON array body": b"[1, 2, 3]",
    "empty body": b"",
}


def test_oversized_and_absurd_requests_are_400s_and_health_stays_responsive(
    engine: EngineProcess, reliability_report: Report
) -> None:
    health_latencies: list[float] = []
    stop = threading.Event()

    def watch_health() -> None:  # what a kubelet liveness probe would see meanwhile
        with httpx.Client(timeout=30) as probe:
            while not stop.is_set():
                started = time.monotonic()
                probe.get(engine.url + "/health").raise_for_status()
                health_latencies.append(time.monotonic() - started)
                time.sleep(0.1)

    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    problems: list[str] = []
    statuses = Counter[int]()
    try:
        for name, content in ABSURD.items():
            for path in ("/v1/completions", "/v1/chat/completions"):
                response = httpx.post(
                    engine.url + path,
                    content=content,
                    headers={"content-type": "application/json"},
                    timeout=120,
                )
                statuses[response.status_code] += 1
                problem = error_shape_problem(response)
                if problem is None and response.status_code != 400:
                    problem = f"HTTP {response.status_code}, expected 400: {response.text[:200]}"
                if problem:
                    problems.append(f"{name} -> {path}: {problem}")
    finally:
        stop.set()
        watcher.join(30)
    worst = max(health_latencies, default=float("inf"))
    reliability_report.record(
        "engine API: oversized prompts, absurd max_tokens, malformed JSON",
        sum(statuses.values()),
        len(problems) + (worst > 2),
        f"{dict(statuses)}; /health answered {len(health_latencies)} probes meanwhile, slowest {worst:.2f} s",
    )
    assert not problems, problems
    assert worst < 2.0, f"/health took {worst:.2f} s while oversized prompts were processed"
    assert_healthy_and_released(engine)


# ------------------------------------------------------------------------------ many streams


async def _client(i: int, client: httpx.AsyncClient, url: str) -> str:
    """One client; what it does depends on i: finish a stream, leave mid-stream, leave before the
    first byte, or give up on a non-streamed answer."""
    behaviour = i % 10
    body: dict[str, Any] = {"model": MODEL, "prompt": f"request {i}:", "max_tokens": 8, "ignore_eos": True}
    if behaviour == 3:  # non-streamed, long, and the client gives up after 0.5 s
        body.update(max_tokens=400)
        try:
            await client.post(url + "/v1/completions", json=body, timeout=0.5)
        except httpx.TimeoutException:
            return "gave-up"
        return "answered"
    body["stream"] = True
    if behaviour == 2:  # leaves before the first byte
        try:
            await asyncio.wait_for(client.post(url + "/v1/completions", json=body), timeout=0.05)
        except TimeoutError:
            return "left-early"
        return "answered"
    chunks = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return f"HTTP {response.status_code}"
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunks += 1
                if "error" in json.loads(line[6:]):
                    return "error-chunk"
                if behaviour in (0, 1) and chunks == 2:
                    return "left-mid-stream"
            elif line == "data: [DONE]":
                return "done" if chunks >= 8 else f"short ({chunks} chunks)"
    return f"cut after {chunks} chunks"


def test_a_thousand_streams_with_disconnects_release_everything(
    engine: EngineProcess, reliability_report: Report
) -> None:
    before = engine.metrics()

    async def main() -> list[str]:
        limits = httpx.Limits(max_connections=STREAMS, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            return await asyncio.gather(*(_client(i, client, engine.url) for i in range(STREAMS)))

    started = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - started
    outcomes = Counter(results)
    meant_to_finish = sum(1 for i in range(STREAMS) if i % 10 not in (0, 1, 2, 3))
    lost = meant_to_finish - outcomes["done"]
    after = assert_healthy_and_released(engine)
    served = {
        s: after.get(f"{mn.REQUESTS}{{{s}}}", 0) - before.get(f"{mn.REQUESTS}{{{s}}}", 0)
        for s in ("ok", "aborted", "error")
    }
    reliability_report.record(
        f"engine API: {STREAMS} concurrent streams, 40% of clients leave early",
        STREAMS,
        lost,
        f"{dict(outcomes)} in {elapsed:.1f} s; engine counted {served}; KV cache, running, queue back to 0",
    )
    assert lost == 0, outcomes
    assert served["error"] == 0, served
    # every stream that finished was counted ok; the rest were aborted or never reached the engine
    assert served["ok"] >= outcomes["done"] and served["ok"] + served["aborted"] <= STREAMS + 1


def test_a_prompt_is_refused_from_its_prefix_without_tokenizing_the_rest() -> None:
    from kiln_engine.server.app import PROBE_CHARS_PER_TOKEN, encode_bounded
    from kiln_engine.server.errors import OpenAIError

    seen: list[int] = []

    def words(text: str) -> list[int]:  # a stand-in tokenizer: one token per word
        seen.append(len(text))
        return [len(w) for w in text.split()]

    with pytest.raises(OpenAIError) as refused:
        encode_bounded(words, "word " * 1_000_000, 100, "prompt")
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "prompt"
    assert seen == [seen[0]] and seen[0] <= 100 * PROBE_CHARS_PER_TOKEN  # only the prefix was tokenized
    assert encode_bounded(words, "a bb ccc", 100, "prompt") == [1, 2, 3]

    def surrogate(text: str) -> list[int]:
        raise TypeError("TextInputSequence must be str")

    with pytest.raises(OpenAIError) as invalid:
        encode_bounded(surrogate, "\ud800", 100, "messages")
    assert invalid.value.status_code == 400 and invalid.value.param == "messages"
