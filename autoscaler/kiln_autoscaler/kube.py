"""The autoscaler's Kubernetes edge: list LLMDeployments, read capacity, pods, apply replicas, patch status.

Also emits Events. Thin wrappers over the kubernetes client; every write carries the field manager
`kiln-autoscaler`, so `--show-managed-fields` (and Argo CD's ignoreDifferences) tell its writes apart.
Replicas go through server-side apply on the LLMDeployment itself, not the `/scale` subresource:
kube-apiserver records no owner for a `/scale` write to a field nobody owned yet, so a user's later
apply naming `replicas` would silently replace the autoscaler's count instead of conflicting.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from kiln.api.v1alpha1 import GROUP, VERSION
from kiln.labels import COMPONENT_LABEL, DEPLOYMENT_LABEL, MANAGED_BY, MANAGED_BY_VALUE, ROUTER_COMPONENT
from kiln_autoscaler.data import (
    Capacity,
    Decision,
    Replicas,
    Signals,
    Targets,
    capacity_from_api,
    targets_from_api,
)

FIELD_MANAGER = "kiln-autoscaler"
PLURAL = "llmdeployments"
ENGINE_PLURAL = "llmengines"
COMPONENT = "kiln-autoscaler"


@dataclass(frozen=True)
class Scaled:
    """One LLMDeployment the autoscaler owns, as read this round."""

    namespace: str
    name: str
    uid: str
    targets: Targets
    replicas: Replicas
    selector: str | None
    engine: str | None
    routed: bool = False  # spec.router.enabled: Kiln routers front it (and hold requests at zero)

    @property
    def router_selector(self) -> str:
        """The label selector of this deployment's router pods."""
        selected = {
            MANAGED_BY: MANAGED_BY_VALUE,
            COMPONENT_LABEL: ROUTER_COMPONENT,
            DEPLOYMENT_LABEL: self.name,
        }
        return ",".join(f"{key}={value}" for key, value in selected.items())


def scaled_from_object(obj: dict[str, Any]) -> Scaled | None:
    """The autoscaling view of an LLMDeployment object, or None when autoscaling is off."""
    spec = obj.get("spec") or {}
    autoscaling = spec.get("autoscaling") or {}
    if not autoscaling.get("enabled"):
        return None
    status = obj.get("status") or {}
    metadata = obj.get("metadata") or {}
    current = int(spec.get("replicas", 1))
    ready = int(status.get("readyReplicas") or 0)
    engine = (status.get("engine") or {}).get("name")
    return Scaled(
        namespace=metadata["namespace"],
        name=metadata["name"],
        uid=metadata.get("uid", ""),
        targets=targets_from_api(autoscaling),
        replicas=Replicas(current=current, ready=min(ready, current) if current else ready),
        selector=status.get("selector"),
        engine=engine,
        routed=bool((spec.get("router") or {}).get("enabled")),
    )


# The latencies the autoscaler reports on the deployment's status (ms there, seconds in Signals).
LATENCY_STATUS_FIELDS: tuple[tuple[str, Callable[[Signals], float | None]], ...] = (
    ("ttftP50Ms", lambda s: s.ttft_p50_s),
    ("ttftP90Ms", lambda s: s.ttft_p90_s),
    ("ttftP95Ms", lambda s: s.ttft_p95_s),
    ("itlP50Ms", lambda s: s.itl_p50_s),
    ("itlP95Ms", lambda s: s.itl_p95_s),
)


def decision_status(
    decision: Decision, current: int, signals: Signals | None, now: dt.datetime
) -> dict[str, Any]:
    """The status merge patch for a decision (camelCase, as the CRD stores it)."""
    status: dict[str, Any] = {}
    if decision.desired != current:
        status["lastScaleDecision"] = {
            "time": now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "fromReplicas": current,
            "toReplicas": decision.desired,
            "reason": decision.reason[:1024],
        }
    if signals is not None:
        for field, seconds in LATENCY_STATUS_FIELDS:
            value = seconds(signals)
            status[field] = None if value is None else round(value * 1000, 1)
    return {"status": status}


def replicas_apply(namespace: str, name: str, replicas: int, uid: str = "") -> dict[str, Any]:
    """The apply configuration that names only `.spec.replicas` (and the object, by uid when known)."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if uid:
        metadata["uid"] = uid
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMDeployment",
        "metadata": metadata,
        "spec": {"replicas": replicas},
    }


class Kube:
    """The API calls the controller makes."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api_client = api_client or client.ApiClient()
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    def list_scaled(self, namespaces: list[str] | None = None) -> list[Scaled]:
        """LLMDeployments with autoscaling enabled, in `namespaces` (all when empty)."""
        items: list[dict[str, Any]] = []
        if namespaces:
            for namespace in namespaces:
                listed: Any = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
                items += listed["items"]
        else:
            everything: Any = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
            items = everything["items"]
        return [scaled for obj in items if (scaled := scaled_from_object(obj)) is not None]

    def capacity(self, namespace: str, engine: str | None) -> Capacity:
        """The measured per-replica capacity of the deployment's LLMEngine (unknown if not measured)."""
        if not engine:
            return Capacity()
        try:
            obj: Any = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, ENGINE_PLURAL, engine
            )
        except client.ApiException as error:
            if error.status == 404:
                return Capacity()
            raise
        return capacity_from_api((obj.get("status") or {}).get("capacity"))

    def pod_metrics_urls(self, namespace: str, selector: str | None, port: int | str) -> list[str]:
        """`http://<podIP>:<port>/metrics` of the ready pods matching `selector`.

        `port` is a number or a container port name (the engine's is `http`).
        """
        if not selector:
            return []
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        urls: list[str] = []
        for pod in pods:
            if not pod.status or not pod.status.pod_ip or (pod.metadata and pod.metadata.deletion_timestamp):
                continue
            ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
            if not ready:
                continue
            number = _port_number(pod, port)
            if number is not None:
                urls.append(f"http://{pod.status.pod_ip}:{number}/metrics")
        return urls

    def scale(self, namespace: str, name: str, replicas: int, uid: str = "") -> None:
        """Own `.spec.replicas` by server-side apply (field manager kiln-autoscaler, forced).

        Forcing takes the one field back from whoever held it, so a later apply that names
        `replicas` under another manager gets a 409 naming kiln-autoscaler unless it forces too.
        `uid`, when given, pins the object that was read: if it was deleted since, the apply is
        answered 409 (uid mismatch) instead of creating it, and if it was recreated under the same
        name, 422 (uid is immutable), so the new object keeps its own replicas.
        """
        self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            replicas_apply(namespace, name, replicas, uid),
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type="application/apply-patch+yaml",
        )

    def write_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Merge-patch the status subresource with the autoscaler's fields only."""
        if not patch.get("status"):
            return
        self.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            patch,
            field_manager=FIELD_MANAGER,
            _content_type="application/merge-patch+json",
        )

    def event(self, scaled: Scaled, reason: str, message: str, now: dt.datetime) -> None:
        """A Normal event on the LLMDeployment (what `kubectl describe` shows)."""
        stamp = now.astimezone(dt.UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{scaled.name}.", namespace=scaled.namespace),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind="LLMDeployment",
                name=scaled.name,
                namespace=scaled.namespace,
                uid=scaled.uid or None,
            ),
            reason=reason,
            message=message[:1024],
            type="Normal",
            first_timestamp=stamp,
            last_timestamp=stamp,
            count=1,
            source=client.V1EventSource(component=COMPONENT),
            reporting_component=COMPONENT,
            reporting_instance=COMPONENT,
        )
        self.core.create_namespaced_event(scaled.namespace, body)


def _port_number(pod: Any, port: int | str) -> int | None:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for container in pod.spec.containers or []:
        for declared in container.ports or []:
            if declared.name == port:
                return int(declared.container_port)
    return None
