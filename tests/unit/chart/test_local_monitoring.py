"""The local cluster's Prometheus (kiln.local.monitoring) against the chart: the Prometheus object
selects every monitor and rule the chart renders, in the release's namespace; and the pure parts
that adapt upstream's operator manifests and build Prometheus from its Go module."""

from __future__ import annotations

import re
from typing import Any

import pytest
from kiln_chart import Helm
from test_selector_contract import MONITORING_API, matches

from kiln.local import monitoring, realnode

SELECTORS = {
    "PodMonitor": ("podMonitorSelector", "podMonitorNamespaceSelector"),
    "ServiceMonitor": ("serviceMonitorSelector", "serviceMonitorNamespaceSelector"),
    "PrometheusRule": ("ruleSelector", "ruleNamespaceSelector"),
}
ACCOUNT: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "ServiceAccount",
    "metadata": {"name": "prometheus", "namespace": "default"},
}
BINDING: dict[str, Any] = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "ClusterRoleBinding",
    "metadata": {"name": "prometheus"},
    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "prometheus"},
    "subjects": [{"kind": "ServiceAccount", "name": "prometheus", "namespace": "default"}],
}


def local_prometheus() -> dict[str, Any]:
    (prometheus,) = [
        m
        for m in monitoring.prometheus_manifests([ACCOUNT, BINDING], "localhost/p:v2.42.0", "v2.42.0")
        if m["kind"] == "Prometheus"
    ]
    return prometheus


@pytest.mark.parametrize("release_namespace", ["kiln-system", "team-a"])
def test_local_prometheus_selects_every_monitor_and_rule_the_chart_renders(
    helm: Helm, release_namespace: str
) -> None:
    objects = helm.render(api_versions=[MONITORING_API], namespace=release_namespace)
    monitors = [o for o in objects if o["kind"] in SELECTORS]
    assert {o["kind"] for o in monitors} == set(SELECTORS)
    spec = local_prometheus()["spec"]
    for monitor in monitors:
        selector, namespace_selector = SELECTORS[monitor["kind"]]
        assert matches(spec[selector], monitor["metadata"].get("labels") or {}), monitor["metadata"]["name"]
        namespace_labels = {"kubernetes.io/metadata.name": release_namespace}
        assert matches(spec[namespace_selector], namespace_labels)


def test_local_prometheus_runs_the_given_image_on_the_real_node_with_upstreams_account() -> None:
    manifests = monitoring.prometheus_manifests([ACCOUNT, BINDING], "localhost/p:v2.42.0", "v2.42.0")
    assert all(
        m["metadata"].get("namespace", monitoring.NAMESPACE) == monitoring.NAMESPACE for m in manifests
    )
    (binding,) = [m for m in manifests if m["kind"] == "ClusterRoleBinding"]
    assert binding["subjects"][0]["namespace"] == monitoring.NAMESPACE
    spec = local_prometheus()["spec"]
    assert spec["serviceAccountName"] == ACCOUNT["metadata"]["name"]
    assert (spec["image"], spec["version"]) == ("localhost/p:v2.42.0", "v2.42.0")
    assert spec["nodeSelector"] == {realnode.NODE_LABEL: "true"}
    assert BINDING["subjects"][0]["namespace"] == "default"  # upstream's documents are not changed


def test_operator_manifests_move_upstreams_objects_to_the_local_images_and_node() -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "prometheus-operator", "namespace": "default"},
        "spec": {
            "template": {
                "spec": {
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "containers": [
                        {
                            "name": "prometheus-operator",
                            "image": "quay.io/x",
                            "args": ["--kubelet-service=a/b"],
                        }
                    ],
                }
            }
        },
    }
    monitor = {
        "apiVersion": MONITORING_API,
        "kind": "ServiceMonitor",
        "metadata": {"name": "m", "namespace": "default"},
    }
    objects = monitoring.operator_manifests(
        [BINDING, deployment, monitor], "localhost/op:v1", "localhost/rl:v1"
    )
    assert [o["kind"] for o in objects] == ["ClusterRoleBinding", "Deployment"]
    pod = objects[1]["spec"]["template"]["spec"]
    assert objects[1]["metadata"]["namespace"] == monitoring.NAMESPACE
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", realnode.NODE_LABEL: "true"}
    (container,) = pod["containers"]
    assert container["image"] == "localhost/op:v1"
    assert container["args"] == ["--prometheus-config-reloader=localhost/rl:v1"]


@pytest.mark.parametrize(
    ("module_version", "release"),
    [("v0.305.0", "v3.5.0"), ("v0.310.2", "v3.10.2"), ("v0.54.1", "v2.54.1"), ("v0.300.0", "v3.0.0")],
)
def test_prometheus_release_follows_upstreams_go_module_tags(module_version: str, release: str) -> None:
    assert monitoring.prometheus_release(module_version) == release


@pytest.mark.parametrize("version", ["v3.5.0", "v0.305", "0.305.0", "v0.305.0-rc.0"])
def test_prometheus_release_refuses_what_is_no_module_tag(version: str) -> None:
    with pytest.raises(monitoring.MonitoringError, match="Prometheus module version"):
        monitoring.prometheus_release(version)


def test_plugins_source_links_the_kubernetes_sd_the_operator_configures() -> None:
    # Every scrape job the operator writes for a PodMonitor or ServiceMonitor uses
    # kubernetes_sd_configs: a Prometheus built without that plugin rejects its whole configuration
    # (Debian's 2.42 did, and the chart's monitors never reached it).
    source = monitoring.plugins_source(monitoring.PROMETHEUS_PLUGINS)
    imported = re.findall(r'^\s*_ "([^"]+)"', source, re.MULTILINE)
    assert f"{monitoring.PROMETHEUS_MODULE}/discovery/kubernetes" in imported
    assert re.search(r"^package plugins$", source, re.MULTILINE)
    with pytest.raises(monitoring.MonitoringError, match="at least one"):
        monitoring.plugins_source(())
