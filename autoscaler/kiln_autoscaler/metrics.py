"""The autoscaler's own Prometheus metrics (decisions, desired replicas, signal staleness, loop errors)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LABELS = ["namespace", "llmdeployment"]


class AutoscalerMetrics:
    """One registry with everything `kiln autoscaler run` exports on its metrics port."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.desired = Gauge(
            "kiln_autoscaler_desired_replicas", "Replicas the autoscaler wants.", LABELS, registry=r
        )
        self.decisions = Counter(
            "kiln_autoscaler_decisions", "Scaling decisions by direction: up, down, none.",
            [*LABELS, "direction"], registry=r,
        )  # fmt: skip
        self.signal_age = Gauge(
            "kiln_autoscaler_signal_age_seconds",
            "Age of the newest metric sample behind the last decision (+Inf when none).",
            LABELS, registry=r,
        )  # fmt: skip
        self.observed_ttft = Gauge(
            "kiln_autoscaler_observed_ttft_seconds", "TTFT quantiles the last decision saw.",
            [*LABELS, "quantile"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "kiln_autoscaler_loop_errors", "Errors in the control loop by stage.", ["stage"], registry=r
        )
        self.leader = Gauge("kiln_autoscaler_leader", "1 while this replica holds the Lease.", registry=r)
        self.loop_seconds = Histogram(
            "kiln_autoscaler_loop_duration_seconds", "Time of one pass over all deployments.", registry=r
        )

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted deployment's series."""
        for gauge in (self.desired, self.signal_age):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, name)
