"""LoRA adapters of a deployment as the operator keeps them against a real control plane: a ConfigMap
the serving pods mount (the engine polls the file: kiln_engine.server.lora_watch), changed in place
when spec.engine.lora changes while the serving Deployment's template stays as it was (no rollout),
put back when edited by hand, and gone with the deployment. And the chart's operator role lets the
operator write every kind it applies (ConfigMaps included), checked on the API server itself.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client

from kiln.controller.kube import KINDS
from kiln.local.testing import wait_for
from tests.integration.test_operator import (  # noqa: F401  (fixtures)
    GROUP,
    VERSION,
    Operator,
    create,
    custom,
    example,
    get,
    leftover_children,
    operator,
    phase_is,
    with_secret,
)
from tests.integration.test_router_wiring import RELEASE, RELEASE_NAMESPACE, chart_rbac  # noqa: F401

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SQL = {"name": "sql", "source": "hf://acme/sql-lora@v1"}
CHAT = {"name": "chat", "source": "s3://adapters/chat"}


def adapters_of(core_v1: client.CoreV1Api, namespace: str, name: str) -> list[dict[str, str]] | None:
    try:
        found = core_v1.read_namespaced_config_map(f"{name}-adapters", namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    listed: list[dict[str, str]] = json.loads(found.data["adapters.json"]).get("adapters", [])
    return listed


def patch_adapters(custom_api: client.CustomObjectsApi, namespace: str, name: str, lora: Any) -> None:
    custom_api.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "llmdeployments", name, {"spec": {"engine": {"lora": lora}}}
    )


def test_adapters_change_in_place_are_put_back_and_leave_with_the_deployment(
    operator: Operator,  # noqa: F811
    custom: client.CustomObjectsApi,  # noqa: F811
    core_v1: client.CoreV1Api,
    apps_v1: client.AppsV1Api,
    batch_v1: client.BatchV1Api,
    namespace: str,
) -> None:
    with_secret(core_v1, namespace)
    body = example("llama-3-70b-fp8-tp4.yaml")  # an s3:// cache: no PVC to provide
    body["spec"]["engine"].update(backend="torch", kvCacheDtype="auto", lora=[SQL])
    name = body["metadata"]["name"]
    create(custom, namespace, body)
    wait_for(lambda: phase_is(custom, namespace, "llmdeployments", name, "Ready"), 120, "Ready")
    assert adapters_of(core_v1, namespace, name) == [SQL]
    serving = apps_v1.read_namespaced_deployment(name, namespace)
    [volume] = [v for v in serving.spec.template.spec.volumes if v.config_map is not None]
    assert volume.config_map.name == f"{name}-adapters"
    owners = core_v1.read_namespaced_config_map(f"{name}-adapters", namespace).metadata.owner_references
    assert [(o.kind, o.name) for o in owners] == [("LLMDeployment", name)]

    patch_adapters(custom, namespace, name, [SQL, CHAT])
    wait_for(lambda: adapters_of(core_v1, namespace, name) == [SQL, CHAT], 30, "the new adapter listed")
    patch_adapters(custom, namespace, name, [CHAT])
    wait_for(lambda: adapters_of(core_v1, namespace, name) == [CHAT], 30, "the removed adapter unlisted")
    after = apps_v1.read_namespaced_deployment(name, namespace)
    assert after.metadata.generation == serving.metadata.generation  # the pods were not rolled
    assert get(custom, namespace, "llmdeployments", name)["status"]["phase"] == "Ready"

    core_v1.patch_namespaced_config_map(f"{name}-adapters", namespace, {"data": {"adapters.json": "{}"}})
    wait_for(lambda: adapters_of(core_v1, namespace, name) == [CHAT], 30, "the hand edit put back")

    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "llmdeployments", name)
    wait_for(lambda: adapters_of(core_v1, namespace, name) is None, 60, "the adapter list gone")
    wait_for(
        lambda: not leftover_children(custom, core_v1, apps_v1, batch_v1, namespace), 60, "every child gone"
    )


def test_the_charts_operator_role_covers_every_kind_the_operator_applies(
    chart_rbac: None,  # noqa: F811
    core_v1: client.CoreV1Api,
    namespace: str,
) -> None:
    # Asked of the API server's authorizer (a SubjectAccessReview), which needs no CRD installed.
    reviews = client.AuthorizationV1Api(core_v1.api_client)
    account = f"system:serviceaccount:{RELEASE_NAMESPACE}:{RELEASE}-operator"
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{RELEASE_NAMESPACE}", "system:authenticated"]
    missing = []
    for kind in KINDS.values():
        if kind.kind == "LLMDeployment":  # the users' objects: the operator patches, never creates
            continue
        group = kind.api_version.split("/")[0] if "/" in kind.api_version else ""
        for verb in ("get", "list", "watch", "create", "patch", "delete"):
            review = client.V1SubjectAccessReview(
                spec=client.V1SubjectAccessReviewSpec(
                    user=account,
                    groups=groups,
                    resource_attributes=client.V1ResourceAttributes(
                        group=group, resource=kind.plural, verb=verb, namespace=namespace
                    ),
                )
            )
            if not reviews.create_subject_access_review(review).status.allowed:
                missing.append(f"{verb} {kind.plural}.{group or 'core'}")
    assert missing == []
