"""The policies Kiln's is compared with: HPA-style scaling on concurrency, and static provisioning.

Both have the same call signature as `kiln_autoscaler.policy.decide`, so the simulator runs any of
them on the same signals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from kiln_autoscaler.data import (
    DEFAULT_TUNING,
    Capacity,
    Decision,
    History,
    Replicas,
    Signals,
    Targets,
    Tuning,
)
from kiln_autoscaler.policy import decide, is_fresh


class Policy(Protocol):
    """Anything that turns the autoscaler's inputs into a decision."""

    @property
    def name(self) -> str:
        """Short name for tables."""
        ...

    def __call__(
        self,
        targets: Targets,
        signals: Signals | None,
        replicas: Replicas,
        capacity: Capacity,
        history: History,
        now: float,
    ) -> Decision: ...


@dataclass(frozen=True)
class KilnPolicy:
    """Kiln's policy (`kiln_autoscaler.policy.decide`) with fixed tuning."""

    tuning: Tuning = DEFAULT_TUNING
    name: str = "kiln"
    # Routed (Kiln routers in front): the simulator reads the routers' in-flight count this often
    # between passes and on a burst runs a pass at once that only scales up, as the controller's
    # `woken` and `wake` do.
    router_wake_s: float | None = None

    def __call__(
        self,
        targets: Targets,
        signals: Signals | None,
        replicas: Replicas,
        capacity: Capacity,
        history: History,
        now: float,
    ) -> Decision:
        return decide(targets, signals, replicas, capacity, history, now, self.tuning)


@dataclass(frozen=True)
class HpaConcurrencyPolicy:
    """The Kubernetes HPA algorithm on a per-pod concurrency metric (requests in flight: running + waiting).

    desired = ceil(ready * metric / target), skipped inside a 10% tolerance; scale-up limited to
    max(+100%, +4 pods) per period with no stabilization; scale-down takes the highest
    recommendation of the last 5 minutes (the HPA v2 defaults). Missing metrics hold.
    """

    target_in_flight_per_replica: float
    tolerance: float = 0.1
    scale_down_window_s: float = 300.0
    scale_up_step_min: int = 4
    scale_up_step_ratio: float = 1.0
    stale_after_s: float = 90.0
    name: str = "hpa-concurrency"

    def __call__(
        self,
        targets: Targets,
        signals: Signals | None,
        replicas: Replicas,
        capacity: Capacity,
        history: History,
        now: float,
    ) -> Decision:
        current = replicas.current
        low, high = max(targets.min_replicas, 1), max(targets.max_replicas, targets.min_replicas, 1)
        tuning = Tuning(stale_after_s=self.stale_after_s)
        if signals is None or not is_fresh(signals, now, tuning) or replicas.ready == 0:
            held = max(low, min(high, current))
            return Decision(held, "hpa: no metrics, holding", held)
        per_pod = signals.in_flight / replicas.ready
        ratio = per_pod / self.target_in_flight_per_replica
        within = abs(ratio - 1.0) <= self.tolerance
        raw = current if within else math.ceil(replicas.ready * ratio - 1e-9)
        recommendation = max(low, min(high, raw))
        reason = f"hpa: {per_pod:.1f} in flight per pod vs target {self.target_in_flight_per_replica:.1f}"
        if recommendation > current:
            step = max(self.scale_up_step_min, math.ceil(current * self.scale_up_step_ratio))
            return Decision(min(recommendation, current + step), reason, recommendation)
        if recommendation < current:
            window = [r for t, r in history.recommendations if now - t < self.scale_down_window_s]
            return Decision(min(current, max([*window, recommendation])), reason, recommendation)
        return Decision(current, reason, recommendation)


@dataclass(frozen=True)
class StaticPolicy:
    """A fixed replica count (static provisioning for the peak)."""

    replicas: int
    name: str = "static-peak"

    def __call__(
        self,
        targets: Targets,
        signals: Signals | None,
        replicas: Replicas,
        capacity: Capacity,
        history: History,
        now: float,
    ) -> Decision:
        return Decision(self.replicas, f"static: {self.replicas}", self.replicas)
