"""The replica set one router routes to: endpoints from discovery, engine gauges from their /metrics,
and the router's own requests in flight on each. Feeds `pick` a snapshot of plain values."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import aiohttp

import kiln_engine.metric_names as engine_names
from kiln_router.pick import ReplicaState

log = logging.getLogger(__name__)

_GAUGES = {
    engine_names.QUEUE_DEPTH: "queue_depth",
    engine_names.RUNNING_REQUESTS: "running",
    engine_names.KV_CACHE_USAGE: "kv_usage",
}


def engine_gauges(text: str) -> dict[str, float]:
    """Queue depth, running requests and KV-cache usage from an engine's Prometheus text (summed over
    its models; a gauge the engine does not export is absent)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        field = _GAUGES.get(name)
        if field is not None:
            values[field] = values.get(field, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


@dataclass
class _Replica:
    state: ReplicaState
    in_flight: int = 0


class Replicas:
    """Endpoints (base URLs) with their last scraped state; scrapes them all every `interval` s."""

    def __init__(self, interval: float, timeout: float = 2.0) -> None:
        self.interval = interval
        self.timeout = timeout
        self._replicas: dict[str, _Replica] = {}
        self._available = asyncio.Event()  # set while the set is not empty
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def set_endpoints(self, urls: Iterable[str]) -> None:
        """Replace the endpoint set (from discovery); known endpoints keep their state."""
        urls = set(urls)
        for gone in set(self._replicas) - urls:
            del self._replicas[gone]
        for url in urls - set(self._replicas):
            self._replicas[url] = _Replica(ReplicaState())
            if self._session is not None:  # fill in its load at once rather than at the next round
                asyncio.get_running_loop().create_task(self._scrape(url))
        if self._replicas:
            self._available.set()
        else:
            self._available.clear()

    async def wait_available(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the set to hold a replica; whether it does."""
        if not self._replicas:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._available.wait(), timeout)
        return bool(self._replicas)

    def snapshot(self) -> Mapping[str, ReplicaState]:
        return {url: replace(r.state, in_flight=r.in_flight) for url, r in self._replicas.items()}

    def __len__(self) -> int:
        return len(self._replicas)

    def counts(self) -> tuple[int, int]:
        """(healthy, unhealthy) replicas."""
        healthy = sum(1 for r in self._replicas.values() if r.state.healthy)
        return healthy, len(self._replicas) - healthy

    def started(self, url: str) -> None:
        if url in self._replicas:
            self._replicas[url].in_flight += 1

    def finished(self, url: str) -> None:
        if url in self._replicas:
            self._replicas[url].in_flight -= 1

    def failed(self, url: str) -> None:
        """A connection to the replica failed: avoid it until a scrape succeeds again."""
        if url in self._replicas:
            self._replicas[url].state = replace(self._replicas[url].state, healthy=False)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.gather(*(self._scrape(url) for url in list(self._replicas)))
            await asyncio.sleep(self.interval)

    async def _scrape(self, url: str) -> None:
        assert self._session is not None
        try:
            async with self._session.get(url + "/metrics") as response:
                response.raise_for_status()
                gauges = engine_gauges(await response.text())
        except (aiohttp.ClientError, TimeoutError, ValueError, IndexError) as e:
            log.debug("scrape of %s failed: %s", url, e)
            state = ReplicaState(healthy=False)
        else:
            state = ReplicaState(
                queue_depth=gauges.get("queue_depth", 0.0),
                running=gauges.get("running", 0.0),
                kv_usage=gauges.get("kv_usage", 0.0),
            )
        if url in self._replicas:
            self._replicas[url].state = state
