"""Secrets and privileges in what the operator creates on a real cluster: credentials and the API key
travel only as Secret references (never in specs, status, events or the operator's log), and every pod
runs as non-root with a read-only root filesystem, no privilege escalation and no added capabilities.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest
from kubernetes import client

from kiln.labels import COMPONENT_LABEL
from kiln.local.testing import LocalCluster, wait_for
from kiln.render.common import BUILD_COMPONENT
from tests.integration.test_operator import GROUP, VERSION, Operator, create, example, phase_is
from tests.reliability.report import Report

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def pod_problems(kind: str, name: str, pod_spec: dict[str, Any]) -> list[str]:
    """How a pod spec falls short of running non-root, read-only, unprivileged."""
    problems = []
    pod_ctx = pod_spec.get("securityContext") or {}
    for container in (pod_spec.get("containers") or []) + (pod_spec.get("initContainers") or []):
        where = f"{kind}/{name} container {container['name']}"
        ctx = container.get("securityContext") or {}
        if not (ctx.get("runAsNonRoot") or pod_ctx.get("runAsNonRoot")):
            problems.append(f"{where}: runAsNonRoot not set")
        if (ctx.get("runAsUser", pod_ctx.get("runAsUser")) or 0) == 0:
            problems.append(f"{where}: runs as uid 0 or an unset uid")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: root filesystem writable")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: privilege escalation allowed")
        if ctx.get("privileged"):
            problems.append(f"{where}: privileged")
        if (ctx.get("capabilities") or {}).get("add"):
            problems.append(f"{where}: adds capabilities {ctx['capabilities']['add']}")
        if "ALL" not in ((ctx.get("capabilities") or {}).get("drop") or []):
            problems.append(f"{where}: does not drop ALL capabilities")
        for env in container.get("env") or []:
            if (
                any(word in env["name"].upper() for word in ("TOKEN", "SECRET", "KEY", "PASSWORD"))
                and "value" in env
            ):
                problems.append(f"{where}: {env['name']} given as a literal value, not a Secret reference")
    return problems


def test_operator_children_hold_secrets_by_reference_and_run_unprivileged(
    local_cluster: LocalCluster,
    operator: Operator,
    custom: client.CustomObjectsApi,
    core_v1: client.CoreV1Api,
    apps_v1: client.AppsV1Api,
    batch_v1: client.BatchV1Api,
    namespace: str,
    reliability_report: Report,
) -> None:
    hf_token, api_key = f"hf_{secrets.token_hex(16)}", f"key_{secrets.token_hex(16)}"
    core_v1.create_namespaced_secret(
        namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="hf-token"), string_data={"HF_TOKEN": hf_token}),
    )
    core_v1.create_namespaced_secret(
        namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="api-key"), string_data={"api-key": api_key}),
    )
    body = example(
        "llama-3-70b-fp8-tp4.yaml", serving={"apiKeySecret": {"name": "api-key", "key": "api-key"}}
    )
    name = body["metadata"]["name"]
    create(custom, namespace, body)
    wait_for(lambda: phase_is(custom, namespace, "llmdeployments", name, "Ready"), 120, "Ready")

    api = client.ApiClient()
    serialize = api.sanitize_for_serialization
    jobs = [serialize(j) for j in batch_v1.list_namespaced_job(namespace).items]
    workloads = [serialize(d) for d in apps_v1.list_namespaced_deployment(namespace).items]
    pods = [serialize(p) for p in core_v1.list_namespaced_pod(namespace).items]
    places: dict[str, str] = {
        "LLMDeployment": json.dumps(
            custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "llmdeployments")
        ),
        "LLMEngine": json.dumps(
            custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "llmengines")
        ),
        "events": json.dumps([serialize(e) for e in core_v1.list_namespaced_event(namespace).items]),
        "Jobs": json.dumps(jobs),
        "Deployments": json.dumps(workloads),
        "Pods": json.dumps(pods),
        "ConfigMaps": json.dumps([serialize(c) for c in core_v1.list_namespaced_config_map(namespace).items]),
        "operator log": operator.log_path.read_text(errors="replace"),
    }
    leaks = [
        f"{secret} in {place}"
        for place, text in places.items()
        for secret in (hf_token, api_key)
        if secret in text
    ]

    problems: list[str] = []
    for job in jobs:
        problems += pod_problems("Job", job["metadata"]["name"], job["spec"]["template"]["spec"])
    for workload in workloads:
        problems += pod_problems(
            "Deployment", workload["metadata"]["name"], workload["spec"]["template"]["spec"]
        )
    for pod in pods:
        problems += pod_problems("Pod", pod["metadata"]["name"], pod["spec"])
    # The credentials do reach the containers, by reference.
    # The build Job (a multi-rank engine also gets a capacity Job once Ready: it holds no credentials).
    (build,) = [job for job in jobs if job["metadata"]["labels"].get(COMPONENT_LABEL) == BUILD_COMPONENT]
    build_container = build["spec"]["template"]["spec"]["containers"][0]
    build_env = json.dumps([build_container.get("env", []), build_container.get("envFrom", [])])
    serve_env = json.dumps(workloads[0]["spec"]["template"]["spec"]["containers"][0].get("env", []))
    # credentialsSecret without a key: every key of the Secret becomes a variable (envFrom)
    if '"secretRef": {"name": "hf-token"}' not in build_env:
        problems.append(f"the build Job does not get HF_TOKEN from the Secret: {build_env}")
    if '"name": "api-key"' not in serve_env:
        problems.append(f"the serving pods do not get the API key from its Secret: {serve_env}")
    reliability_report.record(
        "security: operator-created Jobs, Deployments, pods; status, events, operator log",
        len(jobs) + len(workloads) + len(pods) + len(places),
        len(leaks) + len(problems),
        "secrets only as references; non-root, read-only root fs, no escalation, caps dropped"
        if not leaks and not problems
        else f"LEAKS {leaks}; PROBLEMS {problems}",
    )
    assert not leaks, leaks
    assert not problems, problems
