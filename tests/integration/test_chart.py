"""The Helm chart against the real local control plane: its manifests pass the API server's
server-side dry-run (the Kubernetes schemas, CEL and admission), it installs and brings the
operator, autoscaler and topology agent up on KWOK nodes, and the topology agent's permissions
hold when exercised with a real pod-bound ServiceAccount token."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from kiln.local.testing import LocalCluster, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "chart"))
from kiln_chart import (
    AUTOSCALER_VERBS,
    CHART,
    FULL_VALUES,
    OPERATOR_VERBS,
    TOPOLOGY_AGENT_VERBS,
    Helm,
    find_helm,
    kubernetes_version,
)

pytestmark = pytest.mark.cluster

# The Prometheus Operator's own CRDs, from its Go module (fetched through the Go module proxy).
PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
MONITORING_CRDS = ("podmonitors", "servicemonitors", "prometheusrules")
GPU_NODE_LABEL = "nvidia.com/gpu.present"


def run(args: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=300, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args[:4])} ... failed:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def helm(local_cluster: LocalCluster) -> Helm:
    path, reason = find_helm()
    if path is None:
        pytest.skip(reason)
    return Helm(path)


@pytest.fixture(scope="module")
def kubectl(local_cluster: LocalCluster) -> str:
    """The local toolchain's kubectl (same version as the API server), else the one on PATH."""
    from kiln.local import build

    built = build.bin_dir() / "kubectl"
    if built.is_file():
        return str(built)
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is neither built by `kiln local build` nor on PATH")
    return path


@pytest.fixture(scope="module")
def monitoring_crds(local_cluster: LocalCluster, kubectl: str) -> Iterator[None]:
    """PodMonitor, ServiceMonitor and PrometheusRule CRDs as the Prometheus Operator ships them."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("go is not on PATH: it fetches the Prometheus Operator's CRDs")
    found = run([go, "mod", "download", "-json", PROMETHEUS_OPERATOR], check=False)
    if found.returncode != 0:
        pytest.skip(f"cannot fetch {PROMETHEUS_OPERATOR}: {found.stderr.strip()}")
    crd_dir = Path(json.loads(found.stdout)["Dir"]) / "example" / "prometheus-operator-crd"
    files = [crd_dir / f"monitoring.coreos.com_{name}.yaml" for name in MONITORING_CRDS]
    for path in files:
        run([kubectl, "apply", "--server-side", "--field-manager=kiln-chart-test", "-f", str(path)])
    names = [f"{name}.monitoring.coreos.com" for name in MONITORING_CRDS]
    run([kubectl, "wait", "--for=condition=Established", "--timeout=60s", *[f"crd/{n}" for n in names]])
    yield
    run([kubectl, "delete", "--ignore-not-found", "--wait=false", *[f"crd/{n}" for n in names]], check=False)


@pytest.fixture
def namespaces(core_v1: client.CoreV1Api) -> Iterator[dict[str, str]]:
    """A fresh release namespace plus the namespaces ci/full-values.yaml names, removed afterwards."""
    suffix = uuid.uuid4().hex[:6]
    names = {"release": f"kiln-chart-{suffix}"}
    full = yaml.safe_load(FULL_VALUES.read_text())
    for extra in [*full["watchNamespaces"], full["monitoring"]["dashboard"]["namespace"]]:
        names[extra] = f"{extra}-{suffix}"
    for name in names.values():
        core_v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield names
    for name in names.values():
        core_v1.delete_namespace(name)


@pytest.fixture
def nvidia_runtime_class(local_cluster: LocalCluster) -> Iterator[None]:
    """The `nvidia` RuntimeClass the NVIDIA GPU Operator installs; pods naming a missing one are refused."""
    node_v1 = client.NodeV1Api(local_cluster.api_client)
    created = False
    try:
        node_v1.create_runtime_class(
            client.V1RuntimeClass(metadata=client.V1ObjectMeta(name="nvidia"), handler="nvidia")
        )
        created = True
    except ApiException as error:
        if error.status != 409:
            raise
    yield
    if created:
        node_v1.delete_runtime_class("nvidia")


def full_values_args(names: dict[str, str]) -> list[str]:
    """ci/full-values.yaml, with its namespaces renamed to this test's."""
    full = yaml.safe_load(FULL_VALUES.read_text())
    watched = ",".join(names[n] for n in full["watchNamespaces"])
    dashboard = names[full["monitoring"]["dashboard"]["namespace"]]
    return [
        "--values", str(FULL_VALUES),
        "--set", f"watchNamespaces={{{watched}}}",
        "--set", f"monitoring.engines.namespaces={{{names[full['monitoring']['engines']['namespaces'][0]]}}}",
        "--set", f"monitoring.dashboard.namespace={dashboard}",
    ]  # fmt: skip


@pytest.mark.parametrize("values", ["default", "full"])
def test_rendered_manifests_pass_server_side_dry_run(
    helm: Helm, kubectl: str, monitoring_crds: None, namespaces: dict[str, str], values: str
) -> None:
    release_namespace = namespaces["release"]
    version = ["--kube-version", kubernetes_version()]  # helm template assumes 1.20 unless told
    extra = (
        full_values_args(namespaces)
        if values == "full"
        else ["--set", "monitoring.prometheusOperator=enabled"]
    )
    rendered = helm.run(
        "template", "kiln", str(CHART), "--namespace", release_namespace, *version, *extra
    ).stdout
    kinds = {doc["kind"] for doc in yaml.safe_load_all(rendered) if doc}
    assert {"Deployment", "DaemonSet", "PodMonitor", "ServiceMonitor", "PrometheusRule"} <= kinds
    done = run([kubectl, "apply", "--dry-run=server", "-f", "-"], rendered, False)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr


def test_dry_run_rejects_what_the_schemas_reject(
    kubectl: str, monitoring_crds: None, namespaces: dict[str, str]
) -> None:
    """The check above can fail: the same dry-run refuses a PodMonitor the CRD's schema does not allow."""
    broken = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": "broken", "namespace": namespaces["release"]},
        "spec": {"selector": {}, "podMetricsEndpoints": [{"port": "http", "interval": "thirty seconds"}]},
    }
    done = run([kubectl, "apply", "--dry-run=server", "-f", "-"], yaml.safe_dump(broken), False)
    assert done.returncode != 0
    assert "interval" in done.stderr


def gpu_nodes(core_v1: client.CoreV1Api) -> set[str]:
    return {n.metadata.name for n in core_v1.list_node(label_selector=f"{GPU_NODE_LABEL}=true").items}


def test_install_brings_up_kiln(
    helm: Helm,
    core_v1: client.CoreV1Api,
    apps_v1: client.AppsV1Api,
    local_cluster: LocalCluster,
    kubectl: str,
    monitoring_crds: None,
    namespaces: dict[str, str],
    nvidia_runtime_class: None,
) -> None:
    namespace = namespaces["release"]
    release = f"kiln-{namespace.rsplit('-', 1)[1]}"
    # KWOK fakes these pods: the local control plane has no node that runs them.
    on_kwok = ["--set", "operator.nodeSelector.type=kwok", "--set", "autoscaler.nodeSelector.type=kwok"]
    installed = helm.run(
        "install", release, str(CHART), "--namespace", namespace, *on_kwok, "--wait", "--timeout", "180s"
    )
    try:
        notes = installed.stdout  # NOTES.txt: what to apply next, and that monitoring was found
        assert "kubectl apply" in notes and "wait llmdeployment/qwen --for=condition=Ready" in notes, notes
        assert "PodMonitor, ServiceMonitor and PrometheusRule are installed" in notes, notes
        operator = apps_v1.read_namespaced_deployment(f"{release}-operator", namespace)
        assert operator.status.ready_replicas == 2
        autoscaler = apps_v1.read_namespaced_deployment(f"{release}-autoscaler", namespace)
        assert autoscaler.status.ready_replicas == 1
        pods = core_v1.list_namespaced_pod(
            namespace, label_selector=f"app.kubernetes.io/instance={release}"
        ).items
        assert pods and all(p.status.phase == "Running" for p in pods), [
            (p.metadata.name, p.status.phase) for p in pods
        ]

        # The topology agent runs on every GPU node and on nothing else.
        def agent_everywhere() -> bool:
            daemonset = apps_v1.read_namespaced_daemon_set(f"{release}-topology-agent", namespace)
            return daemonset.status.desired_number_scheduled == len(gpu_nodes(core_v1))

        wait_for(agent_everywhere, timeout=60, what="a topology agent on every GPU node")
        agents = core_v1.list_namespaced_pod(
            namespace, label_selector="app.kubernetes.io/component=topology-agent"
        )
        assert {p.spec.node_name for p in agents.items} <= gpu_nodes(core_v1)

        # Prometheus Operator objects appear because the cluster serves monitoring.coreos.com/v1.
        custom = client.CustomObjectsApi(local_cluster.api_client)
        for plural in MONITORING_CRDS:
            found = custom.list_namespaced_custom_object("monitoring.coreos.com", "v1", namespace, plural)
            assert found["items"], plural

        for component, allowed in (
            ("operator", OPERATOR_VERBS),
            ("autoscaler", AUTOSCALER_VERBS),
            ("topology-agent", TOPOLOGY_AGENT_VERBS),
        ):
            account = f"system:serviceaccount:{namespace}:{release}-{component}"
            assert can_i_list(kubectl, account, namespace) == allowed, component
        check_topology_agent_permissions(local_cluster, core_v1, namespace, release)
    finally:
        helm.run("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s", check=False)


# What every authenticated identity may do (self reviews, discovery); not the chart's doing.
EVERYONE = {"selfsubjectaccessreviews", "selfsubjectrulesreviews", "selfsubjectreviews"}


def can_i_list(kubectl: str, account: str, namespace: str) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs the API server grants `account` in `namespace`, as
    `kubectl auth can-i --list` reports them (cluster-wide grants included)."""
    out = run([kubectl, "auth", "can-i", "--list", f"--as={account}", f"--namespace={namespace}"]).stdout
    granted: dict[tuple[str, str], set[str]] = {}
    for line in out.splitlines()[1:]:
        match = re.match(r"^(\S+)\s+\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]$", line.strip())
        if not match or match.group(2):  # non-resource URLs (/healthz, /api, ...)
            continue
        resource, _, names, verbs = match.groups()
        name, _, subresource = resource.partition("/")
        plural, _, group = name.partition(".")
        if plural in EVERYONE:
            continue
        key = (group, f"{plural}/{subresource}" if subresource else plural)
        # Only the operator's bind on the router ClusterRole is granted by name (the unit contract
        # test checks which name).
        assert not names or key == ("rbac.authorization.k8s.io", "clusterroles"), f"{account}: {line}"
        granted.setdefault(key, set()).update(verbs.split())
    return granted


def agent_client(
    local_cluster: LocalCluster, core_v1: client.CoreV1Api, namespace: str, release: str, pod: Any
) -> Any:
    """A CoreV1Api that authenticates as the topology agent's pod (a token bound to that pod)."""
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(
            audiences=[],
            expiration_seconds=600,
            bound_object_ref=client.V1BoundObjectReference(
                api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid
            ),
        )
    )
    token = core_v1.create_namespaced_service_account_token(f"{release}-topology-agent", namespace, request)
    configuration = client.Configuration()
    admin = local_cluster.api_client.configuration
    configuration.host = admin.host
    configuration.ssl_ca_cert = admin.ssl_ca_cert
    configuration.api_key = {"authorization": f"Bearer {token.status.token}"}
    return client.CoreV1Api(client.ApiClient(configuration))


def forbidden(call: Any) -> str:
    with pytest.raises(ApiException) as raised:
        call()
    assert raised.value.status in (403, 422), raised.value
    return str(raised.value.body)


def check_topology_agent_permissions(
    local_cluster: LocalCluster, core_v1: client.CoreV1Api, namespace: str, release: str
) -> None:
    agents = core_v1.list_namespaced_pod(
        namespace, label_selector="app.kubernetes.io/component=topology-agent"
    )
    pod = agents.items[0]
    own, other = pod.spec.node_name, sorted(gpu_nodes(core_v1) - {pod.spec.node_name})[0]
    agent = agent_client(local_cluster, core_v1, namespace, release, pod)
    probe = {"metadata": {"annotations": {"kiln.dev/chart-test": namespace}}}

    agent.patch_node(own, probe)  # its own node, a kiln.dev/ key: allowed
    agent.patch_node(own, {"metadata": {"annotations": {"kiln.dev/chart-test": None}}})

    # The policy reaches the admission plugin a moment after install: wait until a harmless patch
    # (an annotation on another node) is refused, undoing it should it land before that.
    def refused_on_other_node() -> ApiException | None:
        try:
            agent.patch_node(other, probe)
        except ApiException as error:
            return error
        core_v1.patch_node(other, {"metadata": {"annotations": {"kiln.dev/chart-test": None}}})
        return None

    error = wait_for(refused_on_other_node, timeout=30, what="the admission policy to refuse another node")
    assert error.status == 403 and "only change the node its pod runs on" in str(error.body), error

    def denied(patch: dict[str, Any], because: str) -> None:
        body = forbidden(lambda: agent.patch_node(own, patch))
        assert because in body, body

    denied({"metadata": {"labels": {"team": "x"}}}, "kiln.dev/ labels")
    denied({"metadata": {"labels": {"nvidia.com/gpu.product": "NVIDIA-Fake"}}}, "kiln.dev/ labels")
    denied({"spec": {"unschedulable": True}}, "may not change a node's spec")
    assert "forbidden" in forbidden(lambda: agent.list_namespaced_secret(namespace)).lower()
    assert "forbidden" in forbidden(lambda: agent.list_node()).lower()


def test_invalid_values_are_rejected_before_anything_is_applied(
    helm: Helm, core_v1: client.CoreV1Api, namespaces: dict[str, str]
) -> None:
    namespace = namespaces["release"]
    done = helm.run(
        "install",
        "kiln-bad",
        str(CHART),
        "--namespace",
        namespace,
        "--set",
        "operator.replicas=two",
        check=False,
    )
    assert done.returncode != 0
    assert "/operator/replicas" in done.stderr or "operator.replicas" in done.stderr, done.stderr
    assert not core_v1.list_namespaced_service_account(
        namespace, field_selector="metadata.name=kiln-bad-operator"
    ).items
    listed = helm.run("list", "--namespace", namespace, "--all", "--short").stdout
    assert "kiln-bad" not in listed
