"""Where signals come from: the Prometheus HTTP API (PromQL), or each pod's /metrics scraped directly.

Both return `Signals | None`; None means "nothing trustworthy", which the policy treats as hold.

Prometheus label selector: engine series carry `namespace` and `llmdeployment` (the PodMonitor in
the chart and the plain scrape job in docs/monitoring.md relabel the pod label
`kiln.dev/deployment` to `llmdeployment`), so one deployment is
`{namespace="<ns>", llmdeployment="<name>"}`; the label name is configurable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kiln.common.histogram import bucket_delta, histogram_quantile
from kiln.common.scrape import COUNTERS, PodSample, parse_metrics
from kiln_autoscaler.data import Signals, finite_or_none
from kiln_engine import metric_names as names

DEFAULT_DEPLOYMENT_LABEL = "llmdeployment"
# The routers' gauges of requests waiting for a ready replica and of requests being proxied to one
# (kiln_router.metrics.HELD and IN_FLIGHT; the autoscaler may not import the router: tests read
# them from a real router registry).
ROUTER_HELD_REQUESTS = "kiln_router_held_requests"
ROUTER_IN_FLIGHT = "kiln_router_in_flight_requests"


# ---------------------------------------------------------------------------------------- PromQL


def selector(namespace: str, deployment: str, deployment_label: str = DEFAULT_DEPLOYMENT_LABEL) -> str:
    """The PromQL label matcher of one LLMDeployment's engine series."""

    def quote(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"')

    return f'{{namespace="{quote(namespace)}", {deployment_label}="{quote(deployment)}"}}'


def queries(match: str, window: str = "1m") -> dict[str, str]:
    """The PromQL of every signal, for one selector (`match` from `selector`)."""
    ttft = f"sum by (le) (rate({names.TTFT_SECONDS}_bucket{match}[{window}]))"
    itl = f"sum by (le) (rate({names.INTER_TOKEN_SECONDS}_bucket{match}[{window}]))"
    return {
        "ttft_p50_s": f"histogram_quantile(0.5, {ttft})",
        "ttft_p90_s": f"histogram_quantile(0.9, {ttft})",
        "ttft_p95_s": f"histogram_quantile(0.95, {ttft})",
        "itl_p50_s": f"histogram_quantile(0.5, {itl})",
        "itl_p90_s": f"histogram_quantile(0.9, {itl})",
        "itl_p95_s": f"histogram_quantile(0.95, {itl})",
        "queue_depth": f"sum({names.QUEUE_DEPTH}{match})",
        "running": f"sum({names.RUNNING_REQUESTS}{match})",
        "request_rate": f"sum(rate({names.REQUESTS}{match}[{window}]))",
        "prompt_token_rate": f"sum(rate({names.PROMPT_TOKENS}{match}[{window}]))",
        "output_token_rate": f"sum(rate({names.GENERATION_TOKENS}{match}[{window}]))",
        "kv_cache_usage": f"avg({names.KV_CACHE_USAGE}{match})",
        "pods": f"count({names.QUEUE_DEPTH}{match})",
        "observed_at": f"max(timestamp({names.QUEUE_DEPTH}{match}))",
    }


def scalar_from_vector(payload: Mapping[str, Any]) -> float | None:
    """The single value of an instant-query answer, or None when the vector is empty or not success."""
    if payload.get("status") != "success":
        return None
    data = payload.get("data") or {}
    result = data.get("result") or []
    if data.get("resultType") != "vector" or not result:
        return None
    return finite_or_none(float(result[0]["value"][1]))


def signals_from_values(values: Mapping[str, float | None]) -> Signals | None:
    """Signals from the per-query values; None when the deployment has no fresh engine series."""
    observed_at = values.get("observed_at")
    if observed_at is None or not values.get("pods"):
        return None

    def number(key: str) -> float:
        return values.get(key) or 0.0

    return Signals(
        observed_at=observed_at,
        ttft_p50_s=values.get("ttft_p50_s"),
        ttft_p90_s=values.get("ttft_p90_s"),
        ttft_p95_s=values.get("ttft_p95_s"),
        itl_p50_s=values.get("itl_p50_s"),
        itl_p90_s=values.get("itl_p90_s"),
        itl_p95_s=values.get("itl_p95_s"),
        queue_depth=number("queue_depth"),
        running=number("running"),
        request_rate=number("request_rate"),
        prompt_token_rate=number("prompt_token_rate"),
        output_token_rate=number("output_token_rate"),
        kv_cache_usage=values.get("kv_cache_usage"),
        pods=int(number("pods")),
    )


class PrometheusSource:
    """Reads a deployment's signals with instant queries against `/api/v1/query`."""

    def __init__(
        self,
        url: str,
        window: str = "1m",
        deployment_label: str = DEFAULT_DEPLOYMENT_LABEL,
        client: httpx.Client | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.window = window
        self.deployment_label = deployment_label
        self.client = client or httpx.Client(timeout=timeout_s)

    def query(self, promql: str) -> float | None:
        """One instant query's scalar value (None when empty). Raises on HTTP errors."""
        response = self.client.get(f"{self.url}/api/v1/query", params={"query": promql})
        response.raise_for_status()
        return scalar_from_vector(response.json())

    def read(self, namespace: str, deployment: str, pods: Sequence[str] = ()) -> Signals | None:
        """The deployment's signals now (`pods` is unused: Prometheus knows its targets)."""
        match = selector(namespace, deployment, self.deployment_label)
        values = {key: self.query(promql) for key, promql in queries(match, self.window).items()}
        return signals_from_values(values)


# ---------------------------------------------------------------------------------- pod scraping


def signals_from_samples(
    current: Mapping[str, PodSample], previous: Mapping[str, PodSample]
) -> Signals | None:
    """Signals from this round's pod samples and the last round's (rates and quantiles from deltas).

    Pods without a previous sample (or that restarted) add their gauges but no rates. None when no
    pod answered, or when no pod has a previous sample yet (no window to compute rates over).
    """
    if not current:
        return None
    merged: dict[float, float] = {}
    merged_itl: dict[float, float] = {}
    totals = dict.fromkeys(COUNTERS, 0.0)
    spans: list[float] = []
    for pod, sample in current.items():
        before = previous.get(pod)
        if before is None or sample.time <= before.time:
            continue
        delta = bucket_delta(sample.ttft_buckets, before.ttft_buckets)
        itl_delta = bucket_delta(sample.itl_buckets, before.itl_buckets)
        restarted = any(sample.counters.get(name, 0.0) < before.counters.get(name, 0.0) for name in COUNTERS)
        if restarted or delta is None or itl_delta is None:
            continue
        for bound, count in delta:
            merged[bound] = merged.get(bound, 0.0) + count
        for bound, count in itl_delta:
            merged_itl[bound] = merged_itl.get(bound, 0.0) + count
        for name in COUNTERS:
            totals[name] += sample.counters.get(name, 0.0) - before.counters.get(name, 0.0)
        spans.append(sample.time - before.time)
    if not spans:
        return None
    span = sum(spans) / len(spans)
    buckets = sorted(merged.items())
    itl_buckets = sorted(merged_itl.items())

    def quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
        return histogram_quantile(q, cumulative) if cumulative else None

    kv = [s.gauges[names.KV_CACHE_USAGE] for s in current.values() if names.KV_CACHE_USAGE in s.gauges]
    return Signals(
        observed_at=max(s.time for s in current.values()),
        ttft_p50_s=quantile(0.5, buckets),
        ttft_p90_s=quantile(0.9, buckets),
        ttft_p95_s=quantile(0.95, buckets),
        itl_p50_s=quantile(0.5, itl_buckets),
        itl_p90_s=quantile(0.9, itl_buckets),
        itl_p95_s=quantile(0.95, itl_buckets),
        queue_depth=sum(s.gauges.get(names.QUEUE_DEPTH, 0.0) for s in current.values()),
        running=sum(s.gauges.get(names.RUNNING_REQUESTS, 0.0) for s in current.values()),
        request_rate=totals[names.REQUESTS] / span,
        prompt_token_rate=totals[names.PROMPT_TOKENS] / span,
        output_token_rate=totals[names.GENERATION_TOKENS] / span,
        kv_cache_usage=sum(kv) / len(kv) if kv else None,
        pods=len(current),
    )


class PodScrapeSource:
    """Scrapes each ready pod's /metrics itself and keeps the last sample per pod for deltas."""

    def __init__(
        self,
        client: httpx.Client | None = None,
        timeout_s: float = 3.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client or httpx.Client(timeout=timeout_s)
        self.clock = clock
        self.previous: dict[tuple[str, str], dict[str, PodSample]] = {}

    def scrape(self, url: str) -> PodSample | None:
        """One pod's sample, or None when it does not answer."""
        text = fetch_metrics(self.client, url)
        return None if text is None else parse_metrics(text, self.clock())

    def read(self, namespace: str, deployment: str, pods: Sequence[str] = ()) -> Signals | None:
        """Scrape `pods` (their /metrics URLs) and turn the deltas since the last call into signals."""
        key = (namespace, deployment)
        current: dict[str, PodSample] = {}
        for url in pods:
            sample = self.scrape(url)
            if sample is not None:
                current[url] = sample
        previous = self.previous.get(key, {})
        self.previous[key] = current
        return signals_from_samples(current, previous)


def fetch_metrics(client: httpx.Client, url: str) -> str | None:
    """The text of one /metrics endpoint, or None when it does not answer."""
    try:
        response = client.get(url)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    return response.text


@dataclass(frozen=True)
class RouterLoad:
    """What a deployment's routers hold now, summed over them: fresher than any engine series,
    which reach the autoscaler through a scrape interval and a rate window."""

    held: int = 0  # requests waiting for a ready replica (there is none)
    in_flight: int = 0  # requests being proxied to replicas, waiting or running there


def router_load(client: httpx.Client, urls: Sequence[str]) -> RouterLoad:
    """The load at the routers at `urls` (their /metrics); a router that does not answer counts as
    holding nothing."""
    totals = {ROUTER_HELD_REQUESTS: 0.0, ROUTER_IN_FLIGHT: 0.0}
    for url in urls:
        text = fetch_metrics(client, url)
        if text is None:
            continue
        for family in text_string_to_metric_families(text):
            if family.name in totals:
                totals[family.name] += sum(sample.value for sample in family.samples)
    return RouterLoad(held=round(totals[ROUTER_HELD_REQUESTS]), in_flight=round(totals[ROUTER_IN_FLIGHT]))
