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
    if kind == "chat":
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, **kwargs)
    return client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, **kwargs)


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
    ("chat", {"tools": TOOLS}, "tools", "unsupported_parameter"),
    ("chat", {"tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    (
        "chat",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
        "response_format",
        "unsupported_parameter",
    ),
    ("completion", {"extra_body": {"response_format": {"type": "json_object"}}}, "response_format",
     "unsupported_parameter"),
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
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]}]
    r = httpx.post(
        server.url + "/v1/chat/completions", json={"model": MODEL, "messages": messages}, timeout=30
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages.1.tool_calls"


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
