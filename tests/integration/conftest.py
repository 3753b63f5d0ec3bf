"""Integration-test fixtures: a kubernetes client per API group, bound to the session's local cluster."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client

from kiln.local.testing import LocalCluster


@pytest.fixture
def core_v1(local_cluster: LocalCluster) -> client.CoreV1Api:
    return client.CoreV1Api(local_cluster.api_client)


@pytest.fixture
def apps_v1(local_cluster: LocalCluster) -> client.AppsV1Api:
    return client.AppsV1Api(local_cluster.api_client)


@pytest.fixture
def batch_v1(local_cluster: LocalCluster) -> client.BatchV1Api:
    return client.BatchV1Api(local_cluster.api_client)


@pytest.fixture
def namespace(core_v1: client.CoreV1Api) -> Iterator[str]:
    """A fresh namespace (with its default service account ready), deleted after the test."""
    from kiln.local.testing import wait_for

    name = f"test-{uuid.uuid4().hex[:8]}"
    core_v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_for(
        lambda: any(
            sa.metadata.name == "default" for sa in core_v1.list_namespaced_service_account(name).items
        ),
        what=f"the default service account in {name}",
    )
    yield name
    core_v1.delete_namespace(name)
