"""Probes: the spec read from a container, and the pure threshold logic that turns results into a verdict.

The kubelet flips a probe's result only after `successThreshold` consecutive successes or
`failureThreshold` consecutive failures. Readiness and startup start as failed, liveness as passed.
Executing a probe (HTTP, TCP, exec) is I/O and lives in `kiln.processnode.runtime`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

ProbeKind = Literal["http", "tcp", "exec"]
ProbeRole = Literal["readiness", "liveness", "startup"]


@dataclass(frozen=True)
class ProbeSpec:
    """One probe of a container, ports resolved to numbers."""

    kind: ProbeKind
    port: int = 0
    path: str = "/"
    scheme: str = "HTTP"
    host: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    command: tuple[str, ...] = ()
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3
    termination_grace: float | None = None


def resolve_port(port: int | str, container: Mapping[str, Any]) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for declared in container.get("ports") or []:
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise ValueError(f"probe port {port!r} names no port of container {container.get('name')!r}")


def parse_probe(probe: Mapping[str, Any] | None, container: Mapping[str, Any]) -> ProbeSpec | None:
    """The ProbeSpec of a Kubernetes probe object (None for no probe)."""
    if not probe:
        return None
    timing = {
        "initial_delay": float(probe.get("initialDelaySeconds") or 0),
        "period": float(probe.get("periodSeconds") or 10),
        "timeout": float(probe.get("timeoutSeconds") or 1),
        "success_threshold": int(probe.get("successThreshold") or 1),
        "failure_threshold": int(probe.get("failureThreshold") or 3),
        "termination_grace": (
            float(probe["terminationGracePeriodSeconds"])
            if probe.get("terminationGracePeriodSeconds") is not None
            else None
        ),
    }
    if "httpGet" in probe:
        http = probe["httpGet"]
        return ProbeSpec(
            kind="http",
            port=resolve_port(http["port"], container),
            path=http.get("path") or "/",
            scheme=(http.get("scheme") or "HTTP").upper(),
            host=http.get("host") or "",
            headers=tuple((h["name"], h["value"]) for h in http.get("httpHeaders") or []),
            **timing,  # type: ignore[arg-type]
        )
    if "tcpSocket" in probe:
        tcp = probe["tcpSocket"]
        return ProbeSpec(
            kind="tcp",
            port=resolve_port(tcp["port"], container),
            host=tcp.get("host") or "",
            **timing,  # type: ignore[arg-type]
        )
    if "grpc" in probe:  # a gRPC health check needs grpcio; a TCP connect is the closest we can do
        return ProbeSpec(kind="tcp", port=int(probe["grpc"]["port"]), **timing)  # type: ignore[arg-type]
    if "exec" in probe:
        return ProbeSpec(
            kind="exec",
            command=tuple((probe["exec"] or {}).get("command") or ()),
            **timing,  # type: ignore[arg-type]
        )
    raise ValueError(f"unsupported probe handler: {sorted(probe)}")


@dataclass(frozen=True)
class ProbeState:
    """Consecutive outcomes and the current verdict of one probe."""

    passed: bool
    successes: int = 0
    failures: int = 0

    @classmethod
    def initial(cls, role: ProbeRole) -> ProbeState:
        return cls(passed=role == "liveness")


def observe(state: ProbeState, ok: bool, spec: ProbeSpec) -> ProbeState:
    """The state after one probe result."""
    if ok:
        successes = state.successes + 1
        passed = state.passed or successes >= spec.success_threshold
        return replace(state, passed=passed, successes=successes, failures=0)
    failures = state.failures + 1
    passed = state.passed and failures < spec.failure_threshold
    return replace(state, passed=passed, successes=0, failures=failures)


def http_url(spec: ProbeSpec, pod_ip: str) -> str:
    host = spec.host or pod_ip
    path = spec.path if spec.path.startswith("/") else "/" + spec.path
    return f"{spec.scheme.lower()}://{host}:{spec.port}{path}"


def http_ok(status_code: int) -> bool:
    """The kubelet counts 200-399 as success."""
    return 200 <= status_code < 400


def probes_of(container: Mapping[str, Any]) -> dict[ProbeRole, ProbeSpec]:
    """The container's readiness, liveness and startup probes that are set."""
    found: dict[ProbeRole, ProbeSpec] = {}
    roles: Sequence[tuple[ProbeRole, str]] = (
        ("readiness", "readinessProbe"),
        ("liveness", "livenessProbe"),
        ("startup", "startupProbe"),
    )
    for role, key in roles:
        spec = parse_probe(container.get(key), container)
        if spec is not None:
            found[role] = spec
    return found
