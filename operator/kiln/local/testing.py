"""The pytest side of the local cluster: a session fixture that starts one and proves it stopped.

Import the fixture into a conftest.py to use it (tests/conftest.py does):

    from kiln.local.testing import local_cluster  # noqa: F401

Tests that take `local_cluster` must be marked `@pytest.mark.cluster`. `process_node` (and the
`running_process_node` context manager) add a process node whose pods run as local processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
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


@dataclass
class ProcessNode:
    """A running `kiln process-node` agent: its Node's name, state folder and log."""

    name: str
    state_dir: Path
    log: Path
    pid: int

    def pod_log(self, namespace: str, pod: str, container: str) -> Path:
        return self.state_dir / "pods" / f"{namespace}_{pod}" / f"{container}.log"


def _processes_under(folder: Path) -> list[int]:
    """Pids whose working directory lies in `folder` (pods' processes start in their pod folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = Path(os.readlink(entry / "cwd"))
            except OSError:
                continue
            if cwd == folder or folder in cwd.parents:
                found.append(int(entry.name))
    return found


@contextlib.contextmanager
def running_process_node(
    local: LocalCluster,
    directory: Path,
    name: str = "kiln-process-node",
    extra_args: tuple[str, ...] = (),
    delete_node: bool = True,
) -> Iterator[ProcessNode]:
    """Start `kiln process-node` against `local` for a `with` block; stop it and delete its Node after
    (unless `delete_node` is False: a later agent of the same name and folder resumes its pods).

    Teardown fails if the agent does not exit cleanly on SIGTERM or leaves a process behind.
    """
    from kubernetes import client as kube_client

    core = kube_client.CoreV1Api(local.api_client)
    state_dir = directory / "state"
    log = directory / "process-node.log"
    command = [
        sys.executable,
        "-m",
        "kiln.processnode",
        f"--kubeconfig={local.kubeconfig}",
        f"--name={name}",
        f"--state-dir={state_dir}",
        "--backoff=1",
        *extra_args,
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=cluster._kill_me_with_parent,
        )

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"kiln process-node exited ({process.returncode}):\n{cluster.log_tail(log)}")
        try:
            node = core.read_node(name)
        except kube_client.ApiException:
            return False
        conditions = (node.status.conditions if node.status else None) or []
        return any(c.type == "Ready" and c.status == "True" for c in conditions)

    try:
        wait_for(ready, 60, f"node {name} to become Ready")
        yield ProcessNode(name, state_dir, log, process.pid)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
        if delete_node:
            with contextlib.suppress(kube_client.ApiException):
                core.delete_node(name)
        survivors = _processes_under(state_dir)
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert code == 0, f"kiln process-node exited with {code}:\n{cluster.log_tail(log)}"
        assert not survivors, f"processes of the process node's pods survived its exit: {survivors}"


@pytest.fixture(scope="session")
def process_node(
    local_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessNode]:
    """A process node (`kiln process-node`) on the session's local cluster; stopped after the session.

    Import it next to `local_cluster` in a conftest.py (or a test module) to use it.
    """
    with running_process_node(local_cluster, tmp_path_factory.mktemp("process-node")) as node:
        yield node
