"""Drift against a real API server: hand edits of a serving Deployment Kiln owns (image, env,
resources, probes) are taken back through server-side apply, with an event naming the fields and
who set them; a second deployment sharing an engine built with other build settings is told so.
Shares the session's local cluster and the operator fixture of test_operator.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from kiln.controller.kube import Kube
from kiln.local.testing import wait_for
from tests.integration import test_operator as base
from tests.integration.test_operator import GROUP, VERSION, Operator, create, example, get, with_secret

# The operator, API client and kubectl fixtures of test_operator.py.
operator, custom, kubectl = base.operator, base.custom, base.kubectl

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def engine_container(apps_v1: client.AppsV1Api, namespace: str, name: str) -> dict[str, Any]:
    workload = apps_v1.api_client.sanitize_for_serialization(
        apps_v1.read_namespaced_deployment(name, namespace)
    )
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == "engine")


def reasons_and_messages(core_v1: client.CoreV1Api, namespace: str, name: str) -> list[tuple[str, str]]:
    events = core_v1.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    return [(e.reason, e.message) for e in events]


def ready_example(
    custom: client.CustomObjectsApi, core_v1: client.CoreV1Api, namespace: str, kubectl: Callable[..., str]
) -> str:
    """The Llama 3 70B example, created and Ready; its name."""
    with_secret(core_v1, namespace)
    body = example("llama-3-70b-fp8-tp4.yaml")
    create(custom, namespace, body)
    name = str(body["metadata"]["name"])
    kubectl("wait", "-n", namespace, f"llmdeployment/{name}", "--for=condition=Ready", "--timeout=90s",
            timeout=100)  # fmt: skip
    return name


def test_an_apply_over_a_version_is_refused_once_the_object_moved_on(
    core_v1: client.CoreV1Api, namespace: str
) -> None:
    """What drift reverting stands on: the API applies over the copy Kiln diffed, or answers 409
    (then Kiln re-reads, so no edit is reverted without being named)."""
    kube = Kube(core_v1.api_client)

    def config_map(value: str) -> dict[str, Any]:
        meta = {"name": "drift-precondition", "namespace": namespace}
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": value}}

    first = kube.apply(config_map("1"))["metadata"]["resourceVersion"]
    second = kube.apply(config_map("2"), over_version=first)
    assert second["data"] == {"k": "2"}
    with pytest.raises(client.ApiException) as refused:
        kube.apply(config_map("3"), over_version=first)
    assert refused.value.status == 409
    assert core_v1.read_namespaced_config_map("drift-precondition", namespace).data == {"k": "2"}


def test_hand_edits_of_the_serving_deployment_are_reverted_and_named(
    operator: Operator,
    custom: client.CustomObjectsApi,
    core_v1: client.CoreV1Api,
    apps_v1: client.AppsV1Api,
    namespace: str,
    kubectl: Callable[..., str],
) -> None:
    name = ready_example(custom, core_v1, namespace, kubectl)
    rendered = engine_container(apps_v1, namespace, name)

    # Four edits by three field managers, none of which touches Kiln's applied-hash annotation.
    kubectl("set", "image", "-n", namespace, f"deployment/{name}", "engine=registry.example/evil:1")
    kubectl("set", "env", "-n", namespace, f"deployment/{name}", "-c", "engine", "HOME=/root")
    container = "/spec/template/spec/containers/0"
    patch = [
        {"op": "replace", "path": f"{container}/readinessProbe/periodSeconds", "value": 60},
        {"op": "replace", "path": f"{container}/resources/limits/nvidia.com~1gpu", "value": "8"},
        {"op": "replace", "path": f"{container}/resources/requests/nvidia.com~1gpu", "value": "8"},
    ]
    kubectl("patch", "-n", namespace, f"deployment/{name}", "--type=json", f"--patch={json.dumps(patch)}")

    def reverted() -> bool:
        now = engine_container(apps_v1, namespace, name)
        return all(now[key] == rendered[key] for key in ("image", "env", "readinessProbe", "resources"))

    wait_for(reverted, timeout=60, what="the Deployment's engine container as Kiln rendered it")
    drift_events = wait_for(
        lambda: [m for r, m in reasons_and_messages(core_v1, namespace, name) if r == "DriftReverted"],
        timeout=30,
        what="DriftReverted events",
    )
    said = " ".join(drift_events)
    for field in ("containers[name=engine].image", "env[name=HOME].value", "readinessProbe.periodSeconds",
                  "resources.limits.nvidia.com/gpu"):  # fmt: skip
        assert field in said, said
    assert "kubectl-set" in said and "kubectl-patch" in said

    # Same engine key, other build settings (where and how long to build): shared, and said so.
    other = example("llama-3-70b-fp8-tp4.yaml", build={"timeoutSeconds": 3600, "retries": 0})
    other["metadata"]["name"] = "llama-3-70b-second"
    create(custom, namespace, other)
    first_engine = get(custom, namespace, "llmdeployments", name)["status"]["engine"]["name"]
    message = wait_for(
        lambda: next((m for r, m in reasons_and_messages(core_v1, namespace, "llama-3-70b-second")
                      if r == "EngineSharedWithOtherBuildSettings"), None),
        timeout=30, what="the shared-engine event",
    )  # fmt: skip
    assert first_engine in message and name in message and "llama-3-70b-second" in message
    assert "build.timeoutSeconds" in message and "build.retries" in message
    second = wait_for(
        lambda: (get(custom, namespace, "llmdeployments", other["metadata"]["name"]).get("status") or {})
        .get("engine"),
        timeout=30, what="the second deployment's engine",
    )  # fmt: skip
    assert second["name"] == first_engine


def test_a_hand_edit_taken_back_by_a_new_rendering_is_named(
    operator: Operator,
    custom: client.CustomObjectsApi,
    core_v1: client.CoreV1Api,
    apps_v1: client.AppsV1Api,
    namespace: str,
    kubectl: Callable[..., str],
) -> None:
    """A hand edit and a spec change that renders another Deployment meet in one apply (here: both
    made while the operator is down): that apply takes the edit back, so the event names it."""
    name = ready_example(custom, core_v1, namespace, kubectl)
    rendered_image = engine_container(apps_v1, namespace, name)["image"]

    operator.stop()
    kubectl("set", "image", "-n", namespace, f"deployment/{name}", "engine=registry.example/evil:1")
    spec_change = {"spec": {"serving": {"terminationGracePeriodSeconds": 120}}}
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "llmdeployments", name, spec_change)
    operator.start()

    def applied() -> bool:
        grace = apps_v1.read_namespaced_deployment(
            name, namespace
        ).spec.template.spec.termination_grace_period_seconds
        return grace == 120 and engine_container(apps_v1, namespace, name)["image"] == rendered_image

    wait_for(applied, timeout=60, what="the new rendering, with Kiln's image back")
    said = wait_for(
        lambda: " ".join(
            m for r, m in reasons_and_messages(core_v1, namespace, name) if r == "DriftReverted"
        ),
        timeout=30,
        what="a DriftReverted event",
    )
    assert "containers[name=engine].image" in said and "kubectl-set" in said, said
