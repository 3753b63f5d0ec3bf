"""Running one pod as local processes: volumes, init containers, containers, probes, restarts, deletion.

A `PodWorker` owns one pod bound to the process node. Each container is a process in its own
process group (so a signal reaches everything it started), with stdout and stderr appended to
`<state>/pods/<ns>_<name>/<container>.log`. The worker reports the pod's status after every change
and, when the pod is deleted, stops its processes (SIGTERM, the grace period, SIGKILL) and removes
the pod with gracePeriodSeconds=0, as the kubelet does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from kiln.processnode import envvars, events, mounts, podstatus, probes, restarts
from kiln.processnode.ips import IpPool
from kiln.processnode.kube import KubeClient, KubeError
from kiln.processnode.podstatus import ContainerState, timestamp

log = logging.getLogger("kiln.processnode")

PR_SET_PDEATHSIG = 1
DEFAULT_GRACE = 30.0
# The environment a process starts from; the pod's env is laid over it. The rest of the agent's
# environment (KUBECONFIG with admin rights, above all) stays out of pods.
PASSED_ENV = (
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "USER",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TORCH_HOME",
    "XDG_CACHE_HOME",
    "VIRTUAL_ENV",
)


# Looked up once here: between fork and exec (with other threads about) the child must not dlopen.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    """In the forked child: SIGKILL it if the agent dies without stopping it."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def base_env(path_prefix: list[str], agent_env: Mapping[str, str]) -> dict[str, str]:
    env = {name: agent_env[name] for name in PASSED_ENV if name in agent_env}
    env["PATH"] = os.pathsep.join([*path_prefix, agent_env.get("PATH", "/usr/local/bin:/usr/bin:/bin")])
    env["PYTHONUNBUFFERED"] = "1"  # logs (and FallbackToLogsOnError) see output as it happens
    return env


def read_tail(path: Path, offset: int, max_bytes: int = 64 * 1024) -> str:
    """The text of `path` after `offset` (at most the last `max_bytes`)."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(offset, size - max_bytes))
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


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


class ContainerRunner:
    """One container of a pod: starts its process, probes it, records how it ended, restarts it."""

    def __init__(self, worker: PodWorker, spec: dict[str, Any], state: ContainerState, init: bool) -> None:
        self.worker = worker
        self.spec = spec
        self.state = state
        self.init = init
        self.process: asyncio.subprocess.Process | None = None
        self.log_path = worker.pod_dir / f"{spec['name']}.log"
        self.termination_file = worker.pod_dir / "termination" / spec["name"]
        self.rootfs = worker.pod_dir / "rootfs" / spec["name"]
        self.probe_specs = probes.probes_of(spec)

    # --- building the command ------------------------------------------------------------------

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        """argv, environment and working directory (raises envvars.EnvError)."""
        worker = self.worker
        facts = envvars.PodFacts.from_pod(worker.pod, worker.pod_ip or "", worker.ctx.host_ip)
        env = envvars.container_env(
            self.spec, facts, worker.config_map_text, worker.secret_text, worker.ctx.node_allocatable
        )
        container_mounts = mounts.container_mounts(self.spec, worker.volume_paths, self.termination_file)
        self._link_rootfs(container_mounts)
        env = {**mounts.pvc_root_env(env, container_mounts), **env}
        # Env values are rewritten first, so `$(DIR)/x` inside a shell script still names the host path.
        env = mounts.rewrite_env(env, container_mounts, self.rootfs)
        argv = mounts.rewrite_argv(envvars.container_argv(self.spec, env), container_mounts, self.rootfs)
        full_env = base_env(worker.ctx.path_prefix, worker.ctx.agent_env)
        full_env["HOSTNAME"] = worker.name
        full_env.update(env)
        if "PATH" in env:
            full_env["PATH"] = os.pathsep.join([*worker.ctx.path_prefix, env["PATH"]])
        if worker.pod_kubeconfig is not None and "KUBECONFIG" not in env:
            full_env["KUBECONFIG"] = str(worker.pod_kubeconfig)
        working_dir = self.spec.get("workingDir")
        cwd = (
            Path(mounts.rewrite_path(working_dir, container_mounts, self.rootfs))
            if working_dir
            else worker.pod_dir
        )
        executable = argv[0]
        if "/" not in executable:
            found = shutil.which(executable, path=full_env["PATH"])
            if found is None:
                raise FileNotFoundError(f'exec: "{executable}": executable file not found in $PATH')
            argv[0] = found
        return argv, full_env, cwd

    def _link_rootfs(self, container_mounts: list[mounts.Mount]) -> None:
        """Links to the container's mounts at their mountPaths under `self.rootfs`."""
        for link, target in mounts.rootfs_links(container_mounts, self.rootfs).items():
            if link.is_symlink() and Path(os.readlink(link)) == target:
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink():
                link.unlink()
            link.symlink_to(target)

    # --- one run ---------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Start the process, wait for it to end, record the termination; returns the exit code."""
        state = self.state
        if self.worker.stopping:
            return state.exit_code or 0
        self.termination_file.parent.mkdir(parents=True, exist_ok=True)
        self.termination_file.write_bytes(b"")
        try:
            argv, env, cwd = self.command()
        except envvars.EnvError as error:
            return self._failed_to_start(error.reason, str(error), 128)
        except (FileNotFoundError, ValueError) as error:
            return self._failed_to_start("StartError", str(error), 127)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        started = timestamp()
        with self.log_path.open("ab") as log_file:
            try:
                self.process = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=cwd,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            except OSError as error:
                return self._failed_to_start("StartError", f"{argv[0]}: {error}", 128)
        process = self.process
        if self.worker.stopping:  # deleted while the process was starting
            signal_group(process.pid, signal.SIGTERM)
        log.info(
            "%s/%s: started %s (pid %d): %s",
            self.worker.key,
            self.spec["name"],
            "init" if self.init else "container",
            process.pid,
            " ".join(argv),
        )
        state.state, state.reason, state.message = "running", "", ""
        state.started_at, state.container_id = started, f"process://{process.pid}"
        state.exit_code = state.signal = None
        state.started = "startup" not in self.probe_specs
        self.worker.event(events.STARTED, f"Started container {self.spec['name']}", self.spec["name"])
        state.ready = state.started and "readiness" not in self.probe_specs and not self.init
        self.worker.changed()
        probe_tasks = [
            asyncio.create_task(self._probe_loop(role, spec)) for role, spec in self.probe_specs.items()
        ]
        try:
            returncode = await process.wait()
        finally:
            for task in probe_tasks:
                task.cancel()
            await asyncio.gather(*probe_tasks, return_exceptions=True)
            # Whatever the main process left behind in its group goes with it, as in a cgroup.
            signal_group(process.pid, signal.SIGKILL)
        exit_code = returncode if returncode >= 0 else 128 - returncode
        file_text = (
            self.termination_file.read_text(errors="replace") if self.termination_file.exists() else ""
        )
        policy = self.spec.get("terminationMessagePolicy") or "File"
        message = podstatus.termination_message(
            file_text, read_tail(self.log_path, offset), policy, exit_code
        )
        state.state = "terminated"
        state.exit_code = exit_code
        state.signal = -returncode if returncode < 0 else None
        state.reason = podstatus.termination_reason(exit_code)
        state.message = message
        state.finished_at = timestamp()
        state.ready = False
        self.process = None
        log.info("%s/%s: exited with code %d", self.worker.key, self.spec["name"], exit_code)
        self.worker.changed()
        return exit_code

    def _failed_to_start(self, reason: str, message: str, exit_code: int) -> int:
        now = timestamp()
        self.state.state, self.state.reason, self.state.message = "terminated", reason, message
        self.state.exit_code, self.state.started_at, self.state.finished_at = exit_code, now, now
        self.state.ready = False
        log.warning("%s/%s: %s: %s", self.worker.key, self.spec["name"], reason, message)
        self.worker.event(events.FAILED, f"Error: {reason}: {message}", self.spec["name"], warning=True)
        self.worker.changed()
        return exit_code

    # --- the restart loop -----------------------------------------------------------------------

    async def run(self, policy: str) -> int:
        """Run until the container is done for good under `policy` (or the pod stops)."""
        failures = 0
        while True:
            began = time.monotonic()
            exit_code = await self.run_once()
            if self.worker.stopping or not restarts.should_restart(policy, exit_code):
                return exit_code
            failures = self.worker.ctx.backoff.next_failures(failures, time.monotonic() - began)
            delay = self.worker.ctx.backoff.delay(failures - 1)
            state = self.state
            state.last_terminated = state.terminated_dict()
            state.restart_count += 1
            if delay > 0:
                state.state, state.reason = "waiting", "CrashLoopBackOff"
                self.worker.event(
                    events.BACK_OFF,
                    f"Back-off restarting failed container {state.name}",
                    state.name,
                    warning=True,
                )
                state.message = (
                    f"back-off {delay:g}s restarting failed container={state.name} pod={self.worker.name}"
                )
                self.worker.changed()
                if await self.worker.wait_stopping(delay):
                    return exit_code

    # --- probes ------------------------------------------------------------------------------------

    async def _probe_loop(self, role: probes.ProbeRole, spec: probes.ProbeSpec) -> None:
        verdict = probes.ProbeState.initial(role)
        await asyncio.sleep(spec.initial_delay)
        while True:
            if role != "startup" and not self.state.started:
                await asyncio.sleep(min(spec.period, 0.5))
                continue
            ok = await self._probe(spec)
            verdict = probes.observe(verdict, ok, spec)
            if not ok and verdict.failures in (1, spec.failure_threshold):
                self.worker.event(
                    events.UNHEALTHY, f"{role.capitalize()} probe failed", self.spec["name"], warning=True
                )
            if role == "readiness" and verdict.passed != self.state.ready:
                self.state.ready = verdict.passed
                self.worker.changed()
            elif role == "startup" and verdict.passed:
                self.state.started = True
                self.state.ready = "readiness" not in self.probe_specs
                self.worker.changed()
                return
            elif (
                role in ("liveness", "startup")
                and not verdict.passed
                and verdict.failures >= spec.failure_threshold
            ):
                log.info("%s/%s: %s probe failed; restarting", self.worker.key, self.spec["name"], role)
                self.worker.event(
                    events.KILLING,
                    f"Container {self.spec['name']} failed {role} probe, will be restarted",
                    self.spec["name"],
                )
                grace = spec.termination_grace if spec.termination_grace is not None else self.worker.grace()
                await self.stop(grace)
                return
            await asyncio.sleep(spec.period)

    async def _probe(self, spec: probes.ProbeSpec) -> bool:
        pod_ip = self.worker.pod_ip or self.worker.ctx.host_ip
        try:
            if spec.kind == "http":
                response = await self.worker.http().get(
                    probes.http_url(spec, pod_ip), headers=dict(spec.headers), timeout=spec.timeout
                )
                return probes.http_ok(response.status_code)
            if spec.kind == "tcp":
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(spec.host or pod_ip, spec.port), spec.timeout
                )
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return True
            return await self._exec_probe(spec)
        except (httpx.HTTPError, OSError, TimeoutError):
            return False

    async def _exec_probe(self, spec: probes.ProbeSpec) -> bool:
        try:
            _, env, cwd = self.command()
        except (envvars.EnvError, FileNotFoundError, ValueError):
            return False
        container_mounts = mounts.container_mounts(self.spec, self.worker.volume_paths, self.termination_file)
        argv = mounts.rewrite_argv(list(spec.command), container_mounts, self.rootfs)
        if not argv:
            return False
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            return await asyncio.wait_for(process.wait(), spec.timeout) == 0
        except TimeoutError:
            signal_group(process.pid, signal.SIGKILL)
            await process.wait()
            return False

    # --- stopping ----------------------------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Run the preStop hook, SIGTERM the process group, wait out `grace` seconds, then SIGKILL it."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        deadline = time.monotonic() + grace
        hook = (self.spec.get("lifecycle") or {}).get("preStop")
        if hook and grace > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pre_stop(hook, grace), grace)
        signal_group(process.pid, signal.SIGTERM)
        try:
            # Like the kubelet, a hook that used up the grace period still leaves the process 2 s.
            remaining = max(deadline - time.monotonic(), 2.0 if hook and grace > 0 else 0.0)
            await asyncio.wait_for(asyncio.shield(process.wait()), remaining)
        except TimeoutError:
            log.info("%s/%s: still running after %.0f s; SIGKILL", self.worker.key, self.spec["name"], grace)
            signal_group(process.pid, signal.SIGKILL)
            await process.wait()

    async def _pre_stop(self, hook: dict[str, Any], grace: float) -> None:
        """The container's preStop hook (exec, httpGet, tcpSocket or sleep); its failure stops nothing."""
        if "sleep" in hook:
            await asyncio.sleep(float(hook["sleep"].get("seconds") or 0))
            return
        try:
            spec = probes.parse_probe({**hook, "timeoutSeconds": max(int(grace), 1)}, self.spec)
        except ValueError as error:
            log.warning("%s/%s: preStop hook: %s", self.worker.key, self.spec["name"], error)
            return
        if spec is not None and not await self._probe(spec):
            self.worker.event(
                "FailedPreStopHook",
                f"PreStopHook failed for container {self.spec['name']}",
                self.spec["name"],
                True,
            )


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
        self.pod_dir = ctx.state_dir / "pods" / f"{self.namespace}_{self.name}"
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
        life = asyncio.create_task(self._live())
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
            shutil.rmtree(self.pod_dir / "volumes", ignore_errors=True)

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
                volume, self.pod_dir, self.ctx.state_dir, self.namespace, claim_paths
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
        path = self.pod_dir / "kubeconfig"
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
