"""Two autoscaler replicas elect one leader over a real Lease; the other takes over when it stops renewing."""

from __future__ import annotations

import pytest
from kubernetes import client

from kiln.common.leader import LeaseElector
from kiln.local.testing import LocalCluster

pytestmark = pytest.mark.cluster


class Clock:
    """A clock the test moves, so lease expiry needs no sleeping."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_one_leader_at_a_time_takeover_after_expiry_and_release(
    local_cluster: LocalCluster, namespace: str
) -> None:
    import time

    clock = Clock(time.time())
    a = LeaseElector(
        local_cluster.api_client, namespace, "kiln-autoscaler", "a", lease_duration_s=15, clock=clock
    )
    b = LeaseElector(
        local_cluster.api_client, namespace, "kiln-autoscaler", "b", lease_duration_s=15, clock=clock
    )

    assert a.try_acquire_or_renew()  # creates the Lease
    assert not b.try_acquire_or_renew()  # held and fresh
    assert a.is_leader and not b.is_leader

    clock.now += 5
    assert a.try_acquire_or_renew()  # renews
    clock.now += 10
    assert not b.try_acquire_or_renew()  # 10 s after the renewal: still a's

    clock.now += 20  # a stopped renewing 30 s ago: expired
    assert not a.is_leader
    assert b.try_acquire_or_renew()
    lease = client.CoordinationV1Api(local_cluster.api_client).read_namespaced_lease(
        "kiln-autoscaler", namespace
    )
    assert lease.spec.holder_identity == "b"
    assert lease.spec.lease_transitions == 1
    assert not a.try_acquire_or_renew()

    b.release()  # shutting down: a takes over at once, without waiting for expiry
    assert a.try_acquire_or_renew()
    lease = client.CoordinationV1Api(local_cluster.api_client).read_namespaced_lease(
        "kiln-autoscaler", namespace
    )
    assert lease.spec.holder_identity == "a"


def test_a_stale_write_loses_the_round(local_cluster: LocalCluster, namespace: str) -> None:
    """What the elector relies on: a write with a resourceVersion someone else moved on is refused (409)."""
    coordination = client.CoordinationV1Api(local_cluster.api_client)
    a = LeaseElector(local_cluster.api_client, namespace, "race", "a")
    b = LeaseElector(local_cluster.api_client, namespace, "race", "b")
    assert a.try_acquire_or_renew()
    stale = coordination.read_namespaced_lease("race", namespace)
    assert a.try_acquire_or_renew()  # a renews: resourceVersion moves on
    assert stale.spec is not None
    stale.spec.holder_identity = "b"
    with pytest.raises(client.ApiException) as error:
        coordination.replace_namespaced_lease("race", namespace, stale)
    assert error.value.status == 409
    assert not b.try_acquire_or_renew()
