"""e2e fixtures: one local cluster per session with its real node, Kiln's images, the demo volumes
and Kiln installed from its chart, shared by every e2e module that takes `kiln_stack`.

The stack is `kiln.demo.stack.Stack`, the same one `kiln demo` drives, in a pytest temp folder.
Only one real node can run on a machine: run the e2e under `flock /tmp/kiln-real-node.lock`.
Teardown stops everything and fails if a container process survived it.

`kiln_images` builds the image archives with `kiln images build` once when one is missing (a fresh
machine); `e2e/test_images.py`'s `kiln images build --check` then finds them current.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.demo.kube import Kubectl
from kiln.demo.stack import Stack, build_images

# Unused LLMEngines are deleted this soon, so the delete scenario can see them go.
ENGINE_RETENTION_SECONDS = 5.0
# Seconds between the autoscaler's decisions (the chart's default is 15): the scenarios wait less.
AUTOSCALER_INTERVAL_SECONDS = 3.0


def _reporter(pytestconfig: pytest.Config) -> object:
    return pytestconfig.pluginmanager.get_plugin("terminalreporter")


@pytest.fixture(scope="session")
def kiln_images(pytestconfig: pytest.Config) -> list[Path]:
    """The image archives of this checkout's chart and operator, rebuilt from this checkout.

    Always `kiln images build`: an archive left by an earlier commit would run old code in the
    containers. A warm build redoes only the layers the checkout changed (tests/run.sh starts
    one in the background at the beginning; this one then waits for it and finds it done).
    """
    reporter = _reporter(pytestconfig)
    started = time.monotonic()
    archives = build_images(lambda line: None, always=True)
    if reporter is not None:
        reporter.write_line(f"[kiln e2e] kiln images build: {time.monotonic() - started:.0f} s")  # type: ignore[attr-defined]
    return archives


@pytest.fixture(scope="session")
def kiln_stack(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config, kiln_images: list[Path]
) -> Iterator[Stack]:
    reporter = _reporter(pytestconfig)

    def report(line: str) -> None:  # shown even while pytest captures output
        if reporter is not None:
            reporter.write_line(f"[kiln e2e] {line}")  # type: ignore[attr-defined]

    if os.geteuid() != 0:
        pytest.fail("the e2e cluster's real node needs root (containerd, network links)")
    stack = Stack(
        tmp_path_factory.mktemp("kiln-e2e"),
        lambda line: None,
        die_with_parent=True,
        autoscaler_interval=AUTOSCALER_INTERVAL_SECONDS,
        engine_retention=ENGINE_RETENTION_SECONDS,
    )
    started = time.monotonic()
    try:
        stack.build_binaries()
        stack.start_cluster()
        up = time.monotonic()
        imported = stack.import_images(kiln_images)
        imports = time.monotonic()
        stack.create_volumes()
        stack.install_kiln()
        report(
            f"cluster + real node {up - started:.0f} s, images imported {imports - up:.0f} s "
            f"({len(imported)} of {len(kiln_images) + 1}), Kiln from its chart "
            f"{time.monotonic() - imports:.0f} s: KUBECONFIG={stack.kubeconfig}"
        )
        yield stack
    except BaseException:
        report(stack.log_tails())
        raise
    finally:
        leftovers = stack.stop()
        assert not leftovers, f"container processes outlived the e2e teardown: {leftovers}"


@pytest.fixture(scope="session")
def kubectl(kiln_stack: Stack) -> Kubectl:
    return kiln_stack.kubectl
