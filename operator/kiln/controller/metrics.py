"""The operator's own Prometheus metrics: reconcile durations and errors, builds, API requests, leadership."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """One set of operator metrics in its own registry (so tests can make as many as they like)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reconcile_duration = Histogram(
            "kiln_operator_reconcile_duration_seconds",
            "Time one reconcile of an object took.",
            ["kind"],
            buckets=RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "kiln_operator_reconcile_errors_total",
            "Reconciles that raised (retried later).",
            ["kind", "error"],
            registry=self.registry,
        )
        self.builds_started = Counter(
            "kiln_operator_builds_started_total", "Build Jobs created.", registry=self.registry
        )
        self.builds_succeeded = Counter(
            "kiln_operator_builds_succeeded_total", "Engines that became Ready.", registry=self.registry
        )
        self.builds_failed = Counter(
            "kiln_operator_builds_failed_total", "Engines whose build failed.", registry=self.registry
        )
        self.api_requests = Counter(
            "kiln_operator_api_requests_total",
            "Requests the operator's reconcilers sent to the Kubernetes API (kopf's watches excluded).",
            ["verb", "resource"],
            registry=self.registry,
        )
        self.engines_collected = Counter(
            "kiln_operator_engines_garbage_collected_total",
            "Unused LLMEngines deleted after the retention time.",
            registry=self.registry,
        )
        self.leader = Gauge(
            "kiln_operator_leader", "1 while this replica leads (acts), else 0.", registry=self.registry
        )

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """Expose /metrics on `port` (a background thread)."""
        start_http_server(port, addr=address, registry=self.registry)

    def api_request_total(self) -> float:
        """All API requests counted so far (for benchmarks)."""
        total = 0.0
        for family in self.api_requests.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    total += sample.value
        return total
