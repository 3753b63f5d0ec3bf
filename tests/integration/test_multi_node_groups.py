"""Multi-node replicas on the local control plane without LeaderWorkerSet: the operator's StatefulSet
groups, run by the real controller-manager and placed by the real scheduler on KWOK GB200 trays.

The example llama-3.1-405b-fp8-tp8-pp2.yaml (TP8 x PP2, four pods of four GPUs per replica) runs on a
lab of two NVLink cliques of four trays each, so a replica fits either clique but only by taking all
of it: its pods must land in one clique (spread over both by chance: about 3% of placements), the
second replica in the other. KWOK runs no containers (pods turn Ready once bound), so this proves
the objects, the group env, placement, status and the Service's endpoints, not the engine.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kiln import labels
from kiln.local.testing import LocalCluster, wait_for
from kiln.local.topology import node_manifests, parse_topology
from kiln.render import groups
from tests.integration.test_operator import GROUP, VERSION, Operator, create, example, get, with_secret
from tests.integration.test_placement import Kube

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LAB_LABEL = "kiln.dev/test-multi-node-lab"
EXAMPLE = "llama-3.1-405b-fp8-tp8-pp2.yaml"


@pytest.fixture
def operator(local_cluster: LocalCluster, tmp_path: Path) -> Iterator[Operator]:
    running = Operator(local_cluster.kubeconfig, tmp_path / "operator.log")
    running.start()
    try:
        yield running
    finally:
        running.stop()
        print(f"--- operator log (tail) ---\n{running.log()}")


@pytest.fixture
def custom(local_cluster: LocalCluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(local_cluster.api_client)


@pytest.fixture
def lab(local_cluster: LocalCluster, core_v1: client.CoreV1Api) -> Iterator[str]:
    """Two cliques of four KWOK GB200 trays (4 GPUs, one island each), labelled LAB_LABEL=<lab>.

    In each clique one tray has far more CPU and memory than the other three, so the scheduler's
    least-allocated scoring ranks the two big trays first: without the group's pod affinity, its
    first two pods would take both, one per clique.
    """
    name = f"mn{uuid.uuid4().hex[:6]}"
    gpu = "{{model: GB200, count: 4, islands: [[0, 1, 2, 3]], clique: {lab}.{clique}}}"
    taint = "{key: nvidia.com/gpu, value: present, effect: NoSchedule}"
    text = f"name: {name}\npools:\n" + "".join(
        f"  - {{name: {name}-{c}-{size}, count: {count}, cpu: '{cpu}', memory: {memory}, "
        f"gpu: {gpu.format(lab=name, clique=c)}, taints: [{taint}]}}\n"
        for c in ("a", "b")
        for size, count, cpu, memory in (("big", 1, 512, "4Ti"), ("small", 3, 1, "2Gi"))
    )
    manifests = node_manifests(parse_topology(text))
    for node in manifests:
        node["metadata"]["labels"][LAB_LABEL] = name
        Kube(local_cluster).request("POST", "/api/v1/nodes", node)  # raw: the typed client wants a kubelet
    selector = f"{LAB_LABEL}={name}"
    try:

        def all_ready() -> bool:
            nodes = core_v1.list_node(label_selector=selector).items
            return len(nodes) == len(manifests) and all(
                any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
                and not any(t.key.startswith("node.kubernetes.io/") for t in node.spec.taints or [])
                for node in nodes
            )

        wait_for(all_ready, timeout=60, what=f"lab nodes {name} to be Ready")
        yield name
    finally:
        for node in core_v1.list_node(label_selector=selector).items:
            core_v1.delete_node(node.metadata.name)


def group_pods(core_v1: client.CoreV1Api, namespace: str, name: str) -> list[Any]:
    selector = f"{labels.DEPLOYMENT_LABEL}={name}"
    return [
        pod
        for pod in core_v1.list_namespaced_pod(namespace, label_selector=selector).items
        if pod.metadata.deletion_timestamp is None
    ]


def ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def env(pod: Any) -> dict[str, Any]:
    [container] = pod.spec.containers
    return {
        item.name: item.value if item.value is not None else item.value_from.field_ref.field_path
        for item in container.env
    }


def ready_replicas(custom: client.CustomObjectsApi, namespace: str, name: str, count: int) -> Any:
    def check() -> Any:
        obj = get(custom, namespace, "llmdeployments", name)
        status = obj.get("status") or {}
        return obj if status.get("readyReplicas") == count and status.get("phase") == "Ready" else None

    return wait_for(check, timeout=90, what=f"{count} ready replica(s)")


def test_example_replicas_are_statefulset_groups_each_inside_one_clique(
    operator: Operator,
    custom: client.CustomObjectsApi,
    core_v1: client.CoreV1Api,
    apps_v1: client.AppsV1Api,
    namespace: str,
    lab: str,
) -> None:
    with_secret(core_v1, namespace)
    body = example(
        EXAMPLE,
        serving={"nodeSelector": {LAB_LABEL: lab}},
        placement={"exclusive": True},  # a clique per replica (the API server takes mismatchLabelKeys)
        build={"nodeSelector": {LAB_LABEL: lab}, "podAnnotations": {"kiln.dev/simulate-duration": "1s"}},
    )
    name = body["metadata"]["name"]
    create(custom, namespace, body)
    obj = ready_replicas(custom, namespace, name, 1)
    assert obj["status"]["layout"] == "8x2"

    # One replica: a leader and a worker StatefulSet, four pods, indices 0..3, one clique.
    sets = apps_v1.list_namespaced_stateful_set(namespace).items
    assert sorted(s.metadata.name for s in sets) == [f"{name}-0", f"{name}-0-workers"]
    pods = group_pods(core_v1, namespace, name)
    assert len(pods) == 4 and all(ready(pod) for pod in pods)
    indices = sorted(int(pod.metadata.labels[groups.POD_INDEX_LABEL]) for pod in pods)
    assert indices == [0, 1, 2, 3]
    nodes = {
        node.metadata.name: node for node in core_v1.list_node(label_selector=f"{LAB_LABEL}={lab}").items
    }
    cliques = {nodes[pod.spec.node_name].metadata.labels[labels.GPU_CLIQUE] for pod in pods}
    assert len(cliques) == 1, f"one replica spread over cliques {cliques}"
    assert len({pod.spec.node_name for pod in pods}) == 4  # a tray each: 4 GPUs per pod
    [leader] = [pod for pod in pods if pod.metadata.labels[groups.POD_INDEX_LABEL] == "0"]
    for pod in pods:
        variables = env(pod)
        assert variables["KILN_GROUP_SIZE"] == "4" and variables["KILN_RENDEZVOUS_PORT"] == "29500"
        assert variables["KILN_GROUP_INDEX"] == f"metadata.labels['{groups.POD_INDEX_LABEL}']"
        # pod 0's DNS name, as the StatefulSet controller named it: <hostname>.<subdomain>.<ns>.svc
        assert (
            variables["KILN_LEADER_ADDRESS"]
            == f"{leader.spec.hostname}.{leader.spec.subdomain}.{namespace}.svc"
        )
        assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "4"
    ranks = core_v1.read_namespaced_service(leader.spec.subdomain, namespace)
    assert ranks.spec.cluster_ip == "None" and ranks.spec.publish_not_ready_addresses

    # The API Service's endpoints: the leader only. The headless Service's: every rank.
    def endpoint_ips(service: str) -> set[str]:
        slices = client.DiscoveryV1Api(core_v1.api_client).list_namespaced_endpoint_slice(
            namespace, label_selector=f"kubernetes.io/service-name={service}"
        )
        return {address for item in slices.items for e in item.endpoints or [] for address in e.addresses}

    wait_for(lambda: endpoint_ips(name) == {leader.status.pod_ip}, 30, "the API Service to select the leader")
    wait_for(lambda: len(endpoint_ips(ranks.metadata.name)) == 4, 30, "the headless Service to list 4 ranks")
    scale = custom.get_namespaced_custom_object_scale(GROUP, VERSION, namespace, "llmdeployments", name)
    assert scale["status"]["replicas"] == 1
    assert (
        f"{groups.GROUP_LABEL}" not in scale["status"]["selector"]
        and "kiln.dev/role=leader" in scale["status"]["selector"]
    )

    # Two replicas: a second group, all of it in the other clique (the first one is full).
    custom.patch_namespaced_custom_object_scale(
        GROUP, VERSION, namespace, "llmdeployments", name, {"spec": {"replicas": 2}}
    )
    ready_replicas(custom, namespace, name, 2)
    by_group: dict[str, set[str]] = {}
    for pod in group_pods(core_v1, namespace, name):
        clique = nodes[pod.spec.node_name].metadata.labels[labels.GPU_CLIQUE]
        by_group.setdefault(pod.metadata.labels[groups.GROUP_LABEL], set()).add(clique)
    assert sorted(by_group) == [f"{name}-0", f"{name}-1"]
    assert all(len(found) == 1 for found in by_group.values()), by_group
    assert by_group[f"{name}-0"] != by_group[f"{name}-1"]

    # A worker pod dies: its StatefulSet brings it back under the same name and the replica is whole.
    worker = f"{name}-1-workers-2"
    uid = core_v1.read_namespaced_pod(worker, namespace).metadata.uid
    core_v1.delete_namespaced_pod(worker, namespace, grace_period_seconds=0)

    def replaced() -> bool:
        try:
            pod = core_v1.read_namespaced_pod(worker, namespace)
        except client.ApiException as error:
            if error.status == 404:
                return False  # deleted, not recreated yet
            raise
        return bool(pod.metadata.uid != uid and ready(pod))

    wait_for(replaced, 60, "the worker to come back")
    ready_replicas(custom, namespace, name, 2)

    # Back to one replica: the second group's StatefulSets go.
    custom.patch_namespaced_custom_object_scale(
        GROUP, VERSION, namespace, "llmdeployments", name, {"spec": {"replicas": 1}}
    )
    wait_for(
        lambda: (
            sorted(s.metadata.name for s in apps_v1.list_namespaced_stateful_set(namespace).items)
            == [f"{name}-0", f"{name}-0-workers"]
        ),
        60,
        "the second group to be deleted",
    )
