"""kopf wiring: watch events on Kiln's kinds and their children, routed to the level-based reconcilers.

Only `kopf.on.event` handlers: they keep no state on the objects (no finalizers, no progress
annotations), which suits reconcilers that read the world afresh each time. Children carry labels
naming their parent, so a Job or Deployment event wakes the object that owns it.
"""

from __future__ import annotations

from typing import Any

import kopf

from kiln import labels
from kiln.api.v1alpha1 import GROUP, VERSION
from kiln.controller.reconcile import Reconciler
from kiln.render.capacity_job import CAPACITY_COMPONENT, DEPLOYMENT_ANNOTATION
from kiln.render.common import BUILD_COMPONENT, SERVING_COMPONENT
from kiln.render.router import ROUTER_COMPONENT
from kiln.render.serving import LORA_COMPONENT

MANAGED = {labels.MANAGED_BY: labels.MANAGED_BY_VALUE}


def _ns(namespace: str | None) -> str:
    return namespace or ""


def _reconciler(memo: Any) -> Reconciler:
    reconciler: Reconciler = memo.reconciler
    return reconciler


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """kopf settings: no Events posted from handler logs (the reconcilers record their own), and
    watches that reconnect before a load balancer would cut them."""
    settings.posting.enabled = False
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.execution.max_workers = 16


def _observe(memo: Any, event: kopf.RawEvent) -> float:
    """Cache the event's object; when to reconcile once more (0: no need), see Reconciler.observe."""
    return _reconciler(memo).observe(event["object"], deleted=_deleted(event))


def _deleted(event: kopf.RawEvent) -> bool:
    return event.get("type") == "DELETED"


# The handlers only cache and queue (no API calls), so they are async and never hold up kopf's
# event loop or thread pool; the reconcilers' workers do the rest.


def _child_changed(memo: Any, event: kopf.RawEvent, body: kopf.Body, namespace: str | None) -> None:
    """A child of an LLMDeployment changed: cache it and reconcile the deployment its label names."""
    again = _observe(memo, event)
    owner = body.metadata.labels.get(labels.DEPLOYMENT_LABEL)
    if owner:
        _reconciler(memo).deployment(_ns(namespace), owner, again)


@kopf.on.event(GROUP, VERSION, "llmdeployments")
async def llmdeployment_event(
    event: kopf.RawEvent, name: str, namespace: str | None, memo: Any, **_: Any
) -> None:
    again = _observe(memo, event)
    if _deleted(event):
        _reconciler(memo).forget_deployment(_ns(namespace), name)
    else:
        _reconciler(memo).deployment(_ns(namespace), name, again)


@kopf.on.event(GROUP, VERSION, "llmengines")
async def llmengine_event(
    event: kopf.RawEvent, name: str, namespace: str | None, memo: Any, **_: Any
) -> None:
    again = _observe(memo, event)
    if _deleted(event):
        # Deleting an engine is how a user retries a failed build: its users ask for a new one now.
        _reconciler(memo).engine_deleted(_ns(namespace), name)
    else:
        _reconciler(memo).engine(_ns(namespace), name, again)


@kopf.on.event("batch", "v1", "jobs", labels={**MANAGED, labels.COMPONENT_LABEL: BUILD_COMPONENT})
async def build_job_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, memo: Any, **_: Any
) -> None:
    again = _observe(memo, event)
    engine = body.metadata.labels.get(labels.ENGINE_LABEL)
    if engine:
        _reconciler(memo).engine(_ns(namespace), engine, again)


@kopf.on.event("batch", "v1", "jobs", labels={**MANAGED, labels.COMPONENT_LABEL: CAPACITY_COMPONENT})
async def capacity_job_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, memo: Any, **_: Any
) -> None:
    # The deployment whose replica it measures copies the result into its engine's status.
    again = _observe(memo, event)
    owner = body.metadata.annotations.get(DEPLOYMENT_ANNOTATION)
    if owner:
        _reconciler(memo).deployment(_ns(namespace), owner, again)


@kopf.on.event("apps", "v1", "deployments", labels={**MANAGED, labels.COMPONENT_LABEL: SERVING_COMPONENT})
async def serving_deployment_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, memo: Any, **_: Any
) -> None:
    _child_changed(memo, event, body, namespace)


@kopf.on.event("apps", "v1", "deployments", labels={**MANAGED, labels.COMPONENT_LABEL: ROUTER_COMPONENT})
async def router_deployment_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, memo: Any, **_: Any
) -> None:
    # The routers' readiness goes into the deployment's status; deleted by hand, they come back.
    _child_changed(memo, event, body, namespace)


@kopf.on.event("", "v1", "services", labels={**MANAGED, labels.COMPONENT_LABEL: SERVING_COMPONENT})
async def serving_service_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, memo: Any, **_: Any
) -> None:
    # A Service deleted by hand is created again.
    _child_changed(memo, event, body, namespace)


@kopf.on.event(
    "leaderworkerset.x-k8s.io",
    "v1",
    "leaderworkersets",
    labels={**MANAGED, labels.COMPONENT_LABEL: SERVING_COMPONENT},
)
async def serving_lws_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, memo: Any, **_: Any
) -> None:
    _child_changed(memo, event, body, namespace)


@kopf.on.event("apps", "v1", "statefulsets", labels={**MANAGED, labels.COMPONENT_LABEL: SERVING_COMPONENT})
async def serving_statefulset_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, memo: Any, **_: Any
) -> None:
    # The pod groups of multi-node replicas where LeaderWorkerSet is not installed.
    _child_changed(memo, event, body, namespace)


@kopf.on.event("", "v1", "configmaps", labels={**MANAGED, labels.COMPONENT_LABEL: LORA_COMPONENT})
async def lora_adapters_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, memo: Any, **_: Any
) -> None:
    # The adapter list the serving pods poll: edited or deleted by hand, it is put back.
    _child_changed(memo, event, body, namespace)


@kopf.on.event("", "v1", "nodes")
async def node_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    _reconciler(memo).node_changed(event.get("type"), event["object"])
