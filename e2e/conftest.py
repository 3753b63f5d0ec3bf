"""e2e fixtures: one local cluster per session with the process node, the demo volumes and Kiln.

The stack is `kiln.demo.stack.Stack`, the same one `kiln demo` drives, in a pytest temp folder on
its own ports. Teardown stops every process it started and fails if any survived.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from kiln.demo.kube import Kubectl
from kiln.demo.stack import Stack

# Where the operator and autoscaler run: auto (the chart's pods, else local subprocesses), chart, local.
CONTROLLERS_ENV = "KILN_E2E_CONTROLLERS"
# Unused LLMEngines are deleted this soon, so the delete scenario can see them go.
ENGINE_RETENTION_SECONDS = 5.0


@pytest.fixture(scope="session")
def kiln_stack(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Stack]:
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")

    def report(line: str) -> None:  # shown even while pytest captures output
        if reporter is not None:
            reporter.write_line(f"[kiln e2e] {line}")

    stack = Stack(
        tmp_path_factory.mktemp("kiln-e2e"),
        lambda line: None,
        die_with_parent=True,
        autoscaler_interval=3.0,
        engine_retention=ENGINE_RETENTION_SECONDS,
    )
    started = time.monotonic()
    try:
        stack.build_binaries()
        stack.start_cluster()
        stack.start_process_node()
        stack.create_volumes()
        mode = stack.install_kiln(os.environ.get(CONTROLLERS_ENV, "auto"))  # type: ignore[arg-type]
        report(
            f"cluster + process node + Kiln ({mode}) up in {time.monotonic() - started:.0f} s: "
            f"KUBECONFIG={stack.kubeconfig}"
        )
        yield stack
    except BaseException:
        report(stack.log_tails())
        raise
    finally:
        leftovers = stack.stop()
        assert not leftovers, f"processes outlived the e2e teardown: {leftovers}"


@pytest.fixture(scope="session")
def kubectl(kiln_stack: Stack) -> Kubectl:
    return kiln_stack.kubectl
