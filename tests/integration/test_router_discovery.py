"""The router's replica discovery against a real API server: the ready endpoints of a Service's
EndpointSlices, followed through creation, a readiness change, a second slice and deletion."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from kubernetes import client

from kiln.local.testing import LocalCluster
from kiln_router.discovery import SERVICE_NAME_LABEL, EndpointSliceWatch

pytestmark = pytest.mark.cluster

SERVICE = "tiny-engines"


class Seen:
    """The endpoint sets the watch reported, latest last."""

    def __init__(self) -> None:
        self.sets: list[set[str]] = []
        self.changed = threading.Condition()

    def __call__(self, urls: set[str]) -> None:
        with self.changed:
            self.sets.append(urls)
            self.changed.notify_all()

    def wait_for(self, expected: set[str], seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        with self.changed:
            while not self.sets or self.sets[-1] != expected:
                left = deadline - time.monotonic()
                assert left > 0, f"the watch saw {self.sets[-3:]}, not {expected}"
                self.changed.wait(left)


def endpoint_slice(name: str, addresses: dict[str, bool], service: str = SERVICE) -> client.V1EndpointSlice:
    return client.V1EndpointSlice(
        metadata=client.V1ObjectMeta(name=name, labels={SERVICE_NAME_LABEL: service}),
        address_type="IPv4",
        ports=[client.DiscoveryV1EndpointPort(name="http", port=8000, protocol="TCP")],
        endpoints=[
            client.V1Endpoint(addresses=[a], conditions=client.V1EndpointConditions(ready=ready))
            for a, ready in addresses.items()
        ],
    )


@pytest.fixture
def discovery(local_cluster: LocalCluster, namespace: str) -> Iterator[tuple[client.DiscoveryV1Api, Seen]]:
    seen = Seen()
    watch = EndpointSliceWatch(SERVICE, namespace, "http", seen, api_client=local_cluster.api_client)
    watch.start()
    yield client.DiscoveryV1Api(local_cluster.api_client), seen
    watch.stop()


def test_the_router_follows_the_ready_endpoints_of_its_service(discovery, namespace: str) -> None:
    api, seen = discovery
    seen.wait_for(set())  # nothing yet: the first list is empty
    api.create_namespaced_endpoint_slice(
        namespace, endpoint_slice("a", {"10.1.0.1": True, "10.1.0.2": False})
    )
    api.create_namespaced_endpoint_slice(namespace, endpoint_slice("other", {"10.9.0.1": True}, service="x"))
    seen.wait_for({"http://10.1.0.1:8000"})
    api.replace_namespaced_endpoint_slice(
        "a", namespace, endpoint_slice("a", {"10.1.0.1": True, "10.1.0.2": True})
    )
    seen.wait_for({"http://10.1.0.1:8000", "http://10.1.0.2:8000"})
    api.create_namespaced_endpoint_slice(namespace, endpoint_slice("b", {"10.1.0.3": True}))
    seen.wait_for({"http://10.1.0.1:8000", "http://10.1.0.2:8000", "http://10.1.0.3:8000"})
    api.delete_namespaced_endpoint_slice("a", namespace)
    seen.wait_for({"http://10.1.0.3:8000"})
