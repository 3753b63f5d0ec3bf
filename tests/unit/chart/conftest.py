"""Fixtures for the chart tests: the local toolchain's helm."""

from __future__ import annotations

import pytest
from kiln_chart import Helm, find_helm


@pytest.fixture(scope="session")
def helm() -> Helm:
    path, reason = find_helm()
    if path is None:
        pytest.skip(reason)
    return Helm(path)
