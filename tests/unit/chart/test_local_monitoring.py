"""The local cluster's Prometheus (kiln.local.monitoring) against the chart: the Prometheus object
selects every monitor and rule the chart renders, in the release's namespace; and the pure parts
that adapt upstream's operator manifests and package Debian's Prometheus."""

from __future__ import annotations

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


def test_shared_libraries_and_version_read_what_ldd_and_prometheus_print() -> None:
    ldd = (
        "\tlinux-vdso.so.1 (0x00007ffc)\n"
        "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f53)\n"
        "\t/lib64/ld-linux-x86-64.so.2 (0x00007f53)\n"
    )
    assert [str(p) for p in monitoring.shared_libraries(ldd)] == [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
    ]
    debian = "prometheus, version 2.42.0+ds (branch: debian/sid, revision: 2.42.0+ds-5+deb12u1)"
    assert monitoring.prometheus_version(debian) == "v2.42.0"
    with pytest.raises(monitoring.MonitoringError, match="version"):
        monitoring.prometheus_version("not prometheus")
