"""OpenAI-compatible request and response bodies (pydantic), and their mapping to SamplingParams.

Requests are validated strictly (a string where a number belongs is an error, not a coercion);
parameters we do not implement, and unknown (e.g. misspelt) ones, are rejected with a 400 naming
them rather than silently ignored. Only the fields in IGNORED_PARAMETERS are accepted without effect.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_serializer,
    model_validator,
)

from kiln_engine import grammar
from kiln_engine.interface import SamplingParams

MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 16  # `n`: each choice is a sequence of its own in the engine
MAX_LOGIT_BIAS = 1024  # entries of `logit_bias`
MAX_STOP_TOKEN_IDS = 64

Number = StrictInt | StrictFloat

# Accepted for compatibility with OpenAI clients and deliberately without effect on the output.
IGNORED_PARAMETERS = frozenset({"user"})

# OpenAI parameters this server does not implement (yet): a 400 says so instead of "unknown parameter".
UNSUPPORTED_PARAMETERS: dict[str, str] = {
    "tools": "tools are only supported by /v1/chat/completions and /v1/responses",
    "tool_choice": "tools are only supported by /v1/chat/completions and /v1/responses",
    "parallel_tool_calls": "tools are only supported by /v1/chat/completions and /v1/responses",
    "functions": "the deprecated function calling is not supported (use tools)",
    "function_call": "the deprecated function calling is not supported (use tool_choice)",
    "audio": "audio is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning effort is not supported",
    "web_search_options": "web search is not supported",
    "store": "stored completions are not supported",
    "metadata": "stored completions (metadata) are not supported",
    "service_tier": "service tiers are not supported",
    # the Responses API's (/v1/responses): nothing is stored, and only function tools are served
    "previous_response_id": "responses are not stored (send the whole conversation as input)",
    "conversation": "conversations are not stored (send the whole conversation as input)",
    "background": "background responses are not supported",
    "include": "extra output data (include) is only supported by /v1/responses",
    "reasoning": "reasoning options are not supported",
    "prompt": "stored prompt templates are not supported",
    "truncation": "truncating the input is not supported (a too long input is an error)",
    "max_tool_calls": "max_tool_calls is not supported",
    "top_logprobs": "top_logprobs is only supported by /v1/chat/completions and /v1/responses",
    "prompt_cache_key": "prompt cache keys are not supported (prefix caching is automatic)",
    "safety_identifier": "safety identifiers are not supported",
}


class _Request(BaseModel):
    """A part of a request body: unknown fields are errors, never silently dropped."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    """`stream_options`: whether the last streamed chunk carries usage."""

    include_usage: StrictBool = False


class JsonSchemaFormat(_Request):
    """`response_format.json_schema`: the schema the output must validate against."""

    name: StrictStr = Field(min_length=1, max_length=64)
    description: StrictStr | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = Field(
        default=None, description="Accepted either way: the output always follows the schema strictly."
    )


class ResponseFormat(_Request):
    """`response_format`: free text, any JSON object, JSON that validates against a schema, or (an
    extension) text that matches a regex or an EBNF grammar."""

    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]
    json_schema: JsonSchemaFormat | None = None
    regex: StrictStr | None = Field(default=None, description="Extension: with type 'regex'.")
    grammar: StrictStr | None = Field(
        default=None, description="Extension: with type 'grammar', EBNF (xgrammar/GBNF) with a rule `root`."
    )

    @model_validator(mode="after")
    def _field_iff_type(self) -> ResponseFormat:
        for kind in ("json_schema", "regex", "grammar"):
            if (self.type == kind) != (getattr(self, kind) is not None):
                raise ValueError(f"{kind} is required with type '{kind}' and only then")
        return self

    def structured(self) -> tuple[str, str] | None:
        """The engine's `structured` spec, or None for free text."""
        if self.type == "json_object":
            return (grammar.JSON_OBJECT, "")
        if self.json_schema is not None:
            return (grammar.JSON_SCHEMA, json.dumps(self.json_schema.schema_))
        if self.regex is not None:
            return (grammar.REGEX, self.regex)
        if self.grammar is not None:
            return (grammar.EBNF, self.grammar)
        return None

    def param(self) -> str:
        """The request field that holds this format's source, for errors about it."""
        return {"json_schema": "response_format.json_schema.schema", "regex": "response_format.regex",
                "grammar": "response_format.grammar"}.get(self.type, "response_format")  # fmt: skip


class _SamplingFields(_Request):
    """Fields shared by completions and chat completions."""

    model: StrictStr
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Annotated[Number, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Number, Field(gt=0.0, le=1.0)] | None = None
    top_k: StrictInt | None = Field(default=None, ge=-1, description="Extension: 0 or -1 disables.")
    n: StrictInt = Field(default=1, ge=1, le=MAX_CHOICES, description="Number of choices to generate.")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    # torch generators take a 64-bit seed: anything wider is a client error, not an engine failure.
    seed: StrictInt | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: Annotated[Number, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0.0, le=2.0)] | None = Field(
        default=None, description="Extension: >1 discourages tokens of the prompt and the output so far."
    )
    logit_bias: dict[StrictStr, Annotated[Number, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS, description="Token id (as a string) -> added to its logit."
    )
    min_tokens: StrictInt = Field(
        default=0, ge=0, description="Extension: EOS, stop tokens and stop strings end nothing before this."
    )
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = Field(
        default=None, max_length=MAX_STOP_TOKEN_IDS, description="Extension: token ids that end a choice."
    )
    response_format: ResponseFormat | None = None
    ignore_eos: StrictBool = False
    user: StrictStr | None = Field(default=None, description="Accepted and ignored.")

    @field_validator("stop")
    @classmethod
    def _few_stop_sequences(cls, stop: str | list[str] | None) -> str | list[str] | None:
        # each stop string is matched against every generated token: the count must be bounded
        if isinstance(stop, list) and len(stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stop)}")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not key.isdecimal():
                raise ValueError(f"keys must be token ids, got {key!r}")
        return bias

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return tuple(s for s in stops if s)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: StrictStr | list[StrictInt] | list[StrictStr]
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: StrictBool = Field(default=False, description="Not supported: only false is accepted.")
    best_of: StrictInt | None = Field(default=None, ge=1, le=1)
    suffix: StrictStr | None = Field(default=None, max_length=0, description="Not supported.")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported: only false is accepted")
        return echo


class TextPart(_Request):
    """One `{"type": "text", "text": ...}` part of a chat message's content."""

    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Request):
    """A call an assistant message made: the function's name and its arguments as JSON text."""

    name: StrictStr
    arguments: StrictStr

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        try:
            value = json.loads(arguments)
        except ValueError as exc:
            raise ValueError(f"arguments must be a JSON object, got invalid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError("arguments must be a JSON object")
        return arguments


class MessageToolCall(_Request):
    """One entry of an assistant message's `tool_calls`."""

    id: StrictStr
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Request):
    """One chat message; content is a string or a list of text parts. An assistant message may carry
    the tool calls it made; a `tool` message answers one of them (`tool_call_id`)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: StrictStr | None = None

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls belong to assistant messages only")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool messages need tool_call_id, and only they may have one")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (transformers' convention: arguments as a dict)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": c.type,
                 "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                for c in self.tool_calls
            ]  # fmt: skip
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule; names are spliced into grammars
MAX_TOOLS = 128


class FunctionDefinition(_Request):
    """A function the model may call: its name, what it does, and a JSON schema of its arguments."""

    name: StrictStr = Field(pattern=TOOL_NAME.pattern)
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = Field(
        default=None, description="Accepted either way: forced calls always follow the schema."
    )


class Tool(_Request):
    """One entry of `tools`."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: StrictStr


class NamedToolChoice(_Request):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`: call this function."""

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: StrictBool = True
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True

    def tool_definitions(self) -> list[dict[str, Any]]:
        """The offered functions as chat templates read them (`{"type": "function", "function"}`)."""
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def named_tool(self) -> str | None:
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None

    def forces_tool_calls(self) -> bool:
        """tool_choice "required" or a named function: the output must be tool calls."""
        return bool(self.tools) and (self.tool_choice == "required" or self.named_tool() is not None)

    def parses_tool_calls(self) -> bool:
        """Tools are offered and may be called (tool_choice is not "none")."""
        return bool(self.tools) and self.tool_choice != "none"


def to_sampling_params(
    req: CompletionRequest | ChatCompletionRequest,
    max_tokens: int,
    num_logprobs: int | None,
    choice: int = 0,
    structured: tuple[str, str] | None = None,
) -> SamplingParams:
    """Map a validated request onto the engine's SamplingParams of one of its `n` choices.

    top_k -1 and 0 both disable. Choice i > 0 of a seeded request draws from seed + i, so the
    choices differ and each is reproducible. `structured` (e.g. a forced tool call's grammar)
    replaces the one of `response_format`.
    """
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    seed = req.seed if req.seed is None or choice == 0 else (req.seed + choice) % 2**64
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if req.top_p is None else float(req.top_p),
        top_k=max(req.top_k or 0, 0),
        seed=seed,
        stop=req.stop_strings(),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        logprobs=num_logprobs,
        presence_penalty=float(req.presence_penalty or 0.0),
        frequency_penalty=float(req.frequency_penalty or 0.0),
        repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
        logit_bias=tuple((int(k), float(v)) for k, v in (req.logit_bias or {}).items()),
        min_tokens=req.min_tokens,
        structured=structured or (req.response_format.structured() if req.response_format else None),
    )


# ----------------------------------------------------------------------------- responses


class UsageInfo(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions logprobs block."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    """One choice of a completion (or one streamed delta of it)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A completion, or one chunk of a streamed completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    """An alternative token at one position of a chat completion."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    """The chosen token at one position of a chat completion, with its alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """The chat completions logprobs block."""

    content: list[ChatTokenLogprob] = Field(default_factory=list)


class ResponseFunctionCall(BaseModel):
    """A called function: its name and its arguments as JSON text."""

    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    """One tool call of an assistant message."""

    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ChatResponseMessage(BaseModel):
    """The assistant message of a chat completion: content and/or tool calls."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    """A (non-streamed) chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class _Sparse(BaseModel):
    """Leaves out unset fields when dumped, as OpenAI's streamed tool-call pieces do."""

    @model_serializer(mode="wrap")
    def _without_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(_Sparse):
    """A streamed piece of a call: the name comes once, the arguments text in pieces."""

    name: str | None = None
    arguments: str


class DeltaToolCall(_Sparse):
    """A streamed piece of the call at `index`; its first piece carries id, type and name."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatDelta(BaseModel):
    """What one streamed chunk adds to the assistant message."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    """One choice of a streamed chat chunk."""

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One chunk of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    """One entry of GET /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kiln"
    max_model_len: int | None = None
    parent: str | None = None  # a LoRA adapter's base model


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    """The inside of an OpenAI-style error body."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """An OpenAI-style error body: `{"error": {...}}`."""

    error: ErrorInfo


def dump(model: BaseModel) -> dict[str, Any]:
    """A response model as a JSON-ready dict."""
    return model.model_dump(mode="json")


def dump_list(models: Sequence[BaseModel]) -> list[dict[str, Any]]:
    return [dump(m) for m in models]
