"""Tool calling: the tool-call text formats of the model families Kiln serves, which format a chat
template teaches, the grammar that forces calls (`tool_choice` "required" or a named function), and
the parser that splits generated text, streamed or whole, into content and tool calls.

Formats (what the model writes; the chat template shows it to the model):
* `hermes` (Qwen 2.5/3, Hermes): `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, one
  tag per call.
* `llama3_json` (Llama 3.1-3.3): `{"name": "f", "parameters": {...}}`, calls separated by `;`.
* `mistral`: `[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]`; `[TOOL_CALLS]` is a special
  token that detokenizing drops, so a bare leading `[{"name": ...}]` counts too.
A call is recognised by its head (start marker, an offered function's name, the arguments object
opening); its arguments are streamed as the model writes them, and (as OpenAI's) are not checked
unless a grammar forced them. Text that is no such head (e.g. names no offered tool) stays content.
"""

from __future__ import annotations

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

_WS = " \t\r\n"
_FILLER = {HERMES: _WS, LLAMA3_JSON: _WS + ";", MISTRAL: _WS}  # between calls: dropped when a call follows


class _Ws:
    """A pattern step: optional whitespace."""


class _Name:
    """A pattern step: the JSON string of an offered function's name."""


WS, NAME = _Ws(), _Name()
Pattern = tuple[tuple[str, ...] | _Ws | _Name, ...]

# A call's head: from its start marker to the `{` that opens its arguments (models write the name first).
_NAMED: Pattern = (("{",), WS, ('"name"',), WS, (":",), WS, NAME, WS, (",",), WS)
_HEADS: dict[str, tuple[Pattern, ...]] = {
    HERMES: ((("<tool_call>",), WS, *_NAMED, ('"arguments"',), WS, (":",), WS, ("{",)),),
    LLAMA3_JSON: ((*_NAMED, ('"parameters"', '"arguments"'), WS, (":",), WS, ("{",)),),
    MISTRAL: tuple(
        (*prefix, ("[",), WS, *_NAMED, ('"arguments"',), WS, (":",), WS, ("{",))
        for prefix in ((("[TOOL_CALLS]",), WS), ())
    ),
}
_HEAD_FIRST_CHARS = {f: {o[0] for p in ps for o in p[0]} for f, ps in _HEADS.items()}  # type: ignore[union-attr]
# What closes a call after its arguments (a Hermes tag closes it even without the brace); a Mistral
# array then goes on with `, {...}` or ends with `]`.
_TAILS: dict[str, tuple[Pattern, ...]] = {
    HERMES: ((WS, ("}",), WS, ("</tool_call>",)), (WS, ("</tool_call>",))),
    LLAMA3_JSON: ((WS, ("}",)),),
    MISTRAL: ((WS, ("}",)),),
}
_NEXT_IN_ARRAY: Pattern = (WS, (",",), WS, *_HEADS[MISTRAL][1][2:])
_ARRAY_END: Pattern = (WS, ("]",))

PARTIAL = "partial"


def _match(pattern: Pattern, names: frozenset[str], text: str, pos: int) -> tuple[int, str] | str | None:
    """(the end, the name) when `pattern` matches `text` at `pos`; PARTIAL when the text ends while it
    still may; None when it cannot."""
    name = ""
    for step in pattern:
        if isinstance(step, _Ws):
            while pos < len(text) and text[pos] in _WS:
                pos += 1
            continue
        options = tuple(f'"{n}"' for n in names) if isinstance(step, _Name) else step
        rest = text[pos : pos + max(map(len, options), default=0)]
        hit = next((o for o in options if rest.startswith(o)), None)
        if hit is None:
            cut_short = pos + len(rest) == len(text) and any(o.startswith(rest) for o in options)
            return PARTIAL if cut_short else None
        pos += len(hit)
        if isinstance(step, _Name):
            name = hit[1:-1]
    return pos, name


class _JsonEnd:
    """Finds where a JSON object or array ends as its text arrives (strings and escapes understood)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def scan(self, text: str) -> int:
        """How much of `text` belongs to the value: up to its closing bracket, or all of it."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return len(text)


@dataclass(frozen=True)
class CallPiece:
    """A piece of the call at `index` as it is generated: the first piece names the function, and
    each adds to its arguments text (the call's arguments are all of them joined)."""

    index: int
    name: str | None
    arguments: str


@dataclass
class ToolCallParser:
    """Splits one choice's generated text into content and tool calls as it arrives.

    `feed` takes each new piece of text and returns what is settled: content strings and CallPieces,
    in order. A call is recognised by its head (the family's start marker, the name of an offered
    function, then its arguments object opening): text that may begin one is held until it is one (or
    is not). From there its arguments are passed on as they come, exactly as the model writes them, up
    to the object's closing brace; the rest of the call's syntax (closing brace and tag) is dropped.
    Whitespace (and, for Llama, `;`) at the end of content is held, and dropped when a call follows it.
    `finish` settles the rest (a call cut short keeps the arguments written so far, as OpenAI's do).
    However the text is cut into pieces, the items joined are the same.
    """

    family: str
    tool_names: frozenset[str]
    calls: int = 0  # calls started so far
    _text: str = ""  # unsettled text of the current state
    _state: str = "text"  # "text", "arguments", "tail" (closing a call), "next" (Mistral: more calls?)
    _args: _JsonEnd = field(default_factory=_JsonEnd)
    _filler: str = ""  # held whitespace between settled items
    _out: list[str | CallPiece] = field(default_factory=list)

    def feed(self, text: str) -> list[str | CallPiece]:
        self._text += text
        self._advance(final=False)
        return self._take()

    def finish(self) -> list[str | CallPiece]:
        self._advance(final=True)
        if self._filler and not self.calls:
            self._out.append(self._filler)
        self._filler = ""
        return self._take()

    def _take(self) -> list[str | CallPiece]:
        out, self._out = self._out, []
        return out

    def _advance(self, final: bool) -> None:
        while self._step(final):
            pass

    def _step(self, final: bool) -> bool:
        """Move the state on by what the text allows; False when it must wait for more (or is done)."""
        if self._state == "arguments":
            used = self._args.scan(self._text)
            self._argument_text(self._text[:used])
            self._text = self._text[used:]
            if self._args.depth:
                return False
            self._state = "tail"
            return True
        if self._state == "text":
            return self._find_call(final)
        if self._state == "tail":
            tails = [_match(t, self.tool_names, self._text, 0) for t in _TAILS[self.family]]
            closed = next((t for t in tails if isinstance(t, tuple)), None)
            if closed is not None:
                self._text = self._text[closed[0] :]
                self._state = "next" if self.family == MISTRAL else "text"
                return True
            return self._not_closed(PARTIAL if PARTIAL in tails else None, final)
        more = _match(_NEXT_IN_ARRAY, self.tool_names, self._text, 0)
        if isinstance(more, tuple):
            self._start_call(more[1], more[0])
            return True
        end = _match(_ARRAY_END, self.tool_names, self._text, 0)
        if isinstance(end, tuple):
            self._text = self._text[end[0] :]
            self._state = "text"
            return True
        return self._not_closed(PARTIAL if PARTIAL in (more, end) else None, final)

    def _not_closed(self, found: str | None, final: bool) -> bool:
        """After a call, text that is not (yet) its closing syntax: wait for more while it may be; at
        the end, what was cut short is dropped as the call's; anything else is content again."""
        if found == PARTIAL:
            if not final:
                return False
            self._text = ""
        self._state = "text"
        return True

    def _find_call(self, final: bool) -> bool:
        """Settle the content before the first call head; start the call, or hold a possible head."""
        text = self._text
        for pos in range(len(text)):
            if text[pos] not in _HEAD_FIRST_CHARS[self.family]:
                continue
            for pattern in _HEADS[self.family]:
                found = _match(pattern, self.tool_names, text, pos)
                if found is None or (found == PARTIAL and final):
                    continue
                self._content(text[:pos])
                if found == PARTIAL:
                    self._text = text[pos:]
                    return False
                assert isinstance(found, tuple)
                self._text = text[pos:]
                self._start_call(found[1], found[0] - pos)
                return True
        self._content(text)
        self._text = ""
        return False

    def _start_call(self, name: str, head_end: int) -> None:
        """A call's head ends at `head_end` of the text, just past its arguments' opening brace."""
        self._filler = ""  # whitespace between calls is not content
        self._out.append(CallPiece(self.calls, name, ""))
        self.calls += 1
        self._args = _JsonEnd()
        self._text = self._text[head_end - 1 :]
        self._state = "arguments"

    def _argument_text(self, text: str) -> None:
        last = self._out[-1] if self._out else None
        if isinstance(last, CallPiece) and last.index == self.calls - 1:
            self._out[-1] = CallPiece(last.index, last.name, last.arguments + text)
        elif text:
            self._out.append(CallPiece(self.calls - 1, None, text))

    def _content(self, text: str) -> None:
        """Settle content, holding its trailing filler back (it may turn out to precede a call)."""
        settled = text.rstrip(_FILLER[self.family])
        if settled:
            self._out.append(self._filler + settled)
            self._filler = ""
        self._filler += text[len(settled) :]


def calls_of(pieces: list[CallPiece]) -> list[ToolCall]:
    """The whole calls that streamed pieces add up to."""
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for piece in pieces:
        if piece.name is not None:
            names[piece.index] = piece.name
        arguments[piece.index] = arguments.get(piece.index, "") + piece.arguments
    return [ToolCall(names[i], arguments[i]) for i in sorted(names)]


def parse_all(family: str, tool_names: frozenset[str], text: str) -> tuple[str | None, list[ToolCall]]:
    """Content (None when there is none) and tool calls of a whole generated text."""
    parser = ToolCallParser(family, tool_names)
    items = parser.feed(text) + parser.finish()
    content = "".join(i for i in items if isinstance(i, str))
    return (content or None), calls_of([i for i in items if isinstance(i, CallPiece)])
