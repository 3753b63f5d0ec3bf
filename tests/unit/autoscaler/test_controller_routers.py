"""The controller and a deployment's routers, over real HTTP: the routers' counts start a pass
between passes and size the deployment before the engines' series show the load."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, cast

import pytest

from kiln_autoscaler.controller import Controller
from kiln_autoscaler.data import Capacity, Replicas, Signals, Targets
from kiln_autoscaler.kube import Kube, Scaled
from kiln_router.metrics import RouterMetrics
from tests.unit.autoscaler.test_sources import metrics_endpoint

NOW = 50_000.0
TARGETS = Targets(min_replicas=0, max_replicas=20, ttft_p50_target_s=0.5, scale_to_zero=True)
CAPACITY = Capacity(output_tokens_per_second=1000.0, prefill_tokens_per_second=10_000.0,
                    max_concurrency_at_ttft_target=16.0, ttft_percentile=50, ttft_target_s=0.5)  # fmt: skip
# What the engines' series say: 2 replicas at ease, 8 requests running.
CALM = Signals(observed_at=NOW, ttft_p50_s=0.2, running=8.0, request_rate=4.0, prompt_token_rate=4000.0,
               output_token_rate=400.0, pods=2)  # fmt: skip


class Cluster:
    """The Kubernetes side the controller talks to: one routed deployment, its routers' URLs."""

    def __init__(self, replicas: int, router_url: str) -> None:
        ready = Replicas(replicas, replicas)
        self.scaled = Scaled("prod", "chat", "u-1", TARGETS, ready, "sel", "e1", routed=True)
        self.router_url = router_url
        self.scaled_to: list[int] = []
        self.router_lists = 0  # API calls for the router pods

    def list_scaled(self, namespaces: list[str] | None = None) -> list[Scaled]:
        return [self.scaled]

    def capacity(self, namespace: str, engine: str | None) -> Capacity:
        return CAPACITY

    def pod_metrics_urls(self, namespace: str, selector: str | None, port: int | str) -> list[str]:
        if selector != self.scaled.router_selector:
            return []
        self.router_lists += 1
        return [self.router_url]

    def scale(self, namespace: str, name: str, replicas: int, uid: str = "") -> None:
        self.scaled_to.append(replicas)
        self.scaled = replace(self.scaled, replicas=Replicas(replicas, self.scaled.replicas.ready))

    def write_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        pass

    def event(self, scaled: Scaled, reason: str, message: str, now: dt.datetime) -> None:
        pass


class Engines:
    def __init__(self, signals: Signals | None) -> None:
        self.signals = signals

    def read(self, namespace: str, deployment: str, pods: Any = ()) -> Signals | None:
        return self.signals


@pytest.fixture
def router() -> Iterator[tuple[str, RouterMetrics]]:
    metrics = RouterMetrics()
    with metrics_endpoint(metrics.render) as url:
        yield url, metrics


def controller(cluster: Cluster, engines: Engines) -> Controller:
    return Controller(cast(Kube, cluster), engines, scrape_pods=False, clock=lambda: NOW)


def test_a_burst_at_the_routers_starts_a_pass_that_sizes_for_it(router: tuple[str, RouterMetrics]) -> None:
    url, metrics = router
    cluster = Cluster(replicas=2, router_url=url)
    control = controller(cluster, Engines(CALM))
    metrics.in_flight.set(8)  # what the engines show too
    control.tick()
    assert cluster.scaled_to == [] and not control.woken()
    metrics.in_flight.set(11)  # fewer than 2 more per ready replica: the next pass will do
    lists = cluster.router_lists
    assert not control.woken()
    assert cluster.router_lists == lists  # between passes the routers the pass found are asked
    metrics.in_flight.set(40)  # 32 requests the engines' series do not show yet
    assert control.woken()
    control.wake(control.woken())
    assert cluster.scaled_to == [5]  # 40 in flight / 16 per replica at 60 % utilization
    assert not control.woken()  # counted by that pass: no pass again until more arrive


def test_a_woken_pass_that_would_not_scale_up_leaves_no_trace(router: tuple[str, RouterMetrics]) -> None:
    url, metrics = router
    cluster = Cluster(replicas=6, router_url=url)
    control = controller(cluster, Engines(replace(CALM, pods=6)))
    metrics.in_flight.set(8)
    control.tick()
    history = control.histories[("prod", "chat")]
    metrics.in_flight.set(20)  # 2 more per ready replica: woken, yet 6 replicas carry 20 with ease
    assert control.woken()
    assert control.wake(control.woken()) == []
    assert cluster.scaled_to == []
    assert control.histories[("prod", "chat")] is history  # the peak it saw holds nothing up later


def test_a_second_burst_starts_from_what_the_first_asked_for(
    router: tuple[str, RouterMetrics],
) -> None:
    url, metrics = router
    cluster = Cluster(replicas=2, router_url=url)
    control = controller(cluster, Engines(CALM))
    metrics.in_flight.set(8)
    control.tick()
    metrics.in_flight.set(60)  # 60 / 16 / 0.6: 7 replicas
    control.wake(control.woken())
    metrics.in_flight.set(40)  # lower than the first burst, yet 2 per ready replica over 8 counted...
    control.routed = [replace(view, in_flight=8.0) for view in control.routed]  # ...as if counted so
    control.wake(control.woken())
    assert cluster.scaled_to == [7]  # never down to 5 from a view that still says 2 replicas


def test_requests_held_at_zero_wake_the_deployment(router: tuple[str, RouterMetrics]) -> None:
    url, metrics = router
    cluster = Cluster(replicas=0, router_url=url)
    control = controller(cluster, Engines(None))  # at zero no engine has series
    control.tick()
    assert cluster.scaled_to == [] and not control.woken()
    metrics.held.set(1)
    assert control.woken()
    control.tick()
    assert cluster.scaled_to == [1]


def test_routers_that_do_not_answer_leave_the_engines_series_to_decide() -> None:
    cluster = Cluster(replicas=2, router_url="http://127.0.0.1:9/metrics")
    control = controller(cluster, Engines(CALM))
    control.tick()
    assert cluster.scaled_to == [] and not control.woken()
