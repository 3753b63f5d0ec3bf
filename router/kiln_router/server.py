"""The router's HTTP server (aiohttp): OpenAI API in and out; each request goes to the replica `pick`
chooses and is streamed back as its bytes arrive; a replica that fails before its first byte (no
connection, a 503 from a draining engine, a connection lost before any body) is replaced by the next
one of the decision, never once bytes have reached the client.

aiohttp serves and proxies here because it costs several times less CPU per streamed request than
uvicorn + starlette + httpx (bench/router_overhead.py measures the router it builds).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from kiln_router.metrics import RouterMetrics
from kiln_router.pick import Decision, Policy, pick
from kiln_router.prompt import Prompt, PromptError, chat_prompt, completion_prompt
from kiln_router.replicas import Replicas

log = logging.getLogger(__name__)

# Headers that describe one hop, not the request: the proxy sets its own.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade", "host", "content-length"}
)  # fmt: skip
RETRY_AFTER_S = "1"
SEEN_PREFIXES = 65536  # (replica, prefix key) pairs remembered for the prefix-hit estimate


@dataclass(frozen=True)
class Settings:
    policy: Policy = field(default_factory=Policy)
    max_attempts: int = 3  # replicas one request may try before the client gets a 503
    connect_timeout_s: float = 5.0
    # Far below the engines' 75 s keep-alive (kiln_engine.server.drain.KEEP_ALIVE_S), so the router
    # never reuses a connection an engine is closing; short, so one to a vanished pod is soon dropped.
    keepalive_s: float = 4.0
    # With no ready replica (a rollout's gap, replicas still starting) a request waits this long for
    # one, at most `max_held` at a time; then, or beyond that, it gets a 503 with Retry-After.
    hold_timeout_s: float = 30.0
    max_held: int = 256


class Router:
    """One router process: the replica set, the policy and the metrics behind the HTTP routes."""

    def __init__(self, replicas: Replicas, settings: Settings, metrics: RouterMetrics | None = None) -> None:
        self.replicas = replicas
        self.settings = settings
        self.metrics = metrics or RouterMetrics()
        self.draining = False
        self.held = 0
        self._seen: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.prometheus)
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._drain)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=self.settings.keepalive_s)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout_s)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        await self.replicas.start()

    async def _drain(self, _: web.Application) -> None:
        self.draining = True  # /ready fails; requests in flight finish (run_app's shutdown timeout)

    async def _stop(self, _: web.Application) -> None:
        await self.replicas.stop()
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------------------------- routes

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def ready(self, _: web.Request) -> web.Response:
        """Ready unless draining: with no replica ready it still takes requests and holds them (a
        router that left the Service then would leave its clients nothing to connect to), unless
        holding is off."""
        if self.draining:
            return web.Response(status=503, text="draining")
        if not len(self.replicas) and not self._holds():
            return web.Response(status=503, text="no ready replica")
        return web.Response(text="ok")

    def _holds(self) -> bool:
        return self.settings.hold_timeout_s > 0 and self.settings.max_held > 0

    async def prometheus(self, _: web.Request) -> web.Response:
        healthy, unhealthy = self.replicas.counts()
        self.metrics.replicas.labels("ready").set(healthy)
        self.metrics.replicas.labels("unhealthy").set(unhealthy)
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._route(request, completion_prompt)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._route(request, chat_prompt)

    async def models(self, request: web.Request) -> web.StreamResponse:
        """Any replica's model list (they serve the same model): the least loaded one answers."""
        refused = await self._await_replica()
        if refused is not None:
            return refused
        return await self._forward(request, pick("", self.replicas.snapshot(), self.settings.policy), None)

    # ------------------------------------------------------------------------------- proxying

    async def _route(
        self, request: web.Request, render: Callable[[Mapping[str, object]], Prompt]
    ) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise PromptError("the request body must be a JSON object")
            prompt = render(body)
        except (ValueError, PromptError) as e:  # JSONDecodeError is a ValueError
            return self._error(400, f"bad request body: {e}", "invalid_request_error")
        refused = await self._await_replica()
        if refused is not None:
            return refused
        start = time.perf_counter()
        decision = pick(
            prompt.text, self.replicas.snapshot(), self.settings.policy, prompt.conversation_chars
        )
        self.metrics.decision_seconds.observe(time.perf_counter() - start)
        self.metrics.decisions.labels(decision.reason).inc()
        self._estimate_prefix_hit(decision, len(prompt.text))
        return await self._forward(request, decision, raw)

    async def _await_replica(self) -> web.Response | None:
        """None once a replica is ready; else the 503 to answer. With none ready a request waits for
        one (`Settings.hold_timeout_s`, at most `max_held` at once), so replicas that are starting
        take it over instead of the client getting an error."""
        if len(self.replicas):
            return None
        if self.draining or not self._holds() or self.held >= self.settings.max_held:
            self.metrics.holds.labels("refused").inc()
            return self._error(503, "no ready replica", "service_unavailable")
        self.held += 1
        self.metrics.held.set(self.held)
        try:
            ready = await self.replicas.wait_available(self.settings.hold_timeout_s)
        finally:
            self.held -= 1
            self.metrics.held.set(self.held)
        if ready and not self.draining:
            self.metrics.holds.labels("released").inc()
            return None
        self.metrics.holds.labels("timed_out").inc()
        waited = f"{self.settings.hold_timeout_s:g}"
        return self._error(503, f"no ready replica within {waited} s", "service_unavailable")

    def _estimate_prefix_hit(self, decision: Decision, prompt_chars: int) -> None:
        """Count the affinity prefix as a hit when this router sent the same prefix there before."""
        self.metrics.prompt_chars.inc(prompt_chars)
        if not decision.prefix_chars:
            return
        key = (decision.order[0], decision.key)
        if key in self._seen:
            self._seen.move_to_end(key)
            self.metrics.prefix_hit_chars.inc(decision.prefix_chars)
        else:
            self._seen[key] = None
            if len(self._seen) > SEEN_PREFIXES:
                self._seen.popitem(last=False)

    async def _forward(
        self, request: web.Request, decision: Decision, body: bytes | None
    ) -> web.StreamResponse:
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
        failures = []
        for attempt, url in enumerate(decision.order[: self.settings.max_attempts]):
            outcome = await self._try(request, url, headers, body)
            if isinstance(outcome, web.StreamResponse):
                return outcome
            failures.append(f"{url}: {outcome}")
            if attempt + 1 < min(len(decision.order), self.settings.max_attempts):
                self.metrics.retries.labels(outcome).inc()
        return self._error(503, "no replica could take the request (" + "; ".join(failures) + ")",
                           "service_unavailable")  # fmt: skip

    async def _try(
        self, request: web.Request, url: str, headers: CIMultiDict[str], body: bytes | None
    ) -> web.StreamResponse | str:
        """Proxy to one replica: the response once its first byte went out, else why it failed (the
        retry cause: `connect`, `unavailable` or `first_byte`)."""
        assert self._session is not None
        self.replicas.started(url)
        self.metrics.in_flight.inc()
        try:
            try:
                upstream = await self._session.request(request.method, url + request.path_qs, data=body,
                                                       headers=headers)  # fmt: skip
            except aiohttp.ClientConnectorError:
                self.replicas.failed(url)  # no connection at all: it is gone or not listening
                return self._upstream_failed("connect")
            except (aiohttp.ClientError, TimeoutError):
                return self._upstream_failed("connect")
            try:
                if upstream.status == 503:
                    return self._upstream_failed("unavailable")  # draining or not ready
                try:
                    first = await upstream.content.readany()
                except (aiohttp.ClientError, TimeoutError):
                    return self._upstream_failed("first_byte")
                return await self._stream(request, upstream, first)
            finally:
                upstream.release()  # back to the pool when read to the end, else closed
        finally:
            self.replicas.finished(url)
            self.metrics.in_flight.dec()

    async def _stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse, first: bytes
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status)
        for name, value in upstream.headers.items():
            if name.lower() not in HOP_BY_HOP:
                response.headers.add(name, value)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        self.metrics.requests.labels(str(upstream.status)).inc()
        await response.prepare(request)
        chunk = first
        while chunk:
            try:
                await response.write(chunk)
            except ConnectionResetError:
                upstream.close()  # the client left: the engine sees its connection close and aborts
                return response
            try:
                chunk = await upstream.content.readany()
            except (aiohttp.ClientError, TimeoutError) as e:
                # bytes already went out: no retry; cut the client's stream so it sees it incomplete
                log.warning("replica %s failed mid-stream: %s", upstream.url.origin(), e)
                self.metrics.upstream_errors.labels("streaming").inc()
                if request.transport is not None:
                    request.transport.close()
                return response
        await response.write_eof()
        return response

    def _upstream_failed(self, cause: str) -> str:
        self.metrics.upstream_errors.labels("before_first_byte").inc()
        return cause

    def _error(self, status: int, message: str, kind: str) -> web.Response:
        self.metrics.requests.labels(str(status)).inc()
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
        return web.json_response(body, status=status, headers=headers)
