"""The OpenAI Responses API (`POST /v1/responses`) on top of chat completions: its request body, the
mapping of a request onto a chat completion request (input items to chat messages, `text.format` to
`response_format`, function tools), and the response object and stream events built from the
chat path's deltas.

The subset applications use: `input` as text or message / `function_call` / `function_call_output`
items, `instructions`, `max_output_tokens`, `temperature`, `top_p`, `text.format`, function `tools`,
`tool_choice`, `parallel_tool_calls`, `stream`, and the output text's token logprobs (`include:
["message.output_text.logprobs"]`, `top_logprobs`). Nothing is stored, so what needs stored responses
(`previous_response_id`, `store: true`, `background`, conversations) is a 400, as are built-in tools.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kiln_engine.server import protocol as p
from kiln_engine.server import tool_calls as tc
from kiln_engine.server.errors import OpenAIError
from kiln_engine.server.streaming import Delta


class _Request(BaseModel):
    """A part of a Responses request body: unknown fields are errors (the OpenAI parameters this
    server does not implement are named in protocol.UNSUPPORTED_PARAMETERS)."""

    model_config = ConfigDict(extra="forbid")


class InputText(_Request):
    """A text part of an input message (`output_text` for assistant turns passed back in)."""

    type: Literal["input_text", "output_text"]
    text: StrictStr
    annotations: list[Any] | None = Field(default=None, description="Accepted on output_text, unused.")
    logprobs: list[Any] | None = Field(default=None, description="Accepted on output_text, unused.")


def _text_or(listed: str) -> Discriminator:
    """Validate a value as text or as the list (tagged `listed`) by its JSON type, so that an error
    names the field in the list rather than "not a string" (errors.validation_error leaves tags
    like these out of the parameter's name)."""
    return Discriminator(lambda v: "str" if isinstance(v, str) else listed)


Content = Annotated[
    Annotated[StrictStr, Tag("str")] | Annotated[list[InputText], Tag("list[InputText]")],
    _text_or("list[InputText]"),
]


class InputItem(_Request):
    """One entry of `input`: a message (the default type), a function call the model made, or the
    output of one. Items of a previous response's `output` can be passed back as they are."""

    type: Literal["message", "function_call", "function_call_output"] = "message"
    id: StrictStr | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: Content | None = None
    call_id: StrictStr | None = Field(default=None, min_length=1)
    name: StrictStr | None = None
    arguments: StrictStr | None = None
    output: Content | None = None

    @model_validator(mode="after")
    def _fields_fit_the_type(self) -> InputItem:
        needs = {"message": ("role", "content"), "function_call": ("call_id", "name", "arguments"),
                 "function_call_output": ("call_id", "output")}[self.type]  # fmt: skip
        for name in ("role", "content", "call_id", "name", "arguments", "output"):
            if (name in needs) != (getattr(self, name) is not None):
                raise ValueError(
                    f"{name} is {'required' if name in needs else 'not allowed'} in a {self.type}"
                )
        if self.arguments is not None:
            p.FunctionCall(name=self.name or "", arguments=self.arguments)  # a JSON object, or an error
        return self

    def text(self, field_name: str) -> str:
        value = getattr(self, field_name)
        return value if isinstance(value, str) else "".join(part.text for part in value)


class FunctionTool(_Request):
    """A function the model may call (Responses' flat shape: no nested `function`)."""

    type: StrictStr
    name: StrictStr = Field(pattern=p.TOOL_NAME.pattern)
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = Field(
        default=None, description="Accepted either way: forced calls always follow the schema."
    )

    @field_validator("type")
    @classmethod
    def _function_only(cls, kind: str) -> str:
        if kind != "function":
            raise ValueError(f"only function tools are supported; built-in tools such as {kind!r} are not")
        return kind


class NamedFunctionChoice(_Request):
    """`tool_choice: {"type": "function", "name": ...}`: call this function."""

    type: Literal["function"]
    name: StrictStr


class TextFormat(_Request):
    """`text.format`: free text, any JSON object, or JSON that validates against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    name: StrictStr | None = Field(default=None, min_length=1, max_length=64)
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = Field(
        default=None, description="Accepted either way: the output always follows the schema strictly."
    )

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> TextFormat:
        if (self.type == "json_schema") != (self.schema_ is not None and self.name is not None):
            raise ValueError("name and schema are required with type 'json_schema' and only then")
        return self

    def response_format(self) -> p.ResponseFormat:
        if self.schema_ is None or self.name is None:
            return p.ResponseFormat(type=self.type)
        schema = p.JsonSchemaFormat(
            name=self.name, description=self.description, schema=self.schema_, strict=self.strict
        )
        return p.ResponseFormat(type="json_schema", json_schema=schema)


class TextConfig(_Request):
    """`text`: the output's format."""

    format: TextFormat


LOGPROBS = "message.output_text.logprobs"  # the one `include` value served


class ResponsesRequest(_Request):
    """POST /v1/responses."""

    model: StrictStr
    input: Annotated[
        Annotated[StrictStr, Tag("str")]
        | Annotated[list[InputItem], Tag("list[InputItem]"), Field(min_length=1)],
        _text_or("list[InputItem]"),
    ]
    instructions: StrictStr | None = None
    max_output_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Annotated[p.Number, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[p.Number, Field(gt=0.0, le=1.0)] | None = None
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = Field(default=None, max_length=p.MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    stream: StrictBool = False
    store: StrictBool | None = Field(default=None, description="Only false: responses are not stored.")
    user: StrictStr | None = Field(default=None, description="Accepted and ignored.")
    include: list[Literal["message.output_text.logprobs"]] | None = Field(
        default=None, description="Extra output: only the output text's token logprobs."
    )
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=p.MAX_TOP_LOGPROBS)

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS in (self.include or [])

    @field_validator("include")
    @classmethod
    def _no_logprobs_with_tools(cls, include: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if include and info.data.get("tools"):
            # The tool-call parser turns the model's text into calls and text outside them: its
            # tokens no longer line up with the output text.
            raise ValueError(f"include {LOGPROBS!r} cannot be combined with tools")
        return include

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_include(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and LOGPROBS not in (info.data.get("include") or []):
            raise ValueError(f"top_logprobs needs include: [{LOGPROBS!r}]")
        return top

    @field_validator("store")
    @classmethod
    def _not_stored(cls, store: bool | None) -> bool | None:
        if store:
            raise ValueError("responses are not stored: only false is accepted")
        return store

    def to_chat(self) -> p.ChatCompletionRequest:
        """The chat completion request that generates this response."""
        chat: dict[str, Any] = {
            "model": self.model,
            "messages": messages_of(self.instructions, self.input),
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stream": self.stream,
            "user": self.user,
        }
        if self.wants_logprobs:
            chat["logprobs"], chat["top_logprobs"] = True, self.top_logprobs or 0
        if self.text is not None:
            chat["response_format"] = self.text.format.response_format()
        if self.tools is not None:
            chat["tools"] = [
                {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                for t in self.tools
            ]
        if isinstance(self.tool_choice, NamedFunctionChoice):
            chat["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            chat["tool_choice"] = self.tool_choice
        if self.parallel_tool_calls is not None:
            chat["parallel_tool_calls"] = self.parallel_tool_calls
        return p.ChatCompletionRequest.model_validate({k: v for k, v in chat.items() if v is not None})


def messages_of(instructions: str | None, items: str | list[InputItem]) -> list[dict[str, Any]]:
    """Chat messages of a Responses input: instructions as the system message, then the items in
    order; consecutive function calls become one assistant message's tool calls."""
    out: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(items, str):
        return [*out, {"role": "user", "content": items}]
    for item in items:
        if item.type == "message":
            out.append({"role": item.role, "content": item.text("content")})
        elif item.type == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text("output")})
        else:
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}  # fmt: skip
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
    return out


# A chat parameter an error names, and the Responses parameter it came from.
_PARAMS = [
    (r"^messages\b.*", "input"),  # its indices are not the input's (instructions, merged calls)
    (r"^max_tokens$", "max_output_tokens"),
    (r"^response_format\.json_schema\.schema$", "text.format.schema"),
    (r"^response_format\b.*", "text.format"),
    (r"^tools\.(\d+)\.function\.", r"tools.\1."),
    (r"^tool_choice\.function\.name$", "tool_choice.name"),
]


def responses_param(chat_param: str | None) -> str | None:
    """The Responses request's name for a parameter of the chat request made from it."""
    if chat_param is None:
        return None
    for pattern, replacement in _PARAMS:
        if re.match(pattern, chat_param):
            return re.sub(pattern, replacement, chat_param)
    return chat_param


def with_responses_param(error: OpenAIError) -> OpenAIError:
    """`error` of the chat path, naming the parameter as the Responses request calls it."""
    param = responses_param(error.param)
    if param != error.param and error.param is not None and param is not None:
        error.message = error.message.replace(f"'{error.param}'", f"'{param}'")
    error.param = param
    return error


# ----------------------------------------------------------------------------- the response object


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[p.ChatTokenLogprob] = Field(default_factory=list)  # with include: one per token


class OutputMessage(BaseModel):
    """An assistant message of the output."""

    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    """A function call of the output; the client answers it with a `function_call_output` item."""

    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """A response: its output items, status and usage, and the request's settings echoed."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    output: list[OutputMessage | FunctionCallItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    store: bool = False
    usage: ResponseUsage | None = None


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class ResponseBuilder:
    """Builds a response from the chat path's deltas of its one choice, and the stream events that
    tell it as it grows (OpenAI's order: an item is added, its text or arguments arrive in deltas,
    it is done; the response is created first and completed, incomplete or failed last). The
    non-streamed response is the same builder's final object, so both always agree."""

    response: ResponseObject
    parser: tc.ToolCallParser | None
    # The chat path's logprobs of a delta's tokens, when the request includes them.
    logprobs_of: Callable[[Delta], list[p.ChatTokenLogprob]] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    _sequence: int = 0
    _open: OutputMessage | FunctionCallItem | None = None
    _logprobs: list[p.ChatTokenLogprob] = field(default_factory=list)  # of tokens with no text yet

    @classmethod
    def start(
        cls,
        req: ResponsesRequest,
        model: str,
        parser: tc.ToolCallParser | None,
        logprobs_of: Callable[[Delta], list[p.ChatTokenLogprob]] | None = None,
    ) -> ResponseBuilder:
        response = ResponseObject(
            id=_item_id("resp"),
            created_at=int(time.time()),
            status="in_progress",
            model=model,
            instructions=req.instructions,
            max_output_tokens=req.max_output_tokens,
            temperature=None if req.temperature is None else float(req.temperature),
            top_p=None if req.top_p is None else float(req.top_p),
            parallel_tool_calls=req.parallel_tool_calls is not False,
            tool_choice=req.tool_choice.model_dump() if isinstance(req.tool_choice, BaseModel) else
            req.tool_choice or "auto",
            tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
            text={"format": (req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text
                             else {"type": "text"})},
        )  # fmt: skip
        builder = cls(response, parser, logprobs_of if req.wants_logprobs else None)
        builder._emit("response.created", response=p.dump(response))
        builder._emit("response.in_progress", response=p.dump(response))
        return builder

    def take(self) -> list[dict[str, Any]]:
        """The events so far, once."""
        out, self.events = self.events, []
        return out

    def feed(self, d: Delta) -> list[dict[str, Any]]:
        """The events `d` adds (the last delta, with its finish reason, ends the response)."""
        if self.logprobs_of is not None:
            self._logprobs += self.logprobs_of(d)
        if self.parser is None:
            items: list[str | tc.CallPiece] = [d.text]
        else:
            items = self.parser.feed(d.text) + (self.parser.finish() if d.finish_reason is not None else [])
        for item in items:
            if isinstance(item, str):
                self._text(item)
            else:
                self._call_piece(item)
        if d.finish_reason is not None:
            self._finish(d)
        return self.take()

    def _emit(self, kind: str, **fields: Any) -> None:
        self.events.append({"type": kind, "sequence_number": self._sequence, **fields})
        self._sequence += 1

    def _where(self, item: OutputMessage | FunctionCallItem) -> dict[str, Any]:
        return {"item_id": item.id, "output_index": self.response.output.index(item)}

    def _add(self, item: OutputMessage | FunctionCallItem) -> None:
        self._close()
        self.response.output.append(item)
        self._open = item
        self._emit(
            "response.output_item.added", output_index=len(self.response.output) - 1, item=p.dump(item)
        )

    def _text(self, text: str) -> None:
        if not text:
            return
        if not isinstance(self._open, OutputMessage):
            self._add(OutputMessage(id=_item_id("msg"), status="in_progress", content=[]))
            assert isinstance(self._open, OutputMessage)
            self._open.content.append(OutputText(text=""))
            self._emit("response.content_part.added", **self._where(self._open), content_index=0,
                       part=p.dump(OutputText(text="")))  # fmt: skip
        assert isinstance(self._open, OutputMessage)
        logprobs, self._logprobs = self._logprobs, []  # a token's text can come with a later one's
        self._open.content[0].text += text
        self._open.content[0].logprobs += logprobs
        self._emit("response.output_text.delta", **self._where(self._open), content_index=0, delta=text,
                   logprobs=p.dump_list(logprobs))  # fmt: skip

    def _call_piece(self, piece: tc.CallPiece) -> None:
        if piece.name is not None:
            call = FunctionCallItem(id=_item_id("fc"), call_id=f"call_{uuid.uuid4().hex[:24]}",
                                    name=piece.name, arguments="", status="in_progress")  # fmt: skip
            self._add(call)
        assert isinstance(self._open, FunctionCallItem)
        if piece.arguments:
            self._open.arguments += piece.arguments
            self._emit(
                "response.function_call_arguments.delta", **self._where(self._open), delta=piece.arguments
            )

    def _close(self, status: Literal["completed", "incomplete"] = "completed") -> None:
        item, self._open = self._open, None
        if item is None:
            return
        item.status = status
        where = self._where(item)
        if isinstance(item, OutputMessage):
            part = item.content[0]
            part.logprobs, self._logprobs = part.logprobs + self._logprobs, []  # tokens with no text
            self._emit("response.output_text.done", **where, content_index=0, text=part.text,
                       logprobs=p.dump_list(part.logprobs))  # fmt: skip
            self._emit("response.content_part.done", **where, content_index=0, part=p.dump(part))
        else:
            self._emit("response.function_call_arguments.done", **where, arguments=item.arguments)
        self._emit("response.output_item.done", output_index=where["output_index"], item=p.dump(item))

    def _finish(self, d: Delta) -> None:
        response = self.response
        if not response.output:  # no text and no call: still one (empty) message, as OpenAI's
            self._text_item_for_nothing()
        if d.finish_reason == "length":
            self._close("incomplete")
            response.status = "incomplete"
            response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
        elif d.finish_reason == "abort":
            self._close("incomplete")
            response.status = "failed"
            response.error = ResponseError(
                code="server_error", message="aborted: the server is shutting down"
            )
        else:
            self._close()
            response.status = "completed"
        response.usage = ResponseUsage(
            input_tokens=d.prompt_tokens,
            output_tokens=d.completion_tokens,
            total_tokens=d.prompt_tokens + d.completion_tokens,
        )
        self._emit(f"response.{response.status}", response=p.dump(response))

    def _text_item_for_nothing(self) -> None:
        self._add(OutputMessage(id=_item_id("msg"), status="in_progress", content=[OutputText(text="")]))
        assert isinstance(self._open, OutputMessage)
        self._emit("response.content_part.added", **self._where(self._open), content_index=0,
                   part=p.dump(OutputText(text="")))  # fmt: skip


def sse_event(event: dict[str, Any]) -> bytes:
    """One Responses stream event: its type as the SSE event name, the event as its data."""
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
