"""Status: an engine's phase from its build Job and pod; a deployment's conditions and phase."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from render_helpers import engine_for, example, nodes, ready

from kiln.api.v1alpha1 import LLMDeployment
from kiln.placement import ReplicaShape, plan
from kiln.render import status as render_status
from kiln.render.build_job import job_name
from kiln.render.engine import engine_identity

NOW = datetime(2026, 12, 2, 14, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)


def job(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "j", "generation": 1}, "status": status}


def job_condition(type_: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-12-02T14:03:00Z",
    }


def pod(
    phase: str,
    message: str | None = None,
    exit_code: int | None = None,
    created: str = "2026-12-02T14:00:00Z",
    scheduled: bool = True,
) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {}}
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, **({"message": message} if message else {})}}
    return {
        "metadata": {"name": f"p-{created}", "creationTimestamp": created},
        "status": {
            "phase": phase,
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "True" if scheduled else "False",
                    "message": "0/26 nodes are available: 2 Insufficient nvidia.com/gpu.",
                }
            ],
            "containerStatuses": [{"name": "build", "state": state}],
        },
    }


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    found = render_status.find_condition(status["conditions"], type_)
    assert found is not None, f"no {type_} condition in {status['conditions']}"
    return dict(found)


ENGINE = engine_for(example("llama-3-8b-fp8-h100.yaml"))


def test_no_job_yet_is_pending() -> None:
    status = render_status.engine_status(ENGINE, render_status.BuildObservation(), NOW)
    assert status["phase"] == "Pending" and status["job"] == job_name(str(ENGINE.metadata.name))
    assert cond(status, "Ready")["status"] == "False"


def test_running_build_reports_progress_from_its_log() -> None:
    log = "\n".join(
        [
            'KILN_PROGRESS {"step":"fetch","percent":10.0,"message":"a"}',
            "some other line",
            '2026-12-02 KILN_PROGRESS {"step":"convert","percent":42.5,"message":"layer 3"}',
        ]
    )
    seen = render_status.BuildObservation(
        job(active=1, startTime="2026-12-02T14:00:00Z"), [pod("Running")], log
    )
    status = render_status.engine_status(ENGINE, seen, NOW)
    assert (status["phase"], status["progress"], status["step"], status["attempts"]) == (
        "Building",
        42,
        "convert",
        1,
    )
    assert cond(status, "Building")["status"] == "True"
    assert status["startedTime"] == "2026-12-02T14:00:00Z"


def test_unscheduled_build_pod_is_pending_with_the_schedulers_message() -> None:
    seen = render_status.BuildObservation(job(active=1), [pod("Pending", scheduled=False)])
    status = render_status.engine_status(ENGINE, seen, NOW)
    assert status["phase"] == "Pending"
    assert "Insufficient nvidia.com/gpu" in cond(status, "Ready")["message"]


def test_succeeded_build_with_result_is_ready_with_checksum_and_capacity() -> None:
    result = {
        "ok": True,
        "artifact": "/mnt/pvc/kiln-engine-cache/x",
        "manifestSha256": "cd" * 32,
        "runtimeVersion": "0.1.0",
        "gpuArch": "sm90",
        "capacity": {"tokensPerSecond": 1234.5, "maxConcurrency": 48, "ttftTargetMs": 500.0},
    }
    seen = render_status.BuildObservation(
        job(succeeded=1, completionTime="2026-12-02T14:04:00Z", conditions=[job_condition("Complete")]),
        [pod("Succeeded", json.dumps(result), 0)],
    )
    status = render_status.engine_status(ENGINE, seen, NOW)
    assert status["phase"] == "Ready" and status["progress"] == 100
    # The URI is where the operator told the build to write (pvc://), not the pod's mount path.
    assert status["artifact"] == {
        "uri": f"pvc://kiln-engine-cache/{ENGINE.metadata.name}",
        "manifestSha256": "cd" * 32,
    }
    assert status["capacity"] == {
        "outputTokensPerSecond": 1234.5,
        "maxConcurrencyAtTtftTarget": 48,
        "ttftTargetMs": 500,
    }
    assert status["gpuArch"] == "sm90" and status["completedTime"] == "2026-12-02T14:04:00Z"
    assert cond(status, "Ready")["status"] == "True" and cond(status, "Failed")["status"] == "False"


def test_succeeded_build_without_message_is_ready_with_the_uri_it_asked_for() -> None:
    seen = render_status.BuildObservation(
        job(succeeded=1, conditions=[job_condition("Complete")]), [pod("Succeeded", None, 0)]
    )
    status = render_status.engine_status(ENGINE, seen, NOW)
    assert status["phase"] == "Ready"
    assert status["artifact"]["uri"] == f"pvc://kiln-engine-cache/{ENGINE.metadata.name}"
    assert "capacity" not in status


def test_failed_build_with_result_gives_its_reason() -> None:
    result = {"ok": False, "reason": "CheckpointNotFound", "message": "hf://x/y: 404"}
    seen = render_status.BuildObservation(
        job(
            failed=3,
            conditions=[
                job_condition("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
            ],
        ),
        [pod("Failed", json.dumps(result), 1, "2026-12-02T14:01:00Z"), pod("Failed", None, 1)],
        "Traceback...\nhf://x/y: 404",
    )
    status = render_status.engine_status(ENGINE, seen, NOW)
    assert status["phase"] == "Failed" and status["attempts"] == 3
    failed = cond(status, "Failed")
    assert (failed["status"], failed["reason"], failed["message"]) == (
        "True",
        "CheckpointNotFound",
        "hf://x/y: 404",
    )
    assert status["logTail"].endswith("hf://x/y: 404")


def test_failed_build_without_result_uses_the_job_reason_and_the_log_fallback() -> None:
    seen = render_status.BuildObservation(
        job(
            failed=1,
            conditions=[
                job_condition("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
            ],
        ),
        [pod("Failed", "line 1\nKilled", 137)],
    )
    status = render_status.engine_status(ENGINE, seen, NOW)
    assert cond(status, "Failed")["reason"] == "DeadlineExceeded"
    assert "exited with code 137" in cond(status, "Failed")["message"]
    assert status["logTail"] == "line 1\nKilled"


def test_ready_and_failed_are_final() -> None:
    built = ready(example("llama-3-8b-fp8-h100.yaml"))
    failing = render_status.BuildObservation(job(failed=1, conditions=[job_condition("Failed", "X")]))
    assert render_status.engine_status(built, failing, NOW)["phase"] == "Ready"


def test_conditions_keep_their_transition_time_until_they_flip() -> None:
    first = render_status.condition("Ready", False, "A", "", 1, NOW)
    same = render_status.condition("Ready", False, "B", "other", 2, LATER, [first])
    flipped = render_status.condition("Ready", True, "C", "", 2, LATER, [first])
    assert same["lastTransitionTime"] == "2026-12-02T14:00:00Z"
    assert flipped["lastTransitionTime"] == "2026-12-02T14:05:00Z"


# ---------------------------------------------------------------- deployments


DEPLOYMENT = example("llama-3-8b-fp8-h100.yaml")
IDENTITY = engine_identity(DEPLOYMENT, "0.1.0")
PLACEMENT = plan(ReplicaShape.from_spec(DEPLOYMENT.spec), nodes(), "Required")


def building(deployment: LLMDeployment, progress: int = 40) -> Any:
    return engine_for(deployment, {"phase": "Building", "progress": progress, "step": "convert"})


def workload(
    replicas: int, ready_: int, updated: int, desired: int, generation: int = 2, observed: int = 2
) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": desired},
        "status": {
            "replicas": replicas,
            "readyReplicas": ready_,
            "updatedReplicas": updated,
            "observedGeneration": observed,
        },
    }


def deployment_status(**seen: Any) -> dict[str, Any]:
    observation = render_status.DeploymentObservation(desired=IDENTITY, placement=PLACEMENT, **seen)
    return render_status.deployment_status(DEPLOYMENT, observation, NOW)


def test_building_engine_nothing_serving() -> None:
    status = deployment_status(desired_engine=building(DEPLOYMENT))
    assert status["phase"] == "Building"
    assert (cond(status, "Ready")["status"], cond(status, "Ready")["reason"]) == ("False", "EngineBuilding")
    assert "40%" in cond(status, "Ready")["message"]
    assert cond(status, "Progressing")["status"] == "True"
    assert cond(status, "EngineReady")["reason"] == "Building"
    assert cond(status, "Unschedulable")["status"] == "False"
    assert status["engine"]["name"] == IDENTITY.name and status["pendingEngine"] is None
    assert status["layout"] == "1x1" and status["observedGeneration"] == 1
    assert status["selector"].count("=") == 3


def test_ready_when_every_replica_runs_the_desired_engine() -> None:
    engine = ready(DEPLOYMENT)
    status = deployment_status(desired_engine=engine, serving=engine, workload=workload(2, 2, 2, 2))
    assert status["phase"] == "Ready"
    assert (cond(status, "Ready")["status"], cond(status, "Ready")["reason"]) == ("True", "Serving")
    assert cond(status, "Progressing")["reason"] == "Complete"
    assert cond(status, "Degraded")["status"] == "False"
    assert (status["replicas"], status["readyReplicas"]) == (2, 2)
    assert status["endpoint"] == "http://llama-3-8b.serving.svc:8000/v1"


def test_rolling_out_is_deploying() -> None:
    engine = ready(DEPLOYMENT)
    status = deployment_status(desired_engine=engine, serving=engine, workload=workload(3, 2, 1, 2))
    assert status["phase"] == "Deploying"
    assert cond(status, "Ready")["status"] == "False" and cond(status, "Progressing")["status"] == "True"


def test_old_engine_serves_while_the_new_one_builds() -> None:
    old = ready(example("llama-3-8b-fp8-h100.yaml", engine={"quantization": "none"}))
    status = deployment_status(
        desired_engine=building(DEPLOYMENT), serving=old, workload=workload(2, 2, 2, 2)
    )
    assert status["phase"] == "Building"
    assert status["engine"]["name"] == old.metadata.name
    assert status["pendingEngine"]["name"] == IDENTITY.name
    assert cond(status, "Ready")["reason"] == "EngineBuilding"
    assert status["readyReplicas"] == 2


def test_failed_new_engine_while_old_serves_is_degraded() -> None:
    old = ready(example("llama-3-8b-fp8-h100.yaml", engine={"quantization": "none"}))
    failed = engine_for(
        DEPLOYMENT,
        {
            "phase": "Failed",
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "OutOfMemory",
                    "message": "CUDA OOM",
                    "lastTransitionTime": "2026-12-02T14:00:00Z",
                }
            ],
        },
    )
    status = deployment_status(desired_engine=failed, serving=old, workload=workload(2, 2, 2, 2))
    assert status["phase"] == "Degraded"
    assert cond(status, "Degraded")["reason"] == "EngineBuildFailed"
    assert "CUDA OOM" in cond(status, "Degraded")["message"]
    assert status["engine"]["name"] == old.metadata.name


def test_failed_engine_nothing_serving_is_failed() -> None:
    failed = engine_for(DEPLOYMENT, {"phase": "Failed"})
    status = deployment_status(desired_engine=failed)
    assert status["phase"] == "Failed" and cond(status, "Ready")["reason"] == "EngineBuildFailed"


def test_unschedulable_and_missing_lws() -> None:
    big = example("llama-3-70b-fp8-tp4.yaml", gpu={"product": "NVIDIA-L40S"})
    nowhere = plan(ReplicaShape.from_spec(big.spec), nodes(), "Required")
    assert not nowhere.feasible
    seen = render_status.DeploymentObservation(desired=IDENTITY, desired_engine=ready(big), placement=nowhere)
    status = render_status.deployment_status(big, seen, NOW)
    assert status["phase"] == "Pending"
    assert cond(status, "Unschedulable")["status"] == "True"
    assert cond(status, "Ready")["reason"] == "Unschedulable"
    problem = ("LeaderWorkerSetRequired", "install LeaderWorkerSet")
    missing = deployment_status(desired_engine=ready(DEPLOYMENT), problem=problem)
    assert missing["phase"] == "Failed" and cond(missing, "Ready")["reason"] == "LeaderWorkerSetRequired"


def test_scaled_to_zero() -> None:
    engine = ready(DEPLOYMENT)
    zero = example("llama-3-8b-fp8-h100.yaml", replicas=0, autoscaling={"enabled": False})
    seen = render_status.DeploymentObservation(
        desired=IDENTITY,
        desired_engine=engine,
        serving=engine,
        workload=workload(0, 0, 0, 0),
        placement=PLACEMENT,
    )
    status = render_status.deployment_status(zero, seen, NOW)
    assert status["phase"] == "ScaledToZero" and cond(status, "Ready")["status"] == "True"


def test_stalled_rollout_is_degraded() -> None:
    engine = ready(DEPLOYMENT)
    stuck = workload(2, 1, 1, 2)
    stuck["status"]["conditions"] = [
        {
            "type": "Progressing",
            "status": "False",
            "reason": "ProgressDeadlineExceeded",
            "message": "too slow",
        }
    ]
    status = deployment_status(desired_engine=engine, serving=engine, workload=stuck)
    assert status["phase"] == "Degraded" and cond(status, "Degraded")["reason"] == "ProgressDeadlineExceeded"


def test_status_patch_touches_only_changed_fields_and_removes_nulls() -> None:
    previous = {"phase": "Ready", "replicas": 2, "ttftP50Ms": 120.0, "pendingEngine": {"name": "x"}}
    wanted = {"phase": "Ready", "replicas": 3, "pendingEngine": None}
    assert render_status.status_patch(previous, wanted) == {"replicas": 3, "pendingEngine": None}
    assert render_status.status_patch(previous, {"phase": "Ready"}) is None


def test_a_written_status_reads_back_as_no_change() -> None:
    """What the operator writes, parsed back from the API, renders to the same status: no patch
    loop of status writes waking the reconciler that wrote them."""
    engine = ready(DEPLOYMENT)
    seen = render_status.DeploymentObservation(
        desired=IDENTITY,
        desired_engine=engine,
        serving=engine,
        workload=workload(2, 2, 2, 2),
        placement=PLACEMENT,
    )
    written = render_status.deployment_status(DEPLOYMENT, seen, NOW)
    stored = LLMDeployment.model_validate({**DEPLOYMENT.model_dump(by_alias=True), "status": written})
    again = render_status.deployment_status(stored, seen, LATER)
    assert render_status.status_patch(written, again) is None

    building_engine = engine_for(DEPLOYMENT)
    seen_build = render_status.BuildObservation(
        job(active=1, startTime="2026-12-02T14:00:00Z"), [pod("Running")]
    )
    first = render_status.engine_status(building_engine, seen_build, NOW)
    reread = engine_for(DEPLOYMENT, {**first, "users": 1, "lastUsedTime": "2026-12-02T14:00:00Z"})
    second = render_status.engine_status(reread, seen_build, LATER)
    assert (
        render_status.status_patch({**first, "users": 1, "lastUsedTime": "2026-12-02T14:00:00Z"}, second)
        is None
    )


def serving_pod(name: str, waiting: str | None = None, unschedulable: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": []}
    if waiting:
        status["containerStatuses"] = [
            {"name": "engine", "state": {"waiting": {"reason": waiting, "message": "boom"}}}
        ]
    if unschedulable:
        status["conditions"] = [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}
        ]
    return {"metadata": {"name": name}, "status": status}


def test_crashing_serving_pods_make_the_deployment_degraded_with_their_reason() -> None:
    engine = ready(DEPLOYMENT)
    pods = [serving_pod("a", "CrashLoopBackOff"), serving_pod("b", "CrashLoopBackOff"), serving_pod("c")]
    status = deployment_status(
        desired_engine=engine, serving=engine, workload=workload(2, 0, 2, 2), pods=pods
    )
    assert status["phase"] == "Degraded"
    degraded = cond(status, "Degraded")
    assert degraded["reason"] == "CrashLoopBackOff" and degraded["message"].startswith("2 serving pod(s)")
    assert cond(status, "Ready")["status"] == "False"


def test_pods_waiting_for_gpus_say_so_without_being_degraded() -> None:
    engine = ready(DEPLOYMENT)
    pods = [serving_pod("a", unschedulable="0/26 nodes are available: 2 Insufficient nvidia.com/gpu.")]
    status = deployment_status(
        desired_engine=engine, serving=engine, workload=workload(2, 1, 2, 2), pods=pods
    )
    assert status["phase"] == "Deploying" and cond(status, "Degraded")["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in cond(status, "Ready")["message"]
