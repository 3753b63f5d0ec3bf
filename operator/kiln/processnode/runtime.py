"""Running one pod as local processes: volumes, init containers, containers, status, deletion.

A `PodWorker` owns one pod bound to the process node and runs its containers (see
`kiln.processnode.container`). It reports the pod's status after every change and, when the pod
is deleted, stops its processes (preStop, SIGTERM, the grace period, SIGKILL) and removes the pod
with gracePeriodSeconds=0, as the kubelet does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from kiln.processnode import envvars, events, mounts, podstatus, restarts
from kiln.processnode.container import ContainerRunner
from kiln.processnode.ips import IpPool
from kiln.processnode.kube import KubeClient, KubeError
from kiln.processnode.podstatus import ContainerState, timestamp

log = logging.getLogger("kiln.processnode")

DEFAULT_GRACE = 30.0


@dataclass
class NodeContext:
    """What every pod worker of one agent shares."""

    node_name: str
    host_ip: str
    state_dir: Path
    kube: KubeClient
    ips: IpPool
    backoff: restarts.Backoff
    path_prefix: list[str]
    node_allocatable: dict[str, str] = field(default_factory=dict)
    agent_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


class PodWorker:
    """Everything the process node does for one pod, from binding to deletion."""

    def __init__(self, ctx: NodeContext, pod: dict[str, Any], on_done: Callable[[PodWorker], None]) -> None:
        self.ctx = ctx
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.key = f"{self.namespace}/{self.name}"
        self.pod_dir = ctx.state_dir / "pods" / f"{self.namespace}_{self.name}"  # logs
        # Volumes, termination files, links: by uid, so a new pod of the same name never shares them.
        self.run_dir = ctx.state_dir / "run" / self.uid
        spec = pod["spec"]
        has_init = bool(spec.get("initContainers"))
        self.init_states = [
            ContainerState(name=c["name"], image=c.get("image", ""), reason="PodInitializing")
            for c in spec.get("initContainers") or []
        ]
        self.states = [
            ContainerState(
                name=c["name"],
                image=c.get("image", ""),
                reason="PodInitializing" if has_init else "ContainerCreating",
            )
            for c in spec.get("containers") or []
        ]
        self.runners: list[ContainerRunner] = []
        status = pod.get("status") or {}
        # What an earlier agent (stopped or crashed) reported: the pod resumes from there.
        self._previous = {s["name"]: s for s in status.get("containerStatuses") or []}
        self._previous_init = {s["name"]: s for s in status.get("initContainerStatuses") or []}
        self.pod_ip: str | None = None
        self.start_time = (pod.get("status") or {}).get("startTime") or timestamp()
        self.volume_paths: dict[str, Path] = {}
        self.config_map_text: dict[str, dict[str, str]] = {}
        self.secret_text: dict[str, dict[str, str]] = {}
        self.pod_kubeconfig: Path | None = None
        self.stopping = False  # no more starts or restarts
        self.gone = False  # the pod no longer exists in the API
        self._deleting = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._dirty = asyncio.Event()
        self._version = 0
        self._event_tasks: set[asyncio.Task[None]] = set()
        self._http: httpx.AsyncClient | None = None
        self._muted = False  # the agent is exiting: no more writes to the API server
        self._gates = self._gate_statuses()
        self._created = time.monotonic()
        self.failure: tuple[str, str] | None = None  # (reason, message) when the node failed the pod
        self._published_version = 0
        self._on_done = on_done
        self.task: asyncio.Task[None] | None = None

    # --- events from the agent -----------------------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.create_task(self._main(), name=f"pod {self.key}")
        self.task.add_done_callback(lambda _: self._on_done(self))
        if self.pod["metadata"].get("deletionTimestamp"):
            self._deleting.set()

    def update(self, pod: dict[str, Any]) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self._deleting.set()
        gates = self._gate_statuses()
        if gates != self._gates:  # another controller flipped a readiness gate: Ready may change
            self._gates = gates
            self.changed()

    def _gate_statuses(self) -> tuple[str | None, ...]:
        gates = [g["conditionType"] for g in self.pod["spec"].get("readinessGates") or []]
        status_of = {
            c["type"]: c.get("status") for c in (self.pod.get("status") or {}).get("conditions") or []
        }
        return tuple(status_of.get(gate) for gate in gates)

    def mark_gone(self) -> None:
        """The pod was removed from the API (force-deleted, or by us): stop without grace."""
        self.gone = True
        self._deleting.set()

    def http(self) -> httpx.AsyncClient:
        """The client HTTP probes share (a kubelet does not verify probe certificates either)."""
        if self._http is None:
            # No keep-alive: a probe must open a connection, as the kubelet's does.
            limits = httpx.Limits(max_keepalive_connections=0)
            self._http = httpx.AsyncClient(verify=False, limits=limits, follow_redirects=False)
        return self._http

    def event(self, reason: str, message: str, container: str | None = None, warning: bool = False) -> None:
        """Report an Event about the pod (best effort, in the background)."""
        if self._muted:
            return
        body = events.event_manifest(
            self.pod, reason, message, self.ctx.node_name, timestamp(), container, warning
        )
        task = asyncio.create_task(self._post_event(body))
        self._event_tasks.add(task)
        task.add_done_callback(self._event_tasks.discard)

    async def _post_event(self, body: dict[str, Any]) -> None:
        try:
            await self.ctx.kube.create(f"/api/v1/namespaces/{self.namespace}/events", body)
        except (KubeError, httpx.HTTPError) as error:
            log.debug("%s: event not recorded: %s", self.key, error)

    def changed(self) -> None:
        self._version += 1
        self._dirty.set()

    def grace(self) -> float:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        if self.gone:
            return 0.0
        for value in (meta.get("deletionGracePeriodSeconds"), spec.get("terminationGracePeriodSeconds")):
            if value is not None:
                return float(value)
        return DEFAULT_GRACE

    async def wait_stopping(self, seconds: float) -> bool:
        """Sleep `seconds` unless the pod starts stopping first; True when it does."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)
        return self.stopping

    async def shutdown(self, max_grace: float) -> None:
        """The agent is exiting: stop the processes (grace capped), leave the pod object alone.

        The pod's status keeps saying what was true while the agent ran; the next agent resumes
        from it (see `podstatus.resumed_state`).
        """
        self._muted = True
        self._begin_stop()
        await self._stop_processes(min(self.grace(), max_grace))
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    # --- the pod's life -------------------------------------------------------------------------------

    def _begin_stop(self) -> None:
        self.stopping = True
        self._stop_event.set()

    async def _stop_processes(self, grace: float) -> None:
        await asyncio.gather(*(runner.stop(grace) for runner in self.runners))

    async def _main(self) -> None:
        publisher = asyncio.create_task(self._publish_loop())
        life = asyncio.create_task(self._live_until_deadline())
        deleting = asyncio.create_task(self._deleting.wait())
        try:
            await asyncio.wait({life, deleting}, return_when=asyncio.FIRST_COMPLETED)
            if not self._deleting.is_set():
                if not life.cancelled() and life.exception() is not None:
                    log.error("%s: %s", self.key, life.exception())
                await self._deleting.wait()  # a finished pod stays until someone deletes it
            self._begin_stop()
            grace = self.grace()
            log.info("%s: deleting; stopping processes (grace %.0f s)", self.key, grace)
            if not self.gone:
                for runner in self.runners:
                    if runner.process is not None:
                        self.event(
                            events.KILLING, f"Stopping container {runner.spec['name']}", runner.spec["name"]
                        )
            await self._stop_processes(grace)
            life.cancel()
            await asyncio.gather(life, return_exceptions=True)
            if not self.gone:
                self.changed()
                await self._flush()
                await self._delete()
        finally:
            for task in (publisher, life, deleting):
                task.cancel()
            await asyncio.gather(publisher, life, deleting, return_exceptions=True)
            if self.pod_ip and self.pod_ip != self.ctx.host_ip:
                self.ctx.ips.release(self.pod_ip)
            if self._http is not None:
                await self._http.aclose()
            if not self._muted:  # an agent restart keeps emptyDirs, as a kubelet restart does
                shutil.rmtree(self.run_dir, ignore_errors=True)

    async def _live_until_deadline(self) -> None:
        """`_live`, but a pod with `activeDeadlineSeconds` is stopped and failed when that passes."""
        seconds = self.pod["spec"].get("activeDeadlineSeconds")
        if seconds is None:
            await self._live()
            return
        life = asyncio.create_task(self._live())
        remaining = float(seconds) - (time.monotonic() - self._created)
        done, _ = await asyncio.wait({life}, timeout=max(remaining, 0.0))
        if life in done:
            life.result()
            return
        log.info("%s: active for longer than its deadline (%s s); stopping it", self.key, seconds)
        self.failure = ("DeadlineExceeded", "Pod was active on the node longer than the specified deadline")
        self._begin_stop()
        await self._stop_processes(self.grace())
        await asyncio.gather(life, return_exceptions=True)
        self.changed()

    async def _live(self) -> None:
        await self._prepare()
        spec = self.pod["spec"]
        policy = spec.get("restartPolicy") or restarts.ALWAYS
        init_policy = restarts.NEVER if policy == restarts.NEVER else restarts.ON_FAILURE
        sidecars: list[asyncio.Task[int]] = []
        for index, container in enumerate(spec.get("initContainers") or []):
            previous = self._previous_init.get(container["name"]) or {}
            done = ((previous.get("state") or {}).get("terminated") or {}).get("exitCode") == 0
            if done and container.get("restartPolicy") != restarts.ALWAYS:
                self.init_states[index], _ = podstatus.resumed_state(
                    previous, restarts.NEVER, container["name"], container.get("image", ""), timestamp()
                )
                self.changed()
                continue
            state = self.init_states[index]
            runner = ContainerRunner(self, container, state, init=True)
            self.runners.append(runner)
            if container.get("restartPolicy") == restarts.ALWAYS:
                sidecars.append(asyncio.create_task(runner.run(restarts.ALWAYS)))
                while not (state.started and state.state == "running") and not self.stopping:
                    await asyncio.sleep(0.1)
                continue
            exit_code = await runner.run(init_policy)
            if exit_code != 0 or self.stopping:
                return
        regular = []
        for index, container in enumerate(spec.get("containers") or []):
            state, run = podstatus.resumed_state(
                self._previous.get(container["name"]),
                policy,
                container["name"],
                container.get("image", ""),
                timestamp(),
            )
            self.states[index] = state
            if run:
                regular.append(ContainerRunner(self, container, state, init=False))
        self.changed()
        self.runners.extend(regular)
        await asyncio.gather(*(runner.run(policy) for runner in regular))
        for sidecar in sidecars:
            sidecar.cancel()

    async def _prepare(self) -> None:
        """Pod IP, folders, ConfigMaps, Secrets, volumes; retried until it works or the pod stops."""
        attempt = 0
        while True:
            try:
                await self._prepare_once()
                return
            except (envvars.EnvError, KubeError, httpx.HTTPError, OSError, RuntimeError) as error:
                attempt += 1
                log.warning("%s: preparing the pod failed: %s", self.key, error)
                for state in [*self.init_states, *self.states]:
                    state.reason, state.message = "ContainerCreating", str(error)
                self.changed()
                if await self.wait_stopping(min(10.0, float(attempt))):
                    raise asyncio.CancelledError from error

    async def _prepare_once(self) -> None:
        spec = self.pod["spec"]
        if self.pod_ip is None:
            if spec.get("hostNetwork"):
                self.pod_ip = self.ctx.host_ip
            else:
                self.pod_ip = self.ctx.ips.acquire((self.pod.get("status") or {}).get("podIP"))
            self.changed()
        uid_file = self.pod_dir / ".uid"
        if self.pod_dir.exists() and (not uid_file.exists() or uid_file.read_text() != self.uid):
            shutil.rmtree(self.pod_dir)  # logs of an earlier pod of the same name
        self.pod_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        uid_file.write_text(self.uid)
        kube = self.ctx.kube
        config_maps, secrets = envvars.referenced_objects(self.pod)
        config_map_bytes: dict[str, dict[str, bytes]] = {}
        secret_bytes: dict[str, dict[str, bytes]] = {}
        for name in sorted(config_maps):
            obj = await kube.get(f"/api/v1/namespaces/{self.namespace}/configmaps/{name}")
            if obj is not None:
                config_map_bytes[name] = mounts.decode_data(obj)
        for name in sorted(secrets):
            obj = await kube.get(f"/api/v1/namespaces/{self.namespace}/secrets/{name}")
            if obj is not None:
                secret_bytes[name] = mounts.decode_data(obj)
        self.config_map_text = {
            k: {a: b.decode(errors="replace") for a, b in v.items()} for k, v in config_map_bytes.items()
        }
        self.secret_text = {
            k: {a: b.decode(errors="replace") for a, b in v.items()} for k, v in secret_bytes.items()
        }
        claim_paths: dict[str, str | None] = {}
        for volume in spec.get("volumes") or []:
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                claim_paths[claim] = await self._claim_path(claim)
        facts = envvars.PodFacts.from_pod(self.pod, self.pod_ip or "", self.ctx.host_ip)
        volume_paths: dict[str, Path] = {}
        for volume in spec.get("volumes") or []:
            path = mounts.volume_host_path(
                volume, self.run_dir, self.ctx.state_dir, self.namespace, claim_paths
            )
            tokens = await self._tokens(volume)
            files = mounts.volume_files(volume, facts, config_map_bytes, secret_bytes, tokens)
            if files is not None:
                shutil.rmtree(path, ignore_errors=True)
                default_mode, modes = mounts.file_modes(volume)
                for relative, content in files.items():
                    target = path / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(content)
                    target.chmod(modes.get(relative, default_mode))
            creates = "hostPath" not in volume or volume["hostPath"].get("type") in (
                "DirectoryOrCreate",
                None,
                "",
            )
            if creates and not path.exists():
                path.mkdir(parents=True, exist_ok=True)
            volume_paths[volume["name"]] = path
            if tokens and self.pod_kubeconfig is None:
                self.pod_kubeconfig = self._write_kubeconfig(path / sorted(tokens)[0])
        self.volume_paths = volume_paths

    def _write_kubeconfig(self, token_file: Path) -> Path:
        """In-cluster credentials for the pod's processes.

        Clients read in-cluster credentials from fixed paths (/var/run/secrets/...) that a process
        cannot be pointed elsewhere from, and the `kubernetes` Service's IP is not routable here, so
        the pod's processes get KUBECONFIG instead: the API server's real address, the cluster CA
        and the service account token the pod was given.
        """
        cluster: dict[str, Any] = {"server": self.ctx.kube.server}
        if self.ctx.kube.ca_file:
            cluster["certificate-authority-data"] = base64.b64encode(
                Path(self.ctx.kube.ca_file).read_bytes()
            ).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "cluster", "cluster": cluster}],
            "users": [{"name": "pod", "user": {"tokenFile": str(token_file)}}],
            "contexts": [
                {"name": "pod", "context": {"cluster": "cluster", "user": "pod", "namespace": self.namespace}}
            ],
            "current-context": "pod",
        }
        path = self.run_dir / "kubeconfig"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path

    async def _claim_path(self, claim: str) -> str | None:
        pvc = await self.ctx.kube.get(f"/api/v1/namespaces/{self.namespace}/persistentvolumeclaims/{claim}")
        if pvc is None:
            raise envvars.EnvError(f'persistentvolumeclaim "{claim}" not found')
        volume_name = (pvc.get("spec") or {}).get("volumeName")
        if not volume_name:
            return None
        pv = await self.ctx.kube.get(f"/api/v1/persistentvolumes/{volume_name}")
        pv_spec = (pv or {}).get("spec") or {}
        path = (pv_spec.get("hostPath") or {}).get("path") or (pv_spec.get("local") or {}).get("path")
        return str(path) if path else None

    async def _tokens(self, volume: Mapping[str, Any]) -> dict[str, str]:
        """Tokens of the pod's service account for a projected volume's serviceAccountToken sources."""
        tokens: dict[str, str] = {}
        for source in (volume.get("projected") or {}).get("sources") or []:
            token_source = source.get("serviceAccountToken")
            if not token_source:
                continue
            account = self.pod["spec"].get("serviceAccountName") or "default"
            request = {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {
                    "audiences": [token_source["audience"]] if token_source.get("audience") else [],
                    # The kubelet refreshes tokens; the process node writes one, valid long enough.
                    "expirationSeconds": max(int(token_source.get("expirationSeconds") or 0), 86400),
                    "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid},
                },
            }
            try:
                answer = await self.ctx.kube.create(
                    f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token", request
                )
                tokens[token_source["path"]] = answer["status"]["token"]
            except (KubeError, httpx.HTTPError, KeyError) as error:
                log.warning("%s: no token for service account %s: %s", self.key, account, error)
        return tokens

    # --- talking to the API server ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return podstatus.pod_status(
            self.pod,
            self.init_states,
            self.states,
            self.pod_ip,
            self.ctx.host_ip,
            self.start_time,
            timestamp(),
            reason=self.failure[0] if self.failure else "",
            message=self.failure[1] if self.failure else "",
            failed=bool(self.failure),
        )

    async def _publish_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if self._muted:
                continue
            version = self._version
            try:
                answer = await self.ctx.kube.patch(
                    f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status",
                    {"metadata": {"uid": self.uid}, "status": self.status()},
                )
            except (KubeError, httpx.HTTPError) as error:
                log.warning("%s: status update failed: %s", self.key, error)
                self._dirty.set()
                await asyncio.sleep(1.0)
                continue
            self._published_version = version
            if answer is None:  # the pod is gone
                self.mark_gone()
            else:
                self.update(answer)
            await asyncio.sleep(0.05)  # coalesce bursts of changes into one write

    async def _flush(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until the latest change reached the API server."""
        deadline = time.monotonic() + timeout
        while self._published_version < self._version and time.monotonic() < deadline and not self.gone:
            await asyncio.sleep(0.05)

    async def _delete(self) -> None:
        with contextlib.suppress(KubeError, httpx.HTTPError):
            await self.ctx.kube.delete(
                f"/api/v1/namespaces/{self.namespace}/pods/{self.name}",
                {
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": self.uid},
                },
            )
