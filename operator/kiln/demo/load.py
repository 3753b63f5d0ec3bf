"""Load for the autoscaling act: concurrent completions, and TTFT p50 read from the engines' metrics.

TTFT comes from what the engines export (`kiln_engine_time_to_first_token_seconds`), not from the
client: each window's p50 is the PromQL-style quantile of the histogram buckets observed between
two scrapes, summed over every serving pod (a pod that appeared in between counts from zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from kiln.common.histogram import bucket_delta, histogram_quantile
from kiln.common.scrape import parse_metrics

Buckets = dict[float, float]  # upper bound (s) -> cumulative count


def ttft_window(after: Mapping[str, Buckets], before: Mapping[str, Buckets]) -> tuple[float | None, int]:
    """(TTFT p50 in ms, requests counted) over the TTFT buckets observed between two scrapes.

    `after`/`before` map an endpoint (pod) to its cumulative buckets; pods missing from `before`
    count from zero, pods that restarted in between are left out.
    """
    merged: dict[float, float] = {}
    for pod, buckets in after.items():
        delta = bucket_delta(buckets, before.get(pod))
        if delta is None:
            continue
        for bound, count in delta:
            merged[bound] = merged.get(bound, 0.0) + count
    ordered = sorted(merged.items())
    total = int(ordered[-1][1]) if ordered else 0
    if total == 0:
        return None, 0
    p50 = histogram_quantile(0.5, ordered)
    return (None if p50 is None else p50 * 1000.0), total


def scrape_ttft(endpoints: Sequence[str], timeout: float = 5.0) -> dict[str, Buckets]:
    """Each endpoint's cumulative TTFT buckets (endpoints that do not answer are left out)."""
    found: dict[str, Buckets] = {}
    with httpx.Client(timeout=timeout) as client:
        for endpoint in endpoints:
            with contextlib.suppress(httpx.HTTPError):
                response = client.get(f"{endpoint}/metrics")
                if response.is_success:
                    found[endpoint] = parse_metrics(response.text, time.time()).ttft_buckets
    return found


@dataclass
class LoadStats:
    """What the clients saw: completed and failed requests (with the first few errors)."""

    ok: int = 0
    failed: int = 0
    retried: int = 0  # answered 503 (a replica draining) and then answered by another replica
    errors: list[str] = field(default_factory=list)

    def record_error(self, message: str) -> None:
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(message)


class Load:
    """`concurrency` clients that each post completions back to back until stopped.

    `urls()` says where to post (full URLs, used round-robin; asked before each request, so a new
    replica gets traffic as soon as it is an endpoint). `verify` is the TLS context for the API
    server's service proxy (plain http endpoints ignore it).
    """

    def __init__(
        self,
        urls: Callable[[], Sequence[str]],
        body: dict[str, Any],
        concurrency: int,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.urls = urls
        self.body = body
        self.concurrency = concurrency
        self.verify = verify
        self.stats = LoadStats()
        self._stop = asyncio.Event()
        self._turn = 0

    def stop(self) -> None:
        self._stop.set()

    async def _client(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            urls = self.urls()
            if not urls:
                await asyncio.sleep(0.2)
                continue
            self._turn += 1
            turn = self._turn  # other clients move self._turn while this one awaits
            url = urls[turn % len(urls)]
            try:
                response = await client.post(url, json=self.body)
                if response.status_code == 503 and len(urls) > 1:
                    # A draining replica refuses new work with 503 before admitting it, so the
                    # request is safe to send again, as a load balancer would, to the next one.
                    self.stats.retried += 1
                    response = await client.post(urls[(turn + 1) % len(urls)], json=self.body)
                if response.status_code == 200:
                    self.stats.ok += 1
                else:
                    self.stats.record_error(f"HTTP {response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as error:
                self.stats.record_error(f"{type(error).__name__}: {error}")

    async def run(self) -> LoadStats:
        """Run until `stop()`; return the stats."""
        limits = httpx.Limits(max_connections=self.concurrency * 2)
        async with httpx.AsyncClient(timeout=120.0, limits=limits, verify=self.verify) as client:
            await asyncio.gather(*(self._client(client) for _ in range(self.concurrency)))
        return self.stats
