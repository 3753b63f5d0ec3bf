"""The demo's environment: local cluster with its real node, Kiln's images on it, volumes and Kiln
installed from its Helm chart, started and stopped as one.

`kiln demo` and the e2e fixture (`e2e/conftest.py`) both use `Stack`, so the tests run on exactly
what the demo shows. Everything lives in one folder (the cluster's):

    <dir>/                    the local cluster (state.json, kubeconfig, logs/, node/, ...)
    <dir>/engine-cache/       hostPath behind the `kiln-engine-cache` claim (built engines)
    <dir>/kiln-values.yaml    the Helm values the chart was installed with

The pods run on the cluster's real node (`kiln-real-node`: kubelet, containerd, runc; see
docs/real-node.md) from the images `kiln images build` writes, imported into its containerd: the
operator and autoscaler from the control-plane image, the build Jobs and serving pods from the
engine image. The chart is installed with its default values plus only what this cluster needs
(`manifests.real_node_values`); `Stack(values=...)` merges more on top (e.g. a Prometheus URL for
the autoscaler).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from kiln import paths
from kiln.demo import manifests
from kiln.demo.kube import Api, Helm, Kubectl, wait_for
from kiln.demo.steps import DemoError
from kiln.local import build, cluster, nodeimages, realnode
from kiln.render.common import RUN_AS_USER

RELEASE = "kiln"
RELEASE_NAMESPACE = "kiln-system"
NODE = realnode.NODE_NAME
CLIENT_POD = "kiln-demo-client"  # a busybox pod that asks the model by the Service's DNS name


def repo_root() -> Path:
    root = paths.repo_root()
    if root is None:
        raise DemoError("kiln demo runs from a source checkout (it needs charts/ and examples/)")
    return root


def kiln_executable() -> str:
    """The `kiln` script of the running environment (the venv's, not whatever is on PATH)."""
    beside = Path(sys.executable).parent / "kiln"
    return str(beside) if beside.exists() else (shutil.which("kiln") or "kiln")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def cmdline(pid: int) -> str:
    """The command line of `pid` (arguments joined by spaces), or "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def descendants(root: int) -> list[int]:
    """Live (non-zombie) descendants of `root`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def is_engine_server(argv: list[str]) -> bool:
    """Whether a command line runs `kiln-engine serve` (directly, or through its interpreter)."""
    return any(
        Path(argv[i]).name == "kiln-engine" and argv[i + 1] == "serve" for i in range(min(2, len(argv) - 1))
    )


def container_processes(node: realnode.Layout) -> dict[int, str]:
    """pid -> command line of every process in the node's containers (the shims' descendants)."""
    shims = [pid for pid, argv in realnode.node_processes(node) if "containerd-shim" in Path(argv[0]).name]
    return {pid: cmdline(pid) for shim in shims for pid in descendants(shim)}


def engine_processes(node: realnode.Layout) -> list[int]:
    """Host pids of the `kiln-engine serve` processes in the node's containers."""
    return sorted(pid for pid, line in container_processes(node).items() if is_engine_server(line.split(" ")))


def image_archives() -> list[Path]:
    """The archives of the images this checkout's chart and operator run (`kiln images build`)."""
    from kiln.images.build import cache_dir, repo_images

    return [cache_dir() / image.archive_name for image in repo_images(repo_root())]


def build_images(progress: Callable[[str], None], always: bool = False) -> list[Path]:
    """Kiln's image archives, built with `kiln images build` when one is missing (or `always`: a
    warm build redoes only what changed in the checkout)."""
    archives = image_archives()
    if always or not all(archive.is_file() for archive in archives):
        progress("$ kiln images build")
        lines = []
        with subprocess.Popen(
            [kiln_executable(), "images", "build"],
            cwd=repo_root(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line.rstrip())
                progress(line.rstrip())
        if process.returncode != 0:
            raise DemoError("`kiln images build` failed:\n" + "\n".join(lines[-30:]))
    missing = [str(archive) for archive in archives if not archive.is_file()]
    if missing:
        raise DemoError(f"`kiln images build` left no archive at {', '.join(missing)}")
    return archives


class Stack:
    """Local cluster + real node + Kiln's images + demo volumes + Kiln, in `directory`."""

    def __init__(
        self,
        directory: Path,
        progress: Callable[[str], None] = print,
        *,
        topology: str = "cpu",
        die_with_parent: bool = False,
        autoscaler_interval: float | None = None,
        engine_retention: float | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> None:
        """`autoscaler_interval` and `engine_retention` (seconds) override the chart's defaults for
        tests; `values` are Helm values merged last (the hook for what another part of the local
        cluster brings, e.g. `autoscaler.metricsSource: prometheus` with its URL)."""
        self.directory = directory.resolve()
        self.progress = progress
        self.topology = topology
        self.die_with_parent = die_with_parent
        self.autoscaler_interval = autoscaler_interval
        self.engine_retention = engine_retention  # seconds an unused LLMEngine is kept (operator)
        self.values = dict(values or {})
        self.cluster = cluster.Cluster(
            self.directory, topology, die_with_parent=die_with_parent, real_node=True
        )
        self.state: cluster.State | None = None
        self._kubectl: Kubectl | None = None
        self._api: Api | None = None

    # ------------------------------------------------------------------ accessors

    @property
    def kubeconfig(self) -> Path:
        return self.cluster.kubeconfig

    @property
    def kubectl(self) -> Kubectl:
        if self._kubectl is None:
            self._kubectl = Kubectl(self.kubeconfig)
        return self._kubectl

    @property
    def api(self) -> Api:
        if self._api is None:
            if self.state is None:
                raise DemoError("the cluster is not running")
            self._api = Api(self.directory, self.state.server)
        return self._api

    @property
    def cache_dir(self) -> Path:
        return self.directory / "engine-cache"

    @property
    def node(self) -> realnode.Layout:
        return realnode.layout(self.directory)

    def log(self, name: str) -> Path:
        return cluster.log_path(self.directory, name)

    # ------------------------------------------------------------------ steps

    def build_binaries(self) -> Path:
        """The control plane's and the real node's binaries (built once per pin set)."""
        for toolset in (build.CONTROL_PLANE, *build.NODE_TOOLSETS):
            if build.missing(build.bin_dir(toolset), toolset.binaries):
                build.build(progress=self.progress, toolset=toolset)
        return build.bin_dir()

    def build_images(self, always: bool = False) -> list[Path]:
        return build_images(self.progress, always)

    def start_cluster(self) -> cluster.State:
        self.stop_recorded()
        try:
            self.state = self.cluster.start(progress=self.progress, timeout=120.0)
        except (cluster.StartError, realnode.NodeError, nodeimages.ImageError) as error:
            raise DemoError(str(error)) from error
        return self.state

    def import_images(self, archives: list[Path]) -> list[Path]:
        """Import Kiln's images (and the client pod's) into the node's containerd; returns those
        imported (the node keeps images across clusters: one already there is skipped)."""
        client = nodeimages.archive(nodeimages.test_http_image())
        try:
            return realnode.import_images(self.directory, [*archives, client])
        except nodeimages.ImageError as error:
            raise DemoError(str(error)) from error

    def create_volumes(self, namespace: str = "default", timeout: float = 60.0) -> None:
        """The model claim (examples/) and the engine cache claim, bound to hostPath volumes."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # The engine's pods run as RUN_AS_USER; a hostPath volume keeps its owner (no fsGroup).
        os.chown(self.cache_dir, RUN_AS_USER, RUN_AS_USER)
        documents = manifests.demo_volumes(namespace, repo_root() / "examples", self.cache_dir)
        self.kubectl.apply(documents)

        def bound() -> bool:
            claims = self.kubectl.items("pvc", "-n", namespace)
            phases = {c["metadata"]["name"]: c.get("status", {}).get("phase") for c in claims}
            return all(
                phases.get(name) == "Bound" for name in (manifests.MODELS_CLAIM, manifests.CACHE_CLAIM)
            )

        wait_for(bound, timeout, f"claims {manifests.MODELS_CLAIM} and {manifests.CACHE_CLAIM} to bind")

    def helm_values(self) -> dict[str, Any]:
        """The chart's values here: only what the local cluster needs, plus the tests' overrides."""
        values = manifests.real_node_values({realnode.NODE_LABEL: "true"})
        if self.state is not None:  # the local API server listens on a free port, not 443 or 6443
            values = manifests.merge(values, manifests.api_server_values(self.state.server))
        if self.autoscaler_interval is not None:
            values = manifests.merge(values, {"autoscaler": {"interval": int(self.autoscaler_interval) or 1}})
        if self.engine_retention is not None:
            values = manifests.merge(values, manifests.retention_values(self.engine_retention))
        return manifests.merge(values, self.values)

    def install_kiln(self, timeout: float = 180.0) -> list[str]:
        """Install the chart and wait until its operator and autoscaler pods run on the real node;
        returns the `kubectl get pods -o wide` lines of the release namespace."""
        chart = repo_root() / "charts" / "kiln"
        helm = Helm(self.kubeconfig, self.directory / "helm")
        values_file = self.directory / "kiln-values.yaml"
        values_file.write_text(yaml.safe_dump(self.helm_values(), sort_keys=False))
        self.progress(f"helm upgrade --install {RELEASE} charts/kiln -n {RELEASE_NAMESPACE} -f {values_file}")
        for line in values_file.read_text().splitlines():
            self.progress(f"  {line}")
        helm(
            "upgrade",
            "--install",
            RELEASE,
            str(chart),
            "--namespace",
            RELEASE_NAMESPACE,
            "--create-namespace",
            "-f",
            str(values_file),
            "--wait=false",
        )
        deployments = self.kubectl.items("deployments", "-n", RELEASE_NAMESPACE)
        self.wait_chart_controllers([d["metadata"]["name"] for d in deployments], timeout)
        return self.kubectl("get", "pods", "-n", RELEASE_NAMESPACE, "-o", "wide").rstrip().splitlines()

    def wait_chart_controllers(self, names: list[str], timeout: float, stable: float = 10.0) -> None:
        """Wait until every chart Deployment is available and its pods have run `stable` seconds
        without a restart (a pod that crashes at start-up is Ready for a moment first)."""
        if not names:
            raise DemoError("the chart rendered no Deployments")
        since: float | None = None

        def settled() -> bool:
            nonlocal since
            deployments = self.kubectl.items("deployments", "-n", RELEASE_NAMESPACE)
            available = bool(deployments) and all(
                (d.get("status", {}).get("availableReplicas") or 0)
                >= (d.get("spec", {}).get("replicas") or 0)
                for d in deployments
            )
            if not available or self.controller_trouble():
                since = None
                return False
            since = since or time.monotonic()
            return time.monotonic() - since >= stable

        try:
            wait_for(settled, timeout, f"Deployments {', '.join(names)} to run {stable:.0f} s", interval=1.0)
        except DemoError as error:
            trouble = self.controller_trouble() or self.pod_problems(RELEASE_NAMESPACE)
            raise DemoError(f"{error}{f'; {trouble}' if trouble else ''}") from error

    def controller_trouble(self) -> str | None:
        """What is wrong with the chart's pods (restarts, crash loops), with the last log lines."""
        for pod in self.kubectl.items("pods", "-n", RELEASE_NAMESPACE):
            for container in pod.get("status", {}).get("containerStatuses") or []:
                if (container.get("restartCount") or 0) == 0:
                    continue
                name = pod["metadata"]["name"]
                waiting = (container.get("state") or {}).get("waiting") or {}
                logs = self.kubectl.run(
                    "logs", "-n", RELEASE_NAMESPACE, name, "--previous", "--tail=8", check=False
                ).stdout.strip()
                return (
                    f"pod {name} restarted {container['restartCount']} times "
                    f"({waiting.get('reason', 'running')}); its last log lines:\n{logs}"
                )
        return None

    def pod_problems(self, namespace: str) -> str:
        """Why the pods of `namespace` are not running: waiting reasons and the last events."""
        lines = []
        for pod in self.kubectl.items("pods", "-n", namespace):
            for container in pod.get("status", {}).get("containerStatuses") or []:
                waiting = (container.get("state") or {}).get("waiting")
                if waiting:
                    lines.append(
                        f"pod {pod['metadata']['name']}: {waiting.get('reason')} {waiting.get('message', '')}"
                    )
        events = self.kubectl.run(
            "get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False
        ).stdout.splitlines()[-8:]
        return "\n".join([*lines, *events])

    def start_client(self, namespace: str = "default", timeout: float = 60.0) -> str:
        """The busybox pod that asks the model from inside the cluster; returns its name once Ready."""
        pod = manifests.client_pod(
            CLIENT_POD, namespace, nodeimages.test_http_image().ref, {realnode.NODE_LABEL: "true"}
        )
        self.kubectl.apply([pod])
        wait = [
            "wait",
            "--for=condition=Ready",
            f"pod/{CLIENT_POD}",
            "-n",
            namespace,
            f"--timeout={timeout:.0f}s",
        ]
        result = self.kubectl.run(*wait, check=False, timeout=timeout + 30)
        if result.returncode != 0:
            raise DemoError(
                f"pod {CLIENT_POD} not Ready: {result.stderr.strip()}\n{self.pod_problems(namespace)}"
            )
        return CLIENT_POD

    # ------------------------------------------------------------------ processes

    def engine_processes(self) -> list[int]:
        """Host pids of the `kiln-engine serve` processes in the real node's containers."""
        return engine_processes(self.node)

    def check_processes(self) -> None:
        """Raise DemoError (with its log tail) if a component of the cluster or its node exited."""
        if self.state is None:
            return
        for name, alive in cluster.alive(self.state).items():
            if not alive:
                raise DemoError(
                    f"{name} exited; last lines of {self.log(name)}:\n{cluster.log_tail(self.log(name), 25)}"
                )

    def crictl(self, *args: str) -> str:
        """`crictl` against the node's containerd (what runs there, as the node sees it)."""
        command = [
            str(build.node_binary_paths()["crictl"]),
            f"--runtime-endpoint=unix://{self.node.socket}",
            f"--image-endpoint=unix://{self.node.socket}",
            *args,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise DemoError(f"crictl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def container_pid(self, container_id: str) -> int | None:
        """The host pid of a running container's first process, from its `containerd://<id>`
        (runc's state under the node's runc root), or None if runc knows no such container."""
        runtime, _, ident = container_id.partition("://")
        if runtime != "containerd" or not ident:
            raise DemoError(f"not a containerd container ID: {container_id!r}")
        state = self.node.state / "runc" / "k8s.io" / ident / "state.json"
        try:
            return int(json.loads(state.read_text())["init_process_pid"])
        except FileNotFoundError:
            return None

    def stop_recorded(self) -> list[str]:
        """Stop the cluster a previous demo left running in this folder."""
        previous = cluster.read_state(self.directory)
        if previous is None:
            return []
        stopped = cluster.stop_state(previous)
        cluster.state_file(self.directory).unlink(missing_ok=True)
        return stopped

    def stop(self) -> list[int]:
        """Stop everything: the node's pods through its runtime, the node, the cluster.

        Returns the pids of container processes still running once the cluster had stopped (they
        are killed, but it is a sign that the node's teardown missed them)."""
        if self._api is not None:
            self._api.close()
            self._api = None
        before = container_processes(self.node)
        self.cluster.stop()
        # Same pid and same command line: still the container's process, not a reused pid.
        leftovers = [pid for pid, line in before.items() if line and cmdline(pid) == line]
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return leftovers

    def log_tails(self, lines: int = 20) -> str:
        """What usually explains a failure: the chart's pods' logs and the node's own logs."""
        parts = []
        if self.state is not None:
            for pod in self.kubectl.run(
                "get", "pods", "-n", RELEASE_NAMESPACE, "-o", "name", check=False
            ).stdout.split():
                logs = self.kubectl.run("logs", "-n", RELEASE_NAMESPACE, pod, f"--tail={lines}", check=False)
                parts.append(
                    f"--- kubectl logs -n {RELEASE_NAMESPACE} {pod} (last {lines} lines)\n{logs.stdout}"
                )
        for name in ("kubelet", "containerd"):
            path = self.log(name)
            if path.exists():
                parts.append(f"--- {path} (last {lines} lines)\n{cluster.log_tail(path, lines)}")
        return "\n".join(parts)
