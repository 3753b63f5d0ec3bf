"""The Service in front of an LLMDeployment's serving pods (the OpenAI-compatible API)."""

from __future__ import annotations

from kiln.api.v1alpha1 import LLMDeployment
from kiln.render.common import HTTP_PORT_NAME, Manifest, owner_reference
from kiln.render.router import service_selector
from kiln.render.serving import deployment_owner, selector_labels


def endpoint(deployment: LLMDeployment) -> str:
    """The in-cluster base URL of the OpenAI API."""
    meta = deployment.metadata
    return f"http://{meta.name}.{meta.namespace}.svc:{deployment.spec.serving.port}/v1"


def service(deployment: LLMDeployment, multi_node: bool = False) -> Manifest:
    """A ClusterIP Service named after the deployment, in front of its routers when it has them,
    else of its serving pods (with multi-node replicas only leaders serve)."""
    name = str(deployment.metadata.name)
    selector = service_selector(deployment, multi_node)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": deployment.metadata.namespace,
            "labels": selector_labels(name),
            "ownerReferences": [owner_reference(deployment_owner(deployment))],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
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
