"""Drift from managedFields: fields of Kiln's rendering that another manager owns, and nothing else."""

from __future__ import annotations

from typing import Any

from kiln.drift import drifted, leaf_paths, readable, resolves

MANIFEST: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "chat", "annotations": {"kiln.dev/applied-hash": "abc"}},
    "spec": {
        "replicas": 2,
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "engine",
                        "image": "kiln/engine:1",
                        "env": [{"name": "HOME", "value": "/tmp"}],
                        "ports": [{"name": "http", "containerPort": 8000}],
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                    }
                ]
            }
        },
    },
}
ENGINE = 'k:{"name":"engine"}'


def entry(manager: str, fields: dict[str, Any], operation: str = "Update", **extra: str) -> dict[str, Any]:
    return {"manager": manager, "operation": operation, "fieldsV1": fields, **extra}


def containers(fields: dict[str, Any]) -> dict[str, Any]:
    return {"f:spec": {"f:template": {"f:spec": {"f:containers": {ENGINE: {".": {}, **fields}}}}}}


def live(*entries: dict[str, Any]) -> dict[str, Any]:
    return {**MANIFEST, "metadata": {**MANIFEST["metadata"], "managedFields": list(entries)}}


def test_a_hand_edit_of_image_env_or_probe_is_drift_naming_the_fields_and_manager() -> None:
    edit = containers({
        "f:image": {},
        "f:env": {'k:{"name":"HOME"}': {".": {}, "f:value": {}}},
        "f:readinessProbe": {"f:httpGet": {"f:path": {}}},
    })  # fmt: skip
    [drift] = drifted(live(entry("kiln-operator", containers({"f:image": {}}), "Apply"),
                           entry("kubectl-edit", edit)), MANIFEST, "kiln-operator")  # fmt: skip
    assert drift.manager == "kubectl-edit"
    assert drift.fields == (
        "spec.template.spec.containers[name=engine].image",
        "spec.template.spec.containers[name=engine].env[name=HOME].value",
        "spec.template.spec.containers[name=engine].readinessProbe.httpGet.path",
    )


def test_scaling_through_the_scale_subresource_is_drift() -> None:
    scaled = entry("kubectl", {"f:spec": {"f:replicas": {}}}, subresource="scale")
    [drift] = drifted(live(scaled), MANIFEST, "kiln-operator")
    assert drift.fields == ("spec.replicas",)


def test_fields_kiln_does_not_render_and_status_writers_are_not_drift() -> None:
    restart = containers({"f:resources": {"f:limits": {"f:cpu": {}}}})
    restart["f:spec"]["f:template"]["f:metadata"] = {
        "f:annotations": {"f:kubectl.kubernetes.io/restartedAt": {}}
    }
    revision = {"f:metadata": {"f:annotations": {".": {}, "f:deployment.kubernetes.io/revision": {}}}}
    status = {"f:status": {"f:replicas": {}}, "f:spec": {"f:replicas": {}}}
    assert drifted(live(
        entry("kubectl-rollout", restart),
        entry("kube-controller-manager", revision),
        entry("kube-controller-manager", status, subresource="status"),
        entry("kiln-operator", {"f:spec": {"f:replicas": {}}}, "Apply"),
    ), MANIFEST, "kiln-operator") == []  # fmt: skip


def test_list_items_are_found_by_their_keys_with_defaults() -> None:
    port = ("f:spec", "f:template", "f:spec", "f:containers", ENGINE, "f:ports",
            'k:{"containerPort":8000,"protocol":"TCP"}', "f:containerPort")  # fmt: skip
    assert resolves(MANIFEST, port)  # protocol defaults to TCP
    other = (*port[:6], 'k:{"containerPort":9000,"protocol":"TCP"}')
    assert not resolves(MANIFEST, other) and not resolves(MANIFEST, ("f:spec", "f:paused"))
    assert (
        readable(port)
        == "spec.template.spec.containers[name=engine].ports[containerPort=8000,protocol=TCP].containerPort"
    )


def test_leaf_paths_skip_the_node_markers() -> None:
    fields = {"f:metadata": {".": {}, "f:labels": {".": {}, "f:app": {}}}, "f:spec": {"f:replicas": {}}}
    assert list(leaf_paths(fields)) == [("f:metadata", "f:labels", "f:app"), ("f:spec", "f:replicas")]
