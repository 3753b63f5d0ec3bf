"""The pytest side of the local cluster: a session fixture that starts one and proves it stopped.

Import the fixture into a conftest.py to use it (tests/conftest.py does):

    from kiln.local.testing import local_cluster  # noqa: F401

Tests that take `local_cluster` must be marked `@pytest.mark.cluster`. Its nodes are KWOK's: pods
are scheduled and reported Running, but nothing runs; e2e/ runs pods on a real node.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kiln.local import build, cluster

T = TypeVar("T")

TOPOLOGY_ENV = "KILN_TEST_TOPOLOGY"  # topology of the test cluster (default: mixed)
CRDS_ENV = "KILN_TEST_CRDS"  # folder of CRDs to install (default: Kiln's crds/)


@dataclass
class LocalCluster:
    """A running test cluster: where it lives, its kubeconfig, and a client for it."""

    directory: Path
    kubeconfig: Path
    state: cluster.State
    crds: Path  # the folder whose CRDs were installed
    api_client: Any  # kubernetes.client.ApiClient bound to this cluster's kubeconfig


def wait_for(check: Callable[[], T | None], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; return that, or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def local_cluster(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[LocalCluster]:
    """A fresh local control plane for the session, in its own folder on its own ports.

    Sets KUBECONFIG for the session (so kubectl, helm and kopf find it) and restores it after.
    Teardown stops every component and fails if any process survived.
    """
    from kubernetes import config as kube_config

    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")

    def report(line: str) -> None:  # shown even while pytest captures output
        if reporter is not None:
            reporter.write_line(f"[kiln local] {line}")

    if build.missing(build.bin_dir()):
        build.build(progress=report)
    directory = tmp_path_factory.mktemp("kiln-local")
    crds = os.environ.get(CRDS_ENV)
    local = cluster.Cluster(
        directory, os.environ.get(TOPOLOGY_ENV, "mixed"), Path(crds) if crds else None, die_with_parent=True
    )
    started = time.monotonic()
    state = local.start(progress=lambda line: None)
    report(f"cluster up in {time.monotonic() - started:.1f} s: KUBECONFIG={local.kubeconfig}")
    previous = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(local.kubeconfig)
    api_client = kube_config.new_client_from_config(config_file=str(local.kubeconfig))
    try:
        yield LocalCluster(directory, local.kubeconfig, state, local.crds, api_client)
    finally:
        api_client.close()
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous
        local.stop()
        survivors = [name for name, is_alive in cluster.alive(state).items() if is_alive]
        assert not survivors, f"local cluster processes survived teardown: {survivors}"
