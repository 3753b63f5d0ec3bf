"""A drain asked for from another thread (rank 0, when a follower pod of its group leaves) next to the
pod's own SIGTERM: whichever comes first drains, the other neither forces the exit nor, once the
server has stopped, does anything (CI, 2026-12-07: a leave answered after the drain had finished sent
rank 0 a SIGTERM with uvicorn's handler gone, exit status -15). A second signal still forces."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import uvicorn

from kiln_engine.server.drain import DrainingServer, DrainRequest, DrainState


class Work:
    """In-flight requests as a count the test sets (what the runner or the proxy would count)."""

    def __init__(self) -> None:
        self.on_idle: Callable[[], None] | None = None
        self.requests = 0
        self.aborted = False

    @property
    def active(self) -> int:
        return self.requests

    def abort_all(self) -> None:
        self.aborted = True
        self.requests = 0

    def finish(self) -> None:
        self.requests = 0
        if self.on_idle is not None:
            self.on_idle()


async def app(scope: dict, receive: Callable, send: Callable) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, work: Work) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")  # type: ignore[arg-type]
        self.drain = DrainState(work, timeout_s=30)
        self.server = DrainingServer(config, self.drain)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def wait_started(self) -> None:
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive()
            time.sleep(0.02)

    def wait_draining(self) -> None:
        deadline = time.monotonic() + 10
        while not self.drain.draining:
            assert time.monotonic() < deadline
            time.sleep(0.02)

    def stopped(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


@pytest.fixture
def served() -> Iterator[tuple[Served, Work]]:
    work = Work()
    s = Served(work)
    yield s, work
    s.server.should_exit = True
    s.thread.join(10)


def test_own_sigterm_during_a_requested_drain_does_not_force_the_exit(served: tuple[Served, Work]) -> None:
    s, work = served
    work.requests = 1
    s.start()
    s.wait_started()
    s.server.request_drain()  # a follower pod left
    s.wait_draining()
    s.server.handle_exit(signal.SIGTERM, None)  # the pod's own SIGTERM: the whole group is deleted
    assert not s.stopped(1.0), "the server stopped with a request in flight"
    work.finish()
    assert s.stopped(10)
    assert not s.server.force_exit and not work.aborted


def test_a_request_after_the_server_stopped_does_nothing(served: tuple[Served, Work]) -> None:
    s, _ = served
    s.start()
    s.wait_started()
    s.server.handle_exit(signal.SIGTERM, None)
    assert s.stopped(10)
    s.server.request_drain()  # the leave noticed late: no error, no signal
    assert not s.server.force_exit


def test_a_request_before_the_server_runs_drains_it_once_it_does(served: tuple[Served, Work]) -> None:
    s, _ = served
    asked = DrainRequest()
    asked.ask()  # the leave came while the model was still loading
    asked.attach(s.server)
    s.start()
    assert s.stopped(20)
    assert s.drain.draining and not s.server.force_exit


def test_a_second_signal_forces_the_exit(served: tuple[Served, Work]) -> None:
    s, work = served
    work.requests = 1
    s.start()
    s.wait_started()
    s.server.handle_exit(signal.SIGTERM, None)
    s.wait_draining()
    s.server.handle_exit(signal.SIGTERM, None)
    assert s.stopped(10)
    assert s.server.force_exit
