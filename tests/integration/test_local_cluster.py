"""The local control plane schedules by GPU count, runs Jobs to completion or failure, and stops cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kiln import labels
from kiln.local import cluster, kwok
from kiln.local.testing import LocalCluster, wait_for
from kiln.local.topology import load_topology

pytestmark = pytest.mark.cluster

IMAGE = "registry.example/kiln/engine:test"  # never pulled: KWOK only pretends to run it


def gpu_pod_spec(gpus: int, **extra: Any) -> client.V1PodSpec:
    return client.V1PodSpec(
        containers=[
            client.V1Container(
                name="engine",
                image=IMAGE,
                resources=client.V1ResourceRequirements(
                    requests={labels.GPU_RESOURCE: str(gpus)}, limits={labels.GPU_RESOURCE: str(gpus)}
                ),
            )
        ],
        **extra,
    )


def job(name: str, annotations: dict[str, str] | None = None) -> client.V1Job:
    return client.V1Job(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1JobSpec(
            backoff_limit=0,
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(annotations=annotations or {}),
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    containers=[
                        client.V1Container(name="build", image=IMAGE, command=["kiln-engine", "build"])
                    ],
                ),
            ),
        ),
    )


def job_condition(batch_v1: client.BatchV1Api, namespace: str, name: str) -> str | None:
    """The type of the Job's first true terminal condition (Complete or Failed), if any."""
    status = batch_v1.read_namespaced_job_status(name, namespace).status
    for condition in status.conditions or []:
        if condition.type in ("Complete", "Failed") and condition.status == "True":
            return str(condition.type)
    return None


def test_nodes_follow_the_topology(local_cluster: LocalCluster, core_v1: client.CoreV1Api) -> None:
    expected = {node["metadata"]["name"]: node for node in load_topology(local_cluster.state.topology)}
    nodes = {node.metadata.name: node for node in core_v1.list_node().items}
    assert set(expected) <= set(nodes)
    for name, node in nodes.items():
        ready = [c.status for c in node.status.conditions or [] if c.type == "Ready"]
        assert ready == ["True"], f"{name} is not Ready"
        assert expected[name]["metadata"]["labels"].items() <= node.metadata.labels.items()
        gpus = expected[name]["status"]["capacity"].get(labels.GPU_RESOURCE)
        assert node.status.allocatable.get(labels.GPU_RESOURCE) == gpus
        if gpus:
            islands = json.loads(node.metadata.annotations[labels.NVLINK_ISLANDS])
            assert sum(len(island) for island in islands) == int(gpus)


def test_kwok_leaves_nodes_without_its_label_alone(core_v1: client.CoreV1Api) -> None:
    def node(name: str, node_labels: dict[str, str]) -> client.V1Node:
        return client.V1Node(metadata=client.V1ObjectMeta(name=name, labels=node_labels))

    suffix = uuid.uuid4().hex[:6]
    simulated, real = f"sim-{suffix}", f"real-{suffix}"
    core_v1.create_node(node(real, {labels.REAL_NODE_LABEL: "true"}))
    core_v1.create_node(node(simulated, {"type": "kwok"}))
    try:

        def ready(name: str) -> bool:
            conditions = core_v1.read_node_status(name).status.conditions or []
            return any(c.type == "Ready" and c.status == "True" for c in conditions)

        wait_for(lambda: ready(simulated), timeout=30, what=f"KWOK to mark {simulated} Ready")
        time.sleep(2)  # KWOK handles nodes as they come; give it time to (wrongly) take the other
        assert not ready(real)
        assert not core_v1.read_node_status(real).status.node_info.kubelet_version
    finally:
        core_v1.delete_node(real)
        core_v1.delete_node(simulated)


def test_eight_gpu_deployment_lands_only_on_eight_gpu_nodes(
    core_v1: client.CoreV1Api, apps_v1: client.AppsV1Api, namespace: str
) -> None:
    selector = {"app": "tp8"}
    deployment = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="tp8"),
        spec=client.V1DeploymentSpec(
            replicas=2,
            selector=client.V1LabelSelector(match_labels=selector),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=selector), spec=gpu_pod_spec(8)
            ),
        ),
    )
    apps_v1.create_namespaced_deployment(namespace, deployment)
    wait_for(
        lambda: (apps_v1.read_namespaced_deployment_status("tp8", namespace).status.ready_replicas or 0) == 2,
        timeout=60,
        what="2 ready replicas of an 8-GPU deployment",
    )
    pods = core_v1.list_namespaced_pod(namespace, label_selector="app=tp8").items
    assert len(pods) == 2
    for pod in pods:
        node = core_v1.read_node(pod.spec.node_name)
        assert node.metadata.labels[labels.GPU_COUNT] == "8", f"{pod.metadata.name} on {node.metadata.name}"
        assert node.status.allocatable[labels.GPU_RESOURCE] == "8"
        assert pod.status.phase == "Running"
        assert pod.status.pod_ip


def test_more_gpus_than_any_node_has_stays_pending(core_v1: client.CoreV1Api, namespace: str) -> None:
    pod = client.V1Pod(metadata=client.V1ObjectMeta(name="tp16"), spec=gpu_pod_spec(16))
    core_v1.create_namespaced_pod(namespace, pod)

    def unschedulable() -> str | None:
        status = core_v1.read_namespaced_pod_status("tp16", namespace).status
        for condition in status.conditions or []:
            if condition.type == "PodScheduled" and condition.reason == "Unschedulable":
                return str(condition.message)
        return None

    message = wait_for(unschedulable, timeout=30, what="the scheduler to reject a 16-GPU pod")
    assert f"Insufficient {labels.GPU_RESOURCE}" in message
    assert core_v1.read_namespaced_pod("tp16", namespace).spec.node_name is None


def test_job_completes(core_v1: client.CoreV1Api, batch_v1: client.BatchV1Api, namespace: str) -> None:
    batch_v1.create_namespaced_job(namespace, job("build-ok"))
    assert wait_for(lambda: job_condition(batch_v1, namespace, "build-ok"), timeout=60) == "Complete"
    (pod,) = core_v1.list_namespaced_pod(namespace, label_selector="job-name=build-ok").items
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0


def test_annotated_job_fails_with_exit_code_1(
    core_v1: client.CoreV1Api, batch_v1: client.BatchV1Api, namespace: str
) -> None:
    batch_v1.create_namespaced_job(namespace, job("build-bad", {kwok.SIMULATE_FAIL_ANNOTATION: "true"}))
    assert wait_for(lambda: job_condition(batch_v1, namespace, "build-bad"), timeout=60) == "Failed"
    (pod,) = core_v1.list_namespaced_pod(namespace, label_selector="job-name=build-bad").items
    assert pod.status.phase == "Failed"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 1


def test_annotated_serving_pod_crash_loops(
    core_v1: client.CoreV1Api, apps_v1: client.AppsV1Api, namespace: str
) -> None:
    selector = {"app": "crash"}
    deployment = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="crash"),
        spec=client.V1DeploymentSpec(
            replicas=1,
            selector=client.V1LabelSelector(match_labels=selector),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(
                    labels=selector, annotations={kwok.SIMULATE_FAIL_ANNOTATION: "true"}
                ),
                spec=gpu_pod_spec(1),
            ),
        ),
    )
    apps_v1.create_namespaced_deployment(namespace, deployment)

    def crash_looping() -> client.V1ContainerStatus | None:
        for pod in core_v1.list_namespaced_pod(namespace, label_selector="app=crash").items:
            for status in pod.status.container_statuses or []:
                if status.state.waiting and status.state.waiting.reason == "CrashLoopBackOff":
                    return status
        return None

    status = wait_for(crash_looping, timeout=60, what="a CrashLoopBackOff container")
    assert status.last_state.terminated.exit_code == 1
    assert not status.ready
    assert (apps_v1.read_namespaced_deployment_status("crash", namespace).status.ready_replicas or 0) == 0


def test_crds_are_installed(local_cluster: LocalCluster) -> None:
    files = sorted(local_cluster.crds.glob("*.yaml")) if local_cluster.crds.is_dir() else []
    names = {
        doc["metadata"]["name"]
        for path in files
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "CustomResourceDefinition"
    }
    if not names:
        pytest.skip(f"no CRDs in {local_cluster.crds}")
    api = client.ApiextensionsV1Api(local_cluster.api_client)
    served = {crd.metadata.name for crd in api.list_custom_resource_definition().items}
    assert names <= served


TINY_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.kiln.dev
spec:
  group: example.kiln.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {type: integer, minimum: 1}
"""


def test_crds_are_applied_idempotently_and_served(local_cluster: LocalCluster, tmp_path: Path) -> None:
    (tmp_path / "widgets.yaml").write_text(TINY_CRD)
    with cluster.admin_client(local_cluster.directory) as http:
        assert cluster.install_crds(http, local_cluster.state.server, tmp_path, timeout=30) == 1
        assert cluster.install_crds(http, local_cluster.state.server, tmp_path, timeout=30) == 1
    api = client.CustomObjectsApi(local_cluster.api_client)
    widget = {"apiVersion": "example.kiln.dev/v1", "kind": "Widget", "metadata": {"name": "w"}}
    try:
        api.create_namespaced_custom_object("example.kiln.dev", "v1", "default", "widgets", widget)
        with pytest.raises(client.ApiException) as invalid:
            bad = {**widget, "metadata": {"name": "bad"}, "spec": {"size": 0}}
            api.create_namespaced_custom_object("example.kiln.dev", "v1", "default", "widgets", bad)
        assert invalid.value.status == 422
    finally:
        client.ApiextensionsV1Api(local_cluster.api_client).delete_custom_resource_definition(
            "widgets.example.kiln.dev"
        )


def kiln(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "kiln"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes whose arguments mention `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in argv and state != "Z":
            found.append(argv)
    return found


def test_cli_up_is_fast_when_warm_and_down_leaves_no_process(
    local_cluster: LocalCluster, tmp_path: Path
) -> None:
    directory = tmp_path / "second"
    started = time.monotonic()
    up = kiln("local", "up", "--topology", "cpu", "--dir", str(directory), "--crds", str(local_cluster.crds))
    elapsed = time.monotonic() - started
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        assert f"export KUBECONFIG={directory.resolve() / 'kubeconfig'}" in up.stdout
        assert elapsed < 30, f"warm `kiln local up` took {elapsed:.1f} s"
        state = cluster.read_state(directory.resolve())
        assert state is not None
        assert all(cluster.alive(state).values())
        assert set(state.pids) == set(cluster.COMPONENTS)
        status = kiln("local", "status", "--dir", str(directory))
        assert status.returncode == 0, status.stdout + status.stderr
        assert len(processes_mentioning(str(directory.resolve()))) == len(cluster.COMPONENTS)
    finally:
        down = kiln("local", "down", "--dir", str(directory))
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped" in down.stdout
    assert processes_mentioning(str(directory.resolve())) == []
    assert not any(cluster._is_ours(pid, state.commands[name][0]) for name, pid in state.pids.items())
    assert kiln("local", "status", "--dir", str(directory)).returncode == 1


def test_failed_start_names_the_component_and_stops_the_rest(tmp_path: Path) -> None:
    directory = tmp_path / "broken"
    directory.mkdir()
    (directory / "etcd").write_text("a file where etcd wants its data folder")
    up = kiln("local", "up", "--topology", "cpu", "--dir", str(directory), "--timeout", "20")
    assert up.returncode != 0
    assert "etcd exited with code" in up.stderr, up.stderr
    assert str(directory.resolve() / "logs" / "etcd.log") in up.stderr
    assert "etcd" in up.stderr.split("last lines of", 1)[1]  # the log tail follows
    assert processes_mentioning(str(directory.resolve())) == []


def test_test_clusters_die_with_the_process_that_started_them(
    local_cluster: LocalCluster, tmp_path: Path
) -> None:
    directory = tmp_path / "orphan"
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from kiln.local.cluster import Cluster\n"
        "Cluster(Path(sys.argv[1]), 'cpu', Path(sys.argv[2]), die_with_parent=True).start(progress=print)\n"
        "print('started', flush=True)\n"
        "os._exit(0)  # no stop(): as if the test run were killed\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(directory), str(local_cluster.crds)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "started" in run.stdout, run.stdout + run.stderr
    wait_for(
        lambda: processes_mentioning(str(directory.resolve())) == [],
        timeout=10,
        what="the orphaned cluster's processes to be killed",
    )
