"""Probe specs and the threshold logic that flips readiness and liveness; restart decisions and backoff."""

from __future__ import annotations

import pytest

from kiln.processnode import probes, restarts
from kiln.processnode.probes import ProbeSpec, ProbeState

CONTAINER = {"name": "srv", "ports": [{"name": "http", "containerPort": 8000}]}


def test_parse_http_probe_resolves_named_ports() -> None:
    spec = probes.parse_probe(
        {
            "httpGet": {"path": "ready", "port": "http", "httpHeaders": [{"name": "X", "value": "1"}]},
            "periodSeconds": 2,
            "failureThreshold": 5,
        },
        CONTAINER,
    )
    assert spec == ProbeSpec(
        kind="http", port=8000, path="ready", headers=(("X", "1"),), period=2, failure_threshold=5
    )
    assert probes.http_url(spec, "10.244.255.10") == "http://10.244.255.10:8000/ready"


def test_parse_tcp_and_exec_probes() -> None:
    tcp = probes.parse_probe({"tcpSocket": {"port": 9000}, "timeoutSeconds": 3}, CONTAINER)
    assert tcp is not None and (tcp.kind, tcp.port, tcp.timeout) == ("tcp", 9000, 3.0)
    exec_ = probes.parse_probe({"exec": {"command": ["cat", "/tmp/ok"]}}, CONTAINER)
    assert exec_ is not None and (exec_.kind, exec_.command) == ("exec", ("cat", "/tmp/ok"))
    assert probes.parse_probe(None, CONTAINER) is None


def test_unknown_named_port_is_an_error() -> None:
    with pytest.raises(ValueError):
        probes.parse_probe({"httpGet": {"port": "metrics"}}, CONTAINER)


def run(role: probes.ProbeRole, results: list[bool], spec: ProbeSpec) -> list[bool]:
    state = ProbeState.initial(role)
    verdicts = []
    for ok in results:
        state = probes.observe(state, ok, spec)
        verdicts.append(state.passed)
    return verdicts


def test_readiness_needs_success_threshold_and_drops_after_failure_threshold() -> None:
    spec = ProbeSpec(kind="http", success_threshold=2, failure_threshold=2)
    assert run("readiness", [True, False, True, True, False, True, False, False], spec) == [
        False,
        False,
        False,
        True,
        True,  # one failure is not enough
        True,
        True,
        False,
    ]


def test_liveness_starts_passed_and_fails_after_threshold() -> None:
    spec = ProbeSpec(kind="tcp", failure_threshold=3)
    assert run("liveness", [False, False, True, False, False, False], spec) == [
        True,
        True,
        True,
        True,
        True,
        False,
    ]


def test_http_success_range() -> None:
    assert [probes.http_ok(code) for code in (199, 200, 302, 399, 400, 503)] == [
        False,
        True,
        True,
        True,
        False,
        False,
    ]


def test_probes_of_lists_the_set_roles() -> None:
    container = {
        **CONTAINER,
        "readinessProbe": {"httpGet": {"port": 8000}},
        "livenessProbe": {"tcpSocket": {"port": 8000}},
    }
    assert sorted(probes.probes_of(container)) == ["liveness", "readiness"]


@pytest.mark.parametrize(
    ("policy", "code", "restart"),
    [
        ("Always", 0, True),
        ("Always", 1, True),
        ("OnFailure", 0, False),
        ("OnFailure", 3, True),
        ("Never", 3, False),
        ("Never", 0, False),
    ],
)
def test_should_restart(policy: str, code: int, restart: bool) -> None:
    assert restarts.should_restart(policy, code) is restart


def test_backoff_doubles_to_the_cap_and_resets_after_a_long_run() -> None:
    backoff = restarts.Backoff(initial=10, cap=300, reset_after=600)
    assert [backoff.delay(n) for n in range(0, 8)] == [0, 10, 20, 40, 80, 160, 300, 300]
    assert backoff.next_failures(4, ran_for_seconds=5) == 5
    assert backoff.next_failures(4, ran_for_seconds=601) == 1
