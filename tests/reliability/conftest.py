"""Reliability-suite fixtures: the integration fixtures (API clients, a fresh namespace) and the
session's report, printed as a table at the end of the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from kiln.local.testing import LocalCluster
from tests.integration.conftest import apps_v1, batch_v1, core_v1, namespace
from tests.integration.test_operator import Operator
from tests.reliability.report import REPORT, Report

__all__ = ["apps_v1", "batch_v1", "core_v1", "custom", "namespace", "operator", "reliability_report"]


@pytest.fixture
def operator(local_cluster: LocalCluster, tmp_path: Path) -> Iterator[Operator]:
    """`kiln operator run --all-namespaces` as a subprocess (the integration tests' harness)."""
    running = Operator(local_cluster.kubeconfig, tmp_path / "operator.log")
    running.start()
    try:
        yield running
    finally:
        running.stop()
        print(f"--- operator log (tail) ---\n{running.log()}")


@pytest.fixture
def custom(local_cluster: LocalCluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(local_cluster.api_client)


@pytest.fixture(scope="session")
def reliability_report() -> Report:
    """Where each scenario records what it tried and what was lost."""
    return REPORT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if not REPORT.rows:
        return
    terminalreporter.section("reliability: what was tried, what was lost")
    for line in REPORT.table().splitlines():
        terminalreporter.write_line(line)
    path = REPORT.write(config.rootpath)
    terminalreporter.write_line(f"(written to {path})")
