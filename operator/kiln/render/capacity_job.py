"""The capacity Job of an LLMEngine the build could not measure (several ranks or pods, TensorRT-LLM):
`kiln-engine measure-capacity` against the first Ready replica's leader, and what its result does to
the engine's status. Pure: the controller lists, creates and patches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from kiln import labels
from kiln.api.v1alpha1 import LLMEngine
from kiln.render.build_job import TERMINATION_LOG, engine_owner
from kiln.render.common import (
    BUILD_CONTAINER,
    Manifest,
    Settings,
    container_security_context,
    managed_labels,
    owner_reference,
    pod_security_context,
)
from kiln.render.serving import ROLE_LABEL, WORKER
from kiln.render.status import _capacity, build_result, condition, find_condition

CAPACITY_COMPONENT = "capacity"
JOB_SUFFIX = "-capacity"
CONDITION = "CapacityMeasured"
DEPLOYMENT_ANNOTATION = "kiln.dev/measures-deployment"
DEFAULT_TTFT_TARGET_MS = 500  # `kiln-engine build`'s default, so both measurements agree
BUDGET_SECONDS = 300
DEADLINE_SECONDS = 900  # the budget plus waiting for the replica and a slow last burst


def job_name(engine_name: str) -> str:
    """Fixed per engine, so the Job is created once and an operator restart finds it."""
    return engine_name[: 63 - len(JOB_SUFFIX)].rstrip("-") + JOB_SUFFIX


def build_skips_capacity(engine: LLMEngine) -> bool:
    """Whether the build leaves capacity to the serving pods (the rule of the engine's
    `build.pipeline.measurable`): several ranks, or TensorRT-LLM."""
    ranks = engine.spec.parallelism.tensor * engine.spec.parallelism.pipeline
    return engine.spec.backend != "torch" or ranks > 1


def needs_capacity(engine: LLMEngine) -> bool:
    """A built engine the build did not measure, with no finished measurement yet: the first Ready
    replica measures it. (A one-rank torch engine without capacity is not measured again: its build
    either measured it or chose not to.)"""
    status = engine.status
    if status is None or status.phase != "Ready" or status.capacity is not None:
        return False
    if not build_skips_capacity(engine):
        return False
    conditions = [c.to_wire() for c in status.conditions or []]
    return find_condition(conditions, CONDITION) is None


def ready_leader_ip(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """The IP of a Ready pod that serves the API (any pod of a one-pod replica, the leader of a
    multi-pod one; the caller lists this engine's serving pods), first by name so repeated
    reconciles pick the same one."""
    for pod in sorted(pods, key=lambda p: str(p["metadata"]["name"])):
        if (pod["metadata"].get("labels") or {}).get(ROLE_LABEL) == WORKER:
            continue
        ready = find_condition((pod.get("status") or {}).get("conditions"), "Ready")
        ip = (pod.get("status") or {}).get("podIP")
        if (
            ready is not None
            and ready.get("status") == "True"
            and ip
            and not pod["metadata"].get("deletionTimestamp")
        ):
            return str(ip)
    return None


def capacity_args(engine: LLMEngine, url: str) -> list[str]:
    """`kiln-engine measure-capacity` at the engine's batch limit and TTFT target (the build's)."""
    spec = engine.spec
    return [
        "measure-capacity",
        "--url",
        url,
        "--max-batch-size",
        str(spec.max_batch_size),
        "--ttft-target-ms",
        str(spec.capacity_ttft_target_ms or DEFAULT_TTFT_TARGET_MS),
        "--ttft-percentile",
        str(spec.capacity_ttft_percentile or 90),
        "--capacity-budget-seconds",
        str(BUDGET_SECONDS),
        "--result-file",
        TERMINATION_LOG,
    ]


def capacity_job(engine: LLMEngine, settings: Settings, deployment: str, url: str) -> Manifest:
    """One pod, no GPU, no retries: it only sends HTTP to `url` and writes the result JSON to its
    termination log. Annotated with the deployment whose replica it measures, so its events queue it."""
    name = str(engine.metadata.name)
    pod_labels = managed_labels(CAPACITY_COMPONENT, **{labels.ENGINE_LABEL: name})
    container: dict[str, Any] = {
        "name": BUILD_CONTAINER,
        "image": settings.image_for(engine.spec.backend, engine.spec.image),
        "command": ["kiln-engine"],
        "args": capacity_args(engine, url),
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        "securityContext": container_security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "containers": [container],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name),
            "namespace": engine.metadata.namespace,
            "labels": pod_labels,
            # Not a label: the measuring pod must not look like one of the deployment's serving pods.
            "annotations": {DEPLOYMENT_ANNOTATION: deployment},
            "ownerReferences": [owner_reference(engine_owner(engine))],
        },
        "spec": {
            "parallelism": 1,
            "completions": 1,
            "backoffLimit": 0,
            "activeDeadlineSeconds": DEADLINE_SECONDS,
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }


def _finished(job: Mapping[str, Any], type_: str) -> bool:
    found = find_condition((job.get("status") or {}).get("conditions"), type_)
    return found is not None and found.get("status") == "True"


def measured_status(
    previous: Mapping[str, Any], job: Mapping[str, Any], pod: Mapping[str, Any] | None, now: datetime
) -> dict[str, Any] | None:
    """The engine status once the capacity Job finished (capacity and a CapacityMeasured condition
    saying it came from the serving replica, or why not); None while it runs."""
    complete, failed = _finished(job, "Complete"), _finished(job, "Failed")
    if not (complete or failed):
        return None
    result, fallback = build_result(pod)
    capacity = _capacity((result or {}).get("capacity")) if complete and (result or {}).get("ok") else None
    status = dict(previous)
    old = previous.get("conditions") or []
    if capacity is not None:
        status["capacity"] = capacity
        mark = condition(CONDITION, True, "MeasuredOnServingReplica",
                         f"Measured on the serving replica: {(result or {}).get('measuredOn') or ''}",
                         None, now, old)  # fmt: skip
    else:
        ended = "finished without a result" if complete else "failed"
        why = (result or {}).get("message") or fallback or f"the capacity Job {ended}"
        mark = condition(CONDITION, False, str((result or {}).get("reason") or "MeasurementFailed"), str(why),
                         None, now, old)  # fmt: skip
    status["conditions"] = [c for c in old if c.get("type") != CONDITION] + [mark]
    return status
