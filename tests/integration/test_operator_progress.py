"""Build progress on the process node: a real `kiln-engine build` of examples/tiny-chat, read by the
operator from the build pod's log tail, shows in LLMEngine status (and events) before Ready.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kiln import paths
from kiln.local.testing import LocalCluster, ProcessNode, running_process_node, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

GROUP, VERSION = "kiln.dev", "v1alpha1"
NODE = "process-node-progress"
ON_PROCESS_NODE = {"kiln.dev/process-node": "true"}


@pytest.fixture(scope="module")
def process_node(
    local_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessNode]:
    with running_process_node(local_cluster, tmp_path_factory.mktemp("process-node"), name=NODE) as node:
        yield node


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def operator_log(local_cluster: LocalCluster, tmp_path: Path) -> Iterator[Path]:
    """`kiln operator run` polling running builds every second."""
    log_path = tmp_path / "operator.log"
    health = free_port()
    command = [
        str(Path(sys.executable).parent / "kiln"), "operator", "run", "--all-namespaces",
        f"--health-port={health}", f"--metrics-port={free_port()}", "--log-format=plain",
        "--build-poll-seconds=1",
    ]  # fmt: skip
    env = {**os.environ, "KUBECONFIG": str(local_cluster.kubeconfig)}
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def healthy() -> bool:
        assert process.poll() is None, log_path.read_text(errors="replace")[-4000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 30, "the operator's /healthz")
        yield log_path
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        print(f"--- operator log (tail) ---\n{log_path.read_text(errors='replace')[-6000:]}")


def host_claim(core: client.CoreV1Api, namespace: str, claim: str, folder: Path) -> str:
    """A claim bound to a host folder (what the process node mounts for it)."""
    pv = f"{claim}-{uuid.uuid4().hex[:8]}"
    core.create_persistent_volume(
        {
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "hostPath": {"path": str(folder)},
                "storageClassName": "manual",
                "claimRef": {"namespace": namespace, "name": claim},
            },
        }
    )
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": claim},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "manual",
                "volumeName": pv,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    return pv


def tiny_chat(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMDeployment",
        "metadata": {"name": "tiny-chat", "namespace": namespace},
        "spec": {
            "model": {"source": "pvc://kiln-models/tiny-chat", "servedName": "tiny-chat"},
            "engine": {
                "backend": "torch",
                "quantization": "none",
                "maxBatchSize": 16,
                "maxSequenceLength": 512,
                "maxTokensPerStep": 512,
            },
            "replicas": 1,
            "serving": {"port": 8000, "nodeSelector": ON_PROCESS_NODE, "terminationGracePeriodSeconds": 5},
            "build": {
                "cache": "pvc://kiln-engine-cache",
                "nodeSelector": ON_PROCESS_NODE,
                "timeoutSeconds": 600,
            },
        },
    }


def test_build_progress_shows_in_engine_status_before_ready(
    local_cluster: LocalCluster,
    process_node: ProcessNode,
    operator_log: Path,
    core_v1: client.CoreV1Api,
    namespace: str,
    tmp_path: Path,
) -> None:
    pytest.importorskip("torch")
    root = paths.repo_root()
    assert root is not None
    volumes = [host_claim(core_v1, namespace, "kiln-models", root / "examples")]
    cache = tmp_path / "engine-cache"
    cache.mkdir()
    volumes.append(host_claim(core_v1, namespace, "kiln-engine-cache", cache))
    try:
        watch_build(local_cluster, core_v1, namespace)
    finally:
        for pv in volumes:
            core_v1.delete_persistent_volume(pv)


def watch_build(local_cluster: LocalCluster, core_v1: client.CoreV1Api, namespace: str) -> None:
    """Deploy tiny-chat and follow its LLMEngine's status until Ready, every 0.3 s."""
    custom = client.CustomObjectsApi(local_cluster.api_client)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "llmdeployments", tiny_chat(namespace))

    seen: list[tuple[str | None, int | None, str | None]] = []  # (phase, progress, step), in order
    deadline = time.monotonic() + 480
    phase = None
    while time.monotonic() < deadline and phase not in ("Ready", "Failed"):
        engines = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "llmengines")["items"]
        if engines:
            status = engines[0].get("status") or {}
            phase = status.get("phase")
            observed = (phase, status.get("progress"), status.get("step"))
            if not seen or seen[-1] != observed:
                seen.append(observed)
        time.sleep(0.3)
    assert phase == "Ready", f"engine did not become Ready; statuses seen: {seen}"
    intermediate = [p for ph, p, _ in seen if ph == "Building" and p is not None and 0 < p < 100]
    assert intermediate, f"no progress strictly between 0 and 100 before Ready; statuses seen: {seen}"
    assert any(step for ph, _, step in seen if ph == "Building"), seen
    reasons = [e.reason for e in core_v1.list_namespaced_event(namespace).items]
    assert "BuildProgress" in reasons, reasons
    print(f"statuses seen: {seen}")
