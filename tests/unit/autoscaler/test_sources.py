"""Signal sources: PromQL built per deployment, and pods' /metrics scraped, parsed and differenced."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest
from prometheus_client import generate_latest

from kiln.common.scrape import parse_metrics
from kiln_autoscaler.sources import (
    PodScrapeSource,
    RouterLoad,
    queries,
    router_load,
    scalar_from_vector,
    selector,
    signals_from_samples,
    signals_from_values,
)
from kiln_engine.interface import EngineStats
from kiln_engine.server.metrics import ServerMetrics
from kiln_router.metrics import RouterMetrics


def test_selector_matches_namespace_and_deployment_and_escapes_quotes() -> None:
    assert selector("prod", "llama") == '{namespace="prod", llmdeployment="llama"}'
    assert selector("a", 'x"y', "kiln_dev_deployment") == '{namespace="a", kiln_dev_deployment="x\\"y"}'


def test_queries_use_the_engine_histogram_and_window() -> None:
    q = queries(selector("prod", "llama"), "2m")
    assert q["ttft_p50_s"] == (
        "histogram_quantile(0.5, sum by (le) (rate(kiln_engine_time_to_first_token_seconds_bucket"
        '{namespace="prod", llmdeployment="llama"}[2m])))'
    )
    assert q["queue_depth"] == 'sum(kiln_engine_queue_depth{namespace="prod", llmdeployment="llama"})'


def test_instant_query_answers_become_values_and_empty_or_nan_become_none() -> None:
    ok = {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "2.5"]}]},
    }
    assert scalar_from_vector(ok) == 2.5
    nan = {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "NaN"]}]},
    }
    assert scalar_from_vector(nan) is None
    assert scalar_from_vector({"status": "success", "data": {"resultType": "vector", "result": []}}) is None
    assert scalar_from_vector({"status": "error"}) is None


def test_values_without_fresh_series_are_no_signals() -> None:
    assert signals_from_values({"observed_at": None, "pods": 2}) is None
    assert signals_from_values({"observed_at": 100.0, "pods": None}) is None
    s = signals_from_values({"observed_at": 100.0, "pods": 2, "queue_depth": 3, "ttft_p50_s": None})
    assert s is not None and s.queue_depth == 3 and s.ttft_p50_s is None and s.pods == 2


def engine_metrics(
    ttfts: list[float], waiting: int, running: int, prompt: int, generated: int
) -> ServerMetrics:
    metrics = ServerMetrics("tiny")
    for value in ttfts:
        metrics.ttft.observe(value)
    metrics.observe_stats(EngineStats(waiting=waiting, running=running, kv_blocks_total=10, kv_blocks_used=5))
    metrics.prompt_tokens.inc(prompt)
    metrics.generation_tokens.inc(generated)
    for _ in ttfts:
        metrics.request_finished("ok")
    return metrics


def test_engine_exposition_parses_and_deltas_give_rates_and_quantiles() -> None:
    metrics = engine_metrics([0.05] * 10, waiting=1, running=2, prompt=1000, generated=100)
    before = parse_metrics(generate_latest(metrics.registry).decode(), now=100.0)
    for _ in range(10):
        metrics.ttft.observe(0.9)  # the new window holds only slow requests
        metrics.request_finished("ok")
    metrics.prompt_tokens.inc(2000)
    metrics.generation_tokens.inc(300)
    metrics.observe_stats(EngineStats(waiting=4, running=3, kv_blocks_total=10, kv_blocks_used=8))
    after = parse_metrics(generate_latest(metrics.registry).decode(), now=110.0)

    s = signals_from_samples({"pod-a": after}, {"pod-a": before})
    assert s is not None
    assert s.request_rate == pytest.approx(1.0)
    assert s.prompt_token_rate == pytest.approx(200.0)
    assert s.output_token_rate == pytest.approx(30.0)
    assert s.queue_depth == 4 and s.running == 3 and s.kv_cache_usage == pytest.approx(0.8)
    assert s.ttft_p50_s is not None and 0.75 < s.ttft_p50_s <= 1.0  # only the new observations count
    assert s.observed_at == 110.0


def test_pod_deltas_give_ttft_p95_and_inter_token_latency_quantiles() -> None:
    metrics = engine_metrics([0.05] * 10, waiting=0, running=1, prompt=10, generated=10)
    for _ in range(100):
        metrics.inter_token.observe(0.004)
    before = parse_metrics(generate_latest(metrics.registry).decode(), now=100.0)
    for value in [0.1] * 90 + [2.0] * 10:
        metrics.ttft.observe(value)
    for value in [0.012] * 80 + [0.2] * 20:
        metrics.inter_token.observe(value)
    after = parse_metrics(generate_latest(metrics.registry).decode(), now=110.0)
    s = signals_from_samples({"a": after}, {"a": before})
    assert s is not None
    assert s.ttft_p50_s is not None and s.ttft_p50_s <= 0.15
    assert s.ttft_p95_s is not None and 1.5 < s.ttft_p95_s <= 2.0  # the slow tenth only
    assert s.itl_p50_s is not None and 0.01 < s.itl_p50_s <= 0.015  # the 4 ms gaps were before
    assert s.itl_p90_s is not None and 0.15 < s.itl_p90_s <= 0.25
    assert s.itl(90) == s.itl_p90_s
    with pytest.raises(ValueError, match="50, 90 or 95"):
        s.itl(99)


def test_queries_read_ttft_p95_and_the_inter_token_histogram() -> None:
    q = queries(selector("prod", "llama"))
    assert q["ttft_p95_s"] == q["ttft_p50_s"].replace("histogram_quantile(0.5, ", "histogram_quantile(0.95, ")
    for key, quantile in (("itl_p50_s", "0.5"), ("itl_p90_s", "0.9"), ("itl_p95_s", "0.95")):
        assert q[key] == (
            f"histogram_quantile({quantile}, sum by (le) (rate(kiln_engine_inter_token_latency_seconds_bucket"
            '{namespace="prod", llmdeployment="llama"}[1m])))'
        )
    s = signals_from_values({"observed_at": 1.0, "pods": 1, "ttft_p95_s": 0.7, "itl_p95_s": 0.03})
    assert s is not None and s.ttft_p95_s == 0.7 and s.itl(95) == 0.03 and s.itl_p50_s is None


def test_first_scrape_and_restarts_give_no_rates() -> None:
    metrics = engine_metrics([0.1], waiting=0, running=1, prompt=10, generated=1)
    sample = parse_metrics(generate_latest(metrics.registry).decode(), now=5.0)
    assert signals_from_samples({"a": sample}, {}) is None
    restarted = parse_metrics(generate_latest(ServerMetrics("tiny").registry).decode(), now=10.0)
    assert signals_from_samples({"a": restarted}, {"a": sample}) is None
    assert signals_from_samples({}, {"a": sample}) is None


@contextlib.contextmanager
def metrics_endpoint(render: Callable[[], bytes]) -> Iterator[str]:
    """A real HTTP server answering every GET with `render()` as Prometheus text; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = render()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()


@pytest.fixture
def engine_endpoint() -> Iterator[tuple[str, ServerMetrics]]:
    metrics = engine_metrics([0.2] * 5, waiting=2, running=1, prompt=100, generated=10)
    with metrics_endpoint(lambda: generate_latest(metrics.registry)) as url:
        yield url, metrics


def test_pod_scrape_source_reads_real_endpoints_and_skips_dead_ones(
    engine_endpoint: tuple[str, ServerMetrics],
) -> None:
    url, metrics = engine_endpoint
    clock = iter([100.0, 115.0])
    source = PodScrapeSource(clock=lambda: next(clock))
    dead = "http://127.0.0.1:9/metrics"
    assert source.read("ns", "llama", [url, dead]) is None  # first round: no window yet
    for _ in range(15):
        metrics.ttft.observe(0.3)
        metrics.request_finished("ok")
    s = source.read("ns", "llama", [url, dead])
    assert s is not None
    assert s.pods == 1
    assert s.request_rate == pytest.approx(1.0)
    assert s.queue_depth == 2
    assert s.ttft_p50_s is not None and 0.2 < s.ttft_p50_s <= 0.3


@pytest.fixture
def router_endpoint() -> Iterator[tuple[str, RouterMetrics]]:
    """A real HTTP endpoint serving a router's own metrics registry."""
    metrics = RouterMetrics()
    with metrics_endpoint(metrics.render) as url:
        yield url, metrics


def test_router_load_sums_what_the_routers_hold_and_proxy_and_skips_dead_ones(
    router_endpoint: tuple[str, RouterMetrics],
) -> None:
    url, metrics = router_endpoint  # a real router registry: the gauges' names are the router's own
    with httpx.Client(timeout=2.0) as client:
        assert router_load(client, [url]) == RouterLoad(held=0, in_flight=0)
        metrics.held.set(3)
        metrics.in_flight.set(5)
        dead = "http://127.0.0.1:9/metrics"
        assert router_load(client, [url, url, dead]) == RouterLoad(held=6, in_flight=10)
