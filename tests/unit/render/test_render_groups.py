"""Multi-node replicas from core objects: the StatefulSet pairs, their headless Service, group status
and which group to recreate."""

from __future__ import annotations

import copy
from typing import Any

from render_helpers import example, nodes, ready

from kiln.placement import PlacementPolicy, ReplicaShape, plan
from kiln.render import groups
from kiln.render import service as render_service
from kiln.render import serving as render_serving
from kiln.render.common import Settings

EXAMPLE = "llama-3.1-405b-fp8-tp8-pp2.yaml"


def inputs(replicas: int = 1) -> render_serving.ServingInputs:
    deployment = example(EXAMPLE, replicas=replicas)
    policy = PlacementPolicy.from_spec(deployment.spec, group_label_key=groups.GROUP_LABEL)
    placement = plan(ReplicaShape.from_spec(deployment.spec), nodes(), policy)
    return render_serving.ServingInputs(deployment, ready(deployment), placement, Settings())


def matches(selector: dict[str, str], pod_labels: dict[str, str]) -> bool:
    return selector.items() <= pod_labels.items()


def env_of(template: dict[str, Any]) -> dict[str, Any]:
    [container] = template["spec"]["containers"]
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def pods_of(statefulset: dict[str, Any]) -> list[tuple[str, int]]:
    """(name, index) of the pods the StatefulSet controller makes (ordinals.start .. + replicas)."""
    spec = statefulset["spec"]
    start = spec["ordinals"]["start"]
    return [(f"{statefulset['metadata']['name']}-{i}", i) for i in range(start, start + spec["replicas"])]


def test_a_replica_is_a_leader_and_a_worker_statefulset_whose_pods_know_their_group() -> None:
    rendered = inputs()
    assert rendered.placement is not None and rendered.placement.nodes_per_replica == 4
    leader, workers = groups.group_statefulsets(rendered, 0)
    service = groups.ranks_service(rendered)
    pods = pods_of(leader) + pods_of(workers)
    assert [index for _, index in pods] == [0, 1, 2, 3]  # one index per pod, 0 leads
    for statefulset in (leader, workers):
        spec = statefulset["spec"]
        assert spec["serviceName"] == service["metadata"]["name"]
        assert spec["podManagementPolicy"] == "Parallel" and spec["updateStrategy"] == {"type": "OnDelete"}
        template = spec["template"]
        assert matches(spec["selector"]["matchLabels"], template["metadata"]["labels"])
        env = env_of(template)
        assert env["KILN_GROUP_SIZE"] == "4" and env["KILN_RENDEZVOUS_PORT"] == "29500"
        # the index is the pod-index label the StatefulSet controller puts on each pod
        assert env["KILN_GROUP_INDEX"] == {
            "fieldRef": {"fieldPath": f"metadata.labels['{groups.POD_INDEX_LABEL}']"}
        }
        # pod 0's DNS name: <pod>.<headless service>.<namespace>.svc
        leader_pod = pods[0][0]
        assert env["KILN_LEADER_ADDRESS"] == f"{leader_pod}.{service['metadata']['name']}.serving.svc"
        [container] = template["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
        assert {"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"} in container["ports"]
        assert template["spec"]["affinity"] == rendered.placement.affinity
    paths = [
        s["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"]
        for s in (leader, workers)
    ]
    assert paths == ["/ready", "/health"]  # workers serve only /health, 200 once joined


def test_the_headless_service_names_every_rank_and_the_api_only_leaders() -> None:
    rendered = inputs()
    leader, workers = groups.group_statefulsets(rendered, 0)
    ranks = groups.ranks_service(rendered)
    assert ranks["spec"]["clusterIP"] == "None" and ranks["spec"]["publishNotReadyAddresses"] is True
    api = render_service.service(rendered.deployment, multi_node=True)
    leader_labels = leader["spec"]["template"]["metadata"]["labels"]
    worker_labels = workers["spec"]["template"]["metadata"]["labels"]
    assert matches(ranks["spec"]["selector"], leader_labels) and matches(
        ranks["spec"]["selector"], worker_labels
    )
    assert matches(api["spec"]["selector"], leader_labels) and not matches(
        api["spec"]["selector"], worker_labels
    )
    status_selector = dict(
        part.split("=") for part in render_serving.selector_string("llama-405b", leaders_only=True).split(",")
    )
    assert matches(status_selector, leader_labels) and not matches(status_selector, worker_labels)


def test_each_replica_has_its_own_group_label_that_the_pod_affinity_keys_on() -> None:
    rendered = inputs(replicas=2)
    assert rendered.placement is not None
    [term] = rendered.placement.affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["matchLabelKeys"] == [groups.GROUP_LABEL]
    values = []
    for replica in range(2):
        sets = groups.group_statefulsets(rendered, replica)
        values.append({s["spec"]["template"]["metadata"]["labels"][groups.GROUP_LABEL] for s in sets})
    assert all(len(v) == 1 for v in values) and values[0] != values[1]  # one value per group


def observed(
    statefulset: dict[str, Any], ready_pods: int, updated: int, revision: str = "rev-2"
) -> dict[str, Any]:
    """A StatefulSet as the API returns it once its controller has seen it."""
    item = copy.deepcopy(statefulset)
    item["metadata"]["generation"] = 2
    item["status"] = {
        "observedGeneration": 2,
        "replicas": item["spec"]["replicas"],
        "readyReplicas": ready_pods,
        "updatedReplicas": updated,
        "updateRevision": f"{item['metadata']['name']}-{revision}",
    }
    return item


def group(
    rendered: render_serving.ServingInputs, replica: int, ready_pods: bool, updated: bool
) -> list[dict[str, Any]]:
    leader, workers = groups.group_statefulsets(rendered, replica)
    return [
        observed(leader, int(ready_pods), int(updated)),
        observed(workers, 3 if ready_pods else 2, 3 if updated else 0),
    ]


def test_a_replica_is_ready_only_when_every_pod_of_its_group_is() -> None:
    rendered = inputs(replicas=2)
    sets = group(rendered, 0, ready_pods=True, updated=True) + group(
        rendered, 1, ready_pods=False, updated=True
    )
    summary = groups.group_workload(sets, 2)
    assert summary["status"]["replicas"] == 2 and summary["status"]["readyReplicas"] == 1
    assert summary["status"]["updatedReplicas"] == 2
    assert (
        summary["spec"]["template"]["metadata"]["labels"]["kiln.dev/engine"] == rendered.engine.metadata.name
    )
    unobserved = copy.deepcopy(sets)
    unobserved[0]["metadata"]["generation"] = 3
    assert groups.group_workload(unobserved, 2)["status"]["observedGeneration"] == 0


def test_scaling_down_removes_the_highest_groups() -> None:
    rendered = inputs(replicas=3)
    sets = [s for replica in range(3) for s in group(rendered, replica, True, True)]
    assert groups.stale_statefulsets(sets, 3) == []
    assert groups.stale_statefulsets(sets, 1) == [
        "llama-405b-1",
        "llama-405b-1-workers",
        "llama-405b-2",
        "llama-405b-2-workers",
    ]


def pod(name: str, group_name: str, role: str, revision: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {
                groups.GROUP_LABEL: group_name,
                render_serving.ROLE_LABEL: role,
                groups.REVISION_LABEL: revision,
            },
        }
    }


def test_an_outdated_group_is_recreated_whole_one_at_a_time() -> None:
    rendered = inputs(replicas=2)
    sets = group(rendered, 0, ready_pods=True, updated=False) + group(
        rendered, 1, ready_pods=True, updated=False
    )
    old = [pod(f"llama-405b-{g}-0", f"llama-405b-{g}", "leader", "old") for g in range(2)] + [
        pod(f"llama-405b-{g}-workers-{i}", f"llama-405b-{g}", "worker", "old")
        for g in range(2)
        for i in (1, 2, 3)
    ]
    first = groups.pods_to_recreate(sets, old, 2)
    assert first == [
        "llama-405b-0-0",
        "llama-405b-0-workers-1",
        "llama-405b-0-workers-2",
        "llama-405b-0-workers-3",
    ]
    # Group 0 is coming back (not Ready yet): group 1 keeps serving, and group 0's new pods stay.
    sets = group(rendered, 0, ready_pods=False, updated=True) + group(
        rendered, 1, ready_pods=True, updated=False
    )
    renewed = [pod("llama-405b-0-0", "llama-405b-0", "leader", "llama-405b-0-rev-2"), *old[1:]]
    assert groups.pods_to_recreate(sets, renewed, 2) == []
    # Group 0 half recreated (its leader already new): only the old workers go.
    sets = group(rendered, 0, ready_pods=False, updated=False) + group(
        rendered, 1, ready_pods=True, updated=False
    )
    assert groups.pods_to_recreate(sets, renewed, 2) == [
        "llama-405b-0-workers-1",
        "llama-405b-0-workers-2",
        "llama-405b-0-workers-3",
    ]
    # Group 0 back and Ready: now group 1.
    sets = group(rendered, 0, ready_pods=True, updated=True) + group(
        rendered, 1, ready_pods=True, updated=False
    )
    assert groups.pods_to_recreate(sets, old, 2)[0] == "llama-405b-1-0"
    # Nothing outdated, nothing deleted.
    sets = group(rendered, 0, True, True) + group(rendered, 1, True, True)
    assert groups.pods_to_recreate(sets, old, 2) == []
