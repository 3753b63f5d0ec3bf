"""The demo's environment: local cluster, process node, volumes and Kiln, started and stopped as one.

`kiln demo` and the e2e fixture (`e2e/conftest.py`) both use `Stack`, so the tests run on exactly
what the demo shows. Everything lives in one folder (the cluster's):

    <dir>/                    the local cluster (state.json, kubeconfig, logs/, ...)
    <dir>/logs/<name>.log     also the process node's and, in fallback mode, the controllers' logs
    <dir>/engine-cache/       hostPath behind the `kiln-engine-cache` claim (built engines)
    <dir>/demo.json           pids of the processes the demo started (read by `kiln demo --down`)

Kiln is installed with its Helm chart. Its operator and autoscaler then run as pods on the process
node; when they cannot become available there (`controllers="auto"`), the chart's Deployments are
scaled to zero and the same commands run as local subprocesses instead, which the caller reports.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml

from kiln import labels, paths
from kiln.demo import manifests
from kiln.demo.kube import Api, Helm, Kubectl, wait_for
from kiln.demo.steps import DemoError
from kiln.local import build, cluster

Controllers = Literal["auto", "chart", "local"]

RELEASE = "kiln"
RELEASE_NAMESPACE = "kiln-system"
PROCESS_NODE = "kiln-process-node"  # the Node
PROCESS_NODE_KEY = "process-node"  # its process in state.json and its log (logs/process-node.log)
# Where the chart's values for the local cluster may live (the first that exists is used).
LOCAL_VALUES_CANDIDATES = (
    "values-local.yaml",
    "values.local.yaml",
    "ci/local-values.yaml",
    "local-values.yaml",
)
PR_SET_PDEATHSIG = 1


def repo_root() -> Path:
    root = paths.repo_root()
    if root is None:
        raise DemoError("kiln demo runs from a source checkout (it needs charts/ and examples/)")
    return root


def kiln_executable() -> str:
    """The `kiln` script of the running environment (the venv's, not whatever is on PATH)."""
    beside = Path(sys.executable).parent / "kiln"
    return str(beside) if beside.exists() else (shutil.which("kiln") or "kiln")


def local_values_file(chart: Path) -> Path | None:
    for candidate in LOCAL_VALUES_CANDIDATES:
        if (chart / candidate).is_file():
            return chart / candidate
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


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


def engine_processes(root: int) -> list[int]:
    """`kiln-engine serve` processes among the descendants of `root` (the process node)."""
    return sorted(pid for pid in descendants(root) if is_engine_server(cmdline(pid).split(" ")))


class Stack:
    """Local cluster + process node + demo volumes + Kiln, in `directory`."""

    def __init__(
        self,
        directory: Path,
        progress: Callable[[str], None] = print,
        *,
        topology: str = "cpu",
        die_with_parent: bool = False,
        autoscaler_interval: float = 5.0,
        engine_retention: float | None = None,
    ) -> None:
        self.directory = directory.resolve()
        self.progress = progress
        self.topology = topology
        self.die_with_parent = die_with_parent
        self.autoscaler_interval = autoscaler_interval
        self.engine_retention = engine_retention  # seconds an unused LLMEngine is kept (operator)
        # The local cluster starts the process node itself where it can (`kiln local down` then
        # stops it too); older checkouts' clusters cannot, and the stack starts it.
        self.node_in_cluster = "process_node" in inspect.signature(cluster.Cluster).parameters
        extra: dict[str, Any] = {"process_node": True} if self.node_in_cluster else {}
        self.cluster = cluster.Cluster(self.directory, topology, die_with_parent=die_with_parent, **extra)
        self.state: cluster.State | None = None
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.controllers_mode: str | None = None  # "chart" or "local" once installed
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

    def log(self, name: str) -> Path:
        return cluster.log_path(self.directory, name)

    def env(self) -> dict[str, str]:
        """Environment of the processes the demo starts: this venv first on PATH, our kubeconfig."""
        bin_dir = str(Path(sys.executable).parent)
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{bin_dir}:{build.bin_dir()}:{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        }

    # ------------------------------------------------------------------ steps

    def build_binaries(self) -> Path:
        if build.missing(build.bin_dir()):
            return build.build(progress=self.progress)
        return build.bin_dir()

    def start_cluster(self) -> cluster.State:
        self.stop_recorded()
        try:
            self.state = self.cluster.start(progress=self.progress)
        except cluster.StartError as error:
            raise DemoError(str(error)) from error
        return self.state

    def start_process_node(self, timeout: float = 60.0) -> str:
        """Start `kiln process-node` and wait until its Node is Ready; return the node's name."""
        if self.node_in_cluster:
            wait_for(lambda: self.node_ready(), timeout, f"node {PROCESS_NODE} to become Ready")
            return PROCESS_NODE
        if importlib.util.find_spec("kiln.processnode") is None:
            raise DemoError(
                "this checkout has no process node yet (operator/kiln/processnode/): "
                "nothing could run the engine's pods"
            )
        state_dir = self.directory / "process-node"
        self.launch(
            "process-node",
            [
                kiln_executable(),
                "process-node",
                "--kubeconfig",
                str(self.kubeconfig),
                "--name",
                PROCESS_NODE,
                "--state-dir",
                str(state_dir),
            ],
        )

        def ready() -> bool:
            self.check_processes()
            return self.node_ready()

        wait_for(ready, timeout, f"node {PROCESS_NODE} to become Ready")
        return PROCESS_NODE

    def node_ready(self) -> bool:
        result = self.kubectl.run("get", "node", PROCESS_NODE, "-o", "json", check=False)
        if result.returncode != 0:
            return False
        conditions = json.loads(result.stdout).get("status", {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def create_volumes(self, namespace: str = "default", timeout: float = 60.0) -> None:
        """The model claim (examples/) and the engine cache claim, bound to hostPath volumes."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        documents = manifests.demo_volumes(namespace, repo_root() / "examples", self.cache_dir)
        self.kubectl.apply(documents)

        def bound() -> bool:
            claims = self.kubectl.items("pvc", "-n", namespace)
            phases = {c["metadata"]["name"]: c.get("status", {}).get("phase") for c in claims}
            return all(
                phases.get(name) == "Bound" for name in (manifests.MODELS_CLAIM, manifests.CACHE_CLAIM)
            )

        wait_for(bound, timeout, f"claims {manifests.MODELS_CLAIM} and {manifests.CACHE_CLAIM} to bind")

    def install_kiln(self, controllers: Controllers = "auto", timeout: float = 90.0) -> str:
        """Install the chart; make sure an operator and an autoscaler run. Returns "chart" or "local"."""
        chart = repo_root() / "charts" / "kiln"
        helm = Helm(self.kubeconfig, self.directory / "helm")
        values = local_values_file(chart)
        generated = self.directory / "demo-values.yaml"
        generated.write_text(yaml.safe_dump(manifests.fallback_values(self.autoscaler_interval)))
        value_args = ["-f", str(values)] if values else ["-f", str(generated)]
        # Pods on the process node share this machine's ports: ports of their own, so that two
        # local clusters (a demo and a test session) never fight over the chart's fixed ones.
        overrides = manifests.port_values(*(free_port() for _ in range(4)))
        if self.engine_retention is not None:
            overrides = manifests.merge(overrides, manifests.retention_values(self.engine_retention))
        override_file = self.directory / "demo-overrides.yaml"
        override_file.write_text(yaml.safe_dump(overrides))
        value_args += ["-f", str(override_file)]
        self.progress(
            f"helm upgrade --install {RELEASE} charts/kiln -n {RELEASE_NAMESPACE} {' '.join(value_args)}"
        )
        helm(
            "upgrade",
            "--install",
            RELEASE,
            str(chart),
            "--namespace",
            RELEASE_NAMESPACE,
            "--create-namespace",
            *value_args,
            "--wait=false",
        )
        deployments = self.kubectl.items("deployments", "-n", RELEASE_NAMESPACE)
        names = [d["metadata"]["name"] for d in deployments]
        self.progress(f"chart installed: deployments {', '.join(names) or '(none)'} in {RELEASE_NAMESPACE}")
        if controllers != "local":
            try:
                self.wait_chart_controllers(names, timeout if controllers == "auto" else timeout * 2)
                self.controllers_mode = "chart"
                return "chart"
            except DemoError as error:
                if controllers == "chart":
                    raise
                self.progress(f"the chart's operator/autoscaler did not become available: {error}")
        self.progress(
            "FALLBACK: running `kiln operator run` and `kiln autoscaler run` as local "
            "subprocesses (the chart's Deployments are scaled to 0)"
        )
        if names:
            self.kubectl("scale", "deployment", "-n", RELEASE_NAMESPACE, "--replicas=0", *names)
        self.start_local_controllers()
        self.controllers_mode = "local"
        return "local"

    def wait_chart_controllers(self, names: list[str], timeout: float, stable: float = 15.0) -> None:
        """Wait until every chart Deployment is available and its pods have run `stable` seconds
        without a restart (a pod that crashes at start-up is Ready for a moment first)."""
        if not names:
            raise DemoError("the chart rendered no Deployments")
        since: float | None = None

        def settled() -> bool:
            nonlocal since
            deployments = self.kubectl.items("deployments", "-n", RELEASE_NAMESPACE)
            available = bool(deployments) and all(
                (d.get("status", {}).get("availableReplicas") or 0) >= 1
                for d in deployments
                if (d.get("spec", {}).get("replicas") or 0) > 0
            )
            if not available or self.controller_trouble():
                since = None
                return False
            since = since or time.monotonic()
            return time.monotonic() - since >= stable

        try:
            wait_for(settled, timeout, f"Deployments {', '.join(names)} to run {stable:.0f} s", interval=1.0)
        except DemoError as error:
            trouble = self.controller_trouble()
            raise DemoError(f"{error}{f'; {trouble}' if trouble else ''}") from error

    def controller_trouble(self) -> str | None:
        """What is wrong with the chart's pods (restarts, crash loops), with the last log lines."""
        if self.controllers_mode == "local":
            return None
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

    def start_local_controllers(self) -> None:
        kiln = kiln_executable()
        self.launch(
            "operator",
            [
                kiln,
                "operator",
                "run",
                "--all-namespaces",
                f"--metrics-port={free_port()}",
                f"--health-port={free_port()}",
                "--log-format=plain",
                *(
                    manifests.retention_args(self.engine_retention)
                    if self.engine_retention is not None
                    else []
                ),
            ],
        )
        self.launch(
            "autoscaler",
            [
                kiln,
                "autoscaler",
                "run",
                f"--interval={self.autoscaler_interval}",
                f"--kubeconfig={self.kubeconfig}",
                f"--metrics-port={free_port()}",
                f"--health-port={free_port()}",
            ],
        )
        time.sleep(2.0)
        self.check_processes()

    # ------------------------------------------------------------------ processes

    def retention_args(self) -> list[str]:
        return [] if self.engine_retention is None else manifests.retention_args(self.engine_retention)

    def launch(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        """Start one long-running process in its own process group, logging to logs/<name>.log."""
        self.log(name).parent.mkdir(parents=True, exist_ok=True)
        with self.log(name).open("wb") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=self.env(),
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        self.processes[name] = process
        self._record()
        return process

    def check_processes(self) -> None:
        """Raise DemoError (with the log tail) if a process the demo started has exited."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise DemoError(
                    f"{name} exited with code {process.returncode}; last lines of {self.log(name)}:\n"
                    f"{cluster.log_tail(self.log(name), 25)}"
                )

    def _record(self) -> None:
        record = {name: {"pid": p.pid, "argv0": p.args[0]} for name, p in self.processes.items()}  # type: ignore[index]
        (self.directory / "demo.json").write_text(json.dumps(record, indent=2))

    def stop_recorded(self) -> list[str]:
        """Stop the processes a previous demo recorded in demo.json and its cluster."""
        record_file = self.directory / "demo.json"
        stopped: list[str] = []
        with contextlib.suppress(FileNotFoundError, ValueError):
            record = json.loads(record_file.read_text())
            for name, item in record.items():
                if cluster._is_ours(int(item["pid"]), str(item["argv0"])):
                    cluster.stop_groups([int(item["pid"])], grace_seconds=30.0)
                    stopped.append(name)
        record_file.unlink(missing_ok=True)
        previous = cluster.read_state(self.directory)
        if previous is not None:
            stopped += cluster.stop_state(previous)
            cluster.state_file(self.directory).unlink(missing_ok=True)
        return stopped

    def stop(self) -> list[int]:
        """Stop everything (controllers, process node and its pods, the cluster).

        Returns the pids of the node's pods that were still running once the node had stopped
        (they are killed, but it is a sign that something did not honour SIGTERM).
        """
        if self._api is not None:
            self._api.close()
            self._api = None
        # What runs on the process node now, to make sure none of it outlives the node.
        roots = [pid for pid in (self.process_node_pid(), *(p.pid for p in self.processes.values())) if pid]
        pods = {pid: cmdline(pid) for root in roots for pid in descendants(root)}
        # Controllers first (they would react to pods vanishing), then the node (it stops its pods).
        for name in ("autoscaler", "operator", PROCESS_NODE_KEY):
            process = self.processes.get(name)
            if process is not None and process.poll() is None:
                cluster.stop_groups([process.pid], grace_seconds=40.0)
            if process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)
        self.processes.clear()
        (self.directory / "demo.json").unlink(missing_ok=True)
        self.cluster.stop()
        # Same pid and same command line: still the process the node started, not a reused pid.
        leftovers = [pid for pid, line in pods.items() if line and cmdline(pid) == line]
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return leftovers

    def process_node_pid(self) -> int | None:
        """Pid of the running process node (started by the cluster or by the stack)."""
        process = self.processes.get("process-node")
        if process is not None:
            return process.pid if process.poll() is None else None
        state = self.state or cluster.read_state(self.directory)
        if state is None or PROCESS_NODE_KEY not in state.pids:
            return None
        pid = state.pids[PROCESS_NODE_KEY]
        return pid if cluster.alive(state).get(PROCESS_NODE_KEY) else None

    def engine_processes(self) -> list[int]:
        """Pids of the engine servers running on the process node now."""
        node = self.process_node_pid()
        return engine_processes(node) if node else []

    def log_tails(
        self, names: tuple[str, ...] = ("process-node", "operator", "autoscaler"), lines: int = 20
    ) -> str:
        """The tails of the logs that usually explain a failure."""
        parts = []
        for name in names:
            path = self.log(name)
            if path.exists():
                parts.append(f"--- {path} (last {lines} lines)\n{cluster.log_tail(path, lines)}")
        return "\n".join(parts)


def process_node_label_selector() -> str:
    return f"{labels.PROCESS_NODE_LABEL}=true"
