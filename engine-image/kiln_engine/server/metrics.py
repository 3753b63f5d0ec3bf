"""The server's Prometheus metrics: names from metric_names.py, one registry per server, label `model`."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kiln_engine import metric_names as names
from kiln_engine.interface import EngineStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
REQUEST_STATUSES = ("ok", "error", "aborted")


class ServerMetrics:
    """Histograms, gauges and counters of one served model, in a registry of their own."""

    def __init__(self, model: str, registry: CollectorRegistry | None = None) -> None:
        self.model = model
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        lbl = ["model"]
        self.ttft = Histogram(
            names.TTFT_SECONDS, "Time from arrival to the first generated token.", lbl,
            buckets=names.LATENCY_BUCKETS, registry=r,
        ).labels(model)  # fmt: skip
        self.inter_token = Histogram(
            names.INTER_TOKEN_SECONDS, "Time between consecutive generated tokens of one request.", lbl,
            buckets=names.INTER_TOKEN_BUCKETS, registry=r,
        ).labels(model)  # fmt: skip
        self.e2e = Histogram(
            names.E2E_SECONDS, "Time from arrival to the last token of a finished request.", lbl,
            buckets=names.LATENCY_BUCKETS, registry=r,
        ).labels(model)  # fmt: skip
        self.queue_depth = Gauge(
            names.QUEUE_DEPTH, "Requests waiting for admission.", lbl, registry=r
        ).labels(model)
        self.running = Gauge(
            names.RUNNING_REQUESTS, "Requests in the running batch.", lbl, registry=r
        ).labels(model)
        self.kv_usage = Gauge(names.KV_CACHE_USAGE, "Used / total KV-cache blocks.", lbl, registry=r).labels(
            model
        )
        self.prompt_tokens = Counter(names.PROMPT_TOKENS, "Prompt tokens processed.", lbl, registry=r).labels(
            model
        )
        self.generation_tokens = Counter(
            names.GENERATION_TOKENS, "Tokens generated.", lbl, registry=r
        ).labels(model)
        self._requests = Counter(names.REQUESTS, "Finished requests by status.", [*lbl, "status"], registry=r)
        for status in REQUEST_STATUSES:
            self._requests.labels(model, status)
        self.preemptions = Counter(names.PREEMPTIONS, "Requests preempted.", lbl, registry=r).labels(model)
        self.prefix_cache_hits = Counter(
            names.PREFIX_CACHE_HIT_TOKENS, "Prompt tokens served from the prefix cache.", lbl, registry=r
        ).labels(model)
        self.spec_proposed = Counter(
            names.SPEC_PROPOSED_TOKENS, "Draft tokens proposed by speculative decoding.", lbl, registry=r
        ).labels(model)
        self.spec_accepted = Counter(
            names.SPEC_ACCEPTED_TOKENS, "Draft tokens the target model accepted.", lbl, registry=r
        ).labels(model)
        self.spec_drafts = Counter(
            names.SPEC_DRAFTS, "Draft runs verified (mean acceptance length: 1 + accepted / drafts).", lbl,
            registry=r,
        ).labels(model)  # fmt: skip
        self._spec_per_position = Counter(
            names.SPEC_ACCEPTED_PER_POSITION, "Draft runs whose draft at this position was kept.",
            [*lbl, "position"], registry=r,
        )  # fmt: skip
        self._spec_last = [0, 0, 0]  # proposed, accepted, drafts totals seen last time
        self._spec_last_per_position: list[int] = []
        self.adapter_requests = Counter(
            names.LORA_REQUESTS, "Requests admitted per LoRA adapter.", [*lbl, "adapter"], registry=r
        )
        self._lock = threading.Lock()
        self._last_preemptions = 0
        self._last_prefix_hits = 0

    def request_finished(self, status: str) -> None:
        """Count one finished request: `ok`, `error` or `aborted`."""
        self._requests.labels(self.model, status).inc()

    def observe_stats(self, stats: EngineStats) -> None:
        """Copy the engine's gauges; advance counters by what its running totals grew since last time."""
        self.queue_depth.set(stats.waiting)
        self.running.set(stats.running)
        total = stats.kv_blocks_total
        self.kv_usage.set(stats.kv_blocks_used / total if total > 0 else 0.0)
        with self._lock:
            if stats.preemptions_total > self._last_preemptions:
                self.preemptions.inc(stats.preemptions_total - self._last_preemptions)
            self._last_preemptions = max(self._last_preemptions, stats.preemptions_total)
            if stats.prefix_cache_hit_tokens_total > self._last_prefix_hits:
                self.prefix_cache_hits.inc(stats.prefix_cache_hit_tokens_total - self._last_prefix_hits)
            self._last_prefix_hits = max(self._last_prefix_hits, stats.prefix_cache_hit_tokens_total)
            self._observe_spec(stats)

    def _observe_spec(self, stats: EngineStats) -> None:
        """Advance the speculative-decoding counters by what the engine's totals grew since last time."""
        totals = (stats.spec_proposed_tokens_total, stats.spec_accepted_tokens_total, stats.spec_drafts_total)
        counters = (self.spec_proposed, self.spec_accepted, self.spec_drafts)
        for i, (counter, now) in enumerate(zip(counters, totals, strict=True)):
            counter.inc(max(0, now - self._spec_last[i]))
            self._spec_last[i] = max(now, self._spec_last[i])
        positions = stats.spec_accepted_per_position
        last = self._spec_last_per_position
        last.extend([0] * (len(positions) - len(last)))
        for i, now in enumerate(positions):
            self._spec_per_position.labels(self.model, str(i + 1)).inc(max(0, now - last[i]))
            last[i] = max(now, last[i])

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
