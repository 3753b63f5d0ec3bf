"""The local cluster's real node: a kubelet, containerd and runc run a pod from an image, with probes,
logs, exec, Services by ClusterIP and by DNS name; `down` leaves nothing on the host.

One cluster (`Cluster(real_node=True)`, its own folder) serves the whole module; the last test
stops it and checks the host. Needs root, buildah and runc (e2e/system-packages.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiln.local import build, cluster, nodeimages, realnode
from kiln.local.testing import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1800)]

if os.geteuid() != 0 or not (shutil.which("buildah") and shutil.which("runc")):
    pytest.skip("the real node needs root, buildah and runc", allow_module_level=True)

NAMESPACE = "real-node-test"
ON_REAL_NODE = {"kubernetes.io/hostname": realnode.NODE_NAME}
# Where a kubelet, containerd or CNI write when not told otherwise (searched recursively).
DEFAULT_PATHS = (
    "/run/containerd",
    "/var/log/containers",
    "/var/log/pods",
    "/run/nri",
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/var/lib/cni",
    "/opt/containerd",
    "/opt/cni",
    "/etc/cni",
    "/etc/kubernetes",
    "/usr/libexec/kubernetes",
)
START_AND_SERVE = "echo started $(hostname); exec /bin/httpd -f -p {port} -h /www"


@dataclass
class HostSnapshot:
    """What of the host a real node touches, to compare before `up` and after `down`."""

    links: set[str]
    netns: set[str]
    chains: set[str]
    sysctls: dict[str, str]
    # Paths a kubelet, containerd or CNI write by default (none should appear).
    files: set[str]
    cgroups: set[str]  # the pods' parent cgroup, per hierarchy


def snapshot() -> HostSnapshot:
    chains = set()
    for family in ("iptables-save", "ip6tables-save"):
        dump = subprocess.run([family], capture_output=True, text=True, check=False).stdout
        table = ""
        for line in dump.splitlines():
            if line.startswith("*"):
                table = line
            elif line.startswith((":KUBE-", ":CNI-HOSTPORT-")):  # what kube-proxy, kubelet, portmap make
                chains.add(f"{family} {table} {line.split()[0]}")
    netns = Path("/run/netns")
    return HostSnapshot(
        # Other work on the machine (podman, buildah) may add its own links and CNI allocations
        # meanwhile: not ours to judge.
        links={p.name for p in Path("/sys/class/net").iterdir() if "podman" not in p.name},
        netns={p.name for p in netns.iterdir()} if netns.is_dir() else set(),
        chains=chains,
        sysctls={key: Path("/proc/sys", key).read_text().strip() for key in realnode.SYSCTLS},
        cgroups={str(path) for path in Path("/sys/fs/cgroup").glob(f"*/{realnode.CGROUP_PARENT}")},
        files={path for path in DEFAULT_PATHS if Path(path).exists()}
        | {
            str(entry)
            for folder in DEFAULT_PATHS
            if Path(folder).is_dir()
            for entry in Path(folder).rglob("*")
            if "podman" not in entry.parts  # other work's CNI network (buildah, podman)
        },
    )


@dataclass
class RealCluster:
    local: cluster.Cluster
    before: HostSnapshot
    kubectl: Path
    up_seconds: float

    def run(self, *args: str, timeout: float = 60) -> str:
        result = subprocess.run(
            [str(self.kubectl), f"--kubeconfig={self.local.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result.stdout

    def apply(self, manifest: dict[str, Any]) -> None:
        result = subprocess.run(
            [str(self.kubectl), f"--kubeconfig={self.local.kubeconfig}", "apply", "-f", "-"],
            input=json.dumps(manifest),
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    started = time.monotonic()
    for toolset in (build.CONTROL_PLANE, *build.NODE_TOOLSETS):
        build.build(progress=lambda line: None, toolset=toolset)
    # `up` would clear a killed run's leftovers itself; clear them first, so that the
    # snapshot holds what the host had without any Kiln node, and `down` must restore exactly it.
    if stale := realnode.clear_stale_node():
        print(f"cleared the stale real node of {stale}")
    before = snapshot()
    local = cluster.Cluster(
        tmp_path_factory.mktemp("real-node") / "cluster", "mixed", die_with_parent=True, real_node=True
    )
    try:
        local.start(progress=lambda line: print(line, flush=True), timeout=120)
        realnode.import_images(local.directory, [nodeimages.archive(nodeimages.test_http_image())])
        kubectl = build.binary_paths()["kubectl"]
        real = RealCluster(local, before, kubectl, time.monotonic() - started)
        real.run("create", "namespace", NAMESPACE)
        yield real
    finally:
        local.stop()


def deployment(name: str) -> dict[str, Any]:
    """The test image's HTTP server, with a readiness probe, on the real node."""
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": ON_REAL_NODE,
                    "containers": [
                        {
                            "name": "web",
                            "image": nodeimages.test_http_image().ref,
                            "imagePullPolicy": "Never",
                            "command": [
                                "/bin/sh",
                                "-c",
                                START_AND_SERVE.format(port=nodeimages.TEST_HTTP_PORT),
                            ],
                            "ports": [{"containerPort": nodeimages.TEST_HTTP_PORT}],
                            "readinessProbe": {
                                "httpGet": {"path": "/index.html", "port": nodeimages.TEST_HTTP_PORT},
                                "periodSeconds": 1,
                            },
                        }
                    ],
                },
            },
        },
    }


def service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": nodeimages.TEST_HTTP_PORT}]},
    }


def client_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "nodeSelector": ON_REAL_NODE,
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "client",
                    "image": nodeimages.test_http_image().ref,
                    "imagePullPolicy": "Never",
                    "command": ["/bin/sleep", "3600"],
                }
            ],
        },
    }


def ready_pod(real: RealCluster, selector: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        pods = json.loads(real.run("get", "pods", "-n", NAMESPACE, "-l", selector, "-o", "json"))["items"]
        for pod in pods:
            conditions = pod["status"].get("conditions", [])
            if pod["status"].get("phase") == "Running" and any(
                c["type"] == "Ready" and c["status"] == "True" for c in conditions
            ):
                return dict(pod)
        return None

    return wait_for(probe, 90, f"a Running and Ready pod with {selector}")


@pytest.fixture(scope="module")
def web(real: RealCluster) -> dict[str, Any]:
    """A Deployment + Service of the test image, and a client pod, all on the real node."""
    name = f"web-{uuid.uuid4().hex[:6]}"
    real.apply(deployment(name))
    real.apply(service(name))
    real.apply(client_pod("client"))
    pod = ready_pod(real, f"app={name}")
    real.run("wait", "-n", NAMESPACE, "--for=condition=Ready", "pod/client", "--timeout=90s", timeout=100)
    return {"name": name, "pod": pod}


def test_the_node_is_a_real_kubelet(real: RealCluster) -> None:
    node = json.loads(real.run("get", "node", realnode.NODE_NAME, "-o", "json"))
    info = node["status"]["nodeInfo"]
    assert info["containerRuntimeVersion"].startswith("containerd://")
    assert (
        info["kubeletVersion"]
        == build.module_versions((build.GOTOOLS_DIR / "go.mod").read_text())["k8s.io/kubernetes"]
    )
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == realnode.NODE_IP
    print(f"cluster with real node up in {real.up_seconds:.1f} s (binaries and images cached or built)")


def test_deployment_pod_runs_and_becomes_ready_on_the_node(real: RealCluster, web: dict[str, Any]) -> None:
    pod = web["pod"]
    assert pod["spec"]["nodeName"] == realnode.NODE_NAME
    assert pod["status"]["podIP"].startswith(realnode.NODE_POD_CIDR.rsplit(".", 1)[0] + ".")


def test_logs_and_exec_reach_the_container(real: RealCluster, web: dict[str, Any]) -> None:
    pod_name = web["pod"]["metadata"]["name"]
    assert f"started {pod_name}" in real.run("logs", "-n", NAMESPACE, pod_name)
    served = real.run("exec", "-n", NAMESPACE, pod_name, "--", "cat", "/www/index.html")
    assert served == nodeimages.test_http_image().texts["www/index.html"]


def test_service_answers_by_cluster_ip_and_by_dns_name(real: RealCluster, web: dict[str, Any]) -> None:
    name = web["name"]
    cluster_ip = real.run("get", "service", "-n", NAMESPACE, name, "-o", "jsonpath={.spec.clusterIP}")
    expected = nodeimages.test_http_image().texts["www/index.html"]
    for host in (cluster_ip, f"{name}.{NAMESPACE}.svc.{realnode.CLUSTER_DOMAIN}"):
        # No `wget -T`: Debian's static busybox wget crashes with it (SIGSEGV); kubectl's timeout holds.
        body = real.run("exec", "-n", NAMESPACE, "client", "--", "wget", "-q", "-O", "-", f"http://{host}/")
        assert body == expected, host


def test_pods_reach_the_api_server_through_the_kubernetes_service(real: RealCluster) -> None:
    """kubectl in a pod, with the in-cluster config (service account token, CA, `kubernetes` Service)."""
    image = nodeimages.kubectl_image(real.kubectl)
    realnode.import_images(real.local.directory, [nodeimages.archive(image)])
    container: dict[str, Any] = {"name": "kubectl", "image": image.ref, "imagePullPolicy": "Never"}
    container["args"] = ["get", "--raw", "/version"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "api-client", "namespace": NAMESPACE}}
    pod["spec"] = {"nodeSelector": ON_REAL_NODE, "restartPolicy": "Never", "containers": [container]}
    real.apply(pod)
    real.run(
        "wait", "-n", NAMESPACE, "--for=jsonpath={.status.phase}=Succeeded", "pod/api-client", "--timeout=90s"
    )
    version = json.loads(real.run("logs", "-n", NAMESPACE, "api-client"))
    assert (
        version["gitVersion"]
        == build.module_versions((build.GOTOOLS_DIR / "go.mod").read_text())["k8s.io/kubernetes"]
    )


def test_down_leaves_nothing_behind(real: RealCluster) -> None:
    node = realnode.layout(real.local.directory)
    started = time.monotonic()
    real.local.stop()
    print(f"down in {time.monotonic() - started:.1f} s")
    after = snapshot()
    assert realnode.node_processes(node) == []
    assert realnode.mounts_under(real.local.directory) == []
    assert after.links == real.before.links
    assert after.netns == real.before.netns
    assert after.chains == real.before.chains
    assert after.sysctls == real.before.sysctls
    assert after.files - real.before.files == set()
    assert after.cgroups == real.before.cgroups
    assert not realnode.OWNER_FILE.exists()


def test_links_no_cluster_here_owns_are_neither_taken_over_nor_torn_down(tmp_path: Path) -> None:
    """Another container's real node sharing this network namespace (its cluster folder and
    OWNER_FILE out of sight): `up` refuses before launching anything, `down` leaves its links."""
    assert not realnode.OWNER_FILE.exists()  # the module's node is down (the test above)
    subprocess.run(["ip", "link", "add", realnode.NODE_LINK, "type", "bridge"], check=True)
    try:

        def never(*args: object) -> None:
            raise AssertionError(f"called {args} although another node's links are there")

        with pytest.raises(realnode.NodeError, match=f"links {realnode.NODE_LINK} exist"):
            realnode.start(tmp_path, "https://127.0.0.1:1", httpx.Client(), never, never, never, 1.0)
        assert realnode.teardown(tmp_path, never) == []
        assert (Path("/sys/class/net") / realnode.NODE_LINK).exists()
        assert not realnode.OWNER_FILE.exists()
    finally:
        subprocess.run(["ip", "link", "del", realnode.NODE_LINK], check=False)


def test_what_a_killed_run_left_is_cleared_before_the_next_one(tmp_path: Path) -> None:
    """`kiln local up` SIGKILLed with its real node running (a CI job cancelled, an OOM kill):
    its links, chains and cgroups stay behind; clearing the stale node restores the host."""
    assert not realnode.OWNER_FILE.exists()  # the module's node is down (the tests above)
    before = snapshot()
    cluster_dir = tmp_path / "killed"
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from kiln.local import cluster\n"
        "local = cluster.Cluster(Path(sys.argv[1]), 'mixed', die_with_parent=True, real_node=True)\n"
        "local.start(progress=lambda line: None, timeout=120)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(cluster_dir)], timeout=300, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert (Path("/sys/class/net") / realnode.NODE_LINK).exists()  # what it left
    assert realnode.OWNER_FILE.read_text().strip() == str(cluster_dir)
    # Its components die of SIGKILL with it (PR_SET_PDEATHSIG), but not at the same instant: until
    # containerd has exited the node counts as running, and clearing would leave it alone.
    node = realnode.layout(cluster_dir)
    wait_for(
        lambda: not realnode.containerd_running(node), timeout=30, what="the killed node's containerd to exit"
    )

    assert realnode.clear_stale_node() == cluster_dir
    after = snapshot()
    assert realnode.node_processes(realnode.layout(cluster_dir)) == []
    assert realnode.mounts_under(cluster_dir) == []
    assert (after.links, after.netns, after.chains) == (before.links, before.netns, before.chains)
    assert (after.sysctls, after.cgroups) == (before.sysctls, before.cgroups)
    assert after.files - before.files == set()
    assert not realnode.OWNER_FILE.exists()
    assert realnode.clear_stale_node() is None  # nothing left to clear
