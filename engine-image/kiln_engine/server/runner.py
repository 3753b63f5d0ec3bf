"""The engine thread: the one place that calls the (single-threaded) engine, and hands each request's
outputs to the asyncio side through a per-request queue. It also times requests for the metrics.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kiln_engine.interface import Engine, EngineStats, RequestOutput, SamplingParams
from kiln_engine.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


class EngineFailure(RuntimeError):
    """The engine raised while this request was in it; the request is lost, the server is not.

    `client_error` marks a request the engine rejected as invalid (a ValueError from add_request).
    """

    def __init__(self, message: str, client_error: bool = False) -> None:
        super().__init__(message)
        self.client_error = client_error


@dataclass
class RequestHandle:
    """The asyncio side of one request: outputs (or an EngineFailure) arrive on `queue`."""

    request_id: str
    prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | EngineFailure] = field(default_factory=asyncio.Queue)


@dataclass
class _Tracked:
    handle: RequestHandle
    arrival: float
    first_token: float | None = None
    last_token: float | None = None


@dataclass
class _Add:
    handle: RequestHandle
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float


@dataclass
class _Abort:
    request_id: str
    status: str  # metrics status to record: "aborted" (client gone, drain timeout) or "ok" (stop string)


@dataclass
class _Call:
    fn: Callable[[], Any]
    result: concurrent.futures.Future[Any]


class EngineRunner:
    """Drives `engine.step()` on a background thread while any request is unfinished."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, idle_poll_s: float = 0.5) -> None:
        self.engine = engine
        self.metrics = metrics
        self._idle_poll_s = idle_poll_s
        self._commands: queue.SimpleQueue[_Add | _Abort | _Call] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._tracked: dict[str, _Tracked] = {}
        self._active = 0  # submitted and not yet finished, as seen from the submitting side
        self._active_lock = threading.Lock()
        self._stats = EngineStats()
        self._thread = threading.Thread(target=self._run, name="kiln-engine-step", daemon=True)
        self.on_idle: Callable[[], None] | None = None

    # ------------------------------------------------------------------ caller side (any thread)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def active(self) -> int:
        """Requests submitted and not yet finished."""
        with self._active_lock:
            return self._active

    def stats(self) -> EngineStats:
        """The engine's stats as of the last step."""
        return self._stats

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> RequestHandle:
        """Queue a request for the engine; call from the event loop that will read the handle."""
        handle = RequestHandle(request_id, len(prompt_token_ids), asyncio.get_running_loop())
        with self._active_lock:
            self._active += 1
        self._commands.put(_Add(handle, list(prompt_token_ids), params, time.monotonic()))
        self._wake.set()
        return handle

    def abort(self, request_id: str, status: str = "aborted") -> None:
        """Stop a request and free its KV blocks; its handle gets a final `abort` output."""
        self._commands.put(_Abort(request_id, status))
        self._wake.set()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run `fn` on the engine thread between two steps (the engine is single-threaded), in order
        with the requests submitted before it; the future holds its result or exception."""
        result: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._commands.put(_Call(fn, result))
        self._wake.set()
        return result

    def abort_all(self) -> None:
        for request_id in list(self._tracked):
            self.abort(request_id)

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        while not self._stop.is_set():
            self._apply_commands()
            if not self._tracked and not self.engine.has_unfinished():
                self._refresh_stats()
                self._wake.wait(self._idle_poll_s)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # the server outlives a failing step; its requests do not
                log.exception("engine step failed; failing %d request(s)", len(self._tracked))
                self._fail_all(exc)
                continue
            now = time.monotonic()
            for out in outputs:
                self._deliver(out, now)
            self._refresh_stats()
        self._fail_all(RuntimeError("server shutting down"))

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Call):
                try:
                    cmd.result.set_result(cmd.fn())
                except Exception as exc:
                    cmd.result.set_exception(exc)
                continue
            if isinstance(cmd, _Add):
                rid = cmd.handle.request_id
                try:
                    self.engine.add_request(rid, cmd.prompt_token_ids, cmd.params)
                except Exception as exc:
                    log.exception("engine rejected request %s", rid)
                    failure = EngineFailure(
                        f"engine rejected the request: {exc}", isinstance(exc, ValueError)
                    )
                    self._send(cmd.handle, failure)
                    self._finish(cmd.handle, "error")
                    continue
                self._tracked[rid] = _Tracked(cmd.handle, cmd.arrival)
            else:
                tracked = self._tracked.pop(cmd.request_id, None)
                if tracked is None:
                    continue
                with contextlib.suppress(Exception):
                    self.engine.abort_request(cmd.request_id)
                self._send(
                    tracked.handle,
                    RequestOutput(cmd.request_id, [], finished=True, finish_reason="abort",
                                  prompt_tokens=tracked.handle.prompt_tokens),
                )  # fmt: skip
                if cmd.status == "ok":
                    self._observe_e2e(tracked, time.monotonic())
                self._finish(tracked.handle, cmd.status)

    def _deliver(self, out: RequestOutput, now: float) -> None:
        tracked = self._tracked.get(out.request_id)
        if tracked is None:
            return  # aborted while the step ran
        n = len(out.new_token_ids)
        if n:
            if tracked.first_token is None:
                tracked.first_token = now
                self.metrics.ttft.observe(now - tracked.arrival)
                self.metrics.prompt_tokens.inc(out.prompt_tokens or tracked.handle.prompt_tokens)
                extra = n - 1
            else:
                extra = n
            if extra and tracked.last_token is not None:
                gap = (now - tracked.last_token) / extra
                for _ in range(extra):
                    self.metrics.inter_token.observe(gap)
            tracked.last_token = now
            self.metrics.generation_tokens.inc(n)
        self._send(tracked.handle, out)
        if out.finished:
            del self._tracked[out.request_id]
            aborted = out.finish_reason == "abort"
            if not aborted:
                self._observe_e2e(tracked, now)
            self._finish(tracked.handle, "aborted" if aborted else "ok")

    def _observe_e2e(self, tracked: _Tracked, now: float) -> None:
        self.metrics.e2e.observe(now - tracked.arrival)

    def _fail_all(self, exc: BaseException) -> None:
        for rid, tracked in list(self._tracked.items()):
            with contextlib.suppress(Exception):
                self.engine.abort_request(rid)
            self._send(tracked.handle, EngineFailure(str(exc) or type(exc).__name__))
            self._finish(tracked.handle, "error")
        self._tracked.clear()

    def _finish(self, handle: RequestHandle, status: str) -> None:
        self.metrics.request_finished(status)
        with self._active_lock:
            self._active -= 1
            idle = self._active == 0
        if idle and self.on_idle is not None:
            self.on_idle()

    def _refresh_stats(self) -> None:
        try:
            stats = self.engine.stats()
        except Exception:
            log.exception("engine stats failed")
            return
        self._stats = stats
        self.metrics.observe_stats(stats)

    @staticmethod
    def _send(handle: RequestHandle, item: RequestOutput | EngineFailure) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            handle.loop.call_soon_threadsafe(handle.queue.put_nowait, item)
