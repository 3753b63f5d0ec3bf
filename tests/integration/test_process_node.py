"""The process node against the real local control plane: pods run as processes and report back.

One agent (`kiln process-node`, a subprocess) serves this module; its Node is deleted afterwards so
later tests' pods never land on it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client
from kubernetes import config as kube_config

from kiln import paths
from kiln.local import cluster
from kiln.local.testing import LocalCluster, ProcessNode, running_process_node, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

NODE = "process-node-test"
ON_PROCESS_NODE = {"kiln.dev/process-node": "true"}
POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


@pytest.fixture(scope="module")
def process_node(
    local_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessNode]:
    with running_process_node(local_cluster, tmp_path_factory.mktemp("process-node"), name=NODE) as node:
        yield node


def pod_manifest(name: str, containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": NODE}, "containers": containers, **spec},
    }


def python(script: str, *args: str) -> dict[str, Any]:
    return {"command": ["python", "-c", textwrap.dedent(script), *args]}


def wait_pod(
    core: client.CoreV1Api, namespace: str, name: str, check: Any, what: str, timeout: float = 60
) -> Any:
    def probe() -> Any:
        pod = core.read_namespaced_pod(name, namespace)
        return pod if check(pod) else None

    try:
        return wait_for(probe, timeout, f"pod {name} {what}")
    except AssertionError:
        pod = core.read_namespaced_pod(name, namespace)
        raise AssertionError(f"pod {name} not {what}; status: {pod.status}") from None


def is_ready(pod: client.V1Pod) -> bool:
    return pod.status.phase == "Running" and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
    )


def terminated(pod: client.V1Pod) -> client.V1ContainerStateTerminated:
    return pod.status.container_statuses[0].state.terminated


def http_server(name: str, port: int = 8080, probe: str = "httpGet") -> dict[str, Any]:
    handler = (
        {"httpGet": {"path": "/", "port": "http"}} if probe == "httpGet" else {"tcpSocket": {"port": port}}
    )
    return pod_manifest(
        name,
        [
            {
                "name": "web",
                "image": "python:3.11",
                "command": ["python", "-m", "http.server", str(port), "--bind", "$(POD_IP)"],
                "env": [POD_IP_ENV],
                "ports": [{"name": "http", "containerPort": port}],
                "readinessProbe": {**handler, "periodSeconds": 1},
            }
        ],
    )


def test_http_server_pod_becomes_ready_on_its_own_ip(
    process_node: ProcessNode, core_v1: client.CoreV1Api, namespace: str
) -> None:
    core_v1.create_namespaced_pod(namespace, http_server("web"))
    pod = wait_pod(core_v1, namespace, "web", is_ready, "Running and Ready")
    ip = pod.status.pod_ip
    assert ip and ip != "127.0.0.1" and pod.status.pod_ips[0].ip == ip
    assert pod.status.host_ip == "127.0.0.1"
    status = pod.status.container_statuses[0]
    assert status.ready and status.started and status.state.running is not None
    response = httpx.get(f"http://{ip}:8080/", timeout=5)
    assert response.status_code == 200
    # The server's request log reached the container log, and `kubectl logs` reads it via the API server.
    log = wait_for(lambda: core_v1.read_namespaced_pod_log("web", namespace), 10, "the pod's log")
    assert '"GET / HTTP/1.1" 200' in log
    assert process_node.pod_log(namespace, "web", "web").read_text().count("GET /") >= 1


def test_job_pod_succeeds_with_its_termination_message(
    process_node: ProcessNode, batch_v1: client.BatchV1Api, core_v1: client.CoreV1Api, namespace: str
) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "build"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": ON_PROCESS_NODE,
                    "containers": [
                        {
                            "name": "build",
                            "image": "ghcr.io/kiln-dev/kiln-engine:dev",
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                            **python(
                                """
                                import json, sys
                                print("building...")
                                with open(sys.argv[1], "w") as f:
                                    json.dump({"ok": True, "artifact": "pvc://cache/x"}, f)
                                """,
                                "/dev/termination-log",
                            ),
                        }
                    ],
                }
            },
        },
    }
    batch_v1.create_namespaced_job(namespace, job)
    pods = wait_for(
        lambda: core_v1.list_namespaced_pod(namespace, label_selector="job-name=build").items,
        30,
        "the Job's pod",
    )
    pod = wait_pod(
        core_v1, namespace, pods[0].metadata.name, lambda p: p.status.phase == "Succeeded", "Succeeded"
    )
    assert pod.spec.node_name == NODE
    state = terminated(pod)
    assert state.exit_code == 0 and state.reason == "Completed"
    assert json.loads(state.message) == {"ok": True, "artifact": "pvc://cache/x"}
    wait_for(
        lambda: (batch_v1.read_namespaced_job("build", namespace).status.succeeded or 0) == 1, 30, "Job done"
    )


def test_failing_container_fails_the_pod_with_its_exit_code_and_log_tail(
    process_node: ProcessNode, core_v1: client.CoreV1Api, namespace: str
) -> None:
    container = {
        "name": "fail",
        "image": "python:3.11",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        **python("import sys; print('something broke'); sys.exit(3)"),
    }
    core_v1.create_namespaced_pod(namespace, pod_manifest("fail", [container], restartPolicy="Never"))
    pod = wait_pod(core_v1, namespace, "fail", lambda p: p.status.phase == "Failed", "Failed")
    state = terminated(pod)
    assert state.exit_code == 3 and state.reason == "Error"
    assert "something broke" in state.message


def test_unknown_image_without_command_fails(
    process_node: ProcessNode, core_v1: client.CoreV1Api, namespace: str
) -> None:
    container = {"name": "c", "image": "busybox:1.36"}
    core_v1.create_namespaced_pod(namespace, pod_manifest("busybox", [container], restartPolicy="Never"))
    pod = wait_pod(core_v1, namespace, "busybox", lambda p: p.status.phase == "Failed", "Failed")
    assert terminated(pod).reason == "UnknownImage"


def test_restart_policy_on_failure_restarts_until_success(
    process_node: ProcessNode, core_v1: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    """The container fails twice, then succeeds: restartCount 2, phase Succeeded."""
    script = """
        import pathlib, sys
        counter = pathlib.Path(sys.argv[1]) / "runs"
        runs = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(runs))
        sys.exit(0 if runs >= 3 else 1)
    """
    container = {
        "name": "flaky",
        "image": "python:3.11",
        **python(script, "/work"),
        "volumeMounts": [{"name": "work", "mountPath": "/work"}],
    }
    manifest = pod_manifest(
        "flaky",
        [container],
        restartPolicy="OnFailure",
        volumes=[{"name": "work", "hostPath": {"path": str(tmp_path), "type": "Directory"}}],
    )
    core_v1.create_namespaced_pod(namespace, manifest)
    pod = wait_pod(
        core_v1, namespace, "flaky", lambda p: p.status.phase == "Succeeded", "Succeeded", timeout=90
    )
    assert pod.status.container_statuses[0].restart_count == 2
    assert (tmp_path / "runs").read_text() == "3"
    reasons = [
        e.reason
        for e in core_v1.list_namespaced_event(namespace).items
        if e.involved_object.name == "flaky" and e.source.component == "kiln-process-node"
    ]
    assert reasons.count("Started") == 3 and "BackOff" in reasons


def test_env_config_map_secret_and_volumes_reach_the_process(
    process_node: ProcessNode, core_v1: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    core_v1.create_namespaced_config_map(
        namespace, {"metadata": {"name": "settings"}, "data": {"mode": "fast", "greeting.txt": "hello"}}
    )
    core_v1.create_namespaced_secret(
        namespace, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}}
    )
    data = tmp_path / "pv"
    data.mkdir()
    (data / "input.txt").write_text("from the volume")
    pv_name = f"pv-{uuid.uuid4().hex[:8]}"
    core_v1.create_persistent_volume(
        {
            "metadata": {"name": pv_name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "hostPath": {"path": str(data)},
                "storageClassName": "manual",
                "claimRef": {"namespace": namespace, "name": "data"},
            },
        }
    )
    core_v1.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "data"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "manual",
                "volumeName": pv_name,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    script = """
        import json, os, sys
        config, secret, data, result = sys.argv[1:5]
        read = lambda path: open(path).read()
        with open(os.path.join(data, "output.txt"), "w") as f:
            f.write("written by the pod")
        json.dump(
            {
                "env": {k: os.environ.get(k) for k in sys.argv[5].split(",")},
                "greeting": read(os.path.join(config, "greeting.txt")),
                "token": read(os.path.join(secret, "token")),
                "input": read(os.path.join(data, "input.txt")),
                "data_env": os.environ["DATA_DIR"],
                "via_pvc_root": read(os.path.join(os.environ["KILN_PVC_ROOT"], "data", "input.txt")),
            },
            open(result, "w"),
        )
    """
    container = {
        "name": "check",
        "image": "python:3.11",
        **python(
            script,
            "/etc/settings",
            "/etc/creds",
            "/data",
            "/dev/termination-log",
            "POD_IP,POD_NAME,NS,MODE,TOKEN,URL,CM_mode",
        ),
        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CM_"}],
        "env": [
            POD_IP_ENV,
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "URL", "value": "http://$(POD_IP):8000"},
            {"name": "DATA_DIR", "value": "/data"},
        ],
        "volumeMounts": [
            {"name": "settings", "mountPath": "/etc/settings"},
            {"name": "creds", "mountPath": "/etc/creds"},
            {"name": "data", "mountPath": "/data"},
            {"name": "data", "mountPath": "/mnt/pvc/data"},  # where pvc://data/... resolves in the engine
        ],
    }
    manifest = pod_manifest(
        "check",
        [container],
        restartPolicy="Never",
        volumes=[
            {"name": "settings", "configMap": {"name": "settings"}},
            {"name": "creds", "secret": {"secretName": "creds"}},
            {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
        ],
    )
    try:
        core_v1.create_namespaced_pod(namespace, manifest)
        pod = wait_pod(
            core_v1, namespace, "check", lambda p: p.status.phase in ("Succeeded", "Failed"), "finished"
        )
        state = terminated(pod)
        assert state.exit_code == 0, state.message
        result = json.loads(state.message)
        ip = pod.status.pod_ip
        assert result["env"] == {
            "POD_IP": ip,
            "POD_NAME": "check",
            "NS": namespace,
            "MODE": "fast",
            "TOKEN": "s3cret",
            "URL": f"http://{ip}:8000",
            "CM_mode": "fast",
        }
        assert result["greeting"] == "hello" and result["token"] == "s3cret"
        assert result["input"] == "from the volume"
        assert result["data_env"] == str(data)  # env values under a mountPath are rewritten too
        assert result["via_pvc_root"] == "from the volume"
        assert (data / "output.txt").read_text() == "written by the pod"
    finally:
        core_v1.delete_persistent_volume(pv_name)


def test_pods_get_their_service_account_credentials(
    process_node: ProcessNode, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """In-cluster clients (kopf, kubernetes) find the pod's own token through KUBECONFIG."""
    script = """
        import sys
        from kubernetes import client, config
        config.load_kube_config()
        api = client.AuthenticationV1Api()
        review = api.create_self_subject_review({"apiVersion": "authentication.k8s.io/v1"})
        open(sys.argv[1], "w").write(review.status.user_info.username)
    """
    container = {"name": "who", "image": "python:3.11", **python(script, "/dev/termination-log")}
    core_v1.create_namespaced_pod(namespace, pod_manifest("who", [container], restartPolicy="Never"))
    pod = wait_pod(core_v1, namespace, "who", lambda p: p.status.phase in ("Succeeded", "Failed"), "finished")
    state = terminated(pod)
    assert state.exit_code == 0, process_node.pod_log(namespace, "who", "who").read_text()
    assert state.message == f"system:serviceaccount:{namespace}:default"


def test_deleting_a_pod_delivers_sigterm_and_honours_the_grace_period(
    process_node: ProcessNode, core_v1: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    """preStop hook, then SIGTERM; a process that ignores SIGTERM gets SIGKILL after the grace period."""
    script = """
        import pathlib, signal, sys, time
        marker = pathlib.Path(sys.argv[1]) / sys.argv[2]
        def stop(signum, frame):
            hooked = (marker.parent / "prestop").exists()
            marker.write_text("SIGTERM after preStop" if hooked else "SIGTERM")
            sys.exit(0)
        if sys.argv[2] == "polite":
            signal.signal(signal.SIGTERM, stop)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        marker.write_text("started")
        while True:
            time.sleep(0.1)
    """
    volumes = [{"name": "out", "hostPath": {"path": str(tmp_path)}}]
    for name, grace in (("polite", 60), ("stubborn", 3)):
        container = {
            "name": "c",
            "image": "python:3.11",
            **python(script, "/out", name),
            "volumeMounts": [{"name": "out", "mountPath": "/out"}],
        }
        if name == "polite":
            hook = ["python", "-c", "import sys; open(sys.argv[1], 'w').write('hook')", "/out/prestop"]
            container["lifecycle"] = {"preStop": {"exec": {"command": hook}}}
        manifest = pod_manifest(name, [container], terminationGracePeriodSeconds=grace, volumes=volumes)
        core_v1.create_namespaced_pod(namespace, manifest)
    for name in ("polite", "stubborn"):
        wait_pod(core_v1, namespace, name, lambda p: p.status.phase == "Running", "Running")
        wait_for(lambda n=name: (tmp_path / n).exists(), 20, f"{name} to start")

    def gone(name: str) -> bool:
        return not [p for p in core_v1.list_namespaced_pod(namespace).items if p.metadata.name == name]

    started = time.monotonic()
    core_v1.delete_namespaced_pod("polite", namespace)
    wait_for(lambda: gone("polite"), 30, "the polite pod to disappear")
    assert time.monotonic() - started < 15, (
        "a process that exits on SIGTERM does not wait for its grace period"
    )
    assert (tmp_path / "polite").read_text() == "SIGTERM after preStop"

    started = time.monotonic()
    core_v1.delete_namespaced_pod("stubborn", namespace)
    wait_for(lambda: gone("stubborn"), 30, "the stubborn pod to disappear")
    elapsed = time.monotonic() - started
    assert 2.5 <= elapsed < 15, f"SIGKILL after the 3 s grace period, not after {elapsed:.1f} s"
    assert (tmp_path / "stubborn").read_text() == "started"


def admin_http(local: LocalCluster) -> httpx.Client:
    return cluster.admin_client(local.directory)


def service(name: str, port: int, target: int | str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": port, "targetPort": target}]},
    }


def endpoint_ips(core: client.CoreV1Api, namespace: str, name: str) -> list[str]:
    endpoints = core.read_namespaced_endpoints(name, namespace)
    return [a.ip for s in endpoints.subsets or [] for a in s.addresses or []]


def test_service_endpoints_and_api_server_proxy_reach_the_pod(
    process_node: ProcessNode, local_cluster: LocalCluster, core_v1: client.CoreV1Api, namespace: str
) -> None:
    core_v1.create_namespaced_pod(namespace, http_server("site", 8081, probe="tcpSocket"))
    core_v1.create_namespaced_service(namespace, service("site", 80, "http"))
    pod = wait_pod(core_v1, namespace, "site", is_ready, "Running and Ready")
    wait_for(
        lambda: endpoint_ips(core_v1, namespace, "site") == [pod.status.pod_ip], 30, "the Service's endpoints"
    )
    server = local_cluster.state.server
    with admin_http(local_cluster) as http:
        response = http.get(f"{server}/api/v1/namespaces/{namespace}/services/site:80/proxy/")
    assert response.status_code == 200, response.text
    assert "Directory listing" in response.text


@pytest.mark.engine
@pytest.mark.slow
def test_the_real_engine_serves_completions_through_the_service(
    process_node: ProcessNode, local_cluster: LocalCluster, core_v1: client.CoreV1Api, namespace: str
) -> None:
    root = paths.repo_root()
    assert root is not None
    pytest.importorskip("torch")
    pv_name = f"examples-{uuid.uuid4().hex[:8]}"
    core_v1.create_persistent_volume(
        {
            "metadata": {"name": pv_name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany"],
                "hostPath": {"path": str(root / "examples")},
                "storageClassName": "manual",
                "claimRef": {"namespace": namespace, "name": "models"},
            },
        }
    )
    core_v1.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "models"},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "manual",
                "volumeName": pv_name,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    engine = {
        "name": "engine",
        "image": "ghcr.io/kiln-dev/kiln-engine:dev-torch",  # no command: the entrypoint comes from the image
        "args": [
            "serve",
            "--model",
            "/models/tiny-chat",
            "--host",
            "$(POD_IP)",
            "--port",
            "8000",
            "--device",
            "cpu",
        ],
        "env": [POD_IP_ENV],
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1},
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 24,
        },
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
    }
    manifest = pod_manifest(
        "tiny-chat", [engine], volumes=[{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}]
    )
    try:
        core_v1.create_namespaced_pod(namespace, manifest)
        core_v1.create_namespaced_service(namespace, service("tiny-chat", 8000, "http"))
        pod = wait_pod(core_v1, namespace, "tiny-chat", is_ready, "Running and Ready", timeout=180)
        wait_for(
            lambda: endpoint_ips(core_v1, namespace, "tiny-chat") == [pod.status.pod_ip], 30, "endpoints"
        )
        proxy = f"{local_cluster.state.server}/api/v1/namespaces/{namespace}/services/tiny-chat:8000/proxy"
        with admin_http(local_cluster) as http:
            response = http.post(
                f"{proxy}/v1/completions",
                json={"model": "tiny-chat", "prompt": "Once upon a time", "max_tokens": 8},
                timeout=60,
            )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "text_completion" and body["choices"][0]["text"]
        assert body["usage"]["completion_tokens"] > 0
    finally:
        core_v1.delete_persistent_volume(pv_name)


def test_log_follow_streams_until_the_container_exits(
    process_node: ProcessNode, core_v1: client.CoreV1Api, namespace: str
) -> None:
    script = "import time; print('first', flush=True); time.sleep(2); print('second')"
    container = {"name": "talk", "image": "python:3.11", **python(script)}
    core_v1.create_namespaced_pod(namespace, pod_manifest("talk", [container], restartPolicy="Never"))
    wait_pod(core_v1, namespace, "talk", lambda p: p.status.phase != "Pending", "started")
    started = time.monotonic()
    text = core_v1.read_namespaced_pod_log("talk", namespace, follow=True, _request_timeout=30)
    assert text.split() == ["first", "second"]
    assert time.monotonic() - started < 20


def test_stopping_the_agent_stops_its_pods_processes(
    local_cluster: LocalCluster, core_v1: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    """SIGTERM to the agent: every pod process ends (even one ignoring SIGTERM), the node turns NotReady."""
    name = "process-node-stop-test"
    with running_process_node(local_cluster, tmp_path, name=name, extra_args=("--shutdown-grace=2",)) as node:
        stubborn = {
            "name": "c",
            "image": "python:3.11",
            "command": ["sh", "-c", "trap '' TERM; sleep 1000 & sleep 1000"],
            "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1},
        }
        manifest = pod_manifest("victim", [stubborn])
        manifest["spec"]["nodeSelector"] = {"kubernetes.io/hostname": name}
        core_v1.create_namespaced_pod(namespace, manifest)
        pod = wait_pod(core_v1, namespace, "victim", is_ready, "Running and Ready")
        pid = int(pod.status.container_statuses[0].container_id.removeprefix("process://"))
        assert Path(f"/proc/{pid}").exists()
        started = time.monotonic()
        os.kill(node.pid, signal.SIGTERM)
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 20, "the pod's process to end")
        assert time.monotonic() - started < 10

        def stopped() -> bool:
            ready = next(c for c in core_v1.read_node(name).status.conditions if c.type == "Ready")
            return (ready.status, ready.reason) == ("False", "ProcessNodeStopped")

        wait_for(stopped, 15, "the node to report Ready=False (ProcessNodeStopped)")
    # running_process_node's teardown checked the exit code (0) and that no pod process survived.


def test_a_restarted_agent_resumes_its_pods(
    local_cluster: LocalCluster, core_v1: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    """Like a kubelet after a restart: Always pods run again (one restart more), Never pods that lost
    their process fail with ContainerStatusUnknown, finished pods keep their result."""
    name = "process-node-restart-test"
    sleeper = {"name": "c", "image": "python:3.11", "command": ["sleep", "1000"]}
    quick = {"name": "c", "image": "python:3.11", **python("print('done')")}
    manifests = {
        "always": pod_manifest("always", [sleeper]),
        "never": pod_manifest("never", [sleeper], restartPolicy="Never"),
        "finished": pod_manifest("finished", [quick], restartPolicy="OnFailure"),
    }
    for manifest in manifests.values():
        manifest["spec"]["nodeSelector"] = {"kubernetes.io/hostname": name}
    with running_process_node(local_cluster, tmp_path, name=name, delete_node=False):
        for manifest in manifests.values():
            core_v1.create_namespaced_pod(namespace, manifest)
        wait_pod(core_v1, namespace, "always", is_ready, "Running and Ready")
        wait_pod(core_v1, namespace, "never", is_ready, "Running and Ready")
        wait_pod(core_v1, namespace, "finished", lambda p: p.status.phase == "Succeeded", "Succeeded")
    with running_process_node(local_cluster, tmp_path, name=name):
        pod = wait_pod(
            core_v1,
            namespace,
            "always",
            lambda p: is_ready(p) and p.status.container_statuses[0].restart_count == 1,
            "running again after one restart",
        )
        assert pod.status.container_statuses[0].last_state.terminated.reason == "ContainerStatusUnknown"
        pod = wait_pod(core_v1, namespace, "never", lambda p: p.status.phase == "Failed", "Failed")
        assert terminated(pod).reason == "ContainerStatusUnknown"
        pod = core_v1.read_namespaced_pod("finished", namespace)
        assert pod.status.phase == "Succeeded" and pod.status.container_statuses[0].restart_count == 0


def test_a_deleted_node_registers_again_with_a_fresh_lease(
    local_cluster: LocalCluster, core_v1: client.CoreV1Api, tmp_path: Path
) -> None:
    name = "process-node-register-test"
    coordination = client.CoordinationV1Api(local_cluster.api_client)
    with running_process_node(local_cluster, tmp_path, name=name):
        first = core_v1.read_node(name)

        def lease_of_node() -> client.V1Lease | None:
            try:
                return coordination.read_namespaced_lease(name, "kube-node-lease")
            except client.ApiException:
                return None  # the agent writes its Lease right after its Node

        lease = wait_for(lease_of_node, 15, "the node's lease")
        assert lease.spec.holder_identity == name
        assert lease.metadata.owner_references[0].uid == first.metadata.uid
        renewed = lease.spec.renew_time
        wait_for(
            lambda: coordination.read_namespaced_lease(name, "kube-node-lease").spec.renew_time > renewed,
            20,
            "the lease to be renewed",
        )
        core_v1.delete_node(name)

        def registered_again() -> bool:
            try:
                node = core_v1.read_node(name)
            except client.ApiException:
                return False
            return node.metadata.uid != first.metadata.uid and is_node_ready(node)

        wait_for(registered_again, 30, "the node to register again")


def is_node_ready(node: client.V1Node) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])


def test_a_failing_liveness_probe_restarts_the_container(
    process_node: ProcessNode, core_v1: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    """Liveness: `test -f healthy` fails once the process removes the file; the container restarts."""
    script = """
        import os, pathlib, sys, time
        print("started", os.getpid(), flush=True)
        healthy = pathlib.Path(sys.argv[1]) / "healthy"
        healthy.write_text("yes")
        time.sleep(2)
        healthy.unlink()
        time.sleep(1000)
    """
    container = {
        "name": "app",
        "image": "python:3.11",
        **python(script, "/work"),
        "volumeMounts": [{"name": "work", "mountPath": "/work"}],
        "livenessProbe": {
            "exec": {"command": ["test", "-f", "/work/healthy"]},
            "periodSeconds": 1,
            "failureThreshold": 2,
        },
    }
    manifest = pod_manifest(
        "unhealthy",
        [container],
        terminationGracePeriodSeconds=2,
        volumes=[{"name": "work", "hostPath": {"path": str(tmp_path)}}],
    )
    core_v1.create_namespaced_pod(namespace, manifest)
    pod = wait_pod(
        core_v1,
        namespace,
        "unhealthy",
        lambda p: p.status.container_statuses and p.status.container_statuses[0].restart_count >= 1,
        "restarted by its liveness probe",
        timeout=40,
    )
    last = pod.status.container_statuses[0].last_state.terminated
    assert last.exit_code == 143 and last.signal == 15  # SIGTERM; python exits on it
    reasons = {
        e.reason
        for e in core_v1.list_namespaced_event(namespace).items
        if e.involved_object.name == "unhealthy"
    }
    assert {"Unhealthy", "Killing"} <= reasons
    # `kubectl logs` shows the current run, `--previous` the one before.
    previous = core_v1.read_namespaced_pod_log("unhealthy", namespace, previous=True)
    current = wait_for(
        lambda: core_v1.read_namespaced_pod_log("unhealthy", namespace), 10, "the new run's log"
    )
    assert previous.count("started") == 1 and current.count("started") == 1 and previous != current


@pytest.mark.slow
def test_kiln_local_up_with_process_node_and_down(local_cluster: LocalCluster, tmp_path: Path) -> None:
    """`kiln local up --process-node` starts the agent as a component; `down` stops it and its pods."""
    kiln = [str(Path(sys.executable).parent / "kiln"), "local"]
    directory = tmp_path / "cluster"
    common = ["--dir", str(directory)]
    up = subprocess.run(
        [*kiln, "up", "--topology", "cpu", "--process-node", *common, "--crds", str(local_cluster.crds)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "process node kiln-process-node Ready" in up.stdout
        state = cluster.read_state(directory)
        assert state is not None and cluster.alive(state)[cluster.PROCESS_NODE]
        status = subprocess.run([*kiln, "status", *common], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "process-node             running" in status.stdout
        api = client.CoreV1Api(kube_config.new_client_from_config(str(state.kubeconfig)))
        manifest = pod_manifest("sleeper", [{"name": "c", "image": "x", "command": ["sleep", "1000"]}])
        manifest["spec"]["nodeSelector"] = ON_PROCESS_NODE
        api.create_namespaced_pod("default", manifest)
        pod = wait_pod(api, "default", "sleeper", is_ready, "Running and Ready")
        pid = int(pod.status.container_statuses[0].container_id.removeprefix("process://"))
    finally:
        down = subprocess.run([*kiln, "down", *common], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0 and "process-node" in down.stdout, down.stdout + down.stderr
    assert not Path(f"/proc/{pid}").exists(), "the pod's process survived `kiln local down`"
    assert not any(cluster.alive(state).values())


def test_a_pod_recreated_under_the_same_name_keeps_its_own_volumes(
    process_node: ProcessNode, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """The old pod's cleanup must not remove the files of its successor of the same name."""
    core_v1.create_namespaced_config_map(namespace, {"metadata": {"name": "flag"}, "data": {"ready": "yes"}})
    container = {
        "name": "c",
        "image": "python:3.11",
        "command": ["sleep", "1000"],
        "volumeMounts": [{"name": "flag", "mountPath": "/etc/flag"}],
        "readinessProbe": {"exec": {"command": ["test", "-f", "/etc/flag/ready"]}, "periodSeconds": 1},
    }
    manifest = pod_manifest("again", [container], volumes=[{"name": "flag", "configMap": {"name": "flag"}}])
    core_v1.create_namespaced_pod(namespace, manifest)
    first = wait_pod(core_v1, namespace, "again", is_ready, "Running and Ready")
    core_v1.delete_namespaced_pod("again", namespace)

    def recreated() -> bool:
        try:
            core_v1.create_namespaced_pod(namespace, manifest)
        except client.ApiException as error:
            if error.status == 409:  # the old one is still terminating
                return False
            raise
        return True

    wait_for(recreated, 30, "the old pod to go, so its name is free")
    second = wait_pod(core_v1, namespace, "again", is_ready, "Running and Ready (second pod)")
    assert second.metadata.uid != first.metadata.uid
    time.sleep(3)  # several readiness periods after the old pod's cleanup
    assert is_ready(core_v1.read_namespaced_pod("again", namespace))


def test_readiness_gates_hold_the_pod_until_their_condition_is_true(
    process_node: ProcessNode, core_v1: client.CoreV1Api, namespace: str
) -> None:
    container = {"name": "c", "image": "python:3.11", "command": ["sleep", "1000"]}
    manifest = pod_manifest("gated", [container], readinessGates=[{"conditionType": "example.com/warm"}])
    core_v1.create_namespaced_pod(namespace, manifest)
    pod = wait_pod(
        core_v1,
        namespace,
        "gated",
        lambda p: p.status.container_statuses and p.status.container_statuses[0].ready,
        "running",
    )
    assert not is_ready(pod)
    warm = {"type": "example.com/warm", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
    core_v1.patch_namespaced_pod_status("gated", namespace, {"status": {"conditions": [warm]}})
    wait_pod(core_v1, namespace, "gated", is_ready, "Ready once its gate is True")


def test_active_deadline_fails_the_pod(
    process_node: ProcessNode, core_v1: client.CoreV1Api, namespace: str
) -> None:
    container = {"name": "c", "image": "python:3.11", "command": ["sleep", "1000"]}
    manifest = pod_manifest("late", [container], activeDeadlineSeconds=2, terminationGracePeriodSeconds=1)
    started = time.monotonic()
    core_v1.create_namespaced_pod(namespace, manifest)
    pod = wait_pod(core_v1, namespace, "late", lambda p: p.status.phase == "Failed", "Failed", timeout=30)
    assert pod.status.reason == "DeadlineExceeded"
    assert 2 <= time.monotonic() - started < 15
    assert terminated(pod).exit_code == 143  # sleep ends on SIGTERM


def poll(check: Any, timeout: float, what: str) -> None:
    """`wait_for` with a 20 ms period, for timing."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.slow
def test_pod_start_and_delete_latency(
    process_node: ProcessNode, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """Create -> Ready and delete -> gone for ten `sleep` pods, one after the other (printed with -s)."""
    starts, deletes = [], []
    for index in range(10):
        name = f"quick-{index}"
        manifest = pod_manifest(name, [{"name": "c", "image": "python:3.11", "command": ["sleep", "1000"]}])
        began = time.monotonic()
        core_v1.create_namespaced_pod(namespace, manifest)
        poll(lambda n=name: is_ready(core_v1.read_namespaced_pod(n, namespace)), 30, f"{name} Ready")
        starts.append(time.monotonic() - began)
        began = time.monotonic()
        core_v1.delete_namespaced_pod(name, namespace)
        poll(
            lambda n=name: (
                not core_v1.list_namespaced_pod(namespace, field_selector=f"metadata.name={n}").items
            ),
            30,
            f"{name} gone",
        )
        deletes.append(time.monotonic() - began)
    starts.sort()
    deletes.sort()
    print(
        f"\ncreate->Ready median {starts[5]:.2f} s, max {starts[-1]:.2f} s; "
        f"delete->gone median {deletes[5]:.2f} s, max {deletes[-1]:.2f} s"
    )
    assert starts[5] < 3 and deletes[5] < 3
