"""The capacity Job of an engine the build could not measure: when one is wanted, which pod it
measures, the Job it renders, and what its result does to the engine's status."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from render_helpers import engine_for, example, ready

from kiln import labels
from kiln.api.v1alpha1 import LLMEngine
from kiln.render import capacity_job as render_capacity
from kiln.render.common import BUILD_CONTAINER, Settings
from kiln.render.serving import LEADER, ROLE_LABEL, WORKER

NOW = datetime(2026, 12, 5, 6, 0, tzinfo=UTC)
MULTI = "llama-3.1-405b-fp8-tp8-pp2.yaml"


def with_status(engine: LLMEngine, **status: Any) -> LLMEngine:
    wire = engine.to_wire()
    wire["status"] = {**wire["status"], **status}
    return LLMEngine.model_validate(wire)


def pod(name: str, ip: str | None, is_ready: bool, role: str | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {ROLE_LABEL: role} if role else {}},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if is_ready else "False"}]},
    }


def finished(
    job_condition: str, message: dict[str, Any] | str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    job = {"status": {"conditions": [{"type": job_condition, "status": "True"}]}}
    text = json.dumps(message) if isinstance(message, dict) else message
    terminated = {"exitCode": 0 if job_condition == "Complete" else 1, "message": text}
    return job, {
        "status": {"containerStatuses": [{"name": BUILD_CONTAINER, "state": {"terminated": terminated}}]}
    }


def test_only_a_built_multi_rank_engine_without_capacity_or_an_earlier_measurement_needs_one() -> None:
    deployment = example(MULTI)
    built = ready(deployment)
    assert render_capacity.needs_capacity(built)
    assert not render_capacity.needs_capacity(engine_for(deployment, {"phase": "Building"}))
    assert not render_capacity.needs_capacity(with_status(built, capacity={"outputTokensPerSecond": 5.0}))
    tried = [*built.to_wire()["status"]["conditions"],
             {"type": render_capacity.CONDITION, "status": "False", "reason": "MeasurementFailed",
              "lastTransitionTime": "2026-12-05T06:00:00Z"}]  # fmt: skip
    assert not render_capacity.needs_capacity(with_status(built, conditions=tried))
    # a one-rank torch engine is the build's to measure
    assert not render_capacity.needs_capacity(ready(example("tiny-cpu.yaml")))


def test_the_measured_pod_is_a_ready_api_server_chosen_stably() -> None:
    assert render_capacity.ready_leader_ip([pod("a", "10.0.0.1", False), pod("b", None, True)]) is None
    group = [pod("g-0-1", "10.0.0.3", True, WORKER), pod("g-1", "10.0.0.2", True, LEADER),
             pod("g-0", "10.0.0.1", False, LEADER)]  # fmt: skip
    assert render_capacity.ready_leader_ip(group) == "10.0.0.2"
    assert (
        render_capacity.ready_leader_ip([pod("z", "10.0.0.9", True), pod("y", "10.0.0.8", True)])
        == "10.0.0.8"
    )


def test_job_measures_the_url_at_the_engines_batch_and_target_without_a_gpu() -> None:
    engine = ready(example(MULTI))
    job = render_capacity.capacity_job(engine, Settings(), "big", "http://10.0.0.2:8000")
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = container["args"]
    assert args[0] == "measure-capacity"
    assert args[args.index("--url") + 1] == "http://10.0.0.2:8000"
    assert args[args.index("--max-batch-size") + 1] == str(engine.spec.max_batch_size)
    assert container["terminationMessagePath"] == args[args.index("--result-file") + 1]
    assert "resources" not in container and "nodeSelector" not in spec
    assert job["spec"]["backoffLimit"] == 0
    assert job["metadata"]["name"] == render_capacity.job_name(str(engine.metadata.name))
    assert job["metadata"]["annotations"][render_capacity.DEPLOYMENT_ANNOTATION] == "big"
    # the measuring pod is not one of the deployment's serving pods
    assert labels.DEPLOYMENT_LABEL not in job["spec"]["template"]["metadata"]["labels"]
    assert job["metadata"]["ownerReferences"][0]["uid"] == engine.metadata.uid


def test_a_measured_result_becomes_the_capacity_and_says_where_it_came_from() -> None:
    previous = ready(example(MULTI)).to_wire()["status"]
    result = {"ok": True, "measuredOn": "serving replica http://10.0.0.2:8000",
              "capacity": {"tokensPerSecond": 812.5, "maxConcurrency": 24, "ttftTargetMs": 500.0,
                           "ttftPercentile": 90}}  # fmt: skip
    status = render_capacity.measured_status(previous, *finished("Complete", result), NOW)
    assert status is not None
    assert status["capacity"]["outputTokensPerSecond"] == 812.5
    assert status["capacity"]["maxConcurrencyAtTtftTarget"] == 24
    mark = [c for c in status["conditions"] if c["type"] == render_capacity.CONDITION]
    assert mark[0]["status"] == "True" and "10.0.0.2" in mark[0]["message"]
    assert status["phase"] == "Ready" and status["artifact"] == previous["artifact"]


def test_a_failed_measurement_is_recorded_once_and_a_running_one_changes_nothing() -> None:
    previous = ready(example(MULTI)).to_wire()["status"]
    assert render_capacity.measured_status(previous, {"status": {"active": 1}}, None, NOW) is None
    failure = {"ok": False, "reason": "ReplicaUnavailable", "message": "no answer"}
    status = render_capacity.measured_status(previous, *finished("Failed", failure), NOW)
    assert status is not None and "capacity" not in status
    (mark,) = [c for c in status["conditions"] if c["type"] == render_capacity.CONDITION]
    assert mark["status"] == "False" and mark["reason"] == "ReplicaUnavailable"
    assert not render_capacity.needs_capacity(with_status(ready(example(MULTI)), **status))
