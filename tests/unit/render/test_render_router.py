"""Routers in front of a deployment: which pods each Service selects, the routers' identity and
budget, and what the deployment's status says while no router is ready."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import pytest
from render_helpers import example, matches, nodes, ready

from kiln.api.v1alpha1 import LLMDeployment
from kiln.placement import ReplicaShape, plan
from kiln.render import router as render_router
from kiln.render import service as render_service
from kiln.render import serving as render_serving
from kiln.render import status as render_status
from kiln.render.common import Settings
from kiln.render.engine import engine_identity
from kiln_router.cli import main

NOW = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
ROUTED = {"enabled": True, "replicas": 2}


def serving_labels(deployment: LLMDeployment) -> dict[str, str]:
    """The labels of the serving pods the operator renders for `deployment`."""
    placement = None
    if deployment.spec.gpu is not None:
        placement = plan(ReplicaShape.from_spec(deployment.spec), nodes(), deployment.spec.gpu.nvlink)
    inputs = render_serving.ServingInputs(deployment, ready(deployment), placement, Settings())
    labels: dict[str, str] = render_serving.workload(inputs)["spec"]["template"]["metadata"]["labels"]
    return labels


def router_pod_labels(deployment: LLMDeployment) -> dict[str, str]:
    labels: dict[str, str] = render_router.router_deployment(deployment, Settings())["spec"]["template"][
        "metadata"
    ]["labels"]
    return labels


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "llama-3-8b-fp8-h100.yaml"])
def test_with_routers_the_service_sends_to_the_routers_and_the_routers_see_the_replicas(name: str) -> None:
    deployment = example(name, router=ROUTED)
    service = render_service.service(deployment)["spec"]["selector"]
    engines = render_router.engines_service(deployment, multi_node=False)
    assert matches({"matchLabels": service}, router_pod_labels(deployment))
    assert not matches({"matchLabels": service}, serving_labels(deployment))
    assert matches({"matchLabels": engines["spec"]["selector"]}, serving_labels(deployment))
    assert not matches({"matchLabels": engines["spec"]["selector"]}, router_pod_labels(deployment))
    assert engines["spec"]["clusterIP"] == "None"  # the routers pick pods; no virtual IP in between


def test_without_routers_the_service_sends_to_the_replicas() -> None:
    deployment = example("tiny-cpu.yaml")
    service = render_service.service(deployment)["spec"]["selector"]
    assert matches({"matchLabels": service}, serving_labels(deployment))
    assert not matches({"matchLabels": service}, router_pod_labels(deployment))


def test_routers_listen_where_the_service_points_and_follow_the_engines_service() -> None:
    deployment = example("tiny-cpu.yaml", router=ROUTED)
    service = render_service.service(deployment)
    [container] = render_router.router_deployment(deployment, Settings())["spec"]["template"]["spec"][
        "containers"
    ]
    target = service["spec"]["ports"][0]["targetPort"]
    assert target in {port["name"] for port in container["ports"]}
    args = container["args"]
    followed = args[args.index("--service") + 1]
    assert followed == render_router.engines_service(deployment, False)["metadata"]["name"]
    assert args[args.index("--namespace") + 1] == deployment.metadata.namespace


def test_router_identity_is_bound_to_the_configured_role_in_its_own_namespace_only() -> None:
    deployment = example("tiny-cpu.yaml", router=ROUTED)
    settings = Settings(router_cluster_role="team-a-router")
    binding = render_router.role_binding(deployment, settings)
    pod_spec = render_router.router_deployment(deployment, settings)["spec"]["template"]["spec"]
    assert (
        binding["kind"] == "RoleBinding" and binding["metadata"]["namespace"] == deployment.metadata.namespace
    )
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "team-a-router",
    }
    [subject] = binding["subjects"]
    assert subject["name"] == pod_spec["serviceAccountName"]
    assert subject["name"] == render_router.service_account(deployment)["metadata"]["name"]


def test_router_image_defaults_to_the_control_plane_image_and_can_be_set() -> None:
    deployment = example("tiny-cpu.yaml", router=ROUTED)

    def image(settings: Settings) -> str:
        pod = render_router.router_deployment(deployment, settings)["spec"]["template"]["spec"]
        return str(pod["containers"][0]["image"])

    assert image(Settings(runtime_version="1.2.3")) == "ghcr.io/kiln-dev/kiln:1.2.3"
    assert image(Settings(router_image="registry.local/kiln@sha256:" + "a" * 64)).startswith(
        "registry.local/"
    )


@pytest.mark.parametrize(("replicas", "budget"), [(1, False), (2, True), (5, True)])
def test_a_disruption_budget_keeps_a_router_up_only_when_there_are_several(
    replicas: int, budget: bool
) -> None:
    deployment = example("tiny-cpu.yaml", router={"enabled": True, "replicas": replicas})
    made = render_router.disruption_budget(deployment)
    assert (made is not None) == budget
    if made is not None:
        assert made["spec"]["maxUnavailable"] == 1
        assert matches(made["spec"]["selector"], router_pod_labels(deployment))
    kinds = [obj["kind"] for obj in render_router.router_objects(deployment, Settings(), False)]
    assert ("PodDisruptionBudget" in kinds) == budget


def test_router_pods_are_restricted_and_take_the_scheduling_the_spec_gives() -> None:
    toleration = {"key": "dedicated", "operator": "Equal", "value": "routers", "effect": "NoSchedule"}
    router = {**ROUTED, "nodeSelector": {"pool": "cpu"}, "tolerations": [toleration]}
    deployment = example("tiny-cpu.yaml", router=router)
    pod = render_router.router_deployment(deployment, Settings())["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "cpu"} and pod["tolerations"] == [toleration]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def routed_status(routers_ready: int | None, replicas_ready: int = 2) -> dict[str, Any]:
    deployment = example("llama-3-8b-fp8-h100.yaml", router=ROUTED)
    engine = ready(deployment)
    workload = {
        "metadata": {"generation": 1},
        "spec": {"replicas": 2},
        "status": {
            "replicas": 2,
            "readyReplicas": replicas_ready,
            "updatedReplicas": 2,
            "observedGeneration": 1,
        },
    }
    router = None if routers_ready is None else {"status": {"readyReplicas": routers_ready}}
    seen = render_status.DeploymentObservation(
        desired=engine_identity(deployment, "0.1.0"),
        desired_engine=engine,
        serving=engine,
        workload=workload,
        router=router,
    )
    return render_status.deployment_status(
        deployment.model_copy(update={"spec": deployment.spec.model_copy(update={"replicas": 2})}), seen, NOW
    )


def ready_condition(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Ready")


def test_replicas_ready_but_no_router_ready_is_not_ready_and_says_why() -> None:
    for routers in (None, 0):
        status = routed_status(routers)
        assert status["phase"] == "Deploying" and status["routerReadyReplicas"] == 0
        condition = ready_condition(status)
        assert (condition["status"], condition["reason"]) == ("False", "RoutersNotReady")
        assert "router" in condition["message"]


def test_ready_once_a_router_is_ready_and_the_count_is_in_the_status() -> None:
    status = routed_status(1)
    assert status["phase"] == "Ready" and status["routerReadyReplicas"] == 1
    assert ready_condition(status)["status"] == "True"


def test_without_routers_the_status_names_none() -> None:
    deployment = example("llama-3-8b-fp8-h100.yaml")
    engine = ready(deployment)
    seen = render_status.DeploymentObservation(
        desired=engine_identity(deployment, "0.1.0"), desired_engine=engine, serving=engine
    )
    assert render_status.deployment_status(deployment, seen, NOW)["routerReadyReplicas"] is None


def test_the_router_accepts_the_command_line_the_operator_renders() -> None:
    deployment = example("tiny-cpu.yaml", router=ROUTED)
    [container] = render_router.router_deployment(deployment, Settings())["spec"]["template"]["spec"][
        "containers"
    ]
    pyproject = tomllib.loads((Path(__file__).resolve().parents[3] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"][container["command"][0]] == "kiln_router.cli:main"
    subcommand, *options = container["args"]
    command = main.get_command(click.Context(main), subcommand)
    assert command is not None, subcommand
    parsed = command.make_context(subcommand, list(options)).params
    assert parsed["service"] == render_router.engines_service_name(str(deployment.metadata.name))
    assert parsed["namespace"] == deployment.metadata.namespace
    assert parsed["port"] == deployment.spec.serving.port
    engines_port = render_router.engines_service(deployment, False)["spec"]["ports"][0]["name"]
    assert parsed["port_name"] == engines_port
