"""The operator against a real control plane: `kiln operator run` as a subprocess, KWOK GPU nodes.

KWOK runs no containers: build Job pods succeed (or fail, with `kiln.dev/simulate-fail`) after
`kiln.dev/simulate-duration`, and serving pods turn Ready about a second after they are bound. So
these tests prove the control loop (engines, Jobs, workloads, rollovers, status, restarts), not the
engine; the e2e scenarios on the real node (e2e/) run real engines.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kiln.local.testing import LocalCluster, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GROUP, VERSION = "kiln.dev", "v1alpha1"
SERVING = "app.kubernetes.io/managed-by=kiln,app.kubernetes.io/component=serving"
BUILD = "app.kubernetes.io/managed-by=kiln,app.kubernetes.io/component=build"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Operator:
    """`kiln operator run --all-namespaces` as a child process, with its log kept for failures."""

    def __init__(
        self, kubeconfig: Path, log_path: Path, args: tuple[str, ...] = (), env: dict[str, str] | None = None
    ) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.args = args
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.health_port = 0
        self.metrics_port = 0

    def start(self) -> None:
        self.health_port, self.metrics_port = free_port(), free_port()
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), **self.env}
        command = [
            str(Path(sys.executable).parent / "kiln"), "operator", "run", "--all-namespaces",
            f"--health-port={self.health_port}", f"--metrics-port={self.metrics_port}",
            "--engine-retention=3", "--resync-seconds=5", "--log-format=plain", *self.args,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for(self._healthy, timeout=30, what="the operator's /healthz")

    def _healthy(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.log()
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.health_port}/healthz", timeout=1
            ) as response:
                return response.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as response:
            return response.read().decode()

    def leading(self) -> bool:
        return "kiln_operator_leader 1.0" in self.metrics()

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies under the operator."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""


@pytest.fixture
def operator(local_cluster: LocalCluster, tmp_path: Path) -> Iterator[Operator]:
    running = Operator(local_cluster.kubeconfig, tmp_path / "operator.log")
    running.start()
    try:
        yield running
    finally:
        running.stop()
        assert running.process is not None
        print(f"--- operator log (tail) ---\n{running.log()}")


@pytest.fixture
def custom(local_cluster: LocalCluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(local_cluster.api_client)


@pytest.fixture
def kubectl(local_cluster: LocalCluster) -> Callable[..., str]:
    from kiln.local import build

    built = build.bin_dir() / "kubectl"
    binary = str(built) if built.is_file() else "kubectl"

    def run(*args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            [binary, f"--kubeconfig={local_cluster.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
        return done.stdout

    return run


def example(name: str, **spec: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    for key, value in spec.items():
        data["spec"][key] = {**data["spec"].get(key, {}), **value} if isinstance(value, dict) else value
    return data


def get(custom: client.CustomObjectsApi, namespace: str, plural: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    return found


def create(custom: client.CustomObjectsApi, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, "llmdeployments", copy.deepcopy(body)
    )
    return created


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for item in (obj.get("status") or {}).get("conditions") or []:
        if item["type"] == type_:
            return dict(item)
    return {}


def phase_is(custom: client.CustomObjectsApi, namespace: str, plural: str, name: str, *phases: str) -> Any:
    obj = get(custom, namespace, plural, name)
    return obj if (obj.get("status") or {}).get("phase") in phases else None


def with_secret(core_v1: client.CoreV1Api, namespace: str) -> None:
    """The examples read credentials from `hf-token`."""
    core_v1.create_namespaced_secret(
        namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="hf-token"), string_data={"HF_TOKEN": "x"}),
    )


def requantize(
    custom: client.CustomObjectsApi, namespace: str, name: str, quantization: str
) -> dict[str, Any]:
    """Change a Ready deployment's quantization; returns its status.pendingEngine once set."""
    custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "llmdeployments",
        name,
        {"spec": {"engine": {"quantization": quantization}}},
    )
    pending: dict[str, Any] = wait_for(
        lambda: get(custom, namespace, "llmdeployments", name)["status"].get("pendingEngine"),
        30,
        "status.pendingEngine",
    )
    return pending


def ready_on(custom: client.CustomObjectsApi, namespace: str, name: str, engine: str, timeout: float) -> Any:
    """Wait until the deployment is Ready and serves from `engine`; returns it."""
    return wait_for(
        lambda: (
            (obj := phase_is(custom, namespace, "llmdeployments", name, "Ready"))
            and obj["status"]["engine"]["name"] == engine
            and obj
        ),
        timeout,
        "Ready on the new engine",
    )


def leftover_children(
    custom: client.CustomObjectsApi,
    core_v1: client.CoreV1Api,
    apps_v1: client.AppsV1Api,
    batch_v1: client.BatchV1Api,
    namespace: str,
) -> list[str]:
    """Every object Kiln creates that still stands in the namespace, as Kind/name."""
    found = [f"Deployment/{d.metadata.name}" for d in apps_v1.list_namespaced_deployment(namespace).items]
    found += [f"Service/{s.metadata.name}" for s in core_v1.list_namespaced_service(namespace).items]
    found += [f"Job/{j.metadata.name}" for j in batch_v1.list_namespaced_job(namespace).items]
    managed = core_v1.list_namespaced_config_map(
        namespace, label_selector="app.kubernetes.io/managed-by=kiln"
    )
    found += [f"ConfigMap/{c.metadata.name}" for c in managed.items]
    found += [f"Pod/{p.metadata.name}" for p in core_v1.list_namespaced_pod(namespace).items]
    engines = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "llmengines")["items"]
    return found + [f"LLMEngine/{e['metadata']['name']}" for e in engines]


def ready_serving_pods(core_v1: client.CoreV1Api, namespace: str, name: str) -> list[Any]:
    pods = core_v1.list_namespaced_pod(
        namespace, label_selector=f"{SERVING},kiln.dev/deployment={name}"
    ).items
    return [
        pod
        for pod in pods
        if pod.metadata.deletion_timestamp is None
        and any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
    ]


def test_example_becomes_ready_through_engine_job_and_deployment(
    operator: Operator,
    custom: client.CustomObjectsApi,
    core_v1: client.CoreV1Api,
    apps_v1: client.AppsV1Api,
    batch_v1: client.BatchV1Api,
    namespace: str,
    kubectl: Callable[..., str],
) -> None:
    with_secret(core_v1, namespace)
    body = example("llama-3-70b-fp8-tp4.yaml")
    create(custom, namespace, body)
    name = body["metadata"]["name"]

    deployment = wait_for(
        lambda: (get(custom, namespace, "llmdeployments", name).get("status") or {}).get("engine") and
        get(custom, namespace, "llmdeployments", name), timeout=30, what="status.engine",
    )  # fmt: skip
    engine_name = deployment["status"]["engine"]["name"]
    engine = get(custom, namespace, "llmengines", engine_name)
    assert engine["spec"]["quantization"] == "fp8" and engine["spec"]["parallelism"]["tensor"] == 4

    [job] = wait_for(
        lambda: batch_v1.list_namespaced_job(namespace, label_selector=BUILD).items, what="build Job"
    )
    pod_spec = job.spec.template.spec
    assert pod_spec.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod_spec.containers[0].resources.limits == {"nvidia.com/gpu": "4"}
    assert job.metadata.owner_references[0].name == engine_name

    # kubectl wait works on the LLMDeployment's Ready condition.
    kubectl(
        "wait",
        "-n",
        namespace,
        f"llmdeployment/{name}",
        "--for=condition=Ready",
        "--timeout=90s",
        timeout=100,
    )
    engine = get(custom, namespace, "llmengines", engine_name)
    assert engine["status"]["phase"] == "Ready"
    assert engine["status"]["artifact"]["uri"] == f"s3://kiln-engines/prod/{engine_name}"
    workload = apps_v1.read_namespaced_deployment(name, namespace)
    assert workload.status.ready_replicas == 1
    assert workload.spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"] == "4"
    [pod] = ready_serving_pods(core_v1, namespace, name)
    assert pod.spec.node_name.startswith("h100-")  # GPU product affinity
    service = core_v1.read_namespaced_service(name, namespace)
    assert service.spec.ports[0].port == 8000
    status = get(custom, namespace, "llmdeployments", name)["status"]
    assert status["phase"] == "Ready" and status["readyReplicas"] == 1 and status["layout"] == "4x1"
    assert (
        status["observedGeneration"]
        == get(custom, namespace, "llmdeployments", name)["metadata"]["generation"]
    )
    assert status["endpoint"] == f"http://{name}.{namespace}.svc:8000/v1"
    columns = kubectl("get", "-n", namespace, "llmdeployments")
    assert "4x1" in columns and "Ready" in columns
    events = core_v1.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    reasons = {event.reason for event in events}
    assert {"EngineCreated", "WorkloadCreated", "Ready"} <= reasons, reasons
    metrics = operator.metrics()
    assert "kiln_operator_builds_succeeded_total 1.0" in metrics
    assert "kiln_operator_reconcile_duration_seconds_count" in metrics

    # kubectl scale goes through the scale subresource to the Deployment.
    kubectl("scale", "-n", namespace, f"llmdeployment/{name}", "--replicas=2")
    wait_for(lambda: len(ready_serving_pods(core_v1, namespace, name)) == 2, timeout=30, what="2 ready pods")
    wait_for(
        lambda: get(custom, namespace, "llmdeployments", name)["status"].get("readyReplicas") == 2,
        timeout=30,
        what="status.readyReplicas 2",
    )
    scale = custom.get_namespaced_custom_object_scale(GROUP, VERSION, namespace, "llmdeployments", name)
    assert scale["status"]["replicas"] == 2 and "kiln.dev/deployment=" + name in scale["status"]["selector"]
    assert len(batch_v1.list_namespaced_job(namespace, label_selector=BUILD).items) == 1  # no rebuild

    # Children deleted by hand come back (level-based: the world is compared with the spec).
    core_v1.delete_namespaced_service(name, namespace)
    apps_v1.delete_namespaced_deployment(name, namespace)
    wait_for(lambda: core_v1.list_namespaced_service(namespace).items, 30, "the Service to be recreated")
    wait_for(
        lambda: len(ready_serving_pods(core_v1, namespace, name)) == 2, 60, "the Deployment to be recreated"
    )


def test_quantization_change_rolls_over_without_a_moment_without_ready_pods(
    operator: Operator,
    custom: client.CustomObjectsApi,
    core_v1: client.CoreV1Api,
    apps_v1: client.AppsV1Api,
    batch_v1: client.BatchV1Api,
    namespace: str,
) -> None:
    with_secret(core_v1, namespace)
    # A slow build, so the old pods demonstrably serve while the new engine builds.
    body = example("llama-3-70b-fp8-tp4.yaml", build={"podAnnotations": {"kiln.dev/simulate-duration": "6s"}})
    name = body["metadata"]["name"]
    create(custom, namespace, body)
    first = wait_for(lambda: phase_is(custom, namespace, "llmdeployments", name, "Ready"), 90, "Ready")
    old_engine = first["status"]["engine"]["name"]

    gaps: list[float] = []
    samples = [0]
    stop = threading.Event()

    def watch_ready() -> None:
        while not stop.is_set():
            if not ready_serving_pods(core_v1, namespace, name):
                gaps.append(time.monotonic())
            samples[0] += 1
            time.sleep(0.1)

    watcher = threading.Thread(target=watch_ready, daemon=True)
    watcher.start()
    try:
        new_engine = requantize(custom, namespace, name, "int8-weight")["name"]
        assert new_engine != old_engine and "int8-weight" in new_engine
        building = get(custom, namespace, "llmdeployments", name)
        assert building["status"]["engine"]["name"] == old_engine  # the old engine still serves
        assert condition(building, "Ready")["reason"] == "EngineBuilding"
        done = ready_on(custom, namespace, name, new_engine, 120)
        assert done["status"].get("pendingEngine") is None
        pods = ready_serving_pods(core_v1, namespace, name)
        wait_for(
            lambda: all(
                p.metadata.labels["kiln.dev/engine"] == new_engine
                for p in ready_serving_pods(core_v1, namespace, name)
            ),
            30,
            "only new-engine pods",
        )
        assert pods
    finally:
        stop.set()
        watcher.join(5)
    assert samples[0] > 20, "the readiness watcher barely ran"
    assert not gaps, f"{len(gaps)} samples saw no ready serving pod during the rollover"
    assert len(batch_v1.list_namespaced_job(namespace, label_selector=BUILD).items) == 2
    # The old engine lost its last user: it is garbage-collected after the retention time (3 s here).
    wait_for(
        lambda: (
            not any(
                e["metadata"]["name"] == old_engine
                for e in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "llmengines")[
                    "items"
                ]
            )
        ),
        60,
        "the unused old engine to be collected",
    )


def test_build_failure_gives_failed_with_the_reason(
    operator: Operator, custom: client.CustomObjectsApi, core_v1: client.CoreV1Api, namespace: str
) -> None:
    with_secret(core_v1, namespace)
    body = example(
        "llama-3-70b-fp8-tp4.yaml",
        build={"retries": 0, "podAnnotations": {"kiln.dev/simulate-fail": "true"}},
    )
    name = body["metadata"]["name"]
    create(custom, namespace, body)
    failed = wait_for(lambda: phase_is(custom, namespace, "llmdeployments", name, "Failed"), 60, "Failed")
    assert condition(failed, "Ready")["reason"] == "EngineBuildFailed"
    assert condition(failed, "EngineReady")["reason"] == "BuildFailed"
    engine = get(custom, namespace, "llmengines", failed["status"]["engine"]["name"])
    assert engine["status"]["phase"] == "Failed"
    reason = condition(engine, "Failed")
    assert reason["status"] == "True" and reason["reason"] == "BackoffLimitExceeded", reason
    assert "exited with code 1" in reason["message"]
    events = core_v1.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={engine['metadata']['name']}"
    ).items
    assert any(e.reason == "BuildFailed" and e.type == "Warning" for e in events)
    assert "kiln_operator_builds_failed_total 1.0" in operator.metrics()


def test_operator_killed_mid_build_resumes_without_a_second_job(
    operator: Operator,
    custom: client.CustomObjectsApi,
    core_v1: client.CoreV1Api,
    batch_v1: client.BatchV1Api,
    namespace: str,
) -> None:
    with_secret(core_v1, namespace)
    body = example("llama-3-70b-fp8-tp4.yaml", build={"podAnnotations": {"kiln.dev/simulate-duration": "8s"}})
    name = body["metadata"]["name"]
    create(custom, namespace, body)
    [job] = wait_for(lambda: batch_v1.list_namespaced_job(namespace, label_selector=BUILD).items, 30, "a Job")
    operator.kill()
    assert not job.status.succeeded
    operator.start()
    wait_for(lambda: phase_is(custom, namespace, "llmdeployments", name, "Ready"), 90, "Ready after restart")
    jobs = batch_v1.list_namespaced_job(namespace, label_selector=BUILD).items
    assert [j.metadata.uid for j in jobs] == [job.metadata.uid]
    pods = core_v1.list_namespaced_pod(namespace, label_selector=BUILD).items
    assert len(pods) == 1


def test_deletion_leaves_nothing_behind(
    operator: Operator,
    custom: client.CustomObjectsApi,
    core_v1: client.CoreV1Api,
    apps_v1: client.AppsV1Api,
    batch_v1: client.BatchV1Api,
    namespace: str,
) -> None:
    with_secret(core_v1, namespace)
    body = example("llama-3-70b-fp8-tp4.yaml")
    name = body["metadata"]["name"]
    create(custom, namespace, body)
    wait_for(lambda: phase_is(custom, namespace, "llmdeployments", name, "Ready"), 90, "Ready")
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "llmdeployments", name)
    wait_for(
        lambda: not leftover_children(custom, core_v1, apps_v1, batch_v1, namespace),
        60,
        "every child to be gone",
    )


def test_two_replicas_one_leads_and_the_standby_takes_over(
    local_cluster: LocalCluster,
    tmp_path: Path,
    custom: client.CustomObjectsApi,
    core_v1: client.CoreV1Api,
    namespace: str,
) -> None:
    election = (
        "--leader-election",
        f"--leader-election-namespace={namespace}",
        "--leader-election-lease=kiln-operator",
    )
    fast = {
        "KILN_LEADER_ELECTION_LEASE_DURATION": "4",
        "KILN_LEADER_ELECTION_RENEW_DEADLINE": "3",
        "KILN_LEADER_ELECTION_RETRY_PERIOD": "1",
    }
    first = Operator(local_cluster.kubeconfig, tmp_path / "first.log", election, fast)
    second = Operator(local_cluster.kubeconfig, tmp_path / "second.log", election, fast)
    try:
        first.start()
        wait_for(first.leading, 20, "the first replica to lead")
        second.start()
        time.sleep(3)
        assert not second.leading(), "two replicas lead at once"
        with_secret(core_v1, namespace)
        body = example("llama-3-70b-fp8-tp4.yaml")
        name = body["metadata"]["name"]
        create(custom, namespace, body)
        wait_for(lambda: phase_is(custom, namespace, "llmdeployments", name, "Ready"), 90, "Ready")

        first.kill()  # no Lease release: the standby waits for it to expire
        wait_for(second.leading, 30, "the standby to take over")
        lease = client.CoordinationV1Api(local_cluster.api_client).read_namespaced_lease(
            "kiln-operator", namespace
        )
        assert lease.spec.holder_identity.endswith(str(second.process.pid))  # type: ignore[union-attr]
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "llmdeployments", name, {"spec": {"replicas": 2}}
        )
        wait_for(
            lambda: get(custom, namespace, "llmdeployments", name)["status"].get("readyReplicas") == 2,
            60,
            "the new leader to scale to 2",
        )
    finally:
        for replica in (first, second):
            replica.stop()
            print(f"--- {replica.log_path.name} (tail) ---\n{replica.log()}")


def test_crashing_serving_pods_are_reported_degraded(
    operator: Operator, custom: client.CustomObjectsApi, core_v1: client.CoreV1Api, namespace: str
) -> None:
    with_secret(core_v1, namespace)
    crash = {"metadata": {"annotations": {"kiln.dev/simulate-fail": "true"}}}
    body = example("llama-3-70b-fp8-tp4.yaml", serving={"podTemplate": crash})
    name = body["metadata"]["name"]
    create(custom, namespace, body)
    degraded = wait_for(
        lambda: phase_is(custom, namespace, "llmdeployments", name, "Degraded"), 90, "Degraded"
    )
    assert condition(degraded, "Degraded")["reason"] == "CrashLoopBackOff", degraded["status"]
    assert condition(degraded, "Ready")["status"] == "False"
    # The fix (dropping the override) rolls out in place, on the same engine, and recovers.
    engine = degraded["status"]["engine"]["name"]
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "llmdeployments", name, {"spec": {"serving": {"podTemplate": None}}}
    )
    recovered = wait_for(
        lambda: phase_is(custom, namespace, "llmdeployments", name, "Ready"), 90, "Ready again"
    )
    assert recovered["status"]["engine"]["name"] == engine
    assert condition(recovered, "Degraded")["status"] == "False"


def test_a_replica_no_node_can_hold_is_unschedulable_with_the_reason(
    operator: Operator, custom: client.CustomObjectsApi, core_v1: client.CoreV1Api, namespace: str
) -> None:
    with_secret(core_v1, namespace)
    # L40S nodes have no NVLink (islands of one GPU): tensor parallelism 4 cannot be kept on NVLink.
    body = example("llama-3-70b-fp8-tp4.yaml", gpu={"product": "NVIDIA-L40S"})
    name = body["metadata"]["name"]
    create(custom, namespace, body)

    def unschedulable() -> dict[str, Any] | None:
        obj = get(custom, namespace, "llmdeployments", name)
        return obj if condition(obj, "Unschedulable").get("status") == "True" else None

    found = wait_for(unschedulable, 30, "the Unschedulable condition")
    assert condition(found, "Unschedulable")["reason"] == "NoNVLinkIsland"
    assert "NVLink" in condition(found, "Unschedulable")["message"]
    assert found["status"]["phase"] == "Pending"
    assert condition(found, "Ready")["reason"] == "Unschedulable"
