"""The OpenAI parameters applications send, through real HTTP and the official `openai` client: unknown
and unsupported ones are a 400 naming them (never silently ignored).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.engine

pytest.importorskip("torch")
openai = pytest.importorskip("openai")

from kiln_engine import metric_names as mn  # noqa: E402
from kiln_engine.server.app import ServerSettings  # noqa: E402
from kiln_engine.testing.tiny import make_tiny_checkpoint  # noqa: E402
from tests.engine.test_server import MODEL, ThreadServer, metric, metrics  # noqa: E402

MESSAGES = [{"role": "user", "content": "Say something"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "llama", seed=3)
    with ThreadServer(ckpt, ServerSettings(), max_model_len=256) as s:
        yield s


@pytest.fixture()
def client(server: ThreadServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def create(client: openai.OpenAI, kind: str, **kwargs: Any) -> Any:
    """One completion or chat completion with the official client."""
    kwargs = {"max_tokens": 4, **kwargs}
    if kind == "chat":
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, **kwargs)
    return client.completions.create(model=MODEL, prompt="Hello", **kwargs)


def bad_request(client: openai.OpenAI, kind: str, **kwargs: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as info:
        create(client, kind, **kwargs)
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict)
    # the client hands over the inside of {"error": {...}}
    assert set(body) == {"message", "type", "param", "code"}, body
    assert body["type"] == "invalid_request_error"
    return body


TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
]

REJECTED: list[tuple[str, dict[str, Any], str, str]] = [
    ("chat", {"tools": TOOLS}, "tools", "unsupported_parameter"),  # the tiny chat template renders no tools
    ("chat", {"tool_choice": "auto"}, "tool_choice", "invalid_parameter"),  # without tools
    ("chat", {"parallel_tool_calls": False}, "parallel_tool_calls", "invalid_parameter"),
    ("completion", {"extra_body": {"tools": TOOLS}}, "tools", "unsupported_parameter"),
    ("completion", {"extra_body": {"functions": []}}, "functions", "unsupported_parameter"),
    ("chat", {"extra_body": {"max_tokenz": 5}}, "max_tokenz", "unknown_parameter"),
    ("completion", {"extra_body": {"temprature": 0.5}}, "temprature", "unknown_parameter"),
    ("chat", {"stream_options": {"include_usage": True, "bogus": 1}, "stream": True}, "stream_options.bogus",
     "unknown_parameter"),
    ("completion", {"echo": True}, "echo", "invalid_parameter"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "kwargs", "param", "code"), REJECTED, ids=[f"{k}:{p}" for k, _, p, _ in REJECTED]
)
def test_unknown_and_unsupported_parameters_are_a_400_naming_them(
    client: openai.OpenAI, kind: str, kwargs: dict[str, Any], param: str, code: str
) -> None:
    body = bad_request(client, kind, **kwargs)
    assert body["param"] == param and body["code"] == code
    assert param.split(".")[-1] in body["message"]


def test_a_misspelt_parameter_suggests_the_right_one(client: openai.OpenAI) -> None:
    body = bad_request(client, "chat", extra_body={"max_tokenz": 5})
    assert "max_tokens" in body["message"].replace("max_tokenz", "")


def test_unsupported_fields_inside_messages_are_rejected(server: ThreadServer) -> None:
    call = {"name": "f", "arguments": "{}"}  # the deprecated form of tool_calls
    messages = [*MESSAGES, {"role": "assistant", "content": None, "function_call": call}]
    r = httpx.post(
        server.url + "/v1/chat/completions", json={"model": MODEL, "messages": messages}, timeout=30
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("messages.1.function_call", "unsupported_parameter")


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_valid_requests_and_the_ignored_user_field_still_work(client: openai.OpenAI, kind: str) -> None:
    plain = create(client, kind, temperature=0)
    with_user = create(client, kind, temperature=0, user="someone", stream_options=None)
    assert with_user.choices[0].finish_reason in ("stop", "length")
    text = (lambda r: r.choices[0].message.content) if kind == "chat" else (lambda r: r.choices[0].text)
    assert text(with_user) == text(plain)  # `user` is accepted and has no effect


def test_nothing_reached_the_engine_for_rejected_requests(
    server: ThreadServer, client: openai.OpenAI
) -> None:
    before = _requests(server.url, "error")
    bad_request(client, "chat", tools=TOOLS)
    assert _requests(server.url, "error") == before + 1
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def _requests(url: str, status: str) -> float:
    return metric(metrics(url), mn.REQUESTS, status=status)


# ---------------------------------------------------------------------- sampling parameters


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_n_choices(client: openai.OpenAI, kind: str, stream: bool) -> None:
    kwargs: dict[str, Any] = {
        "n": 3, "temperature": 1.0, "seed": 11, "max_tokens": 8, "extra_body": {"ignore_eos": True},
    }  # fmt: skip
    single = create(client, kind, **{**kwargs, "n": 1})
    whole = create(client, kind, **kwargs)
    assert sorted(c.index for c in whole.choices) == [0, 1, 2]
    texts = [text(kind, c) for c in sorted(whole.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # each choice samples on its own
    assert texts[0] == text(kind, single.choices[0])  # choice 0 draws from the request's own seed
    assert whole.usage.prompt_tokens == single.usage.prompt_tokens
    assert whole.usage.completion_tokens == 3 * single.usage.completion_tokens == 3 * 8
    if not stream:
        return
    chunks = list(create(client, kind, stream=True, stream_options={"include_usage": True}, **kwargs))
    streamed = ["", "", ""]
    finished = [0, 0, 0]
    for chunk in chunks:
        for c in chunk.choices:
            streamed[c.index] += (c.delta.content or "") if kind == "chat" else c.text
            finished[c.index] += c.finish_reason is not None
    assert streamed == texts and finished == [1, 1, 1]
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )


def text(kind: str, choice: Any) -> str:
    return str(choice.message.content if kind == "chat" else choice.text)


def greedy_completion(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs = {"max_tokens": 24, "extra_body": {}, **kwargs}
    kwargs["extra_body"] = {"ignore_eos": True, **kwargs["extra_body"]}
    return client.completions.create(model=MODEL, prompt="Hello", temperature=0, **kwargs).choices[0]


def test_logit_bias_and_penalties_change_the_output(client: openai.OpenAI, server: ThreadServer) -> None:
    tok = server.model.tokenizer
    forced = 300
    push = {str(forced): 5}
    assert greedy_completion(client, logit_bias={str(forced): 100}).text == tok.decode([forced] * 24)
    assert greedy_completion(client, logit_bias=push).text == tok.decode([forced] * 24)
    # a one-off presence penalty of 2 does not undo a push of 5; a frequency penalty of 2 per repeat does
    assert greedy_completion(client, logit_bias=push, presence_penalty=2).text == tok.decode([forced] * 24)
    by_frequency = greedy_completion(client, logit_bias=push, frequency_penalty=2).text
    assert by_frequency != tok.decode([forced] * 24)
    base = greedy_completion(client).text
    assert greedy_completion(client, extra_body={"repetition_penalty": 2.0}).text != base


def test_min_tokens_and_stop_token_ids(client: openai.OpenAI, server: ThreadServer) -> None:
    eos = min(server.model.eos_token_ids)
    to_eos = {"logit_bias": {str(eos): 100}, "extra_body": {"ignore_eos": False}}
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=24, temperature=0, **to_eos)
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 1
    to_eos["extra_body"] = {"min_tokens": 5}
    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0, **to_eos
    )
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 6
    stop = 300
    to_stop = {"logit_bias": {str(stop): 100}, "extra_body": {"stop_token_ids": [stop], "ignore_eos": True}}
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=24, temperature=0, **to_stop)
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 1


OUT_OF_RANGE: list[tuple[dict[str, Any], str]] = [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"extra_body": {"repetition_penalty": 2.5}}, "repetition_penalty"),
    ({"logit_bias": {"12": 101}}, "logit_bias.12"),
    ({"logit_bias": {"hello": 1}}, "logit_bias"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),
    ({"extra_body": {"min_tokens": -1}}, "min_tokens"),
    ({"extra_body": {"min_tokens": 5}}, "min_tokens"),  # more than max_tokens (4)
    ({"extra_body": {"stop_token_ids": [-1]}}, "stop_token_ids.0"),
    ({"extra_body": {"stop_token_ids": [100000]}}, "stop_token_ids"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
]


@pytest.mark.parametrize(("kwargs", "param"), OUT_OF_RANGE, ids=[p for _, p in OUT_OF_RANGE])
@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_out_of_range_sampling_parameters_are_a_400_naming_them(
    client: openai.OpenAI, kind: str, kwargs: dict[str, Any], param: str
) -> None:
    body = bad_request(client, kind, **kwargs)
    assert body["param"] == param, body
