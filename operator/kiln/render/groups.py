"""Multi-node replicas from core objects, where LeaderWorkerSet is not installed: per replica a leader
StatefulSet (one pod, index 0) and a worker StatefulSet (pods 1..N-1), one headless Service that
gives pod 0 a DNS name before it is Ready, and the pure decisions on them (group status, which group
to recreate).

This is LeaderWorkerSet's own shape (a leader StatefulSet plus a worker StatefulSet per group), one
replica per pair so that each group's pods carry a label of their own (`GROUP_LABEL`, the key of
the planner's pod affinity). Pod indices come from the `apps.kubernetes.io/pod-index` label (the
worker StatefulSet's ordinals start at 1). Updates are `OnDelete`: a group only works when all its
ranks run the same engine, so the operator recreates whole groups, one at a time
(`groups_to_recreate`). When one pod dies, its peers' engine ranks exit and their containers
restart, and the StatefulSet recreates the dead pod under the same name, so the group rejoins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kiln.render.common import Manifest, owner_reference
from kiln.render.serving import (
    LEADER,
    RENDEZVOUS_PORT,
    RENDEZVOUS_PORT_NAME,
    ROLE_LABEL,
    WORKER,
    GroupMember,
    ServingInputs,
    deployment_owner,
    group_env,
    pod_template,
    selector_labels,
)

GROUP_LABEL = "kiln.dev/group"  # the replica's group name, on its StatefulSets and every pod
REPLICA_LABEL = "kiln.dev/replica"  # the replica's index, on its StatefulSets
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"  # set on StatefulSet pods by the controller-manager
REVISION_LABEL = "controller-revision-hash"  # the StatefulSet revision a pod was made from (same)
GROUPS_KIND = "StatefulSetGroups"  # the kind of the summary `group_workload` returns (not an API kind)


def group_name(name: str, replica: int) -> str:
    """The leader StatefulSet of replica `replica` (its pod 0 is `<group>-0`)."""
    return f"{name}-{replica}"


def workers_name(name: str, replica: int) -> str:
    return f"{group_name(name, replica)}-workers"


def ranks_service_name(name: str) -> str:
    return f"{name}-ranks"


def leader_address(name: str, namespace: str, replica: int) -> str:
    """pod 0's DNS name: `<pod>.<headless service>.<namespace>.svc` (StatefulSet pods get hostname and
    subdomain, and the Service publishes them before they are Ready)."""
    return f"{group_name(name, replica)}-0.{ranks_service_name(name)}.{namespace}.svc"


def _owned(inputs: ServingInputs, name: str, extra: dict[str, str]) -> dict[str, Any]:
    llmd = inputs.deployment
    return {
        "name": name,
        "namespace": llmd.metadata.namespace,
        "labels": {**selector_labels(str(llmd.metadata.name)), **extra},
        "ownerReferences": [owner_reference(deployment_owner(llmd))],
    }


def ranks_service(inputs: ServingInputs) -> Manifest:
    """The headless Service of every group pod: DNS names for pods, published before they are Ready
    (a leader is Ready only after its workers joined it)."""
    name = str(inputs.deployment.metadata.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _owned(inputs, ranks_service_name(name), {}),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(name),
            "ports": [
                {
                    "name": RENDEZVOUS_PORT_NAME,
                    "port": RENDEZVOUS_PORT,
                    "targetPort": RENDEZVOUS_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def group_statefulsets(inputs: ServingInputs, replica: int) -> list[Manifest]:
    """Replica `replica`'s leader and worker StatefulSets."""
    placement = inputs.placement
    assert placement is not None and placement.multi_node
    llmd = inputs.deployment
    name, namespace = str(llmd.metadata.name), str(llmd.metadata.namespace)
    group = group_name(name, replica)
    size = placement.nodes_per_replica
    index = {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}}
    env = group_env(size, index, leader_address(name, namespace, replica))
    sets = []
    for role, set_name, pods, start in (
        (LEADER, group, 1, 0),
        (WORKER, workers_name(name, replica), size - 1, 1),
    ):
        own = {GROUP_LABEL: group, ROLE_LABEL: role}
        metadata = _owned(inputs, set_name, {**own, REPLICA_LABEL: str(replica)})
        sets.append(
            {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": metadata,
                "spec": {
                    "replicas": pods,
                    "ordinals": {"start": start},
                    "serviceName": ranks_service_name(name),
                    "podManagementPolicy": "Parallel",
                    "updateStrategy": {"type": "OnDelete"},
                    "revisionHistoryLimit": 3,
                    "selector": {"matchLabels": {**selector_labels(name), **own}},
                    "template": pod_template(inputs, own, GroupMember(env=env, leader=role == LEADER)),
                },
            }
        )
    return sets


def _by_replica(statefulsets: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, Mapping[str, Any]]]:
    groups: dict[int, dict[str, Mapping[str, Any]]] = {}
    for item in statefulsets:
        item_labels = (item.get("metadata") or {}).get("labels") or {}
        try:
            replica = int(item_labels.get(REPLICA_LABEL, ""))
        except ValueError:
            continue
        groups.setdefault(replica, {})[str(item_labels.get(ROLE_LABEL))] = item
    return groups


def _observed(item: Mapping[str, Any]) -> bool:
    generation = int((item.get("metadata") or {}).get("generation") or 0)
    return int((item.get("status") or {}).get("observedGeneration") or 0) >= generation


def _count(item: Mapping[str, Any] | None, field: str) -> int:
    return int(((item or {}).get("status") or {}).get(field) or 0)


def _wanted(item: Mapping[str, Any] | None) -> int:
    return int(((item or {}).get("spec") or {}).get("replicas") or 0)


def group_ready(group: Mapping[str, Mapping[str, Any]]) -> bool:
    """Every pod of the group is Ready (a worker is Ready once it joined the leader)."""
    return all(
        role in group and _count(group[role], "readyReplicas") >= _wanted(group[role])
        for role in (LEADER, WORKER)
    )


def group_updated(group: Mapping[str, Mapping[str, Any]]) -> bool:
    """Every pod of the group runs its StatefulSet's latest template (as its controller saw it)."""
    return all(
        role in group
        and _observed(group[role])
        and _count(group[role], "updatedReplicas") >= _wanted(group[role])
        for role in (LEADER, WORKER)
    )


def group_workload(statefulsets: Sequence[Mapping[str, Any]], replicas: int) -> dict[str, Any]:
    """The groups summed up in a Deployment's shape (what `kiln.render.status` reads): a replica is a
    group, ready when every pod is, updated when every pod runs the latest template."""
    groups = _by_replica(statefulsets)
    wanted = [group for replica, group in groups.items() if replica < replicas]
    first = groups[min(groups)].get(LEADER) if groups else None
    template = ((first or {}).get("spec") or {}).get("template") or {}
    observed = all(_observed(item) for item in statefulsets)
    return {
        "apiVersion": "apps/v1",
        "kind": GROUPS_KIND,
        "metadata": {"generation": 1},
        "spec": {"replicas": replicas, "template": template},
        "status": {
            "observedGeneration": 1 if observed else 0,
            "replicas": len(groups),
            "readyReplicas": sum(group_ready(group) for group in groups.values()),
            "updatedReplicas": sum(group_updated(group) for group in wanted),
        },
    }


def stale_statefulsets(statefulsets: Sequence[Mapping[str, Any]], replicas: int) -> list[str]:
    """StatefulSets of replicas beyond `replicas` (scaled down): to delete."""
    return sorted(
        str(item["metadata"]["name"])
        for replica, group in _by_replica(statefulsets).items()
        if replica >= replicas
        for item in group.values()
    )


def pods_to_recreate(
    statefulsets: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]], replicas: int
) -> list[str]:
    """Pods to delete now so that a group left on an old template comes back whole on the new one.

    One group at a time (the lowest), and only while every other group is Ready, so at most one
    replica is down for an update. Only its pods still on an old revision go; those the StatefulSets
    already recreated stay.
    """
    groups = _by_replica(statefulsets)
    outdated = [
        replica for replica in sorted(groups) if replica < replicas and not group_updated(groups[replica])
    ]
    if not outdated:
        return []
    target = outdated[0]
    if not all(
        group_ready(group) for replica, group in groups.items() if replica < replicas and replica != target
    ):
        return []
    revisions = {
        role: str((item.get("status") or {}).get("updateRevision") or "")
        for role, item in groups[target].items()
    }
    name = str((next(iter(groups[target].values())).get("metadata") or {}).get("labels", {}).get(GROUP_LABEL))
    stale = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        pod_labels = meta.get("labels") or {}
        if pod_labels.get(GROUP_LABEL) != name or meta.get("deletionTimestamp"):
            continue
        revision = revisions.get(str(pod_labels.get(ROLE_LABEL)))
        if revision and pod_labels.get(REVISION_LABEL) != revision:
            stale.append(str(meta.get("name")))
    return sorted(stale)
