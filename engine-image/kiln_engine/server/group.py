"""A replica's ranks across pods: which ranks each pod runs, the rendezvous, the followers' /health,
the liveness watch that takes every rank down when one dies (so the group restarts together), and
a follower pod's leaving: told to stop (SIGTERM, its pod is being deleted), it asks rank 0 to drain,
so the requests in flight finish while it still runs and the group stops together, exit status 0.

The contract with the pods that render a replica: every pod gets KILN_GROUP_SIZE (pods in the
replica, N), KILN_GROUP_INDEX (this pod; 0 is the leader, whose rank 0 serves the OpenAI API),
KILN_LEADER_ADDRESS (pod 0's host name) and KILN_RENDEZVOUS_PORT. The world is tp * pp ranks;
pod i runs ranks i*world/N .. (i+1)*world/N - 1: its first process is the lowest and starts the
others. torch.distributed meets at the leader address (rank 0 hosts the rendezvous store there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

GROUP_SIZE_ENV = "KILN_GROUP_SIZE"
GROUP_INDEX_ENV = "KILN_GROUP_INDEX"
LEADER_ADDRESS_ENV = "KILN_LEADER_ADDRESS"
RENDEZVOUS_PORT_ENV = "KILN_RENDEZVOUS_PORT"
DEFAULT_RENDEZVOUS_PORT = 29500
HEARTBEAT_TIMEOUT_ENV = "KILN_GROUP_HEARTBEAT_TIMEOUT"  # seconds without a beat before a rank counts as dead
DEFAULT_HEARTBEAT_TIMEOUT_S = 20.0
HEARTBEAT_INTERVAL_S = 1.0
_ALIVE_KEY = "kiln/alive/{rank}"
_STOPPING_KEY = "kiln/stopping"
_LEAVING_KEY = "kiln/leaving"  # a follower pod is going away: rank 0 drains and stops the group


@dataclass(frozen=True)
class GroupLayout:
    """The ranks of one replica and the share of them one pod runs."""

    world: int
    group_size: int = 1
    group_index: int = 0

    @property
    def ranks_per_pod(self) -> int:
        return self.world // self.group_size

    @property
    def local_ranks(self) -> range:
        first = self.group_index * self.ranks_per_pod
        return range(first, first + self.ranks_per_pod)

    @property
    def is_leader(self) -> bool:
        return self.group_index == 0


def group_layout(world: int, group_size: int, group_index: int) -> GroupLayout:
    """Validate a pod's place in its replica: N pods share tp * pp ranks evenly."""
    if group_size < 1:
        raise ValueError(f"group size must be at least 1, got {group_size}")
    if not 0 <= group_index < group_size:
        raise ValueError(f"group index {group_index} is outside a group of {group_size} pods")
    if world % group_size:
        raise ValueError(f"{world} ranks (tp * pp) do not split evenly over {group_size} pods")
    return GroupLayout(world, group_size, group_index)


def rank_coordinates(rank: int, tp: int) -> tuple[int, int]:
    """(pipeline stage, tensor-parallel rank) of a global rank."""
    return rank // tp, rank % tp


def spawn_local_ranks(
    layout: GroupLayout, master_addr: str, master_port: int, argv: list[str], follower_env: str
) -> list[subprocess.Popen[bytes]]:
    """Set this process up as the pod's first rank and start the pod's other ranks as copies of it."""
    first = layout.local_ranks.start
    os.environ.update(
        MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), WORLD_SIZE=str(layout.world), RANK=str(first)
    )
    os.environ.setdefault("LOCAL_RANK", "0")
    procs = []
    for rank in layout.local_ranks[1:]:
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank - first), follower_env: "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "kiln_engine.cli", *argv], env=env))
    return procs


class HealthServer:
    """GET /health on a follower pod: 503 until its ranks joined the group and loaded, then 200."""

    def __init__(self, host: str, port: int, ranks: range) -> None:
        self.ready = threading.Event()
        ready, body = self.ready, {"ranks": list(ranks)}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/health":
                    self._answer(404, {"error": "a follower pod serves only /health"})
                elif ready.is_set():
                    self._answer(200, {"status": "ok", **body})
                else:
                    self._answer(503, {"status": "joining", **body})

            def _answer(self, code: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, name="kiln-follower-health", daemon=True).start()


def heartbeat_timeout() -> float:
    raw = os.environ.get(HEARTBEAT_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_HEARTBEAT_TIMEOUT_S
    value = float(raw)
    if value <= HEARTBEAT_INTERVAL_S:
        raise ValueError(f"{HEARTBEAT_TIMEOUT_ENV} must exceed {HEARTBEAT_INTERVAL_S} s, got {raw}")
    return value


def stalled_ranks(last_change: dict[int, float], now: float, timeout_s: float) -> list[int]:
    """Ranks whose heartbeat counter has not moved for longer than `timeout_s`."""
    return sorted(r for r, t in last_change.items() if now - t > timeout_s)


class Liveness:
    """Every rank bumps its counter in the rendezvous store each second and watches everyone else's.

    A counter that stops moving (a rank died, or its pod did) or a store that stops answering
    (rank 0 died) ends this process with exit status 1, after killing its local ranks, unless the
    group is stopping on purpose (rank 0 drained and told everyone to stop). `on_leave` (rank 0's)
    runs once when a follower pod asks the group to stop (`leave`).
    """

    def __init__(
        self,
        rank: int,
        world: int,
        children: list[subprocess.Popen[bytes]],
        timeout_s: float | None = None,
        exit: Callable[[int], None] = os._exit,
        on_leave: Callable[[], None] | None = None,
    ) -> None:
        import torch.distributed as dist

        self.rank, self.world, self.children = rank, world, children
        self.timeout_s = heartbeat_timeout() if timeout_s is None else timeout_s
        self._exit = exit
        self.on_leave = on_leave
        self.stopping = threading.Event()
        self.store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=max(5.0, self.timeout_s / 2)),
            wait_for_workers=False,
        )
        self._watcher = threading.Thread(target=self._run, name="kiln-group-liveness", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        """The group is shutting down on purpose: stop watching (and tell the others, best effort).
        Returns once the watcher is out of its store calls, so none is in flight when the process
        exits and rank 0's store goes away under it (a C++ exception in a thread aborts the process)."""
        self.stopping.set()
        with contextlib.suppress(Exception):  # rank 0 may be gone already: nobody is watching then
            self.store.set(_STOPPING_KEY, "1")
        if threading.current_thread() is not self._watcher:
            self._watcher.join(timeout=2 * HEARTBEAT_INTERVAL_S + 5.0)

    def leave(self) -> None:
        """This pod is going away: ask rank 0 to drain and stop the group (it keeps stepping till then)."""
        with contextlib.suppress(Exception):  # rank 0 is gone: the group is going down anyway
            self.store.set(_LEAVING_KEY, str(self.rank))

    def fail(self, why: str) -> None:
        """The group is broken (a rank fell out of step): take this pod's ranks down, exit 1."""
        self._fail(why)

    def _run(self) -> None:
        keys = {r: _ALIVE_KEY.format(rank=r) for r in range(self.world) if r != self.rank}
        seen: dict[int, int] = {}
        last_change = {r: time.monotonic() for r in keys}
        left = False
        while not self.stopping.is_set():
            try:
                self.store.add(_ALIVE_KEY.format(rank=self.rank), 1)
                if self.store.check([_STOPPING_KEY]):
                    self.stopping.set()
                    return
                if self.on_leave is not None and not left and self.store.check([_LEAVING_KEY]):
                    left = True
                    log.info("a follower pod is leaving the group: draining")
                    threading.Thread(target=self.on_leave, name="kiln-group-leave", daemon=True).start()
                for r, key in keys.items():
                    value = self.store.add(key, 0)
                    if value != seen.get(r):
                        seen[r], last_change[r] = value, time.monotonic()
            except Exception as exc:  # any store failure: rank 0 is unreachable
                if self.stopping.wait(3.0):  # a clean exit races the store going away
                    return
                self._fail(f"the rendezvous store at rank 0 stopped answering ({exc})")
                return
            dead = stalled_ranks(last_change, time.monotonic(), self.timeout_s)
            if dead:
                self._fail(f"rank(s) {dead} stopped answering for {self.timeout_s:.0f} s")
                return
            self.stopping.wait(HEARTBEAT_INTERVAL_S)

    def _fail(self, why: str) -> None:
        print(f"kiln-engine: rank {self.rank}: {why}; exiting so the whole group restarts", file=sys.stderr)
        for proc in self.children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        self._exit(1)


def leave_on_termination(liveness: Liveness) -> None:
    """SIGTERM to a follower pod's first rank (its pod is being deleted) asks rank 0 to drain and stop
    the group, instead of leaving the group to find a dead rank after the grace period."""
    signal.signal(signal.SIGTERM, lambda signum, frame: liveness.leave())
