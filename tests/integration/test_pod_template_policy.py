"""serving.podTemplate against the real API server: host access, privileged containers and other
identities are refused with a message naming the field (by the CRD's schema, and by the chart's
ValidatingAdmissionPolicy where the schema is bypassed); a legitimate template is accepted and ends
up in the serving pods."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from kiln.api.v1alpha1 import (
    DENIED_CONTAINER_FIELDS,
    DENIED_POD_FIELDS,
    DENIED_VOLUME_FIELDS,
    GROUP,
    VERSION,
    LLMDeployment,
)
from kiln.local.testing import LocalCluster, wait_for
from kiln.render import serving as render_serving
from kiln.render.common import Settings
from tests.unit.render.render_helpers import ready

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "chart"))
from kiln_chart import CHART, Helm, find_helm

pytestmark = pytest.mark.cluster

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-cpu.yaml"
PLURAL = "llmdeployments"
CRD_NAME = f"{PLURAL}.{GROUP}"
POLICY_TEMPLATE = "templates/admission/podtemplate-policy.yaml"

UNSAFE = {
    "privileged container": (
        {"spec": {"containers": [{"name": "engine", "securityContext": {"privileged": True}}]}},
        "securityContext",
    ),
    "hostPath volume": ({"spec": {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}}, "hostPath"),
    "host network": ({"spec": {"hostNetwork": True}}, "hostNetwork"),
    "host PID": ({"spec": {"hostPID": True}}, "hostPID"),
    "another service account": ({"spec": {"serviceAccountName": "admin"}}, "serviceAccountName"),
}
LEGITIMATE = {
    "metadata": {"labels": {"team": "search"}, "annotations": {"example.com/owner": "search"}},
    "spec": {
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
        "volumes": [{"name": "prompts", "configMap": {"name": "prompts"}}],
        "containers": [
            {
                "name": "engine",
                "env": [{"name": "EXTRA_FLAG", "value": "1"}],
                "resources": {"requests": {"cpu": "3", "memory": "5Gi"}},
                "volumeMounts": [{"name": "prompts", "mountPath": "/prompts", "readOnly": True}],
            }
        ],
    },
}


def body(name: str, pod_template: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    data["metadata"] = {"name": name}
    data["spec"].setdefault("serving", {})["podTemplate"] = pod_template
    return data


@pytest.fixture
def custom(local_cluster: LocalCluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(local_cluster.api_client)


def refusal(custom: client.CustomObjectsApi, namespace: str, obj: dict[str, Any]) -> str | None:
    """The API server's message when it refuses to create `obj`; None when it accepts it."""
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj)
    except ApiException as error:
        assert error.status in (400, 403, 422), error.body
        return str(error.body)
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj["metadata"]["name"])
    return None


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_the_schema_refuses_an_unsafe_pod_template_naming_the_field(
    custom: client.CustomObjectsApi, namespace: str, case: str
) -> None:
    template, field = UNSAFE[case]
    message = refusal(custom, namespace, body("unsafe", template))
    assert message is not None, f"{case} was accepted"
    assert f"may not set {field}" in message, message


def test_a_volume_kind_outside_the_allow_list_is_refused_not_pruned(
    custom: client.CustomObjectsApi, namespace: str
) -> None:
    """The API server prunes unknown fields (with a mere warning by default): a pruned `nfs` would
    leave a bare volume, which Kubernetes turns into an emptyDir. The schema refuses it instead."""
    template = {"spec": {"volumes": [{"name": "share", "nfs": {"server": "10.0.0.1", "path": "/"}}]}}
    message = refusal(custom, namespace, body("nfs", template))
    assert message is not None and "must set exactly one of" in message, message


def test_a_legitimate_pod_template_is_kept_and_reaches_the_serving_pods(
    local_cluster: LocalCluster, custom: client.CustomObjectsApi, namespace: str
) -> None:
    created = custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body("legit", copy.deepcopy(LEGITIMATE))
    )
    assert created["spec"]["serving"]["podTemplate"] == LEGITIMATE  # nothing pruned
    deployment = LLMDeployment.model_validate(created)
    inputs = render_serving.ServingInputs(deployment, ready(deployment), None, Settings())
    workload = render_serving.workload(inputs)
    assert workload["kind"] == "Deployment"
    apps = client.AppsV1Api(local_cluster.api_client)
    apps.create_namespaced_deployment(namespace, workload)
    core = client.CoreV1Api(local_cluster.api_client)
    selector = ",".join(f"{k}={v}" for k, v in workload["spec"]["selector"]["matchLabels"].items())
    pod = wait_for(
        lambda: next(iter(core.list_namespaced_pod(namespace, label_selector=selector).items), None),
        60,
        "a serving pod from the kube-controller-manager",
    )
    spec = pod.spec
    assert any(t.key == "dedicated" and t.value == "llm" for t in spec.tolerations or [])
    assert pod.metadata.labels["team"] == "search"
    assert pod.metadata.annotations["example.com/owner"] == "search"
    [engine] = [c for c in spec.containers if c.name == "engine"]
    assert {"EXTRA_FLAG": "1"}.items() <= {e.name: e.value for e in engine.env}.items()
    assert engine.resources.requests == {"cpu": "3", "memory": "5Gi"}
    assert any(m.mount_path == "/prompts" and m.read_only for m in engine.volume_mounts)
    assert any(v.name == "prompts" and v.config_map.name == "prompts" for v in spec.volumes)
    assert engine.args and engine.args[0] == "serve"  # merged into Kiln's container, not replacing it
    assert not spec.host_network and spec.automount_service_account_token is False


# ------------------------------------------------------------- the chart's ValidatingAdmissionPolicy


def kubectl(local_cluster: LocalCluster, *args: str, stdin: str | None = None) -> str:
    from kiln.local import build

    done = subprocess.run(
        [str(build.bin_dir() / "kubectl"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        # HOME too: without one kubectl writes its discovery cache to ./.kube of the checkout
        env={
            "KUBECONFIG": str(local_cluster.kubeconfig),
            "PATH": "/usr/bin:/bin",
            "HOME": str(local_cluster.kubeconfig.parent),
        },
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def policy(local_cluster: LocalCluster) -> Iterator[list[dict[str, Any]]]:
    """The chart's policy and binding, installed from `helm template` and removed afterwards."""
    path, reason = find_helm()
    if path is None:
        pytest.skip(reason)
    # `helm template` assumes an old Kubernetes unless told; the chart requires 1.30 or later.
    version = client.VersionApi(local_cluster.api_client).get_code().git_version
    rendered = (
        Helm(path)
        .run("template", "kiln", str(CHART), "--kube-version", version, "--show-only", POLICY_TEMPLATE)
        .stdout
    )
    kubectl(local_cluster, "apply", "-f", "-", stdin=rendered)
    yield [doc for doc in yaml.safe_load_all(rendered) if doc]
    kubectl(local_cluster, "delete", "--ignore-not-found", "-f", "-", stdin=rendered)


@pytest.fixture
def schema_bypassed(local_cluster: LocalCluster) -> Iterator[None]:
    """The LLMDeployment CRD with a free-form podTemplate (an old or edited CRD), restored afterwards."""
    crds = client.ApiextensionsV1Api(local_cluster.api_client)
    original = crds.read_custom_resource_definition(CRD_NAME)
    loose = crds.read_custom_resource_definition(CRD_NAME)
    for version in loose.spec.versions:
        serving = version.schema.open_apiv3_schema.properties["spec"].properties["serving"]
        serving.properties["podTemplate"] = client.V1JSONSchemaProps(
            type="object", x_kubernetes_preserve_unknown_fields=True
        )
    crds.replace_custom_resource_definition(CRD_NAME, loose)
    yield
    current = crds.read_custom_resource_definition(CRD_NAME)
    current.spec.versions = original.spec.versions
    crds.replace_custom_resource_definition(CRD_NAME, current)


def test_the_policy_denies_every_field_the_api_denies(policy: list[dict[str, Any]]) -> None:
    [vap] = [doc for doc in policy if doc["kind"] == "ValidatingAdmissionPolicy"]
    messages = " ".join(v["message"] for v in vap["spec"]["validations"])
    for prefix, fields in (
        ("spec.serving.podTemplate.spec.", DENIED_POD_FIELDS),
        ("spec.serving.podTemplate.spec.containers[].", DENIED_CONTAINER_FIELDS),
        ("spec.serving.podTemplate.spec.volumes[].", DENIED_VOLUME_FIELDS),
    ):
        for field in fields:
            assert f"{prefix}{field} is not allowed" in messages


def test_the_policy_refuses_unsafe_templates_where_the_schema_is_bypassed(
    policy: list[dict[str, Any]], schema_bypassed: None, custom: client.CustomObjectsApi, namespace: str
) -> None:
    def refused_by_policy(obj: dict[str, Any]) -> str | None:
        message = refusal(custom, namespace, obj)
        return message if message and "ValidatingAdmissionPolicy" in message else None

    # The policy and the loosened schema take a moment to reach the API server's caches.
    for case, (template, field) in sorted(UNSAFE.items()):
        message = wait_for(lambda t=template: refused_by_policy(body("unsafe", t)), 30, f"{case} refused")
        assert field in message and "is not allowed" in message, message
    assert refusal(custom, namespace, body("legit", copy.deepcopy(LEGITIMATE))) is None
