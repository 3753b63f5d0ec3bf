"""The process-node agent: registers the Node, keeps its Lease fresh, and runs the pods bound to it.

One asyncio loop: a heartbeat task (Lease and Node status every 10 s), a list+watch of the
pods whose `spec.nodeName` is this node (one `PodWorker` each), and the kubelet log endpoint. On
SIGTERM/SIGINT it stops every pod's processes, marks the Node not ready and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from kiln.processnode import ips, logserver, nodeobj, restarts
from kiln.processnode.kube import KubeClient, KubeError
from kiln.processnode.podstatus import timestamp
from kiln.processnode.runtime import NodeContext, PodWorker

log = logging.getLogger("kiln.processnode")

HEARTBEAT_SECONDS = 10.0


def micro_time(when: datetime | None = None) -> str:
    return (when or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def host_memory() -> str:
    """Total memory of this host as a Kubernetes quantity (Ki), from /proc/meminfo."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1])}Ki"
    except OSError:
        pass
    return "8Gi"


@dataclass
class AgentConfig:
    """Everything `kiln process-node` takes from its command line."""

    node_name: str
    state_dir: Path
    kubeconfig: str | None = None
    cpu: str = field(default_factory=lambda: str(os.cpu_count() or 1))
    memory: str = field(default_factory=host_memory)
    pods: int = 110
    kubelet_port: int = 0  # 0: any free port; -1: no log endpoint
    pod_cidr: str | None = None
    backoff: restarts.Backoff = field(default_factory=restarts.Backoff)
    shutdown_grace: float = 8.0


class Agent:
    """The running process node."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.workers: dict[str, PodWorker] = {}
        self._stop = asyncio.Event()
        self._node_uid = ""
        self._ready_since = timestamp()
        self.kube: KubeClient | None = None
        self.facts: nodeobj.NodeFacts | None = None
        self.failed = False  # a task died: the agent exits non-zero

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        config = self.config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.kube = KubeClient.from_kubeconfig(config.kubeconfig)
        cidr, routable = await asyncio.to_thread(ips.choose_range, config.pod_cidr)
        if routable:
            log.info("pod IPs from %s (reachable through Services)", cidr)
        else:
            log.warning(
                "pod IPs from %s: loopback addresses cannot be Service endpoints (no CAP_NET_ADMIN to "
                "route %s to lo); reach pods by their IP",
                cidr,
                ips.ROUTABLE_RANGE,
            )
        server: logserver.LogServer | None = None
        if config.kubelet_port >= 0:
            server = logserver.LogServer(config.state_dir, config.kubelet_port, self._container_running)
            await server.start()
        self.facts = nodeobj.NodeFacts(
            name=config.node_name,
            cpu=config.cpu,
            memory=config.memory,
            pods=config.pods,
            ephemeral_storage=f"{shutil.disk_usage(config.state_dir).total // 1024}Ki",
            kubelet_port=server.port if server else 0,
            arch=nodeobj.go_arch(),
        )
        venv_bin = str(Path(sys.executable).parent)
        ctx = NodeContext(
            node_name=config.node_name,
            host_ip=nodeobj.HOST_IP,
            state_dir=config.state_dir,
            kube=self.kube,
            ips=ips.IpPool(cidr),
            backoff=config.backoff,
            path_prefix=[venv_bin],
            node_allocatable={"cpu": config.cpu, "memory": config.memory},
        )
        tasks: list[asyncio.Task[None]] = []
        try:
            if not await self._register_when_possible():
                return
            log.info("node %s registered (kubelet port %s)", config.node_name, self.facts.kubelet_port)
            tasks = [
                asyncio.create_task(self._heartbeat(), name="heartbeat"),
                asyncio.create_task(self._watch_pods(ctx), name="pods"),
            ]
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait({stop, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop and not task.cancelled() and task.exception() is not None:
                    log.error("%s failed: %r", task.get_name(), task.exception())
                    self.failed = True
            stop.cancel()
        finally:
            log.info("stopping: %d pod(s)", len(self.workers))
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(
                *(worker.shutdown(config.shutdown_grace) for worker in list(self.workers.values())),
                return_exceptions=True,
            )
            ctx.ips.release_all()
            with contextlib.suppress(KubeError, httpx.HTTPError, TimeoutError):
                await asyncio.wait_for(self._set_ready(False), 5.0)
            if server is not None:
                await server.stop()
            await self.kube.close()

    # --- the Node and its Lease ---------------------------------------------------------------------

    async def _register_when_possible(self) -> bool:
        """Register the Node, retrying while the API server is unreachable; False if stopped first."""
        attempt = 0
        while not self._stop.is_set():
            try:
                await self._register()
                return True
            except (KubeError, httpx.HTTPError) as error:
                attempt += 1
                log.warning("registering node %s failed (%s); retrying", self.config.node_name, error)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), min(2.0 * attempt, 10.0))
        return False

    async def _register(self) -> None:
        assert self.kube is not None and self.facts is not None
        now = timestamp()
        path = f"/api/v1/nodes/{self.facts.name}"
        node = await self.kube.get(path)
        if node is None:
            node = await self.kube.create("/api/v1/nodes", nodeobj.node_manifest(self.facts, now))
        else:
            await self.kube.patch(path, {"metadata": {"labels": nodeobj.node_labels(self.facts)}})
        self._node_uid = node["metadata"]["uid"]
        self._ready_since = now
        await self._set_ready(True)
        await self._renew_lease()

    async def _set_ready(self, ready: bool) -> bool:
        """Report the Node's status; False when the Node no longer exists."""
        assert self.kube is not None and self.facts is not None
        now = timestamp()
        if not ready:
            self._ready_since = now
        status = nodeobj.node_status(
            self.facts, ready, now, self._ready_since, "" if ready else "ProcessNodeStopped"
        )
        return (
            await self.kube.patch(f"/api/v1/nodes/{self.facts.name}/status", {"status": status}) is not None
        )

    async def _renew_lease(self) -> None:
        assert self.kube is not None and self.facts is not None
        name = self.facts.name
        path = f"/apis/coordination.k8s.io/v1/namespaces/{nodeobj.LEASE_NAMESPACE}/leases/{name}"
        patched = await self.kube.patch(path, {"spec": {"holderIdentity": name, "renewTime": micro_time()}})
        if patched is None:
            await self.kube.create(
                f"/apis/coordination.k8s.io/v1/namespaces/{nodeobj.LEASE_NAMESPACE}/leases",
                nodeobj.lease_manifest(name, self._node_uid, micro_time()),
            )

    async def _heartbeat(self) -> None:
        """Lease and Ready condition every 10 s (as the kubelet); a deleted Node is registered again."""
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                if await self._set_ready(True):
                    await self._renew_lease()
                else:
                    log.warning("node %s was deleted; registering it again", self.config.node_name)
                    await self._register()
            except (KubeError, httpx.HTTPError) as error:
                log.warning("heartbeat failed: %s", error)

    # --- pods -------------------------------------------------------------------------------------------

    async def _watch_pods(self, ctx: NodeContext) -> None:
        assert self.kube is not None
        selector = {"fieldSelector": f"spec.nodeName={self.config.node_name}"}
        while True:
            try:
                listing = await self.kube.get("/api/v1/pods", selector)
                assert listing is not None
                version = listing["metadata"]["resourceVersion"]
                present = set()
                for pod in listing.get("items") or []:
                    present.add(pod["metadata"]["uid"])
                    self._on_pod(ctx, pod)
                for uid, worker in list(self.workers.items()):
                    if uid not in present:
                        worker.mark_gone()
                while True:
                    async for event in self.kube.watch(
                        "/api/v1/pods", {**selector, "resourceVersion": version}
                    ):
                        kind, obj = event["type"], event["object"]
                        if kind == "ERROR":
                            raise KubeError(int(obj.get("code") or 500), str(obj.get("message")))
                        version = obj["metadata"]["resourceVersion"]
                        if kind == "BOOKMARK":
                            continue
                        if kind == "DELETED":
                            gone = self.workers.get(obj["metadata"]["uid"])
                            if gone is not None:
                                gone.mark_gone()
                        else:
                            self._on_pod(ctx, obj)
            except (KubeError, httpx.HTTPError) as error:
                if not (isinstance(error, KubeError) and error.status == 410):
                    log.warning("pod watch failed (%s); listing again", error)
                    await asyncio.sleep(1.0)
            except (KeyError, TypeError, ValueError) as error:  # a malformed object must not stop the node
                log.exception("pod watch: unexpected %r; listing again", error)
                await asyncio.sleep(1.0)

    def _on_pod(self, ctx: NodeContext, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if worker is not None:
            worker.update(pod)
            return
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            return  # finished before this agent started; nothing runs, the API server deletes it at once
        worker = PodWorker(ctx, pod, self._forget)
        self.workers[uid] = worker
        log.info("pod %s bound to this node", worker.key)
        worker.start()

    def _container_running(self, namespace: str, pod: str, container: str) -> bool:
        """Whether a `kubectl logs -f` on this container should keep following."""
        for worker in self.workers.values():
            if worker.namespace == namespace and worker.name == pod and not worker.stopping:
                return any(
                    s.name == container and s.state != "terminated"
                    for s in [*worker.init_states, *worker.states]
                )
        return False

    def _forget(self, worker: PodWorker) -> None:
        if self.workers.get(worker.uid) is worker:
            del self.workers[worker.uid]


async def run_agent(config: AgentConfig) -> bool:
    """Run until SIGTERM or SIGINT; False when the agent stopped because something failed."""
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.request_stop)
    try:
        await agent.run()
    finally:
        # Everything is stopped: a late second SIGTERM must not turn the clean exit into a kill
        # (closing the loop would otherwise restore the default handler).
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN)
    return not agent.failed
