"""Routers wired by the operator against a real control plane (KWOK nodes run no containers, so
this proves the objects, selectors, status and RBAC; the router's own routing is tested with real
HTTP in its own tests).

A deployment that turns spec.router on gets its routers (ServiceAccount, RoleBinding, headless
engines Service, Deployment, PodDisruptionBudget); its Service then selects the routers and
status.routerReadyReplicas counts them; turning it off removes them and the Service selects the
replicas again. RBAC is checked on the API server itself with the chart's rendered roles: the
operator's ServiceAccount may bind the router role and no other, and a router's ServiceAccount
may follow EndpointSlices in its own namespace only.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client

from kiln.local.testing import LocalCluster, wait_for
from tests.integration.test_operator import (  # noqa: F401  (fixtures)
    Operator,
    create,
    custom,
    example,
    get,
    kubectl,
    operator,
    ready_serving_pods,
    with_secret,
)
from tests.unit.chart.kiln_chart import Helm, find_helm

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROUTER = "app.kubernetes.io/managed-by=kiln,app.kubernetes.io/component=router"
RELEASE, RELEASE_NAMESPACE = "kiln", "kiln-system"
# KWOK's nodes carry GPU and kwok taints; the routers are told to tolerate them, as a user would
# point them at their CPU pool.
TOLERATE_ALL = [{"operator": "Exists"}]


def routed(replicas: int = 2) -> dict[str, Any]:
    body = example("llama-3-70b-fp8-tp4.yaml")  # an s3:// cache: no PVC to provide
    body["spec"]["router"] = {"enabled": True, "replicas": replicas, "tolerations": TOLERATE_ALL}
    return body


def endpoint_pods(core_v1: client.CoreV1Api, namespace: str, service: str) -> set[str]:
    """Names of the ready pods behind a Service, from its EndpointSlices (what routers read)."""
    discovery = client.DiscoveryV1Api(core_v1.api_client)
    slices = discovery.list_namespaced_endpoint_slice(
        namespace, label_selector=f"kubernetes.io/service-name={service}"
    ).items
    return {
        endpoint.target_ref.name
        for piece in slices
        for endpoint in piece.endpoints or []
        if endpoint.target_ref is not None and (endpoint.conditions is None or endpoint.conditions.ready)
    }


def router_pods(core_v1: client.CoreV1Api, namespace: str, name: str) -> set[str]:
    pods = core_v1.list_namespaced_pod(namespace, label_selector=f"{ROUTER},kiln.dev/deployment={name}")
    return {
        pod.metadata.name
        for pod in pods.items
        if any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
    }


def test_router_on_puts_routers_in_front_and_off_takes_them_away(
    operator: Operator,  # noqa: F811
    custom: client.CustomObjectsApi,  # noqa: F811
    core_v1: client.CoreV1Api,
    apps_v1: client.AppsV1Api,
    namespace: str,
    kubectl: Callable[..., str],  # noqa: F811
) -> None:
    with_secret(core_v1, namespace)
    body = routed()
    name = body["metadata"]["name"]
    create(custom, namespace, body)

    def routed_and_ready() -> bool:
        status = get(custom, namespace, "llmdeployments", name).get("status") or {}
        return status.get("phase") == "Ready" and status.get("routerReadyReplicas") == 2

    wait_for(routed_and_ready, 120, "Ready with both routers")
    routers = router_pods(core_v1, namespace, name)
    serving = {pod.metadata.name for pod in ready_serving_pods(core_v1, namespace, name)}
    assert len(routers) == 2 and serving
    wait_for(lambda: endpoint_pods(core_v1, namespace, name) == routers, 30, "the Service on the routers")
    wait_for(
        lambda: endpoint_pods(core_v1, namespace, f"{name}-engines") == serving, 30, "engines behind routers"
    )
    budget = client.PolicyV1Api(core_v1.api_client).read_namespaced_pod_disruption_budget(
        f"{name}-router", namespace
    )
    assert budget.spec.max_unavailable == 1
    header, row = kubectl("get", "-n", namespace, "llmdeployments", "-o", "wide").splitlines()[:2]
    column = header.index("ROUTERS")  # columns are aligned; empty cells (no TTFT yet) are blank
    assert row[column:].split()[0] == "2"

    # Routers deleted by hand come back.
    apps_v1.delete_namespaced_deployment(f"{name}-router", namespace)
    wait_for(lambda: len(router_pods(core_v1, namespace, name)) == 2, 60, "the routers to be recreated")

    custom.patch_namespaced_custom_object(
        "kiln.dev", "v1alpha1", namespace, "llmdeployments", name, {"spec": {"router": {"enabled": False}}}
    )
    wait_for(
        lambda: endpoint_pods(core_v1, namespace, name) == serving, 60, "the Service back on the replicas"
    )

    def leftovers() -> list[str]:
        found = [f"Deployment/{d.metadata.name}" for d in apps_v1.list_namespaced_deployment(namespace).items]
        found += [f"Service/{s.metadata.name}" for s in core_v1.list_namespaced_service(namespace).items]
        found += [
            f"ServiceAccount/{a.metadata.name}"
            for a in core_v1.list_namespaced_service_account(namespace).items
        ]
        rbac = client.RbacAuthorizationV1Api(core_v1.api_client)
        found += [
            f"RoleBinding/{b.metadata.name}" for b in rbac.list_namespaced_role_binding(namespace).items
        ]
        return sorted(item for item in found if "router" in item or "engines" in item)

    wait_for(lambda: leftovers() == [], 60, "the routers and their objects removed")
    wait_for(
        lambda: "routerReadyReplicas" not in get(custom, namespace, "llmdeployments", name)["status"],
        30,
        "status without routers",
    )
    assert get(custom, namespace, "llmdeployments", name)["status"]["phase"] == "Ready"


@pytest.fixture
def chart_rbac(local_cluster: LocalCluster) -> Iterator[None]:
    """The chart's roles, bindings and ServiceAccounts, applied to the cluster (nothing else)."""
    path, reason = find_helm()
    if path is None:
        pytest.skip(reason)
    rendered = Helm(path).render(namespace=RELEASE_NAMESPACE, release=RELEASE)
    kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    objects = [obj for obj in rendered if obj["kind"] in kinds]
    run = kubectl_runner(local_cluster)
    run("create", "namespace", RELEASE_NAMESPACE, check=False)
    run("apply", "-f", "-", stdin=yaml.safe_dump_all(objects))
    try:
        yield
    finally:
        run("delete", "-f", "-", "--ignore-not-found", stdin=yaml.safe_dump_all(objects), check=False)


def kubectl_runner(local_cluster: LocalCluster) -> Callable[..., subprocess.CompletedProcess[str]]:
    from kiln.local import build

    built = build.bin_dir() / "kubectl"
    binary = str(built) if built.is_file() else "kubectl"

    def run(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [binary, f"--kubeconfig={local_cluster.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert not check or done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
        return done

    return run


def binding_to(role: str, namespace: str, account: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": f"try-{role}", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
    }


def test_operator_binds_the_router_role_only_and_routers_read_their_own_namespace(
    local_cluster: LocalCluster, chart_rbac: None, core_v1: client.CoreV1Api, namespace: str
) -> None:
    run = kubectl_runner(local_cluster)
    as_operator = f"--as=system:serviceaccount:{RELEASE_NAMESPACE}:{RELEASE}-operator"

    def create_binding(role: str) -> subprocess.CompletedProcess[str]:
        manifest = json.dumps(binding_to(role, namespace, "some-router"))
        return run("create", "--dry-run=server", as_operator, "-f", "-", stdin=manifest, check=False)

    allowed = create_binding(f"{RELEASE}-router")
    assert allowed.returncode == 0, allowed.stderr
    # (Binding a role whose rules it holds itself is no escalation; these hold more than it does.)
    for role in ("cluster-admin", "edit", "admin"):
        refused = create_binding(role)
        assert refused.returncode != 0 and "forbidden" in refused.stderr.lower(), (role, refused.stdout)

    # A router's ServiceAccount, bound as the operator binds it, reads EndpointSlices here only.
    core_v1.create_namespaced_service_account(namespace, client.V1ServiceAccount(metadata={"name": "r"}))
    binding = binding_to(f"{RELEASE}-router", namespace, "r")
    run("create", "-f", "-", stdin=json.dumps(binding))
    as_router = f"--as=system:serviceaccount:{namespace}:r"
    for verb in ("list", "watch"):
        here = run(
            "auth", "can-i", verb, "endpointslices.discovery.k8s.io", "-n", namespace, as_router, check=False
        )
        assert here.stdout.strip() == "yes", here.stdout
    elsewhere = run(
        "auth", "can-i", "list", "endpointslices.discovery.k8s.io", "-n", "default", as_router, check=False
    )
    assert elsewhere.stdout.strip() == "no"
    writes = run(
        "auth", "can-i", "create", "endpointslices.discovery.k8s.io", "-n", namespace, as_router, check=False
    )
    assert writes.stdout.strip() == "no"
