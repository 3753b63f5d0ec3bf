"""Run the local control plane: start, wait for, record and stop its processes on 127.0.0.1.

One cluster lives in one folder (default `kiln.paths.state_dir()/local`):

    state.json                 ports, pids, paths (what `down` and `status` read)
    kubeconfig                 admin kubeconfig (certificates embedded)
    pki/                       CA, serving/client certificates, service-account keys
    logs/<component>.log       one log per component
    etcd/                      etcd's data (fresh on every `up`)

Every component runs in its own process group; `stop` sends SIGTERM to each group, then SIGKILL
to whatever is left, so nothing outlives `kiln local down`.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from kiln import paths
from kiln.local import build, kwok, pki, realnode, topology

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # first address of SERVICE_CIDR: the `kubernetes` Service
POD_CIDR = "10.244.0.0/16"
CLUSTER_NAME = "kiln-local"
FIELD_MANAGER = "kiln-local"
LOG_TAIL_LINES = 40
PR_SET_PDEATHSIG = 1  # prctl(2) option

# Start order (see STOP_TIERS for the stop order).
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
# Optional: a real node (containerd, kubelet, kube-proxy, CoreDNS; `up --real-node`), see realnode.py.
REAL_NODE_COMPONENTS = realnode.COMPONENTS


class StartError(RuntimeError):
    """A component failed to start; the message names it and carries the tail of its log."""


def default_dir() -> Path:
    """The folder of the default local cluster."""
    return paths.state_dir() / "local"


@dataclass
class State:
    """What `up` recorded about a running cluster (state.json)."""

    directory: str
    topology: str
    ports: dict[str, int]
    pids: dict[str, int] = field(default_factory=dict)
    commands: dict[str, list[str]] = field(default_factory=dict)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['kube-apiserver']}"

    @property
    def kubeconfig(self) -> Path:
        return Path(self.directory) / "kubeconfig"

    def log(self, component: str) -> Path:
        return log_path(Path(self.directory), component)


def state_file(directory: Path) -> Path:
    return directory / "state.json"


def log_path(directory: Path, component: str) -> Path:
    return directory / "logs" / f"{component}.log"


def read_state(directory: Path) -> State | None:
    """The recorded state of the cluster in `directory`, or None if none was started there."""
    try:
        data = json.loads(state_file(directory).read_text())
    except FileNotFoundError:
        return None
    return State(**data)


def write_state(state: State) -> None:
    path = state_file(Path(state.directory))
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(asdict(state), indent=2))
    partial.replace(path)


def free_ports(names: tuple[str, ...]) -> dict[str, int]:
    """One free loopback TCP port per name (all held open together, so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = {}
        for name in names:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            sockets[name] = sock
        return {name: sock.getsockname()[1] for name, sock in sockets.items()}


def kubeconfig(server: str, ca: Path, cert: Path, key: Path, user: str) -> dict[str, Any]:
    """A kubeconfig for one user, certificates embedded."""

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": CLUSTER_NAME, "cluster": {"server": server, "certificate-authority-data": b64(ca)}}
        ],
        "users": [
            {"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}
        ],
        "contexts": [{"name": CLUSTER_NAME, "context": {"cluster": CLUSTER_NAME, "user": user}}],
        "current-context": CLUSTER_NAME,
    }


def component_commands(
    bins: dict[str, Path], directory: Path, ports: dict[str, int], *, real_node: bool = False
) -> dict[str, list[str]]:
    """Command lines of every component (pure: paths and ports in, argv out).

    With `real_node`, pods dial the API server through the `kubernetes` Service: it listens on
    every address (the node's included) and advertises the node's address as its endpoint."""
    p = pki.Pki(directory / "pki")
    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
    cm_kubeconfig = str(directory / "controller-manager.kubeconfig")
    scheduler_kubeconfig = str(directory / "scheduler.kubeconfig")
    return {
        "etcd": [
            str(bins["etcd"]),
            "--name=kiln",
            f"--data-dir={directory / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=kiln={peer_url}",
            "--initial-cluster-state=new",
            # A throwaway test cluster: durability is not worth an fsync per write.
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ],
        "kube-apiserver": [
            str(bins["kube-apiserver"]),
            f"--etcd-servers={etcd_url}",
            f"--bind-address={'0.0.0.0' if real_node else '127.0.0.1'}",
            f"--advertise-address={realnode.NODE_IP if real_node else '127.0.0.1'}",
            f"--secure-port={ports['kube-apiserver']}",
            f"--cert-dir={directory / 'pki'}",
            f"--tls-cert-file={p.serving_cert}",
            f"--tls-private-key-file={p.serving_key}",
            f"--client-ca-file={p.ca_cert}",
            f"--service-account-key-file={p.sa_pub}",
            f"--service-account-signing-key-file={p.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # `kubectl logs/exec` on a real node: the API server dials the kubelet at the node's
            # InternalIP (its host name resolves nowhere) as the admin.
            f"--kubelet-client-certificate={p.client_cert(pki.ADMIN)}",
            f"--kubelet-client-key={p.client_key(pki.ADMIN)}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction,ExtendedResourceToleration",
            "--allow-privileged=true",
            # Loopback cannot be a Service endpoint; nothing in a simulated cluster dials the
            # `kubernetes` Service, so the API server does not reconcile its endpoints.
            f"--endpoint-reconciler-type={'lease' if real_node else 'none'}",
            "--profiling=false",
        ],
        "kube-controller-manager": [
            str(bins["kube-controller-manager"]),
            f"--kubeconfig={cm_kubeconfig}",
            f"--authentication-kubeconfig={cm_kubeconfig}",
            f"--authorization-kubeconfig={cm_kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['kube-controller-manager']}",
            f"--cert-dir={directory / 'pki' / 'controller-manager'}",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={p.sa_key}",
            f"--root-ca-file={p.ca_cert}",
            f"--cluster-signing-cert-file={p.ca_cert}",
            f"--cluster-signing-key-file={p.ca_key}",
            f"--cluster-name={CLUSTER_NAME}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--profiling=false",
        ],
        "kube-scheduler": [
            str(bins["kube-scheduler"]),
            f"--kubeconfig={scheduler_kubeconfig}",
            f"--authentication-kubeconfig={scheduler_kubeconfig}",
            f"--authorization-kubeconfig={scheduler_kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['kube-scheduler']}",
            f"--cert-dir={directory / 'pki' / 'scheduler'}",
            "--leader-elect=false",
            "--profiling=false",
        ],
        "kwok": [
            str(bins["kwok"]),
            f"--kubeconfig={directory / 'kubeconfig'}",
            f"--config={directory / 'kwok.yaml'}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-label-selector={kwok.KWOK_NODE_SELECTOR}",
            f"--server-address=127.0.0.1:{ports['kwok']}",
        ],
    }


def health_urls(ports: dict[str, int]) -> dict[str, str]:
    """Where each component says it is ready."""
    return {
        "etcd": f"http://127.0.0.1:{ports['etcd']}/health",
        "kube-apiserver": f"https://127.0.0.1:{ports['kube-apiserver']}/readyz",
        "kube-controller-manager": f"https://127.0.0.1:{ports['kube-controller-manager']}/healthz",
        "kube-scheduler": f"https://127.0.0.1:{ports['kube-scheduler']}/healthz",
        "kwok": f"http://127.0.0.1:{ports['kwok']}/healthz",
    }


# --- processes -------------------------------------------------------------------------------


def _proc_state(pid: int) -> str | None:
    """The process state letter from /proc (R, S, Z, ...), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _is_ours(pid: int, executable: str) -> bool:
    """Whether `pid` is alive and still runs `executable` (guards against recycled pids)."""
    state = _proc_state(pid)
    if state is None or state == "Z":
        return False
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return argv0 == executable


def alive(state: State) -> dict[str, bool]:
    """For each recorded component: whether its process is still running."""
    return {name: _is_ours(pid, state.commands.get(name, [""])[0]) for name, pid in state.pids.items()}


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def _group_members(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes in process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def stop_groups(pgids: list[int], grace_seconds: float = 10.0) -> None:
    """SIGTERM each process group, wait up to `grace_seconds`, then SIGKILL the rest."""
    if not pgids:
        return
    for pgid in pgids:
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(_group_members(pgid) for pgid in pgids):
        time.sleep(0.05)
    for pgid in pgids:
        if _group_members(pgid):
            _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_group_members(pgid) for pgid in pgids):
        time.sleep(0.05)


def _kill_me_with_parent() -> None:
    """In a forked child before exec: ask Linux to SIGKILL it when its parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def admin_client(directory: Path) -> httpx.Client:
    """An HTTP client that trusts the cluster's CA and authenticates as its admin."""
    p = pki.Pki(directory / "pki")
    context = ssl.create_default_context(cafile=str(p.ca_cert))
    context.load_cert_chain(str(p.client_cert(pki.ADMIN)), str(p.client_key(pki.ADMIN)))
    return httpx.Client(verify=context, timeout=10.0)


# --- the cluster -----------------------------------------------------------------------------


class Cluster:
    """A local control plane in one folder: `start()` it, use `kubeconfig`, then `stop()` it."""

    def __init__(
        self,
        directory: Path | None = None,
        topology_name: str = "mixed",
        crds: Path | None = None,
        *,
        die_with_parent: bool = False,
        real_node: bool = False,
    ) -> None:
        """`die_with_parent`: components get SIGKILL if this process dies without stopping them
        (tests use it, so a killed test run leaves nothing behind; `kiln local up` does not).
        `real_node`: also start a real node (`kiln-real-node`) and cluster DNS (realnode.py)."""
        self.directory = (directory or default_dir()).resolve()
        self.topology_name = topology_name
        self.crds = crds if crds is not None else paths.crds_dir()
        self.die_with_parent = die_with_parent
        self.real_node = real_node
        self.state: State | None = None
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    def start(self, progress: Callable[[str], None] = print, timeout: float = 90.0) -> State:
        """Start every component, install CRDs, create the topology's nodes and wait until usable."""
        nodes = topology.load_topology(self.topology_name)
        bins = build.binary_paths()
        previous = read_state(self.directory)
        if previous is not None and stop_state(previous):
            progress(f"stopped the cluster that was running in {self.directory}")
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "logs").mkdir(exist_ok=True)
        shutil.rmtree(self.directory / "etcd", ignore_errors=True)
        started = time.monotonic()

        p = pki.ensure_pki(self.directory / "pki", SERVICE_IP)
        ports = free_ports(
            ("etcd", "etcd-peer", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
        )
        server = f"https://127.0.0.1:{ports['kube-apiserver']}"
        for identity, filename in (
            (pki.ADMIN, "kubeconfig"),
            (pki.CONTROLLER_MANAGER, "controller-manager.kubeconfig"),
            (pki.SCHEDULER, "scheduler.kubeconfig"),
        ):
            config = kubeconfig(
                server, p.ca_cert, p.client_cert(identity), p.client_key(identity), identity.user
            )
            path = self.directory / filename
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            path.chmod(0o600)
        (self.directory / "kwok.yaml").write_text(kwok.config_yaml())

        commands = component_commands(bins, self.directory, ports, real_node=self.real_node)
        self.state = State(str(self.directory), self.topology_name, ports, commands=commands)
        urls = health_urls(ports)
        try:
            with admin_client(self.directory) as client:
                for group in (
                    ("etcd",),
                    ("kube-apiserver",),
                    ("kube-controller-manager", "kube-scheduler", "kwok"),
                ):
                    for name in group:
                        self._launch(name, commands[name])
                    for name in group:
                        self._wait_healthy(client, name, urls[name], timeout)
                        progress(
                            f"{name} ready (port {ports[name]}) after {time.monotonic() - started:.1f} s"
                        )
                installed = install_crds(client, server, self.crds, timeout)
                progress(
                    f"{installed} CRDs installed from {self.crds}" if installed else "no CRDs to install"
                )
                create_nodes(client, server, nodes)
                create_runtime_classes(client, server, topology.gpu_runtime_classes(nodes))
                self._wait_until(
                    "kwok",
                    lambda: ready_nodes(client, server) >= len(nodes),
                    timeout,
                    f"{len(nodes)} nodes of topology {self.topology_name!r} to become Ready",
                )
                elapsed = time.monotonic() - started
                progress(f"{len(nodes)} nodes Ready ({self.topology_name}) after {elapsed:.1f} s")
                self._wait_until(
                    "kube-controller-manager",
                    lambda: (
                        client.get(f"{server}/api/v1/namespaces/default/serviceaccounts/default").is_success
                    ),
                    timeout,
                    "the default service account",
                )
                if self.real_node:
                    self.state.commands.update(
                        realnode.start(
                            self.directory, server, client, self._launch, self._wait_until, progress, timeout
                        )
                    )
                    write_state(self.state)
        except BaseException:
            self.stop()
            raise
        return self.state

    def stop(self) -> None:
        """Stop every component (SIGTERM, then SIGKILL) and reap them."""
        state = self.state or read_state(self.directory)
        if state is not None:
            stop_state(state)
        state_file(self.directory).unlink(missing_ok=True)
        for process in self._processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        self._processes.clear()

    def _launch(self, name: str, command: list[str]) -> None:
        assert self.state is not None
        with self.state.log(name).open("wb") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,  # its own process group, which `stop` signals as a whole
                preexec_fn=_kill_me_with_parent if self.die_with_parent else None,
            )
        self._processes[name] = process
        self.state.pids[name] = process.pid
        self.state.commands[name] = command
        write_state(self.state)

    def _failure(self, name: str, what: str) -> StartError:
        assert self.state is not None
        log = self.state.log(name)
        return StartError(f"{name} {what}; last lines of {log}:\n{log_tail(log)}")

    def _wait_until(self, name: str, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for component, process in self._processes.items():
                if process.poll() is not None:
                    raise self._failure(component, f"exited with code {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if check():
                    return
            if time.monotonic() > deadline:
                raise self._failure(name, f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.1)

    def _wait_healthy(self, client: httpx.Client, name: str, url: str, timeout: float) -> None:
        if url.startswith("http://") or name == "kube-apiserver":
            self._wait_until(name, lambda: client.get(url).is_success, timeout, f"{url} to answer OK")
            return
        # Controller manager and scheduler serve healthz with a self-signed certificate.
        with httpx.Client(verify=False, timeout=5.0) as insecure:
            self._wait_until(name, lambda: insecure.get(url).is_success, timeout, f"{url} to answer OK")


# Stop order: clients of the API server first, then the API server, then its storage (an API
# server whose etcd is gone does not finish its graceful shutdown).
STOP_TIERS = (
    ("kwok", "kube-scheduler", "kube-controller-manager", *REAL_NODE_COMPONENTS),
    ("kube-apiserver",),
    ("etcd",),
)


def stop_state(state: State, grace_seconds: float = 10.0) -> list[str]:
    """Stop the recorded components that are still ours; return the names that were running."""
    running = [name for name, is_alive in alive(state).items() if is_alive]
    if realnode.layout(Path(state.directory)).root.exists():
        # Before the API server goes: the node's pods are stopped through its runtime first.
        def stop_one(name: str) -> None:
            if name in running:
                stop_groups([state.pids[name]], grace_seconds)

        realnode.teardown(Path(state.directory), stop_one)
    for tier in STOP_TIERS:
        stop_groups([state.pids[name] for name in tier if name in running], grace_seconds)
    return [name for tier in STOP_TIERS for name in tier if name in running]


_RESTARTED: list[subprocess.Popen[bytes]] = []


def restart_component(
    state: State,
    name: str,
    timeout: float = 60.0,
    *,
    down_seconds: float = 0.0,
    die_with_parent: bool = False,
) -> float:
    """Stop one running component (SIGTERM, then SIGKILL), start it again with its recorded command and
    ports, and wait until it answers healthy; returns the seconds it was away. For fault tests: the
    other components (and whatever uses the cluster) keep running and must recover on their own."""
    started = time.monotonic()
    stop_groups([state.pids[name]])
    time.sleep(down_seconds)
    with state.log(name).open("ab") as log:
        process = subprocess.Popen(
            state.commands[name],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=state.directory,
            start_new_session=True,
            preexec_fn=_kill_me_with_parent if die_with_parent else None,
        )
    _RESTARTED.append(process)  # kept, so it is not collected (and warned about) while it runs
    state.pids[name] = process.pid
    write_state(state)
    url = health_urls(state.ports).get(name)
    deadline = time.monotonic() + timeout
    with admin_client(Path(state.directory)) as client, httpx.Client(verify=False, timeout=5.0) as insecure:
        checker = client if url is None or url.startswith("http://") or name == "kube-apiserver" else insecure
        while url is not None:
            if process.poll() is not None:
                raise StartError(f"{name} exited with code {process.returncode} on restart")
            with contextlib.suppress(httpx.HTTPError):
                if checker.get(url).is_success:
                    break
            if time.monotonic() > deadline:
                raise StartError(f"{name} not healthy {timeout:.0f} s after its restart")
            time.sleep(0.1)
    return time.monotonic() - started


def install_crds(client: httpx.Client, server: str, directory: Path, timeout: float) -> int:
    """Server-side apply every CRD in `directory` (if any) and wait until each is Established."""
    documents = []
    for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    crds = [doc for doc in documents if doc.get("kind") == "CustomResourceDefinition"]
    base = f"{server}/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    for crd in crds:
        response = client.patch(
            f"{base}/{crd['metadata']['name']}",
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
            content=json.dumps(crd),
            headers={"Content-Type": "application/apply-patch+yaml"},
        )
        if not response.is_success:
            raise StartError(f"installing CRD {crd['metadata']['name']} failed: {api_error(response)}")
    deadline = time.monotonic() + timeout
    for crd in crds:
        while not _established(client.get(f"{base}/{crd['metadata']['name']}").json()):
            if time.monotonic() > deadline:
                raise StartError(f"CRD {crd['metadata']['name']} did not become Established")
            time.sleep(0.1)
    return len(crds)


def api_error(response: httpx.Response) -> str:
    """The message of a Kubernetes Status error response (or its raw text)."""
    try:
        return str(response.json()["message"])
    except (ValueError, KeyError):
        return response.text


def _established(crd: dict[str, Any]) -> bool:
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def create_nodes(client: httpx.Client, server: str, nodes: list[dict[str, Any]]) -> None:
    """Create the simulated nodes (status included: capacity, allocatable, node info)."""
    for node in nodes:
        response = client.post(f"{server}/api/v1/nodes", json=node)
        if response.status_code != 409 and not response.is_success:
            raise StartError(f"creating node {node['metadata']['name']} failed: {api_error(response)}")


def create_runtime_classes(client: httpx.Client, server: str, classes: list[dict[str, Any]]) -> None:
    """Create the RuntimeClasses a GPU cluster has (`topology.gpu_runtime_classes`)."""
    for runtime_class in classes:
        response = client.post(f"{server}/apis/node.k8s.io/v1/runtimeclasses", json=runtime_class)
        if response.status_code != 409 and not response.is_success:
            name = runtime_class["metadata"]["name"]
            raise StartError(f"creating RuntimeClass {name} failed: {api_error(response)}")


def node_ready(client: httpx.Client, server: str, name: str) -> bool:
    """Whether node `name` exists and reports Ready."""
    response = client.get(f"{server}/api/v1/nodes/{name}")
    if not response.is_success:
        return False
    conditions = response.json().get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def ready_nodes(client: httpx.Client, server: str) -> int:
    """How many KWOK nodes report Ready."""
    response = client.get(f"{server}/api/v1/nodes", params={"labelSelector": kwok.KWOK_NODE_SELECTOR})
    response.raise_for_status()
    return sum(
        any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in node.get("status", {}).get("conditions", [])
        )
        for node in response.json()["items"]
    )


@contextlib.contextmanager
def running(
    directory: Path, topology_name: str = "mixed", progress: Callable[[str], None] = print
) -> Iterator[State]:
    """Start a cluster in `directory` for the duration of a `with` block."""
    cluster = Cluster(directory, topology_name)
    try:
        yield cluster.start(progress=progress)
    finally:
        cluster.stop()
