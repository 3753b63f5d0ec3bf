"""Reliability-suite fixtures: the integration fixtures (API clients, a fresh namespace) and the
session's report, printed as a table at the end of the run.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import apps_v1, batch_v1, core_v1, namespace
from tests.reliability.report import REPORT, Report

__all__ = ["apps_v1", "batch_v1", "core_v1", "namespace", "reliability_report"]


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
