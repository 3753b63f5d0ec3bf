"""The OpenAI proxy: Kiln's front for another OpenAI-compatible server (`trtllm-serve`), so the
TensorRT-LLM backend has the same API contract, auth, drain, probes and metric names as ours.

Requests are validated with the same models (same 400s), then forwarded; streams are relayed chunk
by chunk while TTFT, inter-token latency, end-to-end latency and token counts are measured at the
proxy (usage is always requested upstream and only passed on when the client asked). Queue depth,
running requests, KV-cache use and prefix-cache hits come from the upstream's iteration stats:
TensorRT-LLM 1.0's trtllm-serve answers `GET /metrics` with the iteration stats its executor kept
since the last read (a JSON list, oldest first; `LLM.get_stats()`), once they are switched on
(`kiln_engine.backends.tensorrt_llm.extra_llm_api_options`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kiln_engine.interface import EngineStats
from kiln_engine.server import protocol as p
from kiln_engine.server.drain import DrainState
from kiln_engine.server.errors import OpenAIError, install_error_handlers
from kiln_engine.server.metrics import CONTENT_TYPE, ServerMetrics

log = logging.getLogger(__name__)

UPSTREAM_KEEP_ALIVE_S = 4.0  # below trtllm-serve's 5 s (uvicorn's default); see the client below


@dataclass
class UpstreamSettings:
    """Where the upstream listens and what it calls the model."""

    url: str
    model: str | None = None  # the upstream's model name (default: whatever its /v1/models lists first)
    api_key: str | None = None  # sent upstream, if the upstream wants one
    timeout_s: float = 600.0


def stats_from_iteration_json(payload: Any) -> EngineStats | None:
    """EngineStats from TensorRT-LLM's iteration stats (a JSON list, latest last); None if absent.

    Field names are those of TensorRT-LLM 1.0's `IterationStats` JSON: `numQueuedRequests`,
    `numActiveRequests` and `kvCacheStats` (`maxNumBlocks`, `usedNumBlocks`, and `reusedBlocks`, the
    blocks served from the prefix cache since start, of `tokensPerBlock` tokens each).
    """
    if not isinstance(payload, list) or not payload or not isinstance(payload[-1], dict):
        return None
    last = payload[-1]
    kv = last.get("kvCacheStats") or {}
    reused_tokens = int(kv.get("reusedBlocks", 0) or 0) * int(kv.get("tokensPerBlock", 0) or 0)
    return EngineStats(
        waiting=int(last.get("numQueuedRequests", 0) or 0),
        running=int(last.get("numActiveRequests", 0) or 0),
        kv_blocks_total=int(kv.get("maxNumBlocks", 0) or 0),
        kv_blocks_used=int(kv.get("usedNumBlocks", 0) or 0),
        preemptions_total=0,
        prefix_cache_hit_tokens_total=reused_tokens,
    )


def idle_stats(previous: EngineStats) -> EngineStats:
    """The stats after a read that found no new iterations: nothing queued or running, the KV cache
    and the running totals as the last iteration left them (trtllm-serve hands each iteration out once).
    """
    return dataclasses.replace(previous, waiting=0, running=0)


class ProxyInFlight:
    """The proxied requests in flight: what the drain waits for and what a drain timeout cancels."""

    def __init__(self) -> None:
        self._tasks: dict[int, asyncio.Task[Any]] = {}
        self.on_idle: Callable[[], None] | None = None

    @property
    def active(self) -> int:
        return len(self._tasks)

    @contextlib.contextmanager
    def track(self) -> Any:
        task = asyncio.current_task()
        key = id(task)
        if task is not None:
            self._tasks[key] = task
        try:
            yield
        finally:
            self._tasks.pop(key, None)
            if not self._tasks and self.on_idle is not None:
                self.on_idle()

    def abort_all(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()


@dataclass
class _Timing:
    arrival: float
    first: float | None = None
    last: float | None = None


def create_proxy_app(
    served_name: str,
    upstream: UpstreamSettings,
    *,
    api_key: str | None = None,
    drain_timeout_s: float = 30.0,
    max_model_len: int | None = None,
) -> FastAPI:
    """The proxy app for one upstream server."""
    metrics = ServerMetrics(served_name)
    inflight = ProxyInFlight()
    drain = DrainState(inflight, drain_timeout_s)
    headers = {"Authorization": f"Bearer {upstream.api_key}"} if upstream.api_key else {}
    state: dict[str, Any] = {"model": upstream.model}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # trtllm-serve runs uvicorn with its default 5 s keep-alive: reuse a connection for less than
        # that, so no request is sent on one the upstream is closing (drain.KEEP_ALIVE_S says why).
        limits = httpx.Limits(
            max_connections=None, max_keepalive_connections=64, keepalive_expiry=UPSTREAM_KEEP_ALIVE_S
        )
        app.state.http = httpx.AsyncClient(
            base_url=upstream.url, timeout=httpx.Timeout(upstream.timeout_s, connect=10.0), limits=limits,
            headers=headers,
        )  # fmt: skip
        try:
            yield
        finally:
            await app.state.http.aclose()

    app = FastAPI(title="Kiln engine (proxy)", version="1", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.drain = drain
    app.state.inflight = inflight
    install_error_handlers(app)

    async def upstream_model(http: httpx.AsyncClient) -> str:
        if state["model"] is None:
            r = await http.get("/v1/models")
            r.raise_for_status()
            state["model"] = r.json()["data"][0]["id"]
        return str(state["model"])

    async def require_auth(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise OpenAIError("missing or invalid API key (send 'Authorization: Bearer <key>')", 401,
                              code="invalid_api_key")  # fmt: skip

    def admit(req: p.CompletionRequest | p.ChatCompletionRequest) -> None:
        if drain.draining:
            raise OpenAIError("server is draining and accepts no new requests", 503, code="draining")
        if req.model != served_name:
            raise OpenAIError(f"model '{req.model}' does not exist; this server serves '{served_name}'",
                              param="model", code="model_not_found")  # fmt: skip

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        try:
            r = await request.app.state.http.get("/health", timeout=5.0)
        except httpx.HTTPError as exc:
            raise OpenAIError(f"upstream is not reachable: {exc}", 503, code="upstream_down") from exc
        if r.status_code != 200:
            raise OpenAIError(f"upstream /health answered {r.status_code}", 503, code="upstream_unhealthy")
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        if drain.draining:
            raise OpenAIError("server is draining", 503, code="draining")
        await health(request)
        return JSONResponse({"status": "ready", "model": served_name})

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        stats = None
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = await request.app.state.http.get("/metrics", timeout=2.0)
            if r.status_code == 200 and r.headers.get("content-type", "").startswith("application/json"):
                payload = r.json()
                stats = stats_from_iteration_json(payload)
                if stats is None and payload == [] and state.get("stats") is not None:
                    stats = idle_stats(state["stats"])
        if stats is None:
            stats = EngineStats(running=inflight.active)
        else:
            state["stats"] = stats
        metrics.observe_stats(stats)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    api = APIRouter(prefix="/v1", dependencies=[Depends(require_auth)])

    @api.get("/models", response_model=p.ModelList)
    async def list_models() -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=served_name, max_model_len=max_model_len)])

    @api.post("/completions", response_model=p.CompletionResponse)
    async def completions(req: p.CompletionRequest, request: Request) -> Response:
        return await forward("/v1/completions", req, request)

    @api.post("/chat/completions", response_model=p.ChatCompletionResponse)
    async def chat_completions(req: p.ChatCompletionRequest, request: Request) -> Response:
        return await forward("/v1/chat/completions", req, request)

    async def forward(
        path: str, req: p.CompletionRequest | p.ChatCompletionRequest, request: Request
    ) -> Response:
        try:
            admit(req)
        except OpenAIError:
            metrics.request_finished("error")
            raise
        http: httpx.AsyncClient = request.app.state.http
        body = req.model_dump(exclude_unset=True)
        body["model"] = await upstream_model(http)
        timing = _Timing(time.monotonic())
        if not req.stream:
            with inflight.track():
                try:
                    r = await http.post(path, json=body)
                except asyncio.CancelledError:
                    metrics.request_finished("aborted")
                    raise
                except httpx.HTTPError as exc:
                    metrics.request_finished("error")
                    raise OpenAIError(f"upstream failed: {exc}", 502, type="server_error") from exc
            return _finish_unary(r, timing, served_name, metrics)
        want_usage = bool(req.stream_options and req.stream_options.include_usage)
        body["stream_options"] = {"include_usage": True}
        relay = _relay(http, path, body, timing, want_usage, served_name, metrics, inflight, request)
        return StreamingResponse(relay, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    app.include_router(api)
    return app


def _finish_unary(r: httpx.Response, timing: _Timing, served_name: str, metrics: ServerMetrics) -> Response:
    try:
        payload = r.json()
    except ValueError:
        payload = None
    if r.status_code >= 400 or not isinstance(payload, dict):
        metrics.request_finished("error")
        if isinstance(payload, dict) and "error" in payload:
            return JSONResponse(payload, status_code=r.status_code)
        raise OpenAIError(f"upstream answered {r.status_code}", 502 if r.status_code >= 500 else 400)
    now = time.monotonic()
    metrics.e2e.observe(now - timing.arrival)
    _count_usage(payload.get("usage"), metrics)
    payload["model"] = served_name
    metrics.request_finished("ok")
    return JSONResponse(payload)


def _count_usage(usage: Any, metrics: ServerMetrics) -> None:
    if isinstance(usage, dict):
        metrics.prompt_tokens.inc(int(usage.get("prompt_tokens") or 0))
        metrics.generation_tokens.inc(int(usage.get("completion_tokens") or 0))


def _has_content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


async def _relay(
    http: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    timing: _Timing,
    want_usage: bool,
    served_name: str,
    metrics: ServerMetrics,
    inflight: ProxyInFlight,
    request: Request,
) -> AsyncIterator[bytes]:
    status = "aborted"
    with inflight.track():
        try:
            async with http.stream("POST", path, json=body) as r:
                if r.status_code >= 400:
                    text = (await r.aread()).decode(errors="replace")
                    status = "error"
                    try:
                        err = json.loads(text)
                    except ValueError:
                        err = OpenAIError(f"upstream answered {r.status_code}: {text[:200]}", 502).body()
                    yield f"data: {json.dumps(err)}\n\n".encode()
                    yield b"data: [DONE]\n\n"
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        status = "ok"
                        metrics.e2e.observe(time.monotonic() - timing.arrival)
                        yield b"data: [DONE]\n\n"
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        status = "error"
                    _observe_chunk(chunk, timing, metrics)
                    if chunk.get("usage") and not chunk.get("choices"):
                        _count_usage(chunk["usage"], metrics)
                        if not want_usage:
                            continue
                    elif not want_usage:
                        chunk.pop("usage", None)
                    chunk["model"] = served_name
                    yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
                    if await request.is_disconnected():
                        return
        except httpx.HTTPError as exc:
            status = "error"
            yield f"data: {json.dumps(OpenAIError(f'upstream failed: {exc}', 502).body())}\n\n".encode()
        finally:
            metrics.request_finished(status)


def _observe_chunk(chunk: dict[str, Any], timing: _Timing, metrics: ServerMetrics) -> None:
    if not _has_content(chunk):
        return
    now = time.monotonic()
    if timing.first is None:
        timing.first = now
        metrics.ttft.observe(now - timing.arrival)
    elif timing.last is not None:
        metrics.inter_token.observe(now - timing.last)
    timing.last = now


def serve_proxy(
    served_name: str,
    upstream: UpstreamSettings,
    *,
    host: str,
    port: int,
    api_key: str | None,
    drain_timeout_s: float,
    max_model_len: int | None = None,
    log_level: str = "info",
) -> None:
    """Run the proxy under uvicorn with Kiln's drain (SIGTERM: 503 new work, finish, exit 0)."""
    from kiln_engine.server.drain import DrainingServer, server_config

    app = create_proxy_app(
        served_name, upstream, api_key=api_key, drain_timeout_s=drain_timeout_s, max_model_len=max_model_len
    )
    DrainingServer(server_config(app, host, port, log_level, drain_timeout_s), app.state.drain).run()
