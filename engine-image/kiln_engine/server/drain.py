"""Graceful drain: on SIGTERM stop admitting (new requests and /ready get 503), let in-flight requests
finish within the drain timeout, abort what is left, then let uvicorn exit with status 0.

uvicorn's own SIGTERM handling closes the listening socket at once and re-raises the signal after
shutdown (exit status -15); we replace it so the pod keeps answering 503 while it drains.
`server_config` is the one uvicorn configuration both servers (engine and proxy) run under.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Protocol

import uvicorn


class InFlight(Protocol):
    """What a drain needs from whatever carries the requests (the engine runner, or the proxy)."""

    on_idle: Callable[[], None] | None

    @property
    def active(self) -> int: ...

    def abort_all(self) -> None: ...


log = logging.getLogger(__name__)

# How long an idle client connection stays open. A proxy in front (Kiln's router, an ingress, a cloud
# load balancer) reuses idle upstream connections; if the server closes one just as the proxy sends on
# it, that request fails with a reset the client sees (CI, 2026-12-07: 1 of 942 burst requests, a
# ReadError, with both sides at 5 s). So the server waits longer than those proxies keep connections:
# nginx's upstream keepalive_timeout and AWS ALB's idle timeout are 60 s, Kiln's router 4 s.
KEEP_ALIVE_S = 75


def server_config(
    app: object, host: str, port: int, log_level: str, drain_timeout_s: float
) -> uvicorn.Config:
    """uvicorn's configuration for a Kiln server: the keep-alive above, shutdown bounded by the drain."""
    return uvicorn.Config(
        app,  # type: ignore[arg-type]  # any ASGI app
        host=host,
        port=port,
        log_level=log_level,
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=max(1, int(drain_timeout_s)),
    )


class DrainState:
    """Whether the server admits new work, and the wait for in-flight work to finish."""

    def __init__(self, runner: InFlight, timeout_s: float) -> None:
        self.runner = runner
        self.timeout_s = timeout_s
        self.draining = False
        self._idle = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remember the server's loop so the engine thread can wake the drain when it goes idle."""
        self._loop = loop
        self.runner.on_idle = self._notify_idle

    def _notify_idle(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._idle.set)

    async def drain(self) -> bool:
        """Stop admission and wait for in-flight requests; True if all finished in time."""
        self.draining = True
        deadline = time.monotonic() + self.timeout_s
        log.info("draining: %d request(s) in flight, timeout %.1fs", self.runner.active, self.timeout_s)
        while self.runner.active > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("drain timeout: aborting %d request(s)", self.runner.active)
                self.runner.abort_all()
                await asyncio.sleep(0.2)  # let the aborts reach their streams
                return False
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=min(left, 0.5))
        log.info("drained")
        return True


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT drains before exiting; a second signal forces exit.
    `request_drain` starts the same drain from any thread and never forces anything (rank 0 calls it
    when a follower pod of its group leaves, and may get its own SIGTERM at about the same time)."""

    def __init__(self, config: uvicorn.Config, drain: DrainState) -> None:
        super().__init__(config)
        self.drain_state = drain
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._drain_asked = False  # asked before the loop ran: drain as soon as it does
        self._signals = 0

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.drain_state.bind(loop)
        with self._lock:
            self._loop = loop
            if self._drain_asked:
                loop.call_soon(self._start_drain)
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            self.force_exit = True
            self.should_exit = True
            return
        log.info("received %s: draining", signal.Signals(sig).name)
        self.request_drain()

    def request_drain(self) -> None:
        """Drain, then exit; a no-op while draining already or once the server stopped."""
        with self._lock:
            if self._loop is None:
                self._drain_asked = True
                return
            loop = self._loop
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server has stopped
            loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await self.drain_state.drain()
        self.should_exit = True


class DrainRequest:
    """A drain asked for before the server exists (rank 0's group watch starts before the model loads):
    `ask` from any thread, any number of times; `attach` hands it to the server once there is one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._asked = False
        self._server: DrainingServer | None = None

    def ask(self) -> None:
        with self._lock:
            self._asked = True
            server = self._server
        if server is not None:
            server.request_drain()

    def attach(self, server: DrainingServer) -> None:
        with self._lock:
            self._server = server
            asked = self._asked
        if asked:
            server.request_drain()
