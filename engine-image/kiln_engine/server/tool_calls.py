"""Tool calling: the tool-call text formats of the model families Kiln serves, which format a chat
template teaches, the grammar that forces calls (`tool_choice` "required" or a named function), and
the parser that splits generated text, streamed or whole, into content and tool calls.

Formats (what the model writes; the chat template shows it to the model):
* `hermes` (Qwen 2.5/3, Hermes): `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, one
  tag per call.
* `llama3_json` (Llama 3.1-3.3): `{"name": "f", "parameters": {...}}`, calls separated by `;`.
* `mistral`: `[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]`; `[TOOL_CALLS]` is a special
  token that detokenizing drops, so a bare leading `[{"name": ...}]` counts too.
Text that looks like a call but does not parse, or names no offered tool, stays content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

HERMES = "hermes"
LLAMA3_JSON = "llama3_json"
MISTRAL = "mistral"
FAMILIES = (HERMES, LLAMA3_JSON, MISTRAL)

# A forced call's arguments may not pad themselves with unbounded whitespace (a weak model would).
MAX_ARGUMENT_WHITESPACE = 2


def family_of(template: str) -> str | None:
    """The tool-call format a chat template teaches its model; None when it does not render `tools`."""
    if not re.search(r"\btools\b", template):
        return None
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    return LLAMA3_JSON  # Llama 3.x templates describe the JSON call in prose


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function's name and its arguments as JSON text (OpenAI's shape)."""

    name: str
    arguments: str


# --------------------------------------------------------------------------- forcing calls


def forcing_structural_tag(
    family: str, tools: list[dict[str, Any]], named: str | None, parallel: bool
) -> str:
    """An xgrammar structural tag (JSON text) whose every output is tool calls in `family`'s format:
    one call of `named`, else one or more (one unless `parallel`) calls of any of `tools`
    (`{"name", "parameters"}` each; a missing schema allows any JSON object)."""
    from xgrammar import structural_tag as st

    begin, end, separator = {
        HERMES: ('<tool_call>\n{"name": "%s", "arguments": ', "}\n</tool_call>", "\n"),
        LLAMA3_JSON: ('{"name": "%s", "parameters": ', "}", "; "),
        MISTRAL: ('{"name": "%s", "arguments": ', "}", ", "),
    }[family]
    chosen = [t for t in tools if named is None or t["name"] == named]
    tags = [
        st.TagFormat(
            begin=begin % t["name"],
            content=st.JSONSchemaFormat(
                json_schema=t.get("parameters") or {"type": "object"},
                max_whitespace_cnt=MAX_ARGUMENT_WHITESPACE,
            ),
            end=end,
        )
        for t in chosen
    ]
    calls: Any = (
        tags[0]
        if named is not None
        else st.TagsWithSeparatorFormat(
            tags=tags, separator=separator, at_least_one=True, stop_after_first=not parallel
        )
    )
    if family == MISTRAL:
        calls = st.SequenceFormat(
            elements=[st.ConstStringFormat(value="[TOOL_CALLS]["), calls, st.ConstStringFormat(value="]")]
        )
    return str(st.StructuralTag(format=calls).model_dump_json())


# --------------------------------------------------------------------------- parsing output

_STARTS = {
    HERMES: ("<tool_call>",),
    LLAMA3_JSON: ('{"name"',),
    MISTRAL: ("[TOOL_CALLS]", '[{"name"'),
}
# Text between calls that belongs to neither: dropped when a call follows it.
_FILLER = {HERMES: " \t\r\n", LLAMA3_JSON: " \t\r\n;", MISTRAL: " \t\r\n"}
_DECODER = json.JSONDecoder()


@dataclass
class ToolCallParser:
    """Splits one choice's generated text into content and tool calls as it arrives.

    `feed` takes each new piece of text and returns what is settled: content strings and ToolCalls,
    in order. Text that may begin a call is held until it is one (or is not); whitespace (and, for
    Llama, `;`) at the end of content is held too, and dropped when a call follows it. `finish` settles the
    rest. Feeding the whole text at once gives the same items, merged.
    """

    family: str
    tool_names: frozenset[str]
    calls: int = 0  # calls found so far
    _text: str = ""  # unsettled text (before any call start)
    _call: str = ""  # the text of a call being read, from its start marker
    _filler: str = ""  # held whitespace between settled items
    _out: list[str | ToolCall] = field(default_factory=list)

    def feed(self, text: str) -> list[str | ToolCall]:
        if self._call:
            self._call += text
        else:
            self._text += text
        self._advance(final=False)
        return self._take()

    def finish(self) -> list[str | ToolCall]:
        self._advance(final=True)
        if self._call:  # never closed: it was text after all
            self._content(self._call)
            self._call = ""
        self._content(self._text)
        self._text = ""
        if self._filler and not self.calls:
            self._out.append(self._filler)
        self._filler = ""
        return self._take()

    def _take(self) -> list[str | ToolCall]:
        out, self._out = self._out, []
        return out

    def _advance(self, final: bool) -> None:
        while True:
            if self._call:
                if not self._read_call(final):
                    return
                continue
            start = _first_start(self._text, _STARTS[self.family])
            if start < 0:
                keep = _partial_start(self._text, _STARTS[self.family]) if not final else 0
                self._content(self._text[: len(self._text) - keep])
                self._text = self._text[len(self._text) - keep :]
                return
            self._content(self._text[:start])
            self._call, self._text = self._text[start:], ""

    def _read_call(self, final: bool) -> bool:
        """Settle the call being read when its text is complete; False while it may still grow."""
        parsed = _parse_call(self.family, self._call)
        if parsed is None:
            return False
        calls, used = parsed
        if calls is not None and all(c.name in self.tool_names for c in calls):
            self._filler = ""  # whitespace between calls is not content
            self._out.extend(calls)
            self.calls += len(calls)
        else:
            self._content(self._call[:used])
        self._text, self._call = self._call[used:], ""
        return True

    def _content(self, text: str) -> None:
        """Settle content, holding its trailing filler back (it may turn out to precede a call)."""
        settled = text.rstrip(_FILLER[self.family])
        if settled:
            self._out.append(self._filler + settled)
            self._filler = ""
        self._filler += text[len(settled) :]


def _first_start(text: str, starts: tuple[str, ...]) -> int:
    found = [i for i in (text.find(s) for s in starts) if i >= 0]
    return min(found, default=-1)


def _partial_start(text: str, starts: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that a call start could continue."""
    return max(
        (n for s in starts for n in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:n])),
        default=0,
    )


def _parse_call(family: str, text: str) -> tuple[list[ToolCall] | None, int] | None:
    """(the calls, or None when the text is no call; characters used) when the call text starting
    `text` is complete; None while it may still be incomplete."""
    if family == HERMES:
        close = text.find("</tool_call>")
        if close < 0:
            return None
        used = close + len("</tool_call>")
        try:
            obj = json.loads(text[len("<tool_call>") : close])
        except ValueError:
            return None, used
        call = _call_of(obj, "arguments")
        return ([call] if call else None), used
    offset = len("[TOOL_CALLS]") if text.startswith("[TOOL_CALLS]") else 0
    body = text[offset:]
    lead = len(body) - len(body.lstrip())
    try:
        obj, end = _DECODER.raw_decode(body, lead)
    except ValueError:
        # incomplete, or never JSON: the latter is settled as content by `finish`
        return None
    used = offset + end
    if family == LLAMA3_JSON:
        call = _call_of(obj, "parameters") or _call_of(obj, "arguments")
        return ([call] if call else None), used
    if not isinstance(obj, list) or not obj:
        return None, used
    calls = [_call_of(item, "arguments") for item in obj]
    return ([c for c in calls if c] if all(calls) else None), used


def _call_of(obj: Any, arguments_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(arguments_key, {})
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_all(family: str, tool_names: frozenset[str], text: str) -> tuple[str | None, list[ToolCall]]:
    """Content (None when there is none) and tool calls of a whole generated text."""
    parser = ToolCallParser(family, tool_names)
    items = parser.feed(text) + parser.finish()
    content = "".join(i for i in items if isinstance(i, str))
    return (content or None), [i for i in items if isinstance(i, ToolCall)]
