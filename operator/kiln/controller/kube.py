"""The operator's Kubernetes edge: get/list/create, server-side apply, status patches, logs and Events.

A thin layer over the kubernetes client's ApiClient that speaks plain dicts for any kind (Kiln's
CRDs, Jobs, Deployments, LeaderWorkerSets). Every write carries the field manager `kiln-operator`;
applies are server-side with `force`, so Kiln owns the fields it renders and nothing else. Writes
that hit a conflict (409) are retried.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from kubernetes import client

from kiln.api.v1alpha1 import GROUP, VERSION
from kiln.controller.metrics import Metrics

FIELD_MANAGER = "kiln-operator"
COMPONENT = "kiln-operator"
CONFLICT_RETRIES = 4
LOG_TIMEOUT_SECONDS = 3.0
REQUEST_TIMEOUT_SECONDS = 30.0

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Kind:
    """Where a kind lives in the REST API."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base


LLMDEPLOYMENTS = Kind(f"{GROUP}/{VERSION}", "LLMDeployment", "llmdeployments")
LLMENGINES = Kind(f"{GROUP}/{VERSION}", "LLMEngine", "llmengines")
JOBS = Kind("batch/v1", "Job", "jobs")
DEPLOYMENTS = Kind("apps/v1", "Deployment", "deployments")
LEADERWORKERSETS = Kind("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "leaderworkersets")
STATEFULSETS = Kind("apps/v1", "StatefulSet", "statefulsets")  # pod groups without LeaderWorkerSet
SERVICES = Kind("v1", "Service", "services")
CONFIGMAPS = Kind("v1", "ConfigMap", "configmaps")  # LoRA adapter lists the serving pods poll
SERVICEACCOUNTS = Kind("v1", "ServiceAccount", "serviceaccounts")  # routers' identity
ROLEBINDINGS = Kind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings")
PODDISRUPTIONBUDGETS = Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets")
PODS = Kind("v1", "Pod", "pods")
NODES = Kind("v1", "Node", "nodes", namespaced=False)
EVENTS = Kind("v1", "Event", "events")
CRDS = Kind("apiextensions.k8s.io/v1", "CustomResourceDefinition", "customresourcedefinitions", False)
KINDS = {
    kind.kind: kind
    for kind in (
        LLMDEPLOYMENTS,
        LLMENGINES,
        JOBS,
        DEPLOYMENTS,
        LEADERWORKERSETS,
        STATEFULSETS,
        SERVICES,
        CONFIGMAPS,
        SERVICEACCOUNTS,
        ROLEBINDINGS,
        PODDISRUPTIONBUDGETS,
    )
}
LWS_CRD = "leaderworkersets.leaderworkerset.x-k8s.io"


class Kube:
    """The API calls the reconcilers make, counted in `metrics.api_requests`."""

    def __init__(self, api_client: client.ApiClient, metrics: Metrics | None = None) -> None:
        self.api_client = api_client
        self.metrics = metrics or Metrics()

    # ------------------------------------------------------------ transport

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        response_type: str = "object",
        timeout: float = REQUEST_TIMEOUT_SECONDS,
        resource: str = "",
    ) -> Any:
        self.metrics.api_requests.labels(method.lower(), resource).inc()
        if content_type.endswith("yaml") and body is not None:
            body = json.dumps(body)  # JSON is YAML; sent as is rather than re-encoded
        serialized = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=[(key, value) for key, value in (query or {}).items() if value is not None],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        verb, url, headers, payload, _ = serialized
        response = self.api_client.call_api(
            verb, url, header_params=headers, body=payload, _request_timeout=timeout
        )
        data = response.read()
        if not 200 <= response.status <= 299:
            raise client.ApiException(http_resp=response)
        text = data.decode("utf-8", errors="replace") if data else ""
        if response_type == "str":
            return text
        return json.loads(text) if text else {}

    @staticmethod
    def _retry_conflicts(action: Callable[[], T]) -> T:
        for attempt in range(CONFLICT_RETRIES):
            try:
                return action()
            except client.ApiException as error:
                if error.status != 409 or attempt == CONFLICT_RETRIES - 1:
                    raise
                time.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ reads

    def get(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            found: dict[str, Any] = self._call("GET", kind.path(namespace, name), resource=kind.plural)
        except client.ApiException as error:
            if error.status == 404:
                return None
            raise
        return found

    def list(
        self, kind: Kind, namespace: str | None = None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        """Every object of `kind` in `namespace` (all namespaces when None), following continue tokens."""
        return list(self.iterate(kind, namespace, label_selector))

    def iterate(
        self, kind: Kind, namespace: str | None = None, label_selector: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """`list`, a page at a time: only the page being read is held, so a caller that keeps a
        little of each object (the node cache) never holds thousands of whole ones at once."""
        token: str | None = None
        while True:
            page = self._call(
                "GET",
                kind.path(namespace),
                query={"labelSelector": label_selector, "limit": 500, "continue": token},
                resource=kind.plural,
            )
            for item in page.get("items") or []:
                item.setdefault("apiVersion", kind.api_version)
                item.setdefault("kind", kind.kind)
                yield item
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return

    def pod_log(
        self, namespace: str, name: str, container: str, tail_lines: int = 50, limit_bytes: int = 64 * 1024
    ) -> str | None:
        """The last lines of a container's log ("" while it has written nothing yet); None when the
        node cannot serve logs (quickly)."""
        try:
            text = self._call(
                "GET",
                PODS.path(namespace, name, "log"),
                query={"container": container, "tailLines": tail_lines, "limitBytes": limit_bytes},
                response_type="str",
                timeout=LOG_TIMEOUT_SECONDS,
                resource="pods/log",
            )
        except Exception as error:  # a simulated or unreachable kubelet: logs are best effort
            log.debug("no log for pod %s/%s: %s", namespace, name, error)
            return None
        return str(text)

    def crd_installed(self, name: str) -> bool:
        return self.get(CRDS, None, name) is not None

    # ------------------------------------------------------------ writes

    def create(self, manifest: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create `manifest`, or find it already there: (the object, whether this call created it)."""
        kind = KINDS[manifest["kind"]]
        metadata = manifest["metadata"]
        try:
            created: dict[str, Any] = self._call(
                "POST",
                kind.path(metadata.get("namespace")),
                body=manifest,
                query={"fieldManager": FIELD_MANAGER},
                resource=kind.plural,
            )
            return created, True
        except client.ApiException as error:
            if error.status != 409:
                raise
        existing = self.get(kind, metadata.get("namespace"), metadata["name"])
        if existing is None:  # deleted in between: the caller's next reconcile creates it
            raise client.ApiException(status=409, reason="created and deleted concurrently")
        return existing, False

    def apply(self, manifest: Mapping[str, Any], over_version: str | None = None) -> dict[str, Any]:
        """Server-side apply `manifest` as `kiln-operator` (forcing Kiln's fields), returning the object.
        With `over_version` the API applies only over that resourceVersion of the object and answers
        409 otherwise (not retried: the caller looks at the newer object first)."""
        kind = KINDS[manifest["kind"]]
        metadata = manifest["metadata"]
        body = manifest
        if over_version is not None:
            body = {**manifest, "metadata": {**metadata, "resourceVersion": over_version}}

        def attempt() -> dict[str, Any]:
            applied: dict[str, Any] = self._call(
                "PATCH",
                kind.path(metadata.get("namespace"), metadata["name"]),
                body=body,
                query={"fieldManager": FIELD_MANAGER, "force": "true"},
                content_type="application/apply-patch+yaml",
                resource=kind.plural,
            )
            return applied

        return attempt() if over_version is not None else self._retry_conflicts(attempt)

    def patch_status(
        self, kind: Kind, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge-patch the status subresource with `status` (None values delete fields)."""

        def attempt() -> dict[str, Any]:
            patched: dict[str, Any] = self._call(
                "PATCH",
                kind.path(namespace, name, "status"),
                body={"status": dict(status)},
                query={"fieldManager": FIELD_MANAGER},
                content_type="application/merge-patch+json",
                resource=f"{kind.plural}/status",
            )
            return patched

        return self._retry_conflicts(attempt)

    def delete(self, kind: Kind, namespace: str | None, name: str, uid: str | None = None) -> bool:
        """Delete (children in the background); with `uid`, only that incarnation. False when gone."""
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self._call("DELETE", kind.path(namespace, name), body=body, resource=kind.plural)
        except client.ApiException as error:
            if error.status in (404, 409):
                return False
            raise
        return True

    def event(self, obj: Mapping[str, Any], reason: str, message: str, type_: str = "Normal") -> None:
        """Record a core/v1 Event on `obj` (what `kubectl describe` shows); failures are only logged."""
        metadata = obj.get("metadata") or {}
        log.log(
            logging.WARNING if type_ == "Warning" else logging.INFO,
            "%s %s/%s: %s: %s",
            obj.get("kind"),
            metadata.get("namespace"),
            metadata.get("name"),
            reason,
            message,
            extra={
                "object": f"{obj.get('kind')}/{metadata.get('namespace')}/{metadata.get('name')}",
                "reason": reason,
            },
        )
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        namespace = metadata.get("namespace") or "default"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{metadata.get('name')}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": metadata.get("name"),
                "namespace": namespace,
                "uid": metadata.get("uid"),
                "resourceVersion": metadata.get("resourceVersion"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": COMPONENT,
        }
        try:
            self._call("POST", EVENTS.path(namespace), body=body, resource="events")
        except client.ApiException as error:
            log.warning("could not record event %s on %s: %s", reason, metadata.get("name"), error.reason)
