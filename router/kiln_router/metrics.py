"""The router's own Prometheus metrics: names here (dashboards and alerts read them), one registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kiln_router.pick import REASONS

DECISIONS = "kiln_router_decisions_total"  # counter, label `reason`: affinity | spill | least_loaded | ...
DECISION_SECONDS = "kiln_router_decision_seconds"  # histogram: prompt text, hashes and choice
RETRIES = "kiln_router_retries_total"  # counter, label `cause`: connect | unavailable | first_byte
UPSTREAM_ERRORS = "kiln_router_upstream_errors_total"  # counter, label `phase`: before_first_byte | streaming
REQUESTS = "kiln_router_requests_total"  # counter, label `code`: the HTTP status the client got
IN_FLIGHT = "kiln_router_in_flight_requests"  # gauge: requests this router is proxying now
REPLICAS = "kiln_router_replicas"  # gauge, label `state`: ready | unhealthy
HELD = "kiln_router_held_requests"  # gauge: requests waiting for a ready replica (there is none)
HOLDS = "kiln_router_holds_total"  # counter, label `outcome`: released | timed_out | refused
PROMPT_CHARS = "kiln_router_prompt_chars_total"  # counter: characters of routed prompts
PREFIX_HIT_CHARS = "kiln_router_prefix_hit_chars_total"  # counter: of those, sent where this router sent
# the same affinity prefix before (an estimate of the engines' prefix-cache hits)

RETRY_CAUSES = ("connect", "unavailable", "first_byte")
ERROR_PHASES = ("before_first_byte", "streaming")
HOLD_OUTCOMES = ("released", "timed_out", "refused")
DECISION_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01)


class RouterMetrics:
    """The router's counters, gauges and histograms in a registry of their own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.decisions = Counter(DECISIONS, "Routing decisions by reason.", ["reason"], registry=r)
        for reason in REASONS:
            self.decisions.labels(reason)
        self.decision_seconds = Histogram(
            DECISION_SECONDS, "Time to choose a replica.", buckets=DECISION_BUCKETS, registry=r
        )
        self.retries = Counter(RETRIES, "Requests moved to another replica before any byte.", ["cause"],
                               registry=r)  # fmt: skip
        for cause in RETRY_CAUSES:
            self.retries.labels(cause)
        self.upstream_errors = Counter(UPSTREAM_ERRORS, "Replica failures by phase.", ["phase"], registry=r)
        for phase in ERROR_PHASES:
            self.upstream_errors.labels(phase)
        self.requests = Counter(REQUESTS, "Requests answered, by HTTP status.", ["code"], registry=r)
        self.in_flight = Gauge(IN_FLIGHT, "Requests being proxied.", registry=r)
        self.replicas = Gauge(REPLICAS, "Replicas known, by state.", ["state"], registry=r)
        self.held = Gauge(HELD, "Requests waiting for a ready replica.", registry=r)
        self.holds = Counter(
            HOLDS, "Requests that waited for a replica, by outcome.", ["outcome"], registry=r
        )
        for outcome in HOLD_OUTCOMES:
            self.holds.labels(outcome)
        self.prompt_chars = Counter(PROMPT_CHARS, "Characters of routed prompts.", registry=r)
        self.prefix_hit_chars = Counter(
            PREFIX_HIT_CHARS, "Prompt characters whose affinity prefix went where it went before.", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
