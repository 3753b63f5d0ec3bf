"""The process node's Node and Lease objects (pure: facts about the host in, manifests out)."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

from kiln import labels

LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40  # the kubelet's default; the node lifecycle controller reads it
HOST_IP = "127.0.0.1"
KUBELET_VERSION = "v1.36.0-kiln-process-node"


def go_arch(machine: str | None = None) -> str:
    """`kubernetes.io/arch` of this host (amd64, arm64, ...)."""
    machine = (machine or platform.machine()).lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


@dataclass(frozen=True)
class NodeFacts:
    """What the process node tells the cluster about itself."""

    name: str
    cpu: str
    memory: str
    pods: int
    ephemeral_storage: str | None = None
    kubelet_port: int = 0
    arch: str = "amd64"


def node_labels(facts: NodeFacts) -> dict[str, str]:
    return {
        labels.PROCESS_NODE_LABEL: "true",
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": facts.arch,
        "kubernetes.io/hostname": facts.name,
        "node.kubernetes.io/instance-type": "process-node",
    }


def ready_condition(ready: bool, now: str, since: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {
        "type": "Ready",
        "status": "True" if ready else "False",
        "reason": reason or ("KubeletReady" if ready else "KubeletNotReady"),
        "message": message or ("process node is posting ready status" if ready else "process node stopped"),
        "lastHeartbeatTime": now,
        "lastTransitionTime": since,
    }


def node_status(facts: NodeFacts, ready: bool, now: str, since: str, reason: str = "") -> dict[str, Any]:
    """The Node's status: capacity, addresses, conditions, kubelet endpoint, node info."""
    capacity = {"cpu": facts.cpu, "memory": facts.memory, "pods": str(facts.pods)}
    if facts.ephemeral_storage:
        capacity["ephemeral-storage"] = facts.ephemeral_storage
    pressure = [
        {
            "type": kind,
            "status": "False",
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now,
            "lastTransitionTime": since,
        }
        for kind, reason, message in (
            ("MemoryPressure", "KubeletHasSufficientMemory", "process node has sufficient memory available"),
            ("DiskPressure", "KubeletHasNoDiskPressure", "process node has no disk pressure"),
            ("PIDPressure", "KubeletHasSufficientPID", "process node has sufficient PID available"),
        )
    ]
    status: dict[str, Any] = {
        "capacity": capacity,
        "allocatable": dict(capacity),
        "conditions": [*pressure, ready_condition(ready, now, since, reason)],
        # No Hostname address: the API server dials the first of Hostname, InternalDNS, InternalIP
        # for logs, and the node's name resolves nowhere.
        "addresses": [{"type": "InternalIP", "address": HOST_IP}],
        "nodeInfo": {
            "architecture": facts.arch,
            "operatingSystem": "linux",
            "osImage": "Kiln process node (local processes)",
            "kernelVersion": platform.release(),
            "containerRuntimeVersion": "process://kiln",
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
        },
        "phase": "Running",
    }
    if facts.kubelet_port:
        status["daemonEndpoints"] = {"kubeletEndpoint": {"Port": facts.kubelet_port}}
    return status


def node_manifest(facts: NodeFacts, now: str) -> dict[str, Any]:
    """The Node to create: labelled as a process node, not tainted, Ready."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": facts.name,
            "labels": node_labels(facts),
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {},
        "status": node_status(facts, True, now, now),
    }


def lease_manifest(node_name: str, node_uid: str, now_micro: str) -> dict[str, Any]:
    """The node's heartbeat Lease in kube-node-lease, owned by the Node like the kubelet's."""
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": node_name,
            "namespace": LEASE_NAMESPACE,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node_name, "uid": node_uid}],
        },
        "spec": {"holderIdentity": node_name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now_micro},
    }
