"""The OpenAI-compatible HTTP app: routes, admission (auth, validation, drain) and response assembly.

`create_app` wires a served model (engine + tokenizer) to FastAPI; `serve` runs it under uvicorn
with graceful drain. The engine itself is only ever touched by the EngineRunner's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln_engine import grammar
from kiln_engine.interface import Engine, TokenLogprob
from kiln_engine.lora import BASE_MODEL_NAME
from kiln_engine.server import protocol as p
from kiln_engine.server import responses as rs
from kiln_engine.server import tool_calls as tc
from kiln_engine.server.drain import DrainingServer, DrainRequest, DrainState, server_config
from kiln_engine.server.errors import OpenAIError, install_error_handlers, validation_error
from kiln_engine.server.lora_watch import DEFAULT_POLL_SECONDS, AdapterFileWatch
from kiln_engine.server.metrics import CONTENT_TYPE, ServerMetrics
from kiln_engine.server.runner import EngineFailure, EngineRunner
from kiln_engine.server.streaming import (
    SSE_DONE,
    Delta,
    DisconnectWatch,
    deltas,
    merge,
    next_or_disconnect,
    sse,
)

log = logging.getLogger(__name__)


class ChatTokenizer(Protocol):
    """What the server needs from the model's tokenizer."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str: ...


@dataclass
class ServedModel:
    """One model behind the API: its public name, engine and tokenizer."""

    name: str
    engine: Engine
    tokenizer: ChatTokenizer
    eos_token_ids: frozenset[int] = frozenset()
    vocab_size: int | None = None
    # Text the chat template already starts with a BOS token for: encode without adding another.
    chat_encode: Callable[[str], list[int]] | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)
    # The engine fills RequestOutput.text (detokenized, stop strings applied); else the server decodes.
    engine_detokenizes: bool = False
    # The tool-call format (tool_calls.FAMILIES) the model writes; None: read it off the chat template.
    tool_format: str | None = None
    # LoRA adapters served next to the base model: a request's `model` names one (kiln_engine.lora).
    adapters: tuple[str, ...] = ()
    failed_adapters: dict[str, str] = field(default_factory=dict)  # adapter -> why it is not served
    # The adapter file the adapters above came from (kiln_engine.server.lora_watch), its content then,
    # and how often it is looked at again; None: the adapters are fixed.
    adapter_file: Path | None = None
    adapter_file_text: str | None = None
    adapter_poll_s: float = DEFAULT_POLL_SECONDS


@dataclass
class ServerSettings:
    """Server knobs that are not about the model."""

    api_key: str | None = None
    drain_timeout_s: float = 30.0
    default_completion_max_tokens: int = 16


@dataclass
class _Prepared:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    structured: tuple[str, str] | None = None  # the grammar of forced tool calls, if any


def create_app(model: ServedModel, settings: ServerSettings | None = None) -> FastAPI:
    """Build the FastAPI app; the engine thread starts with the app's lifespan and stops with it."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics(model.name)
    runner = EngineRunner(model.engine, metrics)
    drain = DrainState(runner, settings.drain_timeout_s)
    closed: list[bool] = []

    def close() -> None:
        """Stop the engine thread, then the engine (e.g. tell tensor-parallel followers to exit); once."""
        if closed:
            return
        closed.append(True)
        runner.stop()
        shutdown = getattr(model.engine, "shutdown", None)
        if callable(shutdown):
            shutdown()

    async def apply_adapters(local: list[tuple[str, str]], fetch_failed: dict[str, str]) -> dict[str, str]:
        set_adapters = model.engine.set_adapters  # type: ignore[attr-defined]  # torch engines only
        failed = {**fetch_failed, **await asyncio.wrap_future(runner.call(lambda: set_adapters(local)))}
        model.adapters = tuple(name for name, _ in local if name not in failed)
        model.failed_adapters = failed
        return failed

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runner.start()
        watch = None
        if model.adapter_file is not None:
            watcher = AdapterFileWatch(
                model.adapter_file, apply_adapters, model.adapter_file_text, model.adapter_poll_s
            )
            watch = asyncio.create_task(watcher.run())
        try:
            yield
        finally:
            if watch is not None:
                watch.cancel()
            close()

    app = FastAPI(title="Kiln engine", version="1", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.runner = runner
    app.state.drain = drain
    app.state.close = close
    app.state.model = model
    install_error_handlers(app)
    serves_adapters = bool(model.adapters or model.failed_adapters or model.adapter_file)
    names = {model.name, *model.aliases, *([BASE_MODEL_NAME] if serves_adapters else [])}
    templates: dict[str, str] = getattr(model.tokenizer, "templates", {})
    tool_format = model.tool_format or tc.family_of(templates.get("tool_use", templates.get("default", "")))

    # ------------------------------------------------------------------ admission

    async def require_auth(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        ):
            raise OpenAIError(
                "missing or invalid API key (send 'Authorization: Bearer <key>')",
                401,
                code="invalid_api_key",
            )

    def admit(req: p.CompletionRequest | p.ChatCompletionRequest) -> None:
        if drain.draining:
            raise OpenAIError("server is draining and accepts no new requests", 503, code="draining")
        if req.model in model.failed_adapters:
            reason = model.failed_adapters[req.model]
            raise OpenAIError(
                f"model '{req.model}' is a LoRA adapter that failed to load: {reason}",
                param="model",
                code="adapter_unavailable",
            )
        if req.model not in names and req.model not in model.adapters:
            served = "', '".join([model.name, *sorted(model.adapters)])
            raise OpenAIError(
                f"model '{req.model}' does not exist; this server serves '{served}'",
                param="model",
                code="model_not_found",
            )

    def served_name(req: p.CompletionRequest | p.ChatCompletionRequest) -> str:
        """The `model` a response names: the adapter asked for, else the base model's name."""
        return req.model if req.model in model.adapters else model.name

    def prepare(prompt_ids: list[int], requested: int | None, default: int | None, param: str) -> _Prepared:
        limit = model.engine.max_model_len
        n = len(prompt_ids)
        if n == 0:
            raise OpenAIError("the prompt is empty", param=param, code="empty_prompt")
        if model.vocab_size is not None and any(t < 0 or t >= model.vocab_size for t in prompt_ids):
            raise OpenAIError(
                f"prompt token ids must be in [0, {model.vocab_size})", param=param, code="invalid_token_id"
            )
        if n >= limit:
            raise OpenAIError(
                f"the prompt is {n} tokens; this model's context is {limit} tokens, which leaves no room "
                "to generate",
                param=param,
                code="context_length_exceeded",
            )
        max_tokens = requested if requested is not None else (default if default is not None else limit - n)
        max_tokens = min(max_tokens, limit - n) if requested is None else max_tokens
        if n + max_tokens > limit:
            raise OpenAIError(
                f"the prompt ({n} tokens) plus max_tokens ({max_tokens}) exceeds this model's context of "
                f"{limit} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return _Prepared(uuid.uuid4().hex, prompt_ids, max_tokens)

    # ------------------------------------------------------------------ routes without auth

    @app.get("/health", include_in_schema=True)
    async def health() -> JSONResponse:
        if not runner.alive:
            raise OpenAIError("engine thread is not running", 503, code="engine_dead")
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if drain.draining:
            raise OpenAIError("server is draining", 503, code="draining")
        if not runner.alive:
            raise OpenAIError("engine thread is not running", 503, code="engine_dead")
        return JSONResponse({"status": "ready", "model": model.name})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # ------------------------------------------------------------------ the OpenAI API

    error_responses: dict[int | str, dict[str, Any]] = {
        code: {"model": p.ErrorResponse, "description": what}
        for code, what in ((400, "Invalid request"), (401, "Missing or invalid API key"), (503, "Draining"))
    }
    api = APIRouter(prefix="/v1", dependencies=[Depends(require_auth)], responses=error_responses)
    # With "stream": true the answer is server-sent events, one JSON chunk per `data:` line.
    streamed: dict[int | str, dict[str, Any]] = {
        200: {
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "properties": {"data": {"type": "string"}},
                        "required": ["data"],
                    }
                }
            }
        }
    }

    @api.get("/models", response_model=p.ModelList)
    async def list_models() -> p.ModelList:
        limit = model.engine.max_model_len
        cards = [p.ModelCard(id=model.name, max_model_len=limit)]
        cards += [p.ModelCard(id=a, max_model_len=limit, parent=model.name) for a in model.adapters]
        return p.ModelList(data=cards)

    @api.post("/completions", response_model=p.CompletionResponse, responses=streamed)
    async def completions(req: p.CompletionRequest, request: Request) -> Response:
        admit(req)

        def _prep() -> _Prepared:
            prompt = req.prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
                if len(prompt) != 1:
                    raise OpenAIError("only one prompt per request is supported", param="prompt")
                prompt = prompt[0]
            ids = (
                encode_bounded(model.tokenizer.encode, prompt, model.engine.max_model_len, "prompt")
                if isinstance(prompt, str)
                else [int(t) for t in prompt]
            )
            compile_structured(req)
            return prepare(ids, req.max_tokens, settings.default_completion_max_tokens, "prompt")

        prep = await run_in_threadpool(_prep)  # tokenizing a long prompt must not stall the loop
        rid = f"cmpl-{prep.request_id}"
        stream, abort = launch(req, prep, rid, req.logprobs, request)
        want_logprobs = req.logprobs is not None
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            created = int(time.time())

            def choice(i: int, d: Delta) -> p.CompletionChoice:
                lp = _completion_logprobs([d], model.tokenizer) if want_logprobs else None
                return p.CompletionChoice(index=i, text=d.text, logprobs=lp, finish_reason=d.finish_reason)

            return _sse_response(
                _sse_chunks(
                    stream, req.n, include_usage, choice,
                    lambda choices, usage: p.CompletionResponse(
                        id=rid, created=created, model=served_name(req), choices=choices, usage=usage
                    ),
                ),
                abort,
                request,
            )  # fmt: skip
        return await _collect(
            stream, req.n, request, abort,
            lambda choices: _completion_response(rid, served_name(req), choices, want_logprobs),
        )  # fmt: skip

    async def start_chat(
        req: p.ChatCompletionRequest, request: Request
    ) -> tuple[str, AsyncIterator[tuple[int, Delta]], Callable[[], None], _ToolParsing | None]:
        """Admit, template, tokenize and submit a chat request: its id, deltas, abort and tool parsing."""
        admit(req)

        def _prep() -> _Prepared:
            messages = [m.for_template() for m in req.messages]
            tools = {"tools": req.tool_definitions()} if req.tools else {}
            try:
                text = model.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=req.add_generation_prompt, **tools
                )
            except Exception as exc:
                raise OpenAIError(f"cannot apply the chat template: {exc}", param="messages") from exc
            encode = model.chat_encode or model.tokenizer.encode
            requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            ids = encode_bounded(encode, text, model.engine.max_model_len, "messages")
            forced = check_tools(req)
            compile_structured(req)
            prep = prepare(ids, requested, None, "messages")
            prep.structured = forced
            return prep

        prep = await run_in_threadpool(_prep)  # templating and tokenizing must not stall the loop
        num_logprobs = (req.top_logprobs or 0) if req.logprobs else None
        rid = f"chatcmpl-{prep.request_id}"
        stream, abort = launch(req, prep, rid, num_logprobs, request)
        tools = _ToolParsing.of(tool_format, req) if tool_format and req.parses_tool_calls() else None
        return rid, stream, abort, tools

    @api.post("/chat/completions", response_model=p.ChatCompletionResponse, responses=streamed)
    async def chat_completions(req: p.ChatCompletionRequest, request: Request) -> Response:
        rid, stream, abort, tools = await start_chat(req, request)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            created = int(time.time())
            return _sse_response(
                _sse_chunks(
                    stream, req.n, include_usage,
                    _ChatChunkChoices(req.logprobs, model.tokenizer, tools),
                    lambda choices, usage: p.ChatCompletionChunk(
                        id=rid, created=created, model=served_name(req), choices=choices, usage=usage
                    ),
                ),
                abort,
                request,
            )  # fmt: skip
        return await _collect(
            stream, req.n, request, abort,
            lambda choices: _chat_response(
                rid, served_name(req), choices, req.logprobs, model.tokenizer, tools
            ),
        )  # fmt: skip

    @api.post("/responses", response_model=rs.ResponseObject, responses=streamed)
    async def responses(req: rs.ResponsesRequest, request: Request) -> Response:
        """The Responses API, generated by the chat path (see server/responses.py)."""
        try:
            chat = req.to_chat()
            _, stream, abort, tools = await start_chat(chat, request)
        except ValidationError as exc:
            raise rs.with_responses_param(validation_error(RequestValidationError(exc.errors()))) from exc
        except OpenAIError as exc:
            raise rs.with_responses_param(exc) from exc
        build = rs.ResponseBuilder.start(
            req, model.name, tools.parser() if tools else None,
            lambda d: _chat_logprobs(d.logprobs, model.tokenizer),
        )  # fmt: skip
        if req.stream:

            async def events() -> AsyncIterator[bytes]:
                for event in build.take():
                    yield rs.sse_event(event)
                async for _, d in stream:
                    for event in build.feed(d):
                        yield rs.sse_event(event)

            return _sse_response(events(), abort, request)

        def whole(choices: list[list[Delta]]) -> dict[str, Any]:
            for d in choices[0]:
                build.feed(d)
            return p.dump(build.response)

        return await _collect(stream, 1, request, abort, whole)

    def check_tools(req: p.ChatCompletionRequest) -> tuple[str, str] | None:
        """400 for tool fields that cannot work; the grammar that forces the calls when tool_choice
        is "required" or a named function (compiled here, off the engine thread)."""
        if not req.tools:
            for param in ("tool_choice", "parallel_tool_calls"):
                if param in req.model_fields_set:
                    raise OpenAIError(
                        f"{param} is only allowed when tools are given", param=param, code="invalid_parameter"
                    )
            return None
        names = [t.function.name for t in req.tools]
        if len(set(names)) != len(names):
            raise OpenAIError(
                "tools must have distinct function names", param="tools", code="invalid_parameter"
            )
        named = req.named_tool()
        if named is not None and named not in names:
            raise OpenAIError(
                f"tool_choice names function '{named}', which is not among tools ({', '.join(names)})",
                param="tool_choice.function.name",
                code="invalid_parameter",
            )
        if not req.parses_tool_calls():
            return None
        if tool_format is None:
            raise OpenAIError(
                "this model's chat template does not render tools, so the model cannot be told about them",
                param="tools",
                code="unsupported_parameter",
            )
        if req.response_format is not None and req.response_format.type != "text":
            raise OpenAIError(
                "response_format cannot be combined with tools unless tool_choice is 'none'",
                param="response_format",
                code="invalid_parameter",
            )
        grammars = getattr(model.engine, "grammars", None)
        if grammars is None:
            if req.forces_tool_calls():
                raise OpenAIError(
                    "tool_choice 'required' or a named function needs grammar-constrained decoding, "
                    "which this engine does not have (the model's tokenizer and the xgrammar package)",
                    param="tool_choice",
                    code="unsupported_parameter",
                )
            return None
        for i, tool in enumerate(req.tools):
            if tool.function.parameters is not None:
                try:
                    grammars.compile((grammar.JSON_SCHEMA, json.dumps(tool.function.parameters)))
                except ValueError as exc:
                    raise OpenAIError(
                        str(exc), param=f"tools.{i}.function.parameters", code="invalid_schema"
                    ) from exc
        if not req.forces_tool_calls():
            return None
        if req.ignore_eos or req.min_tokens:
            raise OpenAIError(
                "a forced tool call cannot be combined with ignore_eos or min_tokens: it ends with the "
                "end-of-sequence token",
                param="tool_choice",
                code="invalid_parameter",
            )
        functions = [{"name": t.function.name, "parameters": t.function.parameters} for t in req.tools]
        spec = (
            grammar.STRUCTURAL_TAG,
            tc.forcing_structural_tag(tool_format, functions, named, req.parallel_tool_calls),
        )
        try:
            grammars.compile(spec)
        except ValueError as exc:
            raise OpenAIError(str(exc), param="tools", code="invalid_schema") from exc
        return spec

    def compile_structured(req: p.CompletionRequest | p.ChatCompletionRequest) -> None:
        """Compile the request's response_format here, off the event loop and the engine thread (the
        engine finds it in its compiler's cache); a schema, regex or grammar that cannot be used is
        a 400 naming it."""
        spec = req.response_format.structured() if req.response_format else None
        if spec is None:
            return
        if req.ignore_eos or req.min_tokens:
            raise OpenAIError(
                "response_format cannot be combined with ignore_eos or min_tokens: the structured output "
                "ends with the end-of-sequence token",
                param="response_format",
            )
        grammars = getattr(model.engine, "grammars", None)
        if grammars is None:
            raise OpenAIError(
                "response_format is not supported by this engine: it needs the model's tokenizer and "
                "the xgrammar package",
                param="response_format",
                code="unsupported_parameter",
            )
        assert req.response_format is not None
        try:
            grammars.compile(spec)
        except ValueError as exc:
            raise OpenAIError(str(exc), param=req.response_format.param(), code="invalid_schema") from exc

    def check_sampling(req: p.CompletionRequest | p.ChatCompletionRequest, max_tokens: int) -> None:
        """Sampling parameters that depend on the model or on the resolved max_tokens."""
        if req.min_tokens > max_tokens:
            raise OpenAIError(
                f"min_tokens ({req.min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens"
            )
        vocab = model.vocab_size
        if vocab is None:
            return  # the engine checks token ids itself
        for param, ids in (
            ("logit_bias", [int(k) for k in req.logit_bias or {}]),
            ("stop_token_ids", req.stop_token_ids or []),
        ):
            if any(t >= vocab for t in ids):
                raise OpenAIError(
                    f"{param} token ids must be in [0, {vocab})", param=param, code="invalid_token_id"
                )

    def launch(
        req: p.CompletionRequest | p.ChatCompletionRequest,
        prep: _Prepared,
        rid: str,
        num_logprobs: int | None,
        request: Request,
    ) -> tuple[AsyncIterator[tuple[int, Delta]], Callable[[], None]]:
        """Submit the request's `n` choices to the engine (one sequence each, sharing the prompt's
        prefix-cache blocks); returns their merged deltas, tagged with the choice index, and an
        abort for all of them."""
        check_sampling(req, prep.max_tokens)
        rids = [rid] if req.n == 1 else [f"{rid}-{i}" for i in range(req.n)]
        request.state.submitted = True
        streams = []
        adapter = req.model if req.model in model.adapters else None
        if adapter is not None:
            metrics.adapter_requests.labels(model.name, adapter).inc()
        for i, choice_rid in enumerate(rids):
            params = p.to_sampling_params(req, prep.max_tokens, num_logprobs, i, prep.structured)
            params = replace(params, adapter=adapter)
            handle = runner.submit(choice_rid, prep.prompt_ids, params)
            streams.append(
                deltas(
                    handle,
                    model.tokenizer,
                    params.stop,
                    functools.partial(runner.abort, choice_rid, "ok"),
                    model.eos_token_ids,
                    prep.prompt_ids,
                    model.engine_detokenizes,
                )
            )

        def abort() -> None:
            for choice_rid in rids:
                runner.abort(choice_rid)

        return merge(streams), abort

    def _completion_response(
        rid: str, name: str, choices: list[list[Delta]], want_logprobs: bool
    ) -> dict[str, Any]:
        out = [
            p.CompletionChoice(
                index=i,
                text="".join(d.text for d in ds),
                logprobs=_completion_logprobs(ds, model.tokenizer) if want_logprobs else None,
                finish_reason=_reason(ds),
            )
            for i, ds in enumerate(choices)
        ]
        return p.dump(p.CompletionResponse(id=rid, model=name, choices=out, usage=_usage(choices)))

    app.include_router(api)
    app.add_middleware(RejectedRequestCounter, metrics=metrics, paths=GENERATION_PATHS)
    return app


# ---------------------------------------------------------------------- rejected-request counting

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses"})


class RejectedRequestCounter:
    """Counts generation requests answered with an error before reaching the engine as `error`
    (requests that reached it are counted by the EngineRunner). Pure ASGI, so streaming and
    disconnect detection pass through untouched.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})

        async def watch(message: Message) -> None:
            if (
                message["type"] == "http.response.start"
                and message["status"] >= 400
                and not state.get("submitted")
            ):
                self.metrics.request_finished("error")
            await send(message)

        await self.app(scope, receive, watch)


# ---------------------------------------------------------------------- prompt tokenizing

# A prefix of this many characters per context token is tokenized first when the prompt is longer.
PROBE_CHARS_PER_TOKEN = 64


def encode_bounded(encode: Callable[[str], list[int]], text: str, limit: int, param: str) -> list[int]:
    """Token ids of `text`, refusing a prompt early when a prefix of it already overflows `limit`.

    Tokenizing costs about a second per megabyte of CPU. A tokenizer splits text into words before
    merging, so a prefix cut at a space has no more tokens than the whole text: when it already
    has more than `limit`, the prompt cannot fit and the rest is never tokenized.
    """
    try:
        probe = limit * PROBE_CHARS_PER_TOKEN
        if len(text) > probe:
            cut = text.rfind(" ", probe // 2, probe)
            head = encode(text[: cut if cut > 0 else probe])
            if len(head) > limit:
                raise OpenAIError(
                    f"the prompt is at least {len(head)} tokens (its first {probe} characters alone); "
                    f"this model's context is {limit} tokens",
                    param=param,
                    code="context_length_exceeded",
                )
        return encode(text)
    except (TypeError, UnicodeError) as exc:  # lone surrogates ("\ud800") decode from JSON but are not text
        raise OpenAIError(
            f"the prompt is not valid Unicode text: {exc}", param=param, code="invalid_text"
        ) from exc


# ---------------------------------------------------------------------- response helpers


def _reason(ds: list[Delta]) -> str | None:
    return ds[-1].finish_reason if ds else None


def _usage(choices: list[list[Delta]]) -> p.UsageInfo:
    """The prompt counts once; the completion tokens of all choices add up."""
    lasts = [ds[-1] if ds else Delta("") for ds in choices]
    prompt = max((d.prompt_tokens for d in lasts), default=0)
    completion = sum(d.completion_tokens for d in lasts)
    return p.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _token_text(tok: ChatTokenizer, token_id: int) -> str:
    return tok.decode([token_id])


def _completion_logprobs(ds: list[Delta], tok: ChatTokenizer) -> p.CompletionLogprobs:
    out = p.CompletionLogprobs()
    offset = 0
    for d in ds:
        for entry in d.logprobs:
            text = _token_text(tok, entry.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(entry.logprob)
            out.top_logprobs.append({_token_text(tok, t): lp for t, lp in entry.top.items()})
            out.text_offset.append(offset)
            offset += len(text)
    return out


def _chat_logprobs(entries: list[TokenLogprob], tok: ChatTokenizer) -> list[p.ChatTokenLogprob]:
    out = []
    for entry in entries:
        text = _token_text(tok, entry.token_id)
        top = [
            p.TopLogprob(token=_token_text(tok, t), logprob=lp, bytes=list(_token_text(tok, t).encode()))
            for t, lp in sorted(entry.top.items(), key=lambda kv: -kv[1])
        ]
        out.append(
            p.ChatTokenLogprob(token=text, logprob=entry.logprob, bytes=list(text.encode()), top_logprobs=top)
        )
    return out


async def _sse_chunks(
    stream: AsyncIterator[tuple[int, Delta]],
    n: int,
    include_usage: bool,
    choice: Callable[[int, Delta], Any | None],
    chunk: Callable[[list[Any], p.UsageInfo | None], BaseModel],
) -> AsyncIterator[bytes]:
    """The SSE chunks of a streamed completion or chat completion: one per delta of any choice
    (`choice` builds its entry; None: the delta adds nothing yet), then, with `include_usage`, one
    with the usage of all choices."""
    last: dict[int, Delta] = {}
    async for i, d in stream:
        last[i] = d
        entry = choice(i, d)
        if entry is not None:
            yield sse(p.dump(chunk([entry], None)))
    if include_usage and len(last) == n:
        yield sse(p.dump(chunk([], _usage([[last[i]] for i in range(n)]))))


@dataclass(frozen=True)
class _ToolParsing:
    """How a chat request's output is split into content and tool calls: the model's format and
    the names of the offered functions."""

    family: str
    names: frozenset[str]

    @classmethod
    def of(cls, family: str, req: p.ChatCompletionRequest) -> _ToolParsing:
        return cls(family, frozenset(t.function.name for t in req.tools or []))

    def parser(self) -> tc.ToolCallParser:
        return tc.ToolCallParser(self.family, self.names)


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _finish_reason(reason: str | None, calls: int) -> str | None:
    """OpenAI's reason for a choice that stopped after making tool calls."""
    return "tool_calls" if reason == "stop" and calls else reason


class _ChatChunkChoices:
    """Builds each streamed chat chunk's choice: the role first, content, and (with tools) the tool
    calls parsed out of the text, each sent as OpenAI does: a piece with id, type, name and the
    arguments so far, then the arguments' text in pieces as it is generated."""

    def __init__(self, want_logprobs: bool, tok: ChatTokenizer, tools: _ToolParsing | None) -> None:
        self.want_logprobs = want_logprobs
        self.tok = tok
        self.tools = tools
        self.started: set[int] = set()
        self.parsers: dict[int, tc.ToolCallParser] = {}  # by choice, with tools

    def __call__(self, i: int, d: Delta) -> p.ChatChunkChoice | None:
        delta = p.ChatDelta(role=None if i in self.started else "assistant", content=d.text)
        self.started.add(i)
        calls = 0
        if self.tools is not None:
            parser = self.parsers.setdefault(i, self.tools.parser())
            items = parser.feed(d.text) + (parser.finish() if d.finish_reason is not None else [])
            delta.content = "".join(x for x in items if isinstance(x, str)) or None
            delta.tool_calls = _delta_tool_calls([x for x in items if isinstance(x, tc.CallPiece)])
            calls = parser.calls
        lp = p.ChatLogprobs(content=_chat_logprobs(d.logprobs, self.tok)) if self.want_logprobs else None
        reason = _finish_reason(d.finish_reason, calls)
        if self.tools is not None and delta == p.ChatDelta() and lp is None and reason is None:
            return None  # text held back while it may be a call: nothing to send yet
        return p.ChatChunkChoice(index=i, delta=delta, logprobs=lp, finish_reason=reason)


def _delta_tool_calls(pieces: list[tc.CallPiece]) -> list[p.DeltaToolCall] | None:
    """OpenAI's streamed tool-call entries of parsed call pieces: a call's first (named) piece carries
    its new id, type and name."""
    out = [
        p.DeltaToolCall(index=c.index, id=_call_id(), type="function",
                        function=p.DeltaFunctionCall(name=c.name, arguments=c.arguments))
        if c.name is not None
        else p.DeltaToolCall(index=c.index, function=p.DeltaFunctionCall(arguments=c.arguments))
        for c in pieces
    ]  # fmt: skip
    return out or None


def _chat_response(
    rid: str,
    name: str,
    choices: list[list[Delta]],
    want_logprobs: bool,
    tok: ChatTokenizer,
    tools: _ToolParsing | None,
) -> dict[str, Any]:
    out = []
    for i, ds in enumerate(choices):
        text = "".join(d.text for d in ds)
        content, calls = tc.parse_all(tools.family, tools.names, text) if tools else (text, [])
        functions = [p.ResponseFunctionCall(name=c.name, arguments=c.arguments) for c in calls]
        called = [p.ResponseToolCall(id=_call_id(), function=f) for f in functions]
        message = p.ChatResponseMessage(content=content, tool_calls=called or None)
        logprobs = (
            p.ChatLogprobs(content=[e for d in ds for e in _chat_logprobs(d.logprobs, tok)])
            if want_logprobs
            else None
        )
        reason = _finish_reason(_reason(ds), len(calls))
        out.append(p.ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=reason))
    return p.dump(p.ChatCompletionResponse(id=rid, model=name, choices=out, usage=_usage(choices)))


def _failure_error(exc: EngineFailure) -> OpenAIError:
    if exc.client_error:
        return OpenAIError(str(exc), 400, code="rejected_by_engine")
    return OpenAIError(f"the engine failed this request: {exc}", 500, type="server_error")


async def _collect(
    stream: AsyncIterator[tuple[int, Delta]],
    n: int,
    request: Request,
    abort: Callable[[], None],
    build: Callable[[list[list[Delta]]], dict[str, Any]],
) -> Response:
    """Gather all `n` choices; abort the request if the client leaves or the engine fails it."""
    choices: list[list[Delta]] = [[] for _ in range(n)]
    unfinished = n
    watch = DisconnectWatch(request.is_disconnected)
    try:
        while unfinished:
            item = await next_or_disconnect(stream, watch)
            if item is None:
                abort()
                return Response(status_code=499)
            i, d = item
            choices[i].append(d)
            if d.finish_reason is not None:
                unfinished -= 1
    except EngineFailure as exc:
        abort()
        raise _failure_error(exc) from exc
    except BaseException:
        abort()
        raise
    if any(_reason(ds) == "abort" for ds in choices):
        raise OpenAIError("the request was aborted: the server is shutting down", 503, code="aborted")
    return JSONResponse(build(choices))


def _sse_response(
    chunks: AsyncIterator[bytes], abort: Callable[[], None], request: Request
) -> StreamingResponse:
    """Stream SSE chunks, then `data: [DONE]`; abort the request if the client goes away mid-stream."""

    async def body() -> AsyncIterator[bytes]:
        finished = False
        watch = DisconnectWatch(request.is_disconnected)
        try:
            while True:
                try:
                    data = await next_or_disconnect(chunks, watch)
                except StopAsyncIteration:
                    break
                if data is None:
                    return
                yield data
            finished = True
            yield SSE_DONE
        except EngineFailure as exc:
            finished = True
            abort()  # the other choices of the request, if any
            yield sse(_failure_error(exc).body())
            yield SSE_DONE
        finally:
            if not finished:
                abort()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------------- running it


def serve_model(
    model: ServedModel,
    settings: ServerSettings,
    host: str = "0.0.0.0",
    port: int = 8000,
    log_level: str = "info",
    drain_request: DrainRequest | None = None,
) -> None:
    """Run the app until SIGTERM/SIGINT (or `drain_request`) has drained it; returns normally (exit
    status 0)."""
    app = create_app(model, settings)
    config = server_config(app, host, port, log_level, settings.drain_timeout_s)
    server = DrainingServer(config, app.state.drain)
    if drain_request is not None:
        drain_request.attach(server)
    try:
        server.run()
    finally:
        app.state.close()  # when a forced exit skipped the lifespan's shutdown
