"""Request validation: what is accepted, what becomes which 400 (pure pydantic + the error mapper)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from kiln_engine.server import protocol as p
from kiln_engine.server.errors import OpenAIError, validation_error


def error_for(model: type[p.BaseModel], body: Any) -> OpenAIError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    return validation_error(RequestValidationError(errors))


def test_defaults_and_sampling_params() -> None:
    req = p.CompletionRequest.model_validate({"model": "m", "prompt": "hi"})
    sp = p.to_sampling_params(req, 16, None)
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.stop, sp.seed) == (
        16,
        1.0,
        1.0,
        0,
        (),
        None,
    )
    req = p.CompletionRequest.model_validate(
        {"model": "m", "prompt": [1, 2], "temperature": 0, "top_p": 0.5, "top_k": -1, "stop": "x", "seed": 3,
         "user": "someone"}
    )  # fmt: skip
    sp = p.to_sampling_params(req, 4, 2)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.stop, sp.seed, sp.logprobs) == (0.0, 0.5, 0, ("x",), 3, 2)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"model": "m", "prompt": "x", "temperature": -0.1}, "temperature"),
        ({"model": "m", "prompt": "x", "top_p": 0.0}, "top_p"),
        ({"model": "m", "prompt": "x", "top_k": -2}, "top_k"),
        ({"model": "m", "prompt": "x", "n": 17}, "n"),
        ({"model": "m", "prompt": "x", "echo": True}, "echo"),
        ({"model": "m", "prompt": "x", "unknown_field": True}, "unknown_field"),
        ({"model": "m", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        ({"model": "m", "prompt": "x", "stop": [1]}, "stop"),
        ({"model": "m", "prompt": {"a": 1}}, "prompt"),
        ({"prompt": "x"}, "model"),
    ],
)
def test_invalid_completion_bodies_name_their_param(body: dict, param: str) -> None:
    err = error_for(p.CompletionRequest, body)
    assert err.status_code == 400 and err.param == param
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_chat_content_parts_and_roles() -> None:
    req = p.ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]}]}
    )  # fmt: skip
    assert req.messages[0].text() == "ab"
    assert error_for(
        p.ChatCompletionRequest, {"model": "m", "messages": [{"role": "x", "content": "c"}]}
    ).param == ("messages.0.role")
    assert error_for(p.ChatCompletionRequest, {"model": "m", "messages": []}).param == "messages"


def test_missing_parameter_message() -> None:
    err = error_for(p.CompletionRequest, {"model": "m"})
    assert err.code == "missing_parameter" and "prompt" in err.message


def test_error_body_shape() -> None:
    body = OpenAIError("nope", 503, code="draining").body()
    assert body == {
        "error": {"message": "nope", "type": "service_unavailable", "param": None, "code": "draining"}
    }
