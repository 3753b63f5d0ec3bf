"""The contract between the chart and the operator for Kiln routers (spec.router): the operator's
RBAC covers every object it applies for routers, it may bind exactly the role its flag names and
the chart installs, that role lets routers follow EndpointSlices, the routers run the image the
chart says, and the engine PodMonitor scrapes them. Both sides are rendered by their own code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from kiln_chart import Helm, by_kind

from kiln.controller.reconcile import ROUTER_KINDS
from kiln.render import router as render_router
from kiln.render.common import Settings
from tests.unit.render.render_helpers import example, matches

MONITORING_API = "monitoring.coreos.com/v1"
# What the reconciler does to each router object: reads it, applies it (server-side apply creates
# or patches), and deletes it when the deployment turns routing off.
VERBS = {"get", "create", "patch", "delete"}


def routed() -> Any:
    return example("tiny-cpu.yaml", namespace="llm-serving", router={"enabled": True, "replicas": 2})


def operator_args(objects: list[dict[str, Any]]) -> dict[str, str]:
    [deployment] = [d for d in by_kind(objects, "Deployment") if d["metadata"]["name"].endswith("operator")]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args = [arg for arg in container["args"] if arg.startswith("--") and "=" in arg]
    return dict(arg.removeprefix("--").split("=", 1) for arg in args)


def operator_image(objects: list[dict[str, Any]]) -> str:
    [deployment] = [d for d in by_kind(objects, "Deployment") if d["metadata"]["name"].endswith("operator")]
    return str(deployment["spec"]["template"]["spec"]["containers"][0]["image"])


def operator_rules(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rules of the operator's namespaced ClusterRole (the one bound where it serves)."""
    [role] = [r for r in by_kind(objects, "ClusterRole") if r["metadata"]["name"].endswith("-operator")]
    rules: list[dict[str, Any]] = role["rules"]
    return rules


def allows(
    rules: list[Mapping[str, Any]], group: str, resource: str, verb: str, name: str | None = None
) -> bool:
    for rule in rules:
        if group not in rule.get("apiGroups", []) or resource not in rule.get("resources", []):
            continue
        if verb not in rule.get("verbs", []) and "*" not in rule.get("verbs", []):
            continue
        names = rule.get("resourceNames")
        if not names or (name is not None and name in names):
            return True
    return False


def group_of(api_version: str) -> str:
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


@pytest.fixture(scope="module")
def chart(helm: Helm) -> list[dict[str, Any]]:
    return helm.render(api_versions=[MONITORING_API])


def test_operator_may_do_to_every_router_object_what_the_reconciler_does(chart: list[dict[str, Any]]) -> None:
    rules = operator_rules(chart)
    for manifest in render_router.router_objects(routed(), Settings(), multi_node=False):
        kind = ROUTER_KINDS[manifest["kind"]]
        assert group_of(kind.api_version) == group_of(manifest["apiVersion"])
        for verb in VERBS:
            assert allows(rules, group_of(kind.api_version), kind.plural, verb), f"{verb} {kind.plural}"


def test_operator_may_bind_the_role_its_flag_names_and_no_other(chart: list[dict[str, Any]]) -> None:
    role = operator_args(chart)["router-cluster-role"]
    rules = operator_rules(chart)
    binding = render_router.role_binding(routed(), Settings(router_cluster_role=role))
    assert binding["roleRef"]["name"] == role
    assert allows(rules, "rbac.authorization.k8s.io", "clusterroles", "bind", role)
    assert not allows(rules, "rbac.authorization.k8s.io", "clusterroles", "bind", "cluster-admin")
    assert not allows(rules, "rbac.authorization.k8s.io", "clusterroles", "escalate")


def test_the_bound_role_exists_and_lets_routers_follow_endpoint_slices(chart: list[dict[str, Any]]) -> None:
    role = operator_args(chart)["router-cluster-role"]
    [router_role] = [r for r in by_kind(chart, "ClusterRole") if r["metadata"]["name"] == role]
    for verb in ("list", "watch"):
        assert allows(router_role["rules"], "discovery.k8s.io", "endpointslices", verb)
    # and nothing that writes
    assert all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in router_role["rules"])


@pytest.mark.parametrize("override", [None, "registry.local/kiln-router"])
def test_routers_run_the_chart_image_unless_the_router_image_is_set(helm: Helm, override: str | None) -> None:
    settings = [f"router.image.repository={override}"] if override else []
    objects = helm.render(settings=settings)
    image = operator_args(objects)["router-image"]
    if override:
        assert image.startswith(f"{override}:")
    else:
        assert image == operator_image(objects)


def test_engine_pod_monitor_scrapes_the_routers_on_a_port_they_have(chart: list[dict[str, Any]]) -> None:
    [monitor] = by_kind(chart, "PodMonitor")
    pod = render_router.router_deployment(routed(), Settings())["spec"]["template"]
    assert matches(monitor["spec"]["selector"], pod["metadata"]["labels"])
    ports = {port["name"] for container in pod["spec"]["containers"] for port in container["ports"]}
    assert {endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]} <= ports
