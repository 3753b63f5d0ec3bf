"""The Kiln routers in front of an LLMDeployment's serving pods (spec.router.enabled).

With a router, the deployment's Service selects the router pods (clients keep the same URL), and a
headless `<name>-engines` Service selects the serving pods: the routers follow its EndpointSlices
(ready addresses only) and pick a replica per request by prompt-prefix affinity. The routers read
EndpointSlices through their own ServiceAccount, bound to the ClusterRole the chart ships
(`Settings.router_cluster_role`) in the deployment's namespace only.
"""

from __future__ import annotations

from typing import Any

from kiln import labels
from kiln.api.v1alpha1 import LLMDeployment
from kiln.render.common import (
    HTTP_PORT_NAME,
    TMP_MOUNT,
    Manifest,
    Settings,
    container_security_context,
    managed_labels,
    owner_reference,
    pod_security_context,
)
from kiln.render.serving import deployment_owner, leader_selector, selector_labels

ROUTER_COMPONENT = labels.ROUTER_COMPONENT
ROUTER_CONTAINER = "router"
ROUTER_COMMAND = "kiln-router"
# Requests of a router pod when the spec names none: routing is light, but it must be scheduled
# with some CPU so that a busy node does not starve the path every request takes.
DEFAULT_RESOURCES = {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
GRACE_SECONDS = 30  # streams in flight finish or move on while a router pod stops


def router_name(name: str) -> str:
    return f"{name}-router"


def engines_service_name(name: str) -> str:
    return f"{name}-engines"


def router_labels(name: str) -> dict[str, str]:
    """Labels selecting a deployment's router pods."""
    return managed_labels(ROUTER_COMPONENT, **{labels.DEPLOYMENT_LABEL: name})


def service_selector(deployment: LLMDeployment, multi_node: bool) -> dict[str, str]:
    """What the deployment's Service selects: its routers when it has them, else the serving pods
    (only the leaders of multi-node replicas serve the API)."""
    name = str(deployment.metadata.name)
    if deployment.spec.router.enabled:
        return router_labels(name)
    return leader_selector(name, multi_node)


def _metadata(deployment: LLMDeployment, name: str, kind_labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": deployment.metadata.namespace,
        "labels": kind_labels,
        "ownerReferences": [owner_reference(deployment_owner(deployment))],
    }


def engines_service(deployment: LLMDeployment, multi_node: bool) -> Manifest:
    """The headless Service whose EndpointSlices list the serving pods the routers pick from."""
    name = str(deployment.metadata.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(deployment, engines_service_name(name), selector_labels(name)),
        "spec": {
            "clusterIP": "None",
            "selector": leader_selector(name, multi_node),
            "ports": [
                {
                    "name": HTTP_PORT_NAME,
                    "port": deployment.spec.serving.port,
                    "targetPort": HTTP_PORT_NAME,
                    "protocol": "TCP",
                    "appProtocol": "http",
                }
            ],
        },
    }


def service_account(deployment: LLMDeployment) -> Manifest:
    name = router_name(str(deployment.metadata.name))
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(deployment, name, router_labels(str(deployment.metadata.name))),
    }


def role_binding(deployment: LLMDeployment, settings: Settings) -> Manifest:
    """Binds the routers' ServiceAccount to the chart's router ClusterRole in this namespace only."""
    name = router_name(str(deployment.metadata.name))
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(deployment, name, router_labels(str(deployment.metadata.name))),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": settings.router_cluster_role,
        },
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": deployment.metadata.namespace}],
    }


def router_args(deployment: LLMDeployment) -> list[str]:
    """The router's command line: which Service's endpoints to route to, and where to listen."""
    name = str(deployment.metadata.name)
    return [
        "serve",
        "--service",
        engines_service_name(name),
        "--namespace",
        str(deployment.metadata.namespace),
        "--port",
        str(deployment.spec.serving.port),
    ]


def _container(deployment: LLMDeployment, settings: Settings) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/ready", "port": HTTP_PORT_NAME}, "periodSeconds": 5}
    return {
        "name": ROUTER_CONTAINER,
        "image": settings.router_image_name(),
        "command": [ROUTER_COMMAND],
        "args": router_args(deployment),
        "ports": [{"name": HTTP_PORT_NAME, "containerPort": deployment.spec.serving.port, "protocol": "TCP"}],
        "readinessProbe": {**probe, "failureThreshold": 2},
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": HTTP_PORT_NAME},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": deployment.spec.router.resources or DEFAULT_RESOURCES,
        "securityContext": container_security_context(),
        "volumeMounts": [{"name": "tmp", "mountPath": TMP_MOUNT}],
    }


def router_deployment(deployment: LLMDeployment, settings: Settings) -> Manifest:
    """The routers: spread over nodes, replaced one at a time without dropping below the count."""
    name = str(deployment.metadata.name)
    spec = deployment.spec.router
    selector = router_labels(name)
    pod_spec: dict[str, Any] = {
        "serviceAccountName": router_name(name),
        "containers": [_container(deployment, settings)],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
        "securityContext": pod_security_context(),
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": GRACE_SECONDS,
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "labelSelector": {"matchLabels": selector},
                            "topologyKey": "kubernetes.io/hostname",
                        },
                    }
                ]
            }
        },
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = list(spec.tolerations)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(deployment, router_name(name), selector),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "revisionHistoryLimit": 3,
            "template": {"metadata": {"labels": dict(selector)}, "spec": pod_spec},
        },
    }


def disruption_budget(deployment: LLMDeployment) -> Manifest | None:
    """Keeps one router up through voluntary disruptions (node drains); none for a single router,
    which a budget would only make undrainable."""
    if deployment.spec.router.replicas < 2:
        return None
    name = str(deployment.metadata.name)
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(deployment, router_name(name), router_labels(name)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": router_labels(name)}},
    }


def router_objects(deployment: LLMDeployment, settings: Settings, multi_node: bool) -> list[Manifest]:
    """Everything a deployment's routers need, in the order to apply it (identity before pods)."""
    objects = [
        service_account(deployment),
        role_binding(deployment, settings),
        engines_service(deployment, multi_node),
        router_deployment(deployment, settings),
    ]
    budget = disruption_budget(deployment)
    return objects + ([budget] if budget is not None else [])
