"""The Responses API (`POST /v1/responses`) through the official `openai` client over real HTTP, on a
tiny random model whose chat template renders tools (Hermes/Qwen format): it generates what the chat
path generates for the same conversation, streams OpenAI's event sequence that adds up to the
non-streamed response, keeps structured output valid, makes and takes function calls for a tool
round trip, and answers what it does not support with a 400 naming the parameter.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.engine

pytest.importorskip("torch")
pytest.importorskip("xgrammar")
openai = pytest.importorskip("openai")
jsonschema_rs = pytest.importorskip("jsonschema_rs")

from kiln_engine.server.app import ServerSettings  # noqa: E402
from kiln_engine.testing.tiny import make_tiny_checkpoint  # noqa: E402
from tests.engine.test_server import MODEL, ThreadServer  # noqa: E402
from tests.engine.test_tool_calls import HERMES_TEMPLATE, NOTE, with_template  # noqa: E402

NOTE_TOOL = {"type": "function", "name": "take_note", "description": "Write a note", "parameters": NOTE}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    base = tmp_path_factory.mktemp("ckpt")
    tiny = make_tiny_checkpoint(base / "tiny", "llama", seed=3, max_position_embeddings=2048)
    with ThreadServer(with_template(tiny, base / "hermes", HERMES_TEMPLATE), ServerSettings(),
                      max_model_len=2048) as s:  # fmt: skip
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def create(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.responses.create(**{"model": MODEL, "max_output_tokens": 12, "temperature": 0, **kwargs})


def events(client: openai.OpenAI, **kwargs: Any) -> list[Any]:
    return list(create(client, stream=True, **kwargs))


def test_text_is_what_the_chat_path_generates_for_the_same_conversation(client: openai.OpenAI) -> None:
    """Instructions become the system message and input items the turns after it."""
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Red."}]},
        {"role": "user", "content": "Another one?"},
    ]
    response = create(client, instructions="Be brief.", input=items)
    chat = client.chat.completions.create(
        model=MODEL, max_tokens=12, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another one?"}],
    )  # fmt: skip
    assert response.output_text == chat.choices[0].message.content
    assert (response.usage.input_tokens, response.usage.output_tokens) == (
        chat.usage.prompt_tokens,
        chat.usage.completion_tokens,
    )
    assert response.usage.total_tokens == chat.usage.total_tokens
    cut = chat.choices[0].finish_reason == "length"
    assert response.status == ("incomplete" if cut else "completed")
    assert (response.incomplete_details.reason if cut else None) == ("max_output_tokens" if cut else None)
    assert [(o.type, o.role) for o in response.output] == [("message", "assistant")]


def test_the_stream_is_openais_event_sequence_and_adds_up_to_the_response(client: openai.OpenAI) -> None:
    whole = create(client, input="Tell me a story.", max_output_tokens=16)
    stream = events(client, input="Tell me a story.", max_output_tokens=16)
    kinds = [e.type for e in stream]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", *["response.output_text.delta"] * deltas,
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        f"response.{whole.status}",
    ]  # fmt: skip
    assert deltas > 1
    assert [e.sequence_number for e in stream] == list(range(len(stream)))
    text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    assert text == whole.output_text
    final = stream[-1].response
    assert final.output_text == text and final.usage.output_tokens == whole.usage.output_tokens == 16
    assert stream[0].response.status == "in_progress" and stream[0].response.id == final.id


@pytest.mark.parametrize("stream", [False, True])
def test_a_json_schema_text_format_gives_valid_json(client: openai.OpenAI, stream: bool) -> None:
    kwargs = {"input": "Describe a person.", "text": PERSON_FORMAT, "max_output_tokens": 100}
    if stream:  # through the official stream helper, which checks the events' order and ids
        with client.responses.stream(model=MODEL, temperature=0, **kwargs) as helper:
            deltas = [e.delta for e in helper if e.type == "response.output_text.delta"]
            text = helper.get_final_response().output_text
        assert "".join(deltas) == text
    else:
        response = create(client, **kwargs)
        assert response.status == "completed" and response.text.format.type == "json_schema"
        text = response.output_text
    jsonschema_rs.validate(PERSON, json.loads(text))


def test_a_tool_round_trip(client: openai.OpenAI) -> None:
    """A forced call comes out as a function_call item (streamed: its arguments in pieces); passed back
    with its output, the next turn sees both and answers in text."""
    ask = [{"role": "user", "content": "Note that the sky is blue."}]
    kwargs: dict[str, Any] = {"input": ask, "tools": [NOTE_TOOL], "tool_choice": "required",
                              "parallel_tool_calls": False, "max_output_tokens": 120}  # fmt: skip
    first = create(client, **kwargs)
    [call] = first.output
    assert call.type == "function_call" and call.name == "take_note" and call.call_id.startswith("call_")
    jsonschema_rs.validate(NOTE, json.loads(call.arguments))
    assert first.status == "completed"

    stream = events(client, **kwargs)
    pieces = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 5 and "".join(pieces) == call.arguments
    done = next(e for e in stream if e.type == "response.function_call_arguments.done")
    assert done.arguments == call.arguments
    added = next(e for e in stream if e.type == "response.output_item.added")
    assert (added.item.type, added.item.name, added.item.arguments) == ("function_call", "take_note", "")
    with client.responses.stream(model=MODEL, temperature=0, **kwargs) as helper:
        [helped] = helper.get_final_response().output
    assert (helped.name, helped.arguments) == (call.name, call.arguments)

    follow = [*ask, *first.output, {"type": "function_call_output", "call_id": call.call_id, "output": "ok"}]
    second = create(client, input=follow, tools=[NOTE_TOOL], tool_choice="none")
    assert [o.type for o in second.output] == ["message"]
    rendered = f'<tool_call>\n{{"name": "take_note", "arguments": {call.arguments}}}\n</tool_call>'
    assert second.usage.input_tokens - first.usage.input_tokens >= len(rendered) // 4


def test_included_logprobs_are_the_chat_paths_streamed_or_not(client: openai.OpenAI) -> None:
    """include: ["message.output_text.logprobs"] gives one entry per output token, with its
    top_logprobs alternatives: the chat path's for the same conversation; the stream's deltas
    carry them in order, and its done event all of them. Without include, none."""
    prompt, include = "Tell me a story.", ["message.output_text.logprobs"]
    whole = create(client, input=prompt, max_output_tokens=16, include=include, top_logprobs=3)
    part = whole.output[0].content[0]
    chat = client.chat.completions.create(
        model=MODEL, max_tokens=16, temperature=0, logprobs=True, top_logprobs=3,
        messages=[{"role": "user", "content": prompt}],
    )  # fmt: skip
    assert chat.choices[0].logprobs is not None

    def entries(logprobs: Any) -> list[tuple[str, float, list[tuple[str, float]]]]:
        return [
            (e.token, round(e.logprob, 4), [(t.token, round(t.logprob, 4)) for t in e.top_logprobs])
            for e in logprobs
        ]

    assert len(part.logprobs) == whole.usage.output_tokens == 16
    assert entries(part.logprobs) == entries(chat.choices[0].logprobs.content)
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in part.logprobs)
    stream = events(client, input=prompt, max_output_tokens=16, include=include, top_logprobs=3)
    streamed = [e for event in stream if event.type == "response.output_text.delta" for e in event.logprobs]
    done = next(event for event in stream if event.type == "response.output_text.done")
    assert entries(streamed) == entries(done.logprobs) == entries(part.logprobs)
    assert create(client, input=prompt, max_output_tokens=4).output[0].content[0].logprobs == []


BAD: list[tuple[dict[str, Any], str]] = [
    ({"include": ["reasoning.encrypted_content"]}, "include.0"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"include": ["message.output_text.logprobs"], "top_logprobs": 21}, "top_logprobs"),
    ({"include": ["message.output_text.logprobs"], "tools": [NOTE_TOOL]}, "include"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"store": True}, "store"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0.type"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{oops"}]},
     "input.0.arguments"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "frobnicate"}}}},
     "text.format.schema"),
    ({"tools": [NOTE_TOOL], "tool_choice": {"type": "function", "name": "launch"}}, "tool_choice.name"),
    ({"max_output_tokens": 10**6}, "max_output_tokens"),
    ({"model": "gpt-4o"}, "model"),
    ({"input": []}, "input"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "param"), BAD, ids=[p for _, p in BAD])
def test_what_is_not_supported_is_a_400_naming_it(
    client: openai.OpenAI, kwargs: dict[str, Any], param: str
) -> None:
    kwargs = {"model": MODEL, "input": "Hi", "max_output_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(**kwargs)
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param, body
