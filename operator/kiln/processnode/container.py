"""One container as a local process: its argv and env, the process, its probes, restarts and stop.

Each container is a process in its own process group (so a signal reaches everything it started),
with stdout and stderr appended to `<state>/pods/<ns>_<name>/<container>.log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from kiln.processnode import envvars, events, logserver, mounts, podstatus, probes, restarts
from kiln.processnode.podstatus import ContainerState, timestamp

if TYPE_CHECKING:
    from kiln.processnode.runtime import PodWorker

log = logging.getLogger("kiln.processnode")

PR_SET_PDEATHSIG = 1
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


class ContainerRunner:
    """One container of a pod: starts its process, probes it, records how it ended, restarts it."""

    def __init__(self, worker: PodWorker, spec: dict[str, Any], state: ContainerState, init: bool) -> None:
        self.worker = worker
        self.spec = spec
        self.state = state
        self.init = init
        self.process: asyncio.subprocess.Process | None = None
        self.log_path = worker.pod_dir / f"{spec['name']}.log"
        self.termination_file = worker.run_dir / "termination" / spec["name"]
        self.rootfs = worker.run_dir / "rootfs" / spec["name"]
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
            else worker.run_dir
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
        # Where each run starts in the (appended) log: `kubectl logs` shows the current run,
        # `--previous` the one before.
        with logserver.runs_path(self.log_path).open("a") as runs:
            runs.write(f"{offset}\n")
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
