"""Status of LLMEngines (from the build Job and its pod) and LLMDeployments (from engine and workload).

Pure: observed objects in, the status fields Kiln owns out (camelCase, as the CRDs store them).
Conditions follow metav1.Condition; a condition keeps its lastTransitionTime until its status flips.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kiln.api.v1alpha1 import LLMDeployment, LLMEngine
from kiln.placement import Placement
from kiln.render.build_job import BUILD_CONTAINER, artifact_uri, job_name
from kiln.render.engine import EngineIdentity
from kiln.render.service import endpoint
from kiln.render.serving import selector_string

PROGRESS_MARKER = "KILN_PROGRESS "
LOG_TAIL_LINES = 20
LOG_TAIL_CHARS = 4000
MESSAGE_CHARS = 1024

# Fields of LLMDeployment status that others own (the autoscaler): never written by the operator.
FOREIGN_DEPLOYMENT_FIELDS = (
    "ttftP50Ms",
    "ttftP90Ms",
    "ttftP95Ms",
    "itlP50Ms",
    "itlP95Ms",
    "lastScaleDecision",
)


def timestamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
    previous: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """A metav1.Condition; lastTransitionTime carries over from `previous` when the status is unchanged."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    since = timestamp(now)
    for old in previous or ():
        if old.get("type") == type_ and old.get("status") == value and old.get("lastTransitionTime"):
            since = str(old["lastTransitionTime"])
    result: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message[:MESSAGE_CHARS],
        "lastTransitionTime": since,
    }
    if generation is not None:
        result["observedGeneration"] = generation
    return result


def find_condition(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    for item in conditions or ():
        if item.get("type") == type_:
            return item
    return None


def _is_true(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> bool:
    found = find_condition(conditions, type_)
    return found is not None and found.get("status") == "True"


# ---------------------------------------------------------------- the build


def parse_progress(text: str | None) -> dict[str, Any] | None:
    """The last `KILN_PROGRESS {json}` payload in a build log (step, percent, message), if any."""
    last = None
    for line in (text or "").splitlines():
        at = line.find(PROGRESS_MARKER)
        if at < 0:
            continue
        try:
            payload = json.loads(line[at + len(PROGRESS_MARKER) :])
        except json.JSONDecodeError:
            continue
        if isinstance(payload, dict):
            last = payload
    return last


def log_tail(text: str | None, lines: int = LOG_TAIL_LINES) -> str | None:
    """The last lines of a log, bounded so status stays small."""
    if not text:
        return None
    tail = "\n".join(text.rstrip().splitlines()[-lines:])
    return tail[-LOG_TAIL_CHARS:] or None


def _build_container_state(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == BUILD_CONTAINER:
            return status.get("state") or {}
    return {}


def termination(pod: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The build container's `state.terminated`, once it exited."""
    if pod is None:
        return None
    terminated = _build_container_state(pod).get("terminated")
    return terminated if isinstance(terminated, Mapping) else None


def build_result(pod: Mapping[str, Any] | None) -> tuple[dict[str, Any] | None, str | None]:
    """The build's result JSON from the termination message, and the message when it is not JSON
    (FallbackToLogsOnError puts the log tail there when the build wrote no result)."""
    terminated = termination(pod)
    message = (terminated or {}).get("message")
    if not message:
        return None, None
    try:
        parsed = json.loads(message)
    except json.JSONDecodeError:
        return None, str(message)
    return (parsed, None) if isinstance(parsed, dict) else (None, str(message))


def _latest(pods: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    if not pods:
        return None
    return max(pods, key=lambda pod: str((pod.get("metadata") or {}).get("creationTimestamp") or ""))


def _job_condition(job: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    found = find_condition((job.get("status") or {}).get("conditions"), type_)
    return found if found is not None and found.get("status") == "True" else None


@dataclass(frozen=True)
class BuildObservation:
    """What the operator saw of an engine's build: its Job, the Job's pods, the newest pod's log."""

    job: Mapping[str, Any] | None = None
    pods: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    log: str | None = None


def _capacity(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, Mapping):
        return None
    capacity: dict[str, Any] = {}
    if isinstance(raw.get("tokensPerSecond"), int | float):
        capacity["outputTokensPerSecond"] = float(raw["tokensPerSecond"])
    if isinstance(raw.get("prefillTokensPerSecond"), int | float):
        capacity["prefillTokensPerSecond"] = float(raw["prefillTokensPerSecond"])
    if isinstance(raw.get("maxConcurrency"), int | float):
        capacity["maxConcurrencyAtTtftTarget"] = int(raw["maxConcurrency"])
    if isinstance(raw.get("ttftTargetMs"), int | float):
        capacity["ttftTargetMs"] = int(raw["ttftTargetMs"])
    if isinstance(raw.get("ttftPercentile"), int):
        capacity["ttftPercentile"] = raw["ttftPercentile"]
    return capacity or None


def engine_status(engine: LLMEngine, seen: BuildObservation, now: datetime) -> dict[str, Any]:
    """The LLMEngine status for what its build Job shows.

    Ready and Failed are final: a Ready engine is never rebuilt, whatever happens to its Job.
    """
    previous = engine.status.to_wire() if engine.status is not None else {}
    if previous.get("phase") in ("Ready", "Failed"):
        return previous
    generation = engine.metadata.generation
    old_conditions = previous.get("conditions")
    name = str(engine.metadata.name)
    status: dict[str, Any] = {"observedGeneration": generation, "job": job_name(name)}
    for kept in ("users", "lastUsedTime", "startedTime"):
        if kept in previous:
            status[kept] = previous[kept]
    job = seen.job

    def conditions(
        ready: tuple[bool, str, str], building: tuple[bool, str, str], failed: tuple[bool, str, str]
    ) -> list[dict[str, Any]]:
        return [
            condition(kind, *value, generation, now, old_conditions)
            for kind, value in (("Ready", ready), ("Building", building), ("Failed", failed))
        ]

    if job is None:
        status.update(
            phase="Pending",
            conditions=conditions(
                (False, "BuildNotStarted", "The build Job is being created"),
                (False, "BuildNotStarted", "The build Job is being created"),
                (False, "NoFailure", ""),
            ),
        )
        return status
    job_status = job.get("status") or {}
    if job_status.get("startTime"):
        status["startedTime"] = job_status["startTime"]
    failed_pods = int(job_status.get("failed") or 0)
    running = int(job_status.get("active") or 0) + int(job_status.get("succeeded") or 0)
    status["attempts"] = max(1, failed_pods + running)
    latest = _latest(seen.pods)
    result, fallback = build_result(latest)
    complete = _job_condition(job, "Complete")
    job_failed = _job_condition(job, "Failed")

    if complete is not None and not (result is not None and result.get("ok") is False):
        uri = artifact_uri(engine)
        artifact: dict[str, Any] = {"uri": uri, "manifestSha256": ""}
        if result is not None:
            artifact["manifestSha256"] = str(result.get("manifestSha256") or "")
            if isinstance(result.get("sizeBytes"), int):
                artifact["sizeBytes"] = result["sizeBytes"]
            capacity = _capacity(result.get("capacity"))
            if capacity is not None:
                status["capacity"] = capacity
        status.update(
            phase="Ready",
            progress=100,
            step="done",
            artifact=artifact,
            gpuArch=str((result or {}).get("gpuArch") or engine.spec.gpu_arch),
            completedTime=job_status.get("completionTime")
            or complete.get("lastTransitionTime")
            or timestamp(now),
            conditions=conditions(
                (True, "Built", f"Engine built and published to {uri}"),
                (False, "Built", "The build finished"),
                (False, "NoFailure", ""),
            ),
        )
        return status

    if job_failed is not None or (complete is not None and result is not None):
        if result is not None and result.get("ok") is False:
            reason = str(result.get("reason") or "BuildFailed")
            message = str(result.get("message") or "the build failed")
        else:
            reason = str((job_failed or {}).get("reason") or "BuildFailed")
            message = str((job_failed or {}).get("message") or "the build Job failed")
            exit_info = termination(latest)
            if exit_info is not None and exit_info.get("exitCode") not in (None, 0):
                message += f" (last attempt exited with code {exit_info.get('exitCode')})"
        tail = log_tail(seen.log) or log_tail(fallback)
        if tail:
            status["logTail"] = tail
        status.update(
            phase="Failed",
            completedTime=(job_failed or {}).get("lastTransitionTime") or timestamp(now),
            conditions=conditions(
                (False, reason, message),
                (False, reason, "The build stopped"),
                (True, reason, message),
            ),
        )
        return status

    progress = parse_progress(seen.log)
    if progress is not None:
        if isinstance(progress.get("percent"), int | float):
            status["progress"] = max(0, min(99, int(progress["percent"])))
        if progress.get("step"):
            status["step"] = str(progress["step"])
    elif "progress" in previous:
        status["progress"], status["step"] = previous["progress"], previous.get("step")
    if latest is not None and _unscheduled(latest):
        waiting = _unscheduled(latest) or ""
        status.update(
            phase="Pending",
            conditions=conditions(
                (False, "WaitingForNode", waiting),
                (False, "WaitingForNode", waiting),
                (False, "NoFailure", ""),
            ),
        )
        return status
    described = f"{status.get('step') or 'starting'}"
    if "progress" in status:
        described += f": {status['progress']}%"
    if status["attempts"] > 1:
        described += f" (attempt {status['attempts']} of {engine.spec.retries + 1})"
    status.update(
        phase="Building",
        conditions=conditions(
            (False, "Building", f"Building {described}"),
            (True, "Building", f"Building {described}"),
            (False, "NoFailure", ""),
        ),
    )
    return {key: value for key, value in status.items() if value is not None}


def _unscheduled(pod: Mapping[str, Any]) -> str | None:
    """Why the build pod waits for a node (the scheduler's message), or None once it is placed."""
    found = find_condition((pod.get("status") or {}).get("conditions"), "PodScheduled")
    if found is not None and found.get("status") == "False":
        return str(found.get("message") or found.get("reason") or "waiting for a node")
    return None


def engine_progress_text(engine: LLMEngine | None) -> str:
    """A short description of an engine's state, for deployment conditions."""
    if engine is None or engine.status is None or engine.status.phase is None:
        return "waiting for the build to start"
    status = engine.status
    if status.phase == "Building":
        text = f"building ({status.step or 'starting'}"
        return text + (f", {status.progress}%)" if status.progress is not None else ")")
    if status.phase == "Failed":
        failed = find_condition([c.to_wire() for c in status.conditions or []], "Failed")
        return f"build failed: {(failed or {}).get('message') or 'unknown reason'}"
    if status.phase == "Pending":
        ready = find_condition([c.to_wire() for c in status.conditions or []], "Ready")
        return f"pending: {(ready or {}).get('message') or 'waiting for a build node'}"
    return str(status.phase).lower()


# ---------------------------------------------------------------- the deployment


@dataclass(frozen=True)
class DeploymentObservation:
    """What the operator saw for one LLMDeployment.

    `serving` is the engine the workload runs now (the desired one, or the previous one while the
    desired builds); `workload` the applied Deployment/LeaderWorkerSet as the API returned it.
    `problem` is a (reason, message) that stops the deployment (invalid spec, missing CRD, ...).
    `pods` are the serving pods, looked at only while some replica is not ready.
    """

    desired: EngineIdentity | None
    desired_engine: LLMEngine | None = None
    serving: LLMEngine | None = None
    workload: Mapping[str, Any] | None = None
    placement: Placement | None = None
    problem: tuple[str, str] | None = None
    pods: Sequence[Mapping[str, Any]] = ()
    router: Mapping[str, Any] | None = None  # the routers' Deployment, when spec.router.enabled


# Container states that will not fix themselves: a serving replica in one is broken, not starting.
BROKEN_CONTAINER_REASONS = (
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
)


def pod_problems(pods: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    """Why serving pods are broken (a container that cannot start or keeps crashing), as (reason,
    message) naming how many pods and the first one's detail; None when none is."""
    broken: dict[str, list[str]] = {}
    for pod in pods:
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (status.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason in BROKEN_CONTAINER_REASONS:
                name = (pod.get("metadata") or {}).get("name")
                broken.setdefault(str(reason), []).append(f"{name}: {waiting.get('message') or reason}")
    if not broken:
        return None
    reason, details = max(broken.items(), key=lambda item: len(item[1]))
    return reason, f"{len(details)} serving pod(s) {reason}; {details[0]}"


def pods_waiting_for_nodes(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """The scheduler's message for a serving pod it cannot place right now (e.g. GPUs all in use)."""
    for pod in pods:
        found = find_condition((pod.get("status") or {}).get("conditions"), "PodScheduled")
        if found is not None and found.get("status") == "False" and found.get("reason") == "Unschedulable":
            return str(found.get("message") or "no node has room")
    return None


def _engine_ref(engine: LLMEngine) -> dict[str, str]:
    return {"name": str(engine.metadata.name), "key": engine.spec.key}


def workload_counts(workload: Mapping[str, Any] | None) -> dict[str, int]:
    """replicas/ready/updated/desired of a Deployment or LeaderWorkerSet, and whether the spec is observed."""
    if workload is None:
        return {"replicas": 0, "ready": 0, "updated": 0, "desired": 0, "observed": 0}
    status = workload.get("status") or {}
    generation = int((workload.get("metadata") or {}).get("generation") or 0)
    observed = status.get("observedGeneration")
    return {
        "replicas": int(status.get("replicas") or 0),
        "ready": int(status.get("readyReplicas") or 0),
        "updated": int(status.get("updatedReplicas") or 0),
        "desired": int((workload.get("spec") or {}).get("replicas") or 0),
        # A LeaderWorkerSet has no status.observedGeneration: take it as observed.
        "observed": int(observed is None or int(observed) >= generation),
    }


def rolled_out(workload: Mapping[str, Any] | None) -> bool:
    """Every replica runs the current template and is ready, and no old replica is left."""
    counts = workload_counts(workload)
    return bool(
        workload is not None
        and counts["observed"]
        and counts["updated"] == counts["desired"]
        and counts["ready"] >= counts["desired"]
        and counts["replicas"] == counts["desired"]
    )


def _stalled(workload: Mapping[str, Any] | None) -> str | None:
    if workload is None:
        return None
    progressing = find_condition((workload.get("status") or {}).get("conditions"), "Progressing")
    if progressing is not None and progressing.get("reason") == "ProgressDeadlineExceeded":
        return str(progressing.get("message") or "the rollout did not progress in time")
    return None


def deployment_status(
    deployment: LLMDeployment, seen: DeploymentObservation, now: datetime
) -> dict[str, Any]:
    """The LLMDeployment status fields Kiln owns (never the autoscaler's)."""
    previous = deployment.status.to_wire() if deployment.status is not None else {}
    old = previous.get("conditions")
    generation = deployment.metadata.generation
    spec = deployment.spec
    name = str(deployment.metadata.name)
    counts = workload_counts(seen.workload)
    desired_engine, serving = seen.desired_engine, seen.serving
    desired_phase = desired_engine.status.phase if desired_engine and desired_engine.status else None
    serving_desired = (
        serving is not None
        and desired_engine is not None
        and (serving.metadata.name == desired_engine.metadata.name)
    )
    engine_text = engine_progress_text(desired_engine)
    desired_name = seen.desired.name if seen.desired else "(none)"

    status: dict[str, Any] = {
        "observedGeneration": generation,
        "layout": f"{spec.parallelism.tensor}x{spec.parallelism.pipeline}",
        "selector": selector_string(name, seen.placement is not None and seen.placement.multi_node),
        "replicas": counts["replicas"],
        "readyReplicas": counts["ready"],
        "engine": None,
        "pendingEngine": None,
        "endpoint": None,
    }
    if serving is not None:
        status["engine"] = _engine_ref(serving)
        status["endpoint"] = endpoint(deployment)
        if not serving_desired and desired_engine is not None:
            status["pendingEngine"] = _engine_ref(desired_engine)
    elif desired_engine is not None:
        status["engine"] = _engine_ref(desired_engine)

    conditions: list[dict[str, Any]] = []

    def add(type_: str, value: bool, reason: str, message: str) -> None:
        conditions.append(condition(type_, value, reason, message, generation, now, old))

    if desired_engine is not None:
        if desired_phase == "Ready":
            add("EngineReady", True, "Built", f"Engine {desired_name} is built")
        else:
            reason = {"Failed": "BuildFailed", "Building": "Building"}.get(str(desired_phase), "Pending")
            add("EngineReady", False, reason, f"Engine {desired_name}: {engine_text}")
    placement = seen.placement
    if placement is not None:
        unschedulable = placement.condition()
        add("Unschedulable", not placement.feasible, unschedulable["reason"], unschedulable["message"])

    stalled = _stalled(seen.workload) if serving is not None else None
    degraded: tuple[str, str] | None = None
    if serving is not None and not serving_desired and desired_phase == "Failed":
        degraded = (
            "EngineBuildFailed",
            f"Engine {desired_name} {engine_text}; still serving with {serving.metadata.name}",
        )
    elif stalled is not None:
        degraded = ("ProgressDeadlineExceeded", stalled)
    elif serving is not None and (broken := pod_problems(seen.pods)) is not None:
        degraded = broken

    # Ready, Progressing and the phase, from the most blocking fact down.
    if seen.problem is not None:
        reason, message = seen.problem
        phase = "Failed" if serving is None else "Degraded"
        degraded = degraded or (reason, message)
        ready = (False, reason, message)
        progressing = (False, reason, message)
    elif placement is not None and not placement.feasible and serving is None:
        phase = "Pending"
        ready = (False, "Unschedulable", placement.reason)
        progressing = (False, "Unschedulable", placement.reason)
    elif serving is None:
        if desired_phase == "Failed":
            phase = "Failed"
            ready = (False, "EngineBuildFailed", f"Engine {desired_name} {engine_text}")
            progressing = (False, "EngineBuildFailed", f"Engine {desired_name} {engine_text}")
        else:
            phase = "Building" if desired_phase == "Building" else "Pending"
            waiting = f"Engine {desired_name} is {engine_text}"
            ready = (False, "EngineBuilding" if phase == "Building" else "EnginePending", waiting)
            progressing = (True, ready[1], waiting)
    elif not serving_desired:
        message = f"Serving with {serving.metadata.name} while engine {desired_name} is {engine_text}"
        if desired_phase == "Failed":
            phase = "Degraded"
            ready = (False, "EngineBuildFailed", message)
            progressing = (False, "EngineBuildFailed", message)
        else:
            phase = "Building"
            ready = (False, "EngineBuilding", message)
            progressing = (True, "EngineBuilding", message)
    elif spec.replicas == 0:
        phase = "ScaledToZero"
        ready = (True, "ScaledToZero", "Scaled to zero replicas; scales up when replicas are set")
        progressing = (False, "Complete", "Scaled to zero")
    elif rolled_out(seen.workload):
        phase = "Ready"
        message = f"{counts['ready']}/{spec.replicas} replicas ready, serving {desired_name}"
        ready = (True, "Serving", message)
        progressing = (False, "Complete", message)
    else:
        phase = "Deploying"
        message = (
            f"{counts['ready']}/{spec.replicas} replicas ready, {counts['updated']} on engine {desired_name}"
        )
        unplaced = pods_waiting_for_nodes(seen.pods)
        if unplaced is not None:
            message += f"; waiting for a node: {unplaced}"
        ready = (False, "RollingOut" if counts["ready"] else "ReplicasNotReady", message)
        progressing = (True, "RollingOut", message)
    status["routerReadyReplicas"] = None
    if spec.router.enabled:
        routers = int(((seen.router or {}).get("status") or {}).get("readyReplicas") or 0)
        status["routerReadyReplicas"] = routers
        if phase == "Ready" and routers == 0:
            # The Service sends every request to the routers: without one, nothing is served.
            phase = "Deploying"
            message = (
                f"{counts['ready']}/{spec.replicas} replicas ready; no Kiln router ready yet "
                f"(0/{spec.router.replicas}), and the Service sends requests to the routers"
            )
            ready = (False, "RoutersNotReady", message)
            progressing = (True, "RoutersNotReady", message)
    if degraded is not None and phase in ("Ready", "Deploying"):
        phase = "Degraded"

    add("Ready", *ready)
    add("Progressing", *progressing)
    if degraded is not None:
        add("Degraded", True, *degraded)
    else:
        add("Degraded", False, "AsExpected", "")
    status["phase"] = phase
    status["conditions"] = conditions
    return status


def status_patch(previous: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> dict[str, Any] | None:
    """A JSON merge patch turning `previous` status into `wanted` for the fields in `wanted`
    (None values remove a field); None when nothing changes."""
    before = dict(previous or {})
    patch: dict[str, Any] = {}
    for key, value in wanted.items():
        if value is None:
            if before.get(key) is not None:
                patch[key] = None
        elif before.get(key) != value:
            patch[key] = value
    return patch or None
