"""The control loop: for each LLMDeployment with autoscaling, read signals, decide, scale, report.

One pass (`Controller.tick`) is level-based and idempotent: it reads every deployment afresh, runs
the pure policy with the history kept in memory, applies `spec.replicas` only when the count changes,
merge-patches the decision into status, emits an Event on a change, and updates its metrics. A
new leader starts with a history that holds the current count for the scale-down window, so a
failover never scales down on an empty memory.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import httpx

from kiln_autoscaler.data import DEFAULT_TUNING, Decision, History, Signals, Tuning, capacity_for
from kiln_autoscaler.kube import Kube, Scaled, decision_status
from kiln_autoscaler.metrics import AutoscalerMetrics
from kiln_autoscaler.policy import decide, router_burst, with_router_in_flight
from kiln_autoscaler.sources import RouterLoad, router_load

log = logging.getLogger(__name__)


class SignalSource(Protocol):
    """Prometheus or direct pod scraping (kiln_autoscaler.sources)."""

    def read(self, namespace: str, deployment: str, pods: Sequence[str] = ()) -> Signals | None: ...


@dataclass(frozen=True)
class RoutedView:
    """A routed deployment as the last pass left it."""

    scaled: Scaled
    desired: int  # the replicas that pass asked for
    in_flight: float  # requests in flight that pass counted (the routers' count where higher)
    router_urls: tuple[str, ...] = ()  # the routers that pass found (listed once per pass, not per wake)

    @staticmethod
    def after(scaled: Scaled, outcome: Outcome) -> RoutedView:
        """The view once `outcome`'s pass has scaled: a later woken pass starts from its count."""
        counted = 0.0 if outcome.signals is None else outcome.signals.in_flight
        desired = outcome.decision.desired
        scaled = replace(scaled, replicas=replace(scaled.replicas, current=desired))
        return RoutedView(scaled, desired, counted, outcome.router_urls)


@dataclass(frozen=True)
class Outcome:
    """What one pass did for one deployment."""

    namespace: str
    name: str
    current: int
    decision: Decision
    signals: Signals | None
    router_urls: tuple[str, ...] = ()  # the ready routers' /metrics, asked between passes


def event_reason(current: int, desired: int) -> str:
    """The Event reason for a change of replicas."""
    if desired == 0:
        return "ScaledToZero"
    if current == 0:
        return "ScaledFromZero"
    return "ScaledUp" if desired > current else "ScaledDown"


class Controller:
    """Runs the policy over every autoscaled LLMDeployment once per `tick`."""

    def __init__(
        self,
        kube: Kube,
        source: SignalSource,
        metrics: AutoscalerMetrics | None = None,
        tuning: Tuning = DEFAULT_TUNING,
        namespaces: Sequence[str] = (),
        pod_port: int | str = "http",
        scrape_pods: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kube = kube
        self.source = source
        self.metrics = metrics or AutoscalerMetrics()
        self.tuning = tuning
        self.namespaces = list(namespaces)
        self.pod_port = pod_port
        self.scrape_pods = scrape_pods
        self.clock = clock
        self.histories: dict[tuple[str, str], History] = {}
        self.last_pass: float | None = None
        self.router_client = httpx.Client(timeout=2.0)
        # Routed deployments as the last pass left them: `woken` asks their routers between passes.
        self.routed: list[RoutedView] = []

    def tick(self) -> list[Outcome]:
        """One pass over all deployments; errors on one deployment do not stop the others."""
        started = self.clock()
        try:
            deployments = self.kube.list_scaled(self.namespaces)
        except Exception as error:
            self.metrics.errors.labels("list").inc()
            log.warning("listing LLMDeployments failed: %s", error)
            return []
        outcomes: list[Outcome] = []
        seen = set()
        routed = []
        for scaled in deployments:
            seen.add((scaled.namespace, scaled.name))
            outcome = self._reconcile_or_log(scaled)
            if outcome is None:
                continue
            outcomes.append(outcome)
            if scaled.routed:
                routed.append(RoutedView.after(scaled, outcome))
        self.routed = routed
        for key in set(self.histories) - seen:
            del self.histories[key]
            self.metrics.forget(*key)
        self.last_pass = self.clock()
        self.metrics.loop_seconds.observe(self.last_pass - started)
        return outcomes

    def router_urls(self, scaled: Scaled) -> tuple[str, ...]:
        """The /metrics URLs of the deployment's ready routers (none without routers)."""
        if not scaled.routed:
            return ()
        return tuple(self.kube.pod_metrics_urls(scaled.namespace, scaled.router_selector, self.pod_port))

    def woken(self) -> list[Scaled]:
        """Between passes: the routed deployments that need a pass now rather than at the next
        interval: left at zero, their routers hold requests; running, their routers have taken a
        burst's worth of requests per ready replica more than the last pass counted (engine series
        show them only after a scrape interval and a rate window)."""
        woken = []
        for view in self.routed:
            load = self._routers_now(view.scaled, view.router_urls)  # the pass's list: no API call
            ready = view.scaled.replicas.ready
            if (view.desired == 0 and load.held > 0) or (
                view.desired > 0 and router_burst(load.in_flight, view.in_flight, ready, self.tuning)
            ):
                woken.append(view.scaled)
        return woken

    def wake(self, woken: Sequence[Scaled]) -> list[Outcome]:
        """A pass for each woken deployment that acts only to scale up (`reconcile`'s `up_only`);
        the regular passes keep their interval."""
        outcomes = []
        for scaled in woken:
            outcome = self._reconcile_or_log(scaled, up_only=True)
            if outcome is not None:
                outcomes.append(outcome)
                self.routed = [
                    RoutedView.after(scaled, outcome) if view.scaled.uid == scaled.uid else view
                    for view in self.routed
                ]
        return outcomes

    def _reconcile_or_log(self, scaled: Scaled, up_only: bool = False) -> Outcome | None:
        """`reconcile` now; None when it failed (counted and logged: the others go on) or, woken,
        it did not scale up."""
        try:
            return self.reconcile(scaled, self.clock(), up_only=up_only)
        except Exception as error:
            self.metrics.errors.labels("reconcile").inc()
            log.warning("autoscaling %s/%s failed: %s", scaled.namespace, scaled.name, error)
            return None

    def _routers_now(self, scaled: Scaled, urls: Sequence[str]) -> RouterLoad:
        """What the deployment's routers at `urls` hold, or nothing when they cannot be asked."""
        try:
            return router_load(self.router_client, urls)
        except Exception as error:  # the engines' series still decide; the next pass asks again
            self.metrics.errors.labels("signals").inc()
            log.warning("asking the routers of %s/%s failed: %s", scaled.namespace, scaled.name, error)
            return RouterLoad()

    def _router_urls_now(self, scaled: Scaled) -> tuple[str, ...]:
        """`router_urls`, or none when the router pods cannot be listed."""
        try:
            return self.router_urls(scaled)
        except Exception as error:  # as above: the engines' series decide this pass
            self.metrics.errors.labels("signals").inc()
            log.warning("listing the routers of %s/%s failed: %s", scaled.namespace, scaled.name, error)
            return ()

    def reconcile(self, scaled: Scaled, now: float, up_only: bool = False) -> Outcome | None:
        """Decide and act for one deployment. `up_only` (a pass the routers woke): act only when
        the decision scales up, and otherwise leave no trace (None). Such a pass runs when the
        routers' count peaks; recorded, its samples would bias the scale-down window's highest
        recommendation and the arrival-rate estimate upward (docs/autoscaler.md measures it)."""
        key = (scaled.namespace, scaled.name)
        current = scaled.replicas.current
        history = self.histories.get(key)
        if history is None:
            history = History(recommendations=((now, current),), last_active=now)
        capacity = capacity_for(self.kube.capacity(scaled.namespace, scaled.engine), scaled.targets)
        pods: list[str] = []
        if self.scrape_pods:
            pods = self.kube.pod_metrics_urls(scaled.namespace, scaled.selector, self.pod_port)
        try:
            signals = self.source.read(scaled.namespace, scaled.name, pods)
        except Exception as error:
            self.metrics.errors.labels("signals").inc()
            log.warning("reading signals of %s/%s failed: %s", scaled.namespace, scaled.name, error)
            signals = None
        router_urls = self._router_urls_now(scaled)
        load = self._routers_now(scaled, router_urls)
        held = load.held if current == 0 else 0
        if signals is not None and current > 0:
            signals = with_router_in_flight(signals, load.in_flight)
        decision = decide(
            scaled.targets, signals, scaled.replicas, capacity, history, now, self.tuning, held=held
        )
        if up_only and decision.desired <= current:
            return None
        self.histories[key] = history.record(now, decision, signals, current)

        stamp = dt.datetime.fromtimestamp(now, dt.UTC)
        if decision.desired != current:
            self.kube.scale(scaled.namespace, scaled.name, decision.desired, scaled.uid)
            message = f"{current} -> {decision.desired}: {decision.reason}"
            log.info("%s/%s %s", scaled.namespace, scaled.name, message)
            try:
                self.kube.event(scaled, event_reason(current, decision.desired), message, stamp)
            except Exception as error:  # an event is best effort; the scale already happened
                self.metrics.errors.labels("event").inc()
                log.warning("event for %s/%s failed: %s", scaled.namespace, scaled.name, error)
        try:
            self.kube.write_status(
                scaled.namespace, scaled.name, decision_status(decision, current, signals, stamp)
            )
        except Exception as error:
            self.metrics.errors.labels("status").inc()
            log.warning("status of %s/%s failed: %s", scaled.namespace, scaled.name, error)

        labels = (scaled.namespace, scaled.name)
        direction = (
            "none" if decision.desired == current else ("up" if decision.desired > current else "down")
        )
        self.metrics.decisions.labels(*labels, direction).inc()
        self.metrics.desired.labels(*labels).set(decision.desired)
        self.metrics.signal_age.labels(*labels).set(
            math.inf if signals is None else now - signals.observed_at
        )
        if signals is not None:
            for quantile, value in (
                ("0.5", signals.ttft_p50_s),
                ("0.9", signals.ttft_p90_s),
                ("0.95", signals.ttft_p95_s),
            ):
                if value is not None:
                    self.metrics.observed_ttft.labels(*labels, quantile).set(value)
        return Outcome(scaled.namespace, scaled.name, current, decision, signals, router_urls)
