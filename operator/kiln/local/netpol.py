"""NetworkPolicies evaluated against a cluster's real pods with cyclonus, since the local cluster's CNI
bridge enforces none: each flow is a source pod (or address), a destination pod (or address) and a
port, and cyclonus' `analyze --mode query-traffic` answers whether the policies allow it.

`flow` and `traffic` turn pods as the API serves them into cyclonus' traffic objects;
`parse_verdicts` reads its answers back. cyclonus is built from its pinned Go module like the other
local tools (`kiln local build --netpol`).
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kiln.local import build

TOOLSET = build.Toolset(
    "cyclonus",
    build.LOCAL_DIR / "gotools-cyclonus",
    (build.Binary("cyclonus", "github.com/mattfenwick/cyclonus/cmd/cyclonus"),),
    "github.com/mattfenwick/cyclonus",
)
_VERDICT = re.compile(r"^\|\s*IS ALLOWED\?\s*\|\s*(TRUE|FALSE)\s*\|", re.MULTILINE)


class NetpolError(RuntimeError):
    """cyclonus could not answer (the message carries its output)."""


@dataclass(frozen=True)
class Peer:
    """One end of a flow: a pod (its namespace, labels and its namespace's labels) or a bare address."""

    ip: str
    namespace: str | None = None
    pod_labels: Mapping[str, str] = field(default_factory=dict)
    namespace_labels: Mapping[str, str] = field(default_factory=dict)

    def to_traffic(self) -> dict[str, Any]:
        peer: dict[str, Any] = {"IP": self.ip}
        if self.namespace is not None:
            peer["Internal"] = {
                "PodLabels": dict(self.pod_labels),
                "NamespaceLabels": dict(self.namespace_labels),
                "Namespace": self.namespace,
            }
        return peer


@dataclass(frozen=True)
class Flow:
    """Traffic from `source` to `destination` on one port (named as the destination pod names it)."""

    what: str
    source: Peer
    destination: Peer
    port: int
    port_name: str = ""
    protocol: str = "TCP"


def pod_peer(pod: Mapping[str, Any], namespaces: Mapping[str, Mapping[str, Any]]) -> Peer:
    """A pod as the API serves it, with the labels of its namespace (`namespaces`: name -> object)."""
    meta = pod["metadata"]
    namespace = str(meta["namespace"])
    namespace_labels = (namespaces[namespace].get("metadata") or {}).get("labels") or {}
    return Peer(
        ip=str((pod.get("status") or {}).get("podIP") or ""),
        namespace=namespace,
        pod_labels=dict(meta.get("labels") or {}),
        namespace_labels=dict(namespace_labels),
    )


def container_port(pod: Mapping[str, Any], name: str) -> int:
    """The number of a pod's container port named `name`."""
    for container in pod["spec"]["containers"]:
        for port in container.get("ports") or []:
            if port.get("name") == name:
                return int(port["containerPort"])
    raise NetpolError(f"pod {pod['metadata']['name']} has no container port named {name!r}")


def to_pod(
    what: str,
    source: Peer,
    pod: Mapping[str, Any],
    port_name: str,
    namespaces: Mapping[str, Mapping[str, Any]],
) -> Flow:
    """A flow to a named port of a pod."""
    return Flow(what, source, pod_peer(pod, namespaces), container_port(pod, port_name), port_name)


def traffic(flows: Sequence[Flow]) -> list[dict[str, Any]]:
    """cyclonus' traffic file: one object per flow, in order."""
    return [
        {
            "Source": f.source.to_traffic(),
            "Destination": f.destination.to_traffic(),
            "Protocol": f.protocol,
            "ResolvedPort": f.port,
            "ResolvedPortName": f.port_name,
        }
        for f in flows
    ]


def parse_verdicts(output: str) -> list[bool]:
    """cyclonus' answers ("IS ALLOWED? | TRUE"), one per traffic object, in order."""
    return [verdict == "TRUE" for verdict in _VERDICT.findall(output)]


def bare_policy(policy: Mapping[str, Any]) -> dict[str, Any]:
    """A NetworkPolicy as the API serves it, down to what decides traffic (cyclonus parses strictly)."""
    meta = policy.get("metadata") or {}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": meta["name"], "namespace": meta.get("namespace") or "default"},
        "spec": policy["spec"],
    }


def evaluate(binary: Path, policies: Sequence[Mapping[str, Any]], flows: Sequence[Flow]) -> list[bool]:
    """Whether `policies` allow each flow, as cyclonus decides it."""
    with tempfile.TemporaryDirectory(prefix="kiln-netpol-") as tmp:
        folder = Path(tmp)
        # cyclonus reads one policy per file (a second YAML document in a file is ignored), strictly.
        (folder / "policies").mkdir()
        for i, policy in enumerate(policies):
            (folder / "policies" / f"{i:03d}.yaml").write_text(yaml.safe_dump(bare_policy(policy)))
        (folder / "traffic.json").write_text(json.dumps(traffic(flows)))
        done = subprocess.run(
            [str(binary), "analyze", "--mode", "query-traffic", "--policy-path",
             str(folder / "policies"), "--traffic-path", str(folder / "traffic.json")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    verdicts = parse_verdicts(done.stdout)
    if done.returncode != 0 or len(verdicts) != len(flows):
        raise NetpolError(
            f"cyclonus answered {len(verdicts)} of {len(flows)} flows (exit {done.returncode}): "
            f"{(done.stdout + done.stderr)[-2000:]}"
        )
    return verdicts


def table(flows: Sequence[Flow], verdicts: Sequence[bool]) -> str:
    """The flows and their verdicts, one line each (what the test prints and the docs quote)."""
    width = max(len(f.what) for f in flows)
    return "\n".join(
        f"{f.what:<{width}}  {f.protocol}/{f.port:<5}  {'allowed' if ok else 'denied'}"
        for f, ok in zip(flows, verdicts, strict=True)
    )
