"""Tool-call parsing per model family on the formats the models write (samples from the models'
function-calling docs), the chat-template family detection, and the streaming parser's contract:
however the text is cut into pieces, it settles the same content and calls as the whole text.
"""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln_engine.server import tool_calls as tc

NAMES = frozenset({"get_current_temperature", "get_temperature_date", "get_current_weather"})

# Qwen2.5's function-calling guide: text, then two parallel calls, one <tool_call> tag each.
QWEN = (
    "Let me look that up.\n<tool_call>\n"
    '{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"name": "get_temperature_date", "arguments": {"location": "San Francisco, CA, USA", '
    '"date": "2024-10-01"}}\n</tool_call>'
)
# Llama 3.1's model card: the JSON call (its `<|python_tag|>` is a special token, gone from the text).
LLAMA = '{"name": "get_current_temperature", "parameters": {"location": "San Francisco, CA", "unit": "F"}}'
# Mistral 7B v0.3: `[TOOL_CALLS]` then a JSON array of calls.
MISTRAL = (
    '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, France", '
    '"format": "celsius"}}, {"name": "get_temperature_date", "arguments": {"location": "Paris", '
    '"date": "2024-10-01"}}]'
)

SAMPLES = [(tc.HERMES, QWEN), (tc.LLAMA3_JSON, LLAMA), (tc.MISTRAL, MISTRAL)]


def test_qwen_calls_and_the_text_before_them() -> None:
    content, calls = tc.parse_all(tc.HERMES, NAMES, QWEN)
    assert content == "Let me look that up."
    assert [c.name for c in calls] == ["get_current_temperature", "get_temperature_date"]
    assert json.loads(calls[1].arguments) == {"location": "San Francisco, CA, USA", "date": "2024-10-01"}


def test_llama_json_calls_separated_by_semicolons() -> None:
    second = '{"name": "get_temperature_date", "parameters": {"date": "2024-10-01"}}'
    content, calls = tc.parse_all(tc.LLAMA3_JSON, NAMES, f"{LLAMA}; {second}")
    assert content is None
    assert [c.name for c in calls] == ["get_current_temperature", "get_temperature_date"]
    assert json.loads(calls[0].arguments) == {"location": "San Francisco, CA", "unit": "F"}


@pytest.mark.parametrize("text", [MISTRAL, MISTRAL.removeprefix("[TOOL_CALLS]")])
def test_mistral_call_arrays_with_or_without_the_special_token(text: str) -> None:
    content, calls = tc.parse_all(tc.MISTRAL, NAMES, text)
    assert content is None
    assert [c.name for c in calls] == ["get_current_weather", "get_temperature_date"]


@pytest.mark.parametrize(
    ("family", "text"),
    [
        (tc.HERMES, '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>'),
        (tc.HERMES, "I will call <tool_call"),
        (tc.LLAMA3_JSON, '{"name": "Ada", "born": 1815} was a mathematician.'),
        (tc.LLAMA3_JSON, '{"name": "Ada", "parameters": {}}'),
        (tc.LLAMA3_JSON, '{"parameters": {}, "name": "get_current_weather"}'),
        (tc.MISTRAL, '[{"name": "get_current_weather", "arguments": "not an object"}]'),
    ],
)
def test_what_is_not_a_call_of_an_offered_tool_stays_content(family: str, text: str) -> None:
    assert tc.parse_all(family, NAMES, text) == (text, [])


@pytest.mark.parametrize(
    ("family", "text", "arguments"),
    [
        (tc.HERMES, 'Sure.<tool_call>\n{"name": "get_current_weather", "arguments": {"a": }\n</tool_call>',
         '{"a": }'),
        (tc.LLAMA3_JSON, '{"name": "get_current_weather", "parameters": {"location": "Par',
         '{"location": "Par'),
        (tc.MISTRAL, '[TOOL_CALLS][{"name": "get_current_weather", "arguments": {"n": [1, "]}"',
         '{"n": [1, "]}"'),
    ],
)  # fmt: skip
def test_a_call_keeps_its_arguments_as_written_even_broken_or_cut_short(
    family: str, text: str, arguments: str
) -> None:
    """As OpenAI's: once its head is out the call is streamed, so malformed or truncated (max_tokens)
    arguments stay the call's; only forced calls (a grammar) guarantee valid ones."""
    content, calls = tc.parse_all(family, NAMES, text)
    assert calls == [tc.ToolCall("get_current_weather", arguments)]
    assert content == ("Sure." if text.startswith("Sure.") else None)


@pytest.mark.parametrize(("family", "text"), SAMPLES)
def test_arguments_come_out_in_pieces_as_they_are_generated(family: str, text: str) -> None:
    """Fed a character at a time, the first piece of each call names it before its arguments are
    complete, and the arguments follow in many pieces that join to the whole call's."""
    parser = tc.ToolCallParser(family, NAMES)
    pieces = [i for ch in text for i in parser.feed(ch) if isinstance(i, tc.CallPiece)]
    pieces += [i for i in parser.finish() if isinstance(i, tc.CallPiece)]
    whole = tc.parse_all(family, NAMES, text)[1]
    assert tc.calls_of(pieces) == whole
    for index, call in enumerate(whole):
        mine = [p for p in pieces if p.index == index]
        assert mine[0].name == call.name and len(mine[0].arguments) < len(call.arguments)
        assert len(mine) > len(call.arguments) // 2
        assert all(p.name is None and p.arguments for p in mine[1:])


def test_plain_text_is_content_whitespace_included() -> None:
    assert tc.parse_all(tc.HERMES, NAMES, "  Paris is sunny.\n") == ("  Paris is sunny.\n", [])


@settings(max_examples=60, deadline=None)
@given(sample=st.sampled_from(SAMPLES), cuts=st.lists(st.integers(0, 400), max_size=12), tail=st.text())
def test_streaming_settles_what_the_whole_text_does(
    sample: tuple[str, str], cuts: list[int], tail: str
) -> None:
    family, text = sample
    text += tail
    parser = tc.ToolCallParser(family, NAMES)
    items = []
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    for a, b in itertools.pairwise(bounds):
        items += parser.feed(text[a:b])
    items += parser.finish()
    content = "".join(i for i in items if isinstance(i, str)) or None
    pieces = [i for i in items if isinstance(i, tc.CallPiece)]
    assert (content, tc.calls_of(pieces)) == tc.parse_all(family, NAMES, text)


@pytest.mark.parametrize(
    ("template", "family"),
    [
        ("{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>\n{...}\n</tool_call>", tc.HERMES),
        ("{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}{% endif %}[TOOL_CALLS]", tc.MISTRAL),
        ('{% if tools %}Respond with {"name": function name, "parameters": ...}{% endif %}', tc.LLAMA3_JSON),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", None),
    ],
)
def test_the_family_comes_from_the_chat_template(template: str, family: str | None) -> None:
    assert tc.family_of(template) == family


@pytest.mark.parametrize("family", tc.FAMILIES)
def test_forcing_grammars_accept_the_calls_the_parser_reads(family: str) -> None:
    """A forced call written in the family's format is in the grammar's language, and parses back."""
    xgr = pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"name": "get_current_weather", "parameters": schema}, {"name": "get_temperature_date"}]
    body = '{"name": "get_current_weather", "%s": {"city": "Paris"}}'
    call = {
        tc.HERMES: f"<tool_call>\n{body % 'arguments'}\n</tool_call>",
        tc.LLAMA3_JSON: body % "parameters",
        tc.MISTRAL: f"[TOOL_CALLS][{body % 'arguments'}]",
    }[family]
    accepts = xgr.testing._is_grammar_accept_string
    for named in ("get_current_weather", None):
        grammar = xgr.Grammar.from_structural_tag(
            tc.forcing_structural_tag(family, tools, named, parallel=False)
        )
        assert accepts(grammar, call)
        assert not accepts(grammar, call.replace('"Paris"', "7"))  # against the schema
        assert not accepts(grammar, "Sure! " + call)  # the output is calls only
    separator = {tc.HERMES: "\n", tc.LLAMA3_JSON: "; ", tc.MISTRAL: ", "}[family]
    two = call + separator + call
    if family == tc.MISTRAL:  # one array holds all calls
        two = call.removesuffix("]") + separator + call.removeprefix("[TOOL_CALLS][")
    for parallel in (True, False):
        grammar = xgr.Grammar.from_structural_tag(tc.forcing_structural_tag(family, tools, None, parallel))
        assert accepts(grammar, two) == parallel
        assert len(tc.parse_all(family, NAMES, two)[1]) == 2
    assert tc.parse_all(family, NAMES, call)[1] == [tc.ToolCall("get_current_weather", '{"city": "Paris"}')]
