"""A pod's status from the states of its containers: phase, conditions, container statuses (pure).

Follows the kubelet's rules (`getPhase`, `generateContainersReadyCondition`, ...) closely enough that
controllers (Job, Deployment, EndpointSlice) and `kubectl wait` treat the pod as they would any other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kiln.processnode.restarts import ALWAYS, NEVER, should_restart

MAX_MESSAGE_BYTES = 4096  # the kubelet's cap on a termination message
FALLBACK_LOG_LINES = 80  # FallbackToLogsOnError: the last lines of the log...
FALLBACK_LOG_BYTES = 2048  # ...capped to this many bytes

# Conditions the process node owns; any other condition on the pod is left as it is.
OWNED_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")


def timestamp(when: datetime | None = None) -> str:
    """RFC 3339 in UTC, seconds precision, as Kubernetes writes it."""
    return (when or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerState:
    """What the process node knows about one container (a regular or an init container)."""

    name: str
    image: str = ""
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    exit_code: int | None = None
    signal: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    ready: bool = False
    started: bool = False
    restart_count: int = 0
    container_id: str = ""
    last_terminated: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def terminated_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "exitCode": self.exit_code if self.exit_code is not None else 0,
            "reason": self.reason or ("Completed" if self.exit_code == 0 else "Error"),
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
        }
        if self.signal:
            out["signal"] = self.signal
        if self.message:
            out["message"] = self.message
        if self.container_id:
            out["containerID"] = self.container_id
        return out

    def status(self) -> dict[str, Any]:
        """The entry of `status.containerStatuses` (or `initContainerStatuses`)."""
        if self.state == "running":
            state: dict[str, Any] = {"running": {"startedAt": self.started_at}}
        elif self.state == "terminated":
            state = {"terminated": self.terminated_dict()}
        else:
            waiting: dict[str, Any] = {"reason": self.reason}
            if self.message:
                waiting["message"] = self.message
            state = {"waiting": waiting}
        out: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "ready": self.ready and self.state == "running",
            "started": self.started and self.state == "running",
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
        }
        if self.container_id:
            out["containerID"] = self.container_id
        return out


LOST_REASON = "ContainerStatusUnknown"
LOST_MESSAGE = "The container could not be located when the process node restarted"


def resumed_state(
    previous: Mapping[str, Any] | None, policy: str, name: str, image: str, now: str
) -> tuple[ContainerState, bool]:
    """A container as a previous agent left it in the pod's status, and whether to run it now.

    A finished container stays finished unless its policy restarts it; a container that was
    running lost its process with the old agent: it counts as a restart, or, under restartPolicy
    Never, as terminated with ContainerStatusUnknown (as the kubelet reports a vanished container).
    """
    if not previous:
        return ContainerState(name=name, image=image), True
    state = previous.get("state") or {}
    count = int(previous.get("restartCount") or 0)
    last = (previous.get("lastState") or {}).get("terminated")
    if "terminated" in state:
        ended = dict(state["terminated"])
        code = int(ended.get("exitCode") or 0)
        if not should_restart(policy, code):
            return (
                ContainerState(
                    name=name,
                    image=image,
                    state="terminated",
                    reason=ended.get("reason") or termination_reason(code),
                    message=ended.get("message") or "",
                    exit_code=code,
                    signal=ended.get("signal"),
                    started_at=ended.get("startedAt"),
                    finished_at=ended.get("finishedAt"),
                    restart_count=count,
                    container_id=ended.get("containerID") or "",
                    last_terminated=last,
                ),
                False,
            )
        return ContainerState(name=name, image=image, restart_count=count + 1, last_terminated=ended), True
    if "running" in state:
        lost = {
            "exitCode": 137,
            "reason": LOST_REASON,
            "message": LOST_MESSAGE,
            "startedAt": state["running"].get("startedAt"),
            "finishedAt": now,
        }
        if policy == NEVER:
            return (
                ContainerState(
                    name=name,
                    image=image,
                    state="terminated",
                    reason=LOST_REASON,
                    message=LOST_MESSAGE,
                    exit_code=137,
                    started_at=lost["startedAt"],
                    finished_at=now,
                    restart_count=count,
                    last_terminated=last,
                ),
                False,
            )
        return ContainerState(name=name, image=image, restart_count=count + 1, last_terminated=lost), True
    return ContainerState(name=name, image=image, restart_count=count, last_terminated=last), True


def termination_reason(exit_code: int, oom: bool = False) -> str:
    if oom:
        return "OOMKilled"
    return "Completed" if exit_code == 0 else "Error"


def termination_message(file_text: str, log_tail: str, policy: str, exit_code: int) -> str:
    """The kubelet's choice: the file's content, or (FallbackToLogsOnError, failed, empty file) the log."""
    message = file_text.encode()[:MAX_MESSAGE_BYTES].decode(errors="ignore")
    if message or policy != "FallbackToLogsOnError" or exit_code == 0:
        return message
    lines = log_tail.splitlines()[-FALLBACK_LOG_LINES:]
    tail = "\n".join(lines).encode()[-FALLBACK_LOG_BYTES:]
    return tail.decode(errors="ignore")


def init_done(spec: Mapping[str, Any], init_states: Sequence[ContainerState]) -> bool:
    """Whether every init container completed (a restartable sidecar counts once started)."""
    sidecars = {c["name"] for c in spec.get("initContainers") or [] if c.get("restartPolicy") == ALWAYS}
    names = [c["name"] for c in spec.get("initContainers") or []]
    by_name = {s.name: s for s in init_states}
    for name in names:
        state = by_name.get(name)
        if state is None:
            return False
        if name in sidecars:
            if not state.started:
                return False
        elif not (state.state == "terminated" and state.exit_code == 0):
            return False
    return True


def init_failed(spec: Mapping[str, Any], init_states: Sequence[ContainerState]) -> bool:
    """Whether an init container failed for good (restartPolicy Never)."""
    if (spec.get("restartPolicy") or ALWAYS) != NEVER:
        return False
    return any(s.state == "terminated" and s.exit_code not in (0, None) for s in init_states)


def pod_phase(
    spec: Mapping[str, Any], init_states: Sequence[ContainerState], states: Sequence[ContainerState]
) -> str:
    """Pending, Running, Succeeded or Failed, by the kubelet's rules."""
    policy = spec.get("restartPolicy") or ALWAYS
    if init_failed(spec, init_states):
        return "Failed"
    if not init_done(spec, init_states):
        return "Pending"
    running = waiting = stopped = succeeded = 0
    for state in states:
        if state.state == "running":
            running += 1
        elif state.state == "terminated":
            stopped += 1
            if state.exit_code == 0:
                succeeded += 1
        elif state.last_terminated is not None:
            stopped += 1  # waiting to restart after a run
        else:
            waiting += 1
    if waiting > 0 or not states:
        return "Pending"
    if running > 0:
        return "Running"
    if policy == ALWAYS:
        return "Running"
    if stopped == succeeded:
        return "Succeeded"
    if policy == NEVER:
        return "Failed"
    return "Running"


def _condition(kind: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
    condition: dict[str, Any] = {"type": kind, "status": "True" if ok else "False"}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


def pod_conditions(
    spec: Mapping[str, Any],
    phase: str,
    init_states: Sequence[ContainerState],
    states: Sequence[ContainerState],
    sandbox_ready: bool,
    existing: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """The conditions the process node owns, without timestamps (`existing`: the pod's current ones,
    for its readiness gates)."""
    initialized = init_done(spec, init_states) or (phase in ("Succeeded", "Failed") and bool(states))
    not_ready = [s.name for s in states if not (s.ready and s.state == "running")]
    if phase == "Succeeded":
        containers_ready = _condition("ContainersReady", False, "PodCompleted")
    elif not_ready:
        containers_ready = _condition(
            "ContainersReady",
            False,
            "ContainersNotReady",
            f"containers with unready status: [{' '.join(not_ready)}]",
        )
    else:
        containers_ready = _condition("ContainersReady", True)
    ready = dict(containers_ready, type="Ready")
    gates = [g["conditionType"] for g in spec.get("readinessGates") or []]
    status_of = {c["type"]: c.get("status") for c in existing}
    unmet = [gate for gate in gates if status_of.get(gate) != "True"]
    if containers_ready["status"] == "True" and unmet:
        ready = _condition(
            "Ready",
            False,
            "ReadinessGatesNotReady",
            f"corresponding condition of pod readiness gate {unmet[0]!r} does not exist or is not True",
        )
    if not initialized:
        pending = [
            s["name"]
            for s in spec.get("initContainers") or []
            if not any(
                i.name == s["name"] and i.state == "terminated" and i.exit_code == 0 for i in init_states
            )
        ]
        init = _condition(
            "Initialized",
            False,
            "ContainersNotInitialized",
            f"containers with incomplete status: [{' '.join(pending)}]",
        )
    else:
        init = _condition("Initialized", True)
    sandbox = _condition("PodReadyToStartContainers", sandbox_ready and phase not in ("Succeeded", "Failed"))
    return [sandbox, init, containers_ready, ready]


def merge_conditions(
    existing: Sequence[Mapping[str, Any]], owned: Sequence[Mapping[str, Any]], now: str
) -> list[dict[str, Any]]:
    """The pod's full conditions list: ours replace theirs by type, transition times kept when unchanged."""
    by_type = {c["type"]: dict(c) for c in existing}
    merged = [dict(c) for c in existing if c["type"] not in OWNED_CONDITIONS]
    for condition in owned:
        previous = by_type.get(condition["type"])
        stamped = dict(condition, lastProbeTime=None)
        if previous is not None and previous.get("status") == condition["status"]:
            stamped["lastTransitionTime"] = previous.get("lastTransitionTime") or now
        else:
            stamped["lastTransitionTime"] = now
        merged.append(stamped)
    return merged


def pod_status(
    pod: Mapping[str, Any],
    init_states: Sequence[ContainerState],
    states: Sequence[ContainerState],
    pod_ip: str | None,
    host_ip: str,
    start_time: str,
    now: str,
    reason: str = "",
    message: str = "",
    failed: bool = False,
) -> dict[str, Any]:
    """The `status` to write for `pod` (a JSON merge patch body's `status`: lists are complete).

    `failed`: the node failed the pod as a whole (`reason`, e.g. DeadlineExceeded), whatever its
    containers did.
    """
    spec = pod.get("spec") or {}
    phase = "Failed" if failed else pod_phase(spec, init_states, states)
    existing = (pod.get("status") or {}).get("conditions") or []
    owned = pod_conditions(
        spec, phase, init_states, states, sandbox_ready=pod_ip is not None, existing=existing
    )
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": merge_conditions(existing, owned, now),
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": start_time,
        "containerStatuses": [s.status() for s in states],
    }
    if init_states:
        status["initContainerStatuses"] = [s.status() for s in init_states]
    if pod_ip:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    return status
