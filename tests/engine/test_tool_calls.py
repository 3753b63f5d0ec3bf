"""Tool calling through the official `openai` client over real HTTP, on a tiny random model whose
chat template renders tools in the Hermes/Qwen format: forced calls (`tool_choice` "required" or a
named function) are always valid calls of offered tools, streamed as OpenAI streams them; tool
messages and assistant calls in the history reach the template; bad tool fields are a 400 naming them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.engine

pytest.importorskip("torch")
pytest.importorskip("xgrammar")
openai = pytest.importorskip("openai")
jsonschema_rs = pytest.importorskip("jsonschema_rs")

from kiln_engine.server import tool_calls as tc  # noqa: E402
from kiln_engine.server.app import ServerSettings  # noqa: E402
from kiln_engine.testing.tiny import make_tiny_checkpoint  # noqa: E402
from tests.engine.test_server import MODEL, ThreadServer  # noqa: E402

# Qwen 2.5's tool layout, shortened: tools in the system turn, calls in <tool_call> tags, tool
# results in <tool_response> tags of a user turn.
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
Call functions when useful:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Reply with <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls is defined %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Tokyo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 6}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
MAX_TOKENS = 200


# Templates that teach the other families' formats (what tool_calls.family_of reads).
LLAMA3_TEMPLATE = """{%- if tools %}Respond with {"name": function name, "parameters": arguments} for a call.
{{ tools | tojson }}
{% endif %}{%- for message in messages %}{{ message.role }}: {{ message.content }}
{% endfor %}assistant: """
MISTRAL_TEMPLATE = """{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}
{%- for message in messages %}[INST]{{ message.content }}[/INST]{% endfor %}"""
TEMPLATES = {tc.HERMES: HERMES_TEMPLATE, tc.LLAMA3_JSON: LLAMA3_TEMPLATE, tc.MISTRAL: MISTRAL_TEMPLATE}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the tools in the prompt take ~600 tokens of the tiny tokenizer
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny", "llama", seed=3, max_position_embeddings=2048
    )


def with_template(checkpoint: Path, path: Path, template: str) -> Path:
    """A copy of `checkpoint` whose chat template is `template`."""
    shutil.copytree(checkpoint, path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = template
    config_file.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    ckpt = with_template(checkpoint, tmp_path_factory.mktemp("hermes") / "tiny", HERMES_TEMPLATE)
    with ThreadServer(ckpt, ServerSettings(), max_model_len=2048) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ThreadServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "tools": TOOLS, **kwargs}
    return client.chat.completions.create(**kwargs)


def assert_valid_calls(calls: list[Any]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema_rs.validate(SCHEMAS[call.function.name], json.loads(call.function.arguments))


def streamed(client: openai.OpenAI, **kwargs: Any) -> list[dict[str, Any]]:
    """Each choice's message and finish reason, put together from the streamed deltas as a client does."""
    out: dict[int, dict[str, Any]] = {}
    for chunk in chat(client, stream=True, **kwargs):
        for c in chunk.choices:
            msg = out.setdefault(c.index, {"content": None, "tool_calls": {}, "finish_reason": None})
            if c.delta.content:
                msg["content"] = (msg["content"] or "") + c.delta.content
            for piece in c.delta.tool_calls or []:
                call = msg["tool_calls"].setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
                assert piece.function is not None
                if piece.id is not None:  # the first piece of a call: id, type and name
                    assert call["id"] is None and piece.type == "function" and piece.function.name
                    call.update(id=piece.id, name=piece.function.name)
                call["arguments"] += piece.function.arguments or ""
            msg["finish_reason"] = c.finish_reason or msg["finish_reason"]
    return [out[i] for i in sorted(out)]


@pytest.mark.parametrize("seed", range(4))
def test_a_named_tool_choice_always_gets_one_valid_call_of_it(client: openai.OpenAI, seed: int) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    out = chat(client, tool_choice=named, temperature=1.0, seed=seed)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    assert_valid_calls(calls)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_gets_valid_calls_streamed_as_openai_streams_them(
    client: openai.OpenAI, parallel: bool
) -> None:
    kwargs: dict[str, Any] = {"tool_choice": "required", "temperature": 1.0, "seed": 11, "n": 2,
                              "parallel_tool_calls": parallel}  # fmt: skip
    whole = chat(client, **kwargs)
    for choice in whole.choices:
        assert_valid_calls(choice.message.tool_calls)
        if not parallel:
            assert len(choice.message.tool_calls) == 1 and choice.finish_reason == "tool_calls"
    stream = streamed(client, **kwargs)
    for choice, msg in zip(sorted(whole.choices, key=lambda c: c.index), stream, strict=True):
        assert msg["content"] == choice.message.content and msg["finish_reason"] == choice.finish_reason
        calls = [msg["tool_calls"][i] for i in sorted(msg["tool_calls"])]
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (c.function.name, c.function.arguments) for c in choice.message.tool_calls
        ]
        assert all(c["id"].startswith("call_") for c in calls)


def test_the_official_clients_stream_helper_assembles_the_calls(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    with client.chat.completions.stream(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        tools=TOOLS,
        tool_choice=named,
        seed=2,
    ) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls and [c.function.name for c in calls] == ["get_weather"]
    jsonschema_rs.validate(WEATHER, json.loads(calls[0].function.arguments))


# A call whose arguments take many tokens: a note of 24-32 characters.
NOTE = {
    "type": "object",
    "properties": {"note": {"type": "string", "minLength": 24, "maxLength": 32}},
    "required": ["note"],
    "additionalProperties": False,
}
TAKE_NOTE: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "take_note", "parameters": NOTE}}
]


@pytest.fixture(params=tc.FAMILIES)
def family_client(
    request: pytest.FixtureRequest, checkpoint: Path, tmp_path: Path, client: openai.OpenAI
) -> Iterator[openai.OpenAI]:
    """A client of a server whose chat template teaches `request.param`'s tool-call format."""
    if request.param == tc.HERMES:
        yield client
        return
    ckpt = with_template(checkpoint, tmp_path / "tiny", TEMPLATES[request.param])
    with ThreadServer(ckpt, ServerSettings(), max_model_len=2048) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_arguments_stream_in_pieces_that_add_up_to_the_whole_call(family_client: openai.OpenAI) -> None:
    """Per family: the first delta of each call has its id, type and name; its arguments follow in
    several deltas as they are generated; joined, and through the official client's stream helper,
    they are the non-streamed response's calls."""
    kwargs: dict[str, Any] = {"tools": TAKE_NOTE, "tool_choice": "required", "temperature": 1.0, "seed": 5,
                              "parallel_tool_calls": False}  # fmt: skip
    whole = chat(family_client, **kwargs).choices[0].message.tool_calls
    assert [c.function.name for c in whole] == ["take_note"]
    jsonschema_rs.validate(NOTE, json.loads(whole[0].function.arguments))
    pieces = [
        piece
        for chunk in chat(family_client, stream=True, **kwargs)
        for choice in chunk.choices
        for piece in choice.delta.tool_calls or []
    ]
    assert pieces[0].id and pieces[0].type == "function" and pieces[0].function.name == "take_note"
    assert all(p.id is None and p.function.name is None for p in pieces[1:])
    arguments = [p.function.arguments for p in pieces]
    assert len(arguments) > 5, arguments  # the note alone is 24+ characters of random tokens
    assert "".join(arguments) == whole[0].function.arguments
    with family_client.chat.completions.stream(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, **kwargs
    ) as stream:
        helped = stream.get_final_completion().choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in helped or []] == [
        (c.function.name, c.function.arguments) for c in whole
    ]


def test_tool_history_reaches_the_template(client: openai.OpenAI) -> None:
    """A call and its result in the history are rendered (the prompt grows by them) and the reply
    to a tool result with tool_choice "none" is plain text."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}  # fmt: skip
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "sunny"}'},
    ]
    before = chat(client, max_tokens=4, temperature=0)
    after = chat(client, messages=history, max_tokens=4, temperature=0, tool_choice="none")
    rendered = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
    grown = after.usage.prompt_tokens - before.usage.prompt_tokens
    assert grown >= len(rendered) // 4  # the call and the result, not just role markers
    assert after.choices[0].message.tool_calls is None
    assert isinstance(after.choices[0].message.content, str)


def test_auto_and_none_generate_the_same_tokens(client: openai.OpenAI) -> None:
    """Tools are offered the same way under "auto" and "none"; only the parsing differs, and a random
    model's text holds no call, so both return the same content."""
    auto = chat(client, tool_choice="auto", temperature=0, max_tokens=24)
    none = chat(client, tool_choice="none", temperature=0, max_tokens=24)
    assert auto.choices[0].message.content == none.choices[0].message.content
    assert auto.usage == none.usage


BAD: list[tuple[dict[str, Any], str]] = [
    ({"tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frobnicate"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ({"tools": None, "tool_choice": "auto"}, "tool_choice"),
    ({"tools": None, "parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "required", "extra_body": {"ignore_eos": True}}, "tool_choice"),
    ({"messages": [*MESSAGES, {"role": "tool", "content": "x"}]}, "messages.1"),
    ({"messages": [*MESSAGES, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
    ({"messages": [*MESSAGES, {"role": "user", "content": "x", "tool_calls": []}]}, "messages.1"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_tool_fields_are_a_400_naming_them(
    client: openai.OpenAI, kwargs: dict[str, Any], param: str
) -> None:
    kwargs = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "tools": TOOLS, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{k: v for k, v in kwargs.items() if v is not None})
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param, body


def test_tools_on_completions_are_unsupported(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, extra_body={"tools": TOOLS})
    body = info.value.body
    assert isinstance(body, dict) and (body["param"], body["code"]) == ("tools", "unsupported_parameter")
