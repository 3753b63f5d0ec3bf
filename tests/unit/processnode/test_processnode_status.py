"""Pod phase, conditions, container statuses and termination messages, by the kubelet's rules."""

from __future__ import annotations

import pytest

from kiln.processnode import podstatus
from kiln.processnode.podstatus import ContainerState

NOW = "2026-12-02T14:00:00Z"


def running(name: str = "c", ready: bool = True) -> ContainerState:
    return ContainerState(name=name, state="running", reason="", started=True, ready=ready, started_at=NOW)


def exited(name: str = "c", code: int = 0, message: str = "") -> ContainerState:
    return ContainerState(
        name=name,
        state="terminated",
        exit_code=code,
        reason=podstatus.termination_reason(code),
        message=message,
    )


def waiting(name: str = "c", restarted: bool = False) -> ContainerState:
    return ContainerState(
        name=name,
        reason="CrashLoopBackOff" if restarted else "ContainerCreating",
        last_terminated={"exitCode": 1} if restarted else None,
    )


@pytest.mark.parametrize(
    ("policy", "states", "phase"),
    [
        ("Always", [waiting()], "Pending"),
        ("Always", [running()], "Running"),
        ("Always", [running("a"), waiting("b")], "Pending"),
        ("Always", [waiting(restarted=True)], "Running"),  # crash-looping is still Running
        ("Always", [exited(code=0)], "Running"),
        ("Never", [exited(code=0)], "Succeeded"),
        ("OnFailure", [exited(code=0)], "Succeeded"),
        ("Never", [exited(code=3)], "Failed"),
        ("Never", [exited("a", 0), exited("b", 1)], "Failed"),
        ("Never", [exited("a", 0), running("b")], "Running"),
        ("OnFailure", [waiting(restarted=True)], "Running"),
    ],
)
def test_pod_phase(policy: str, states: list[ContainerState], phase: str) -> None:
    assert podstatus.pod_phase({"restartPolicy": policy}, [], states) == phase


def test_init_containers_gate_the_phase() -> None:
    spec = {"restartPolicy": "Never", "initContainers": [{"name": "i1"}, {"name": "i2"}]}
    assert podstatus.pod_phase(spec, [exited("i1", 0)], [waiting()]) == "Pending"
    assert podstatus.pod_phase(spec, [exited("i1", 0), exited("i2", 0)], [running()]) == "Running"
    assert podstatus.pod_phase(spec, [exited("i1", 2)], [waiting()]) == "Failed"
    retrying = {**spec, "restartPolicy": "Always"}
    assert podstatus.pod_phase(retrying, [exited("i1", 2)], [waiting()]) == "Pending"


def test_a_started_sidecar_counts_as_initialized() -> None:
    spec = {"initContainers": [{"name": "side", "restartPolicy": "Always"}]}
    assert podstatus.init_done(spec, [running("side")])
    assert not podstatus.init_done(spec, [waiting("side")])


def test_ready_conditions_follow_container_readiness() -> None:
    pod = {"spec": {"containers": [{"name": "a"}, {"name": "b"}]}, "status": {"conditions": []}}
    status = podstatus.pod_status(
        pod, [], [running("a"), running("b", ready=False)], "10.244.255.10", "127.0.0.1", NOW, NOW
    )
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "False"
    assert conditions["ContainersReady"]["message"] == "containers with unready status: [b]"
    assert conditions["Initialized"]["status"] == "True"
    assert status["podIP"] == "10.244.255.10" and status["podIPs"] == [{"ip": "10.244.255.10"}]
    assert [c["ready"] for c in status["containerStatuses"]] == [True, False]
    ready = podstatus.pod_status(
        pod, [], [running("a"), running("b")], "10.244.255.10", "127.0.0.1", NOW, NOW
    )
    assert {c["type"]: c["status"] for c in ready["conditions"]}["Ready"] == "True"


def test_succeeded_pod_is_not_ready_with_pod_completed() -> None:
    pod = {"spec": {"restartPolicy": "Never"}, "status": {}}
    status = podstatus.pod_status(
        pod, [], [exited(message='{"ok": true}')], "10.244.255.11", "127.0.0.1", NOW, NOW
    )
    assert status["phase"] == "Succeeded"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PodCompleted")
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    assert terminated["message"] == '{"ok": true}'


def test_merge_conditions_keeps_foreign_conditions_and_unchanged_transition_times() -> None:
    existing = [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": "t0"},
        {"type": "Ready", "status": "False", "lastTransitionTime": "t1"},
        {"type": "Initialized", "status": "True", "lastTransitionTime": "t2"},
    ]
    owned = [{"type": "Ready", "status": "True"}, {"type": "Initialized", "status": "True"}]
    merged = {c["type"]: c for c in podstatus.merge_conditions(existing, owned, NOW)}
    assert merged["PodScheduled"]["lastTransitionTime"] == "t0"
    assert merged["Ready"]["lastTransitionTime"] == NOW  # changed
    assert merged["Initialized"]["lastTransitionTime"] == "t2"  # unchanged


def test_container_status_shapes() -> None:
    crash = ContainerState(
        name="c",
        reason="CrashLoopBackOff",
        message="back-off 2s",
        restart_count=2,
        last_terminated={"exitCode": 1},
    )
    assert crash.status()["state"] == {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 2s"}}
    assert crash.status()["lastState"] == {"terminated": {"exitCode": 1}}
    assert crash.status()["restartCount"] == 2
    killed = ContainerState(name="c", state="terminated", exit_code=143, signal=15, reason="Error")
    assert killed.status()["state"]["terminated"]["signal"] == 15
    assert running().status()["state"] == {"running": {"startedAt": NOW}}


@pytest.mark.parametrize(
    ("file_text", "log", "policy", "code", "expected"),
    [
        ('{"ok": true}', "noise", "File", 0, '{"ok": true}'),
        ('{"ok": false}', "noise", "FallbackToLogsOnError", 1, '{"ok": false}'),
        ("", "line1\nline2\n", "FallbackToLogsOnError", 1, "line1\nline2"),
        ("", "line1\nline2\n", "FallbackToLogsOnError", 0, ""),  # success: no fallback
        ("", "line1\nline2\n", "File", 1, ""),
    ],
)
def test_termination_message(file_text: str, log: str, policy: str, code: int, expected: str) -> None:
    assert podstatus.termination_message(file_text, log, policy, code) == expected


def test_termination_message_caps() -> None:
    assert len(podstatus.termination_message("x" * 10_000, "", "File", 0)) == podstatus.MAX_MESSAGE_BYTES
    log = "\n".join(f"line {i}" for i in range(500))
    message = podstatus.termination_message("", log, "FallbackToLogsOnError", 2)
    assert message.endswith("line 499") and len(message.encode()) <= podstatus.FALLBACK_LOG_BYTES
    assert "line 419" not in message  # only the last 80 lines


def test_resume_a_fresh_container() -> None:
    state, run = podstatus.resumed_state(None, "Always", "c", "img", NOW)
    assert run and state.restart_count == 0 and state.state == "waiting"


def test_resume_a_running_container_counts_a_restart_or_fails_under_never() -> None:
    previous = {"name": "c", "restartCount": 1, "state": {"running": {"startedAt": "t0"}}}
    state, run = podstatus.resumed_state(previous, "Always", "c", "img", NOW)
    assert run and state.restart_count == 2
    assert state.last_terminated is not None and state.last_terminated["reason"] == "ContainerStatusUnknown"
    state, run = podstatus.resumed_state(previous, "Never", "c", "img", NOW)
    assert not run and state.state == "terminated" and state.exit_code == 137
    assert podstatus.pod_phase({"restartPolicy": "Never"}, [], [state]) == "Failed"


def test_resume_a_finished_container_keeps_its_result() -> None:
    previous = {"name": "c", "restartCount": 0, "state": {"terminated": {"exitCode": 0, "message": "done"}}}
    state, run = podstatus.resumed_state(previous, "OnFailure", "c", "img", NOW)
    assert not run and (state.exit_code, state.message) == (0, "done")
    failed = {"name": "c", "restartCount": 0, "state": {"terminated": {"exitCode": 2}}}
    state, run = podstatus.resumed_state(failed, "OnFailure", "c", "img", NOW)
    assert run and state.restart_count == 1 and state.last_terminated == {"exitCode": 2}


def test_readiness_gates_hold_back_ready() -> None:
    pod = {
        "spec": {"containers": [{"name": "c"}], "readinessGates": [{"conditionType": "example.com/warm"}]},
        "status": {
            "conditions": [{"type": "example.com/warm", "status": "False", "lastTransitionTime": "t"}]
        },
    }
    status = podstatus.pod_status(pod, [], [running()], "10.244.255.10", "127.0.0.1", NOW, NOW)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["ContainersReady"]["status"] == "True"
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == (
        "False",
        "ReadinessGatesNotReady",
    )
    assert conditions["example.com/warm"]["status"] == "False"  # someone else's condition, kept as is
    pod["status"]["conditions"][0]["status"] = "True"
    status = podstatus.pod_status(pod, [], [running()], "10.244.255.10", "127.0.0.1", NOW, NOW)
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"


def test_a_pod_the_node_failed_is_failed_with_its_reason() -> None:
    pod = {"spec": {"restartPolicy": "Always"}, "status": {}}
    killed = ContainerState(name="c", state="terminated", exit_code=143, reason="Error")
    status = podstatus.pod_status(
        pod, [], [killed], "10.244.255.10", "127.0.0.1", NOW, NOW, "DeadlineExceeded", "too long", failed=True
    )
    assert (status["phase"], status["reason"], status["message"]) == (
        "Failed",
        "DeadlineExceeded",
        "too long",
    )
