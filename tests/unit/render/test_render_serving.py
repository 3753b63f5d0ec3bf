"""Serving workloads: Deployment for single-node replicas, LeaderWorkerSet when a replica spans nodes."""

from __future__ import annotations

from typing import Any

import pytest
from render_helpers import example, nodes, ready

from kiln import labels
from kiln.api.v1alpha1 import LLMDeployment
from kiln.placement import ReplicaShape, plan
from kiln.render import service as render_service
from kiln.render import serving as render_serving
from kiln.render.common import Settings


def inputs(deployment: LLMDeployment, settings: Settings | None = None) -> render_serving.ServingInputs:
    placement = None
    if deployment.spec.gpu is not None:
        placement = plan(ReplicaShape.from_spec(deployment.spec), nodes(), deployment.spec.gpu.nvlink)
    return render_serving.ServingInputs(deployment, ready(deployment), placement, settings or Settings())


def engine_container(workload: dict[str, Any]) -> dict[str, Any]:
    [container] = workload["spec"]["template"]["spec"]["containers"]
    return container


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_single_node_gpu_replica_is_a_deployment_with_placement_gpus_and_probes() -> None:
    deployment = example("llama-3-70b-fp8-tp4.yaml")
    rendered = inputs(deployment)
    workload = render_serving.workload(rendered)
    assert workload["kind"] == "Deployment" and workload["metadata"]["name"] == "llama-3-70b"
    assert workload["metadata"]["ownerReferences"][0]["uid"] == "uid-llama-3-70b"
    spec = workload["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert spec["selector"]["matchLabels"] == render_serving.selector_labels("llama-3-70b")
    pod = spec["template"]["spec"]
    assert pod["affinity"] == rendered.placement.affinity  # type: ignore[union-attr]
    assert pod["terminationGracePeriodSeconds"] == 300
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    container = engine_container(workload)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    args = container["args"]
    assert container["command"] == ["kiln-engine"] and args[0] == "serve"
    assert arg(args, "--host") == "$(POD_IP)"
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in container["env"]
    assert arg(args, "--artifact") == f"s3://kiln-engines/prod/{rendered.engine.metadata.name}"
    assert arg(args, "--drain-timeout") == "295"
    assert spec["template"]["metadata"]["labels"][labels.ENGINE_LABEL] == rendered.engine.metadata.name


def test_pvc_artifact_is_mounted_read_only() -> None:
    deployment = example("tiny-cpu.yaml")
    workload = render_serving.workload(inputs(deployment))
    pod = workload["spec"]["template"]["spec"]
    [claim] = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claim["persistentVolumeClaim"] == {"claimName": "kiln-engine-cache", "readOnly": True}
    mount = next(m for m in engine_container(workload)["volumeMounts"] if m["name"] == claim["name"])
    assert mount == {"name": claim["name"], "mountPath": "/mnt/pvc/kiln-engine-cache", "readOnly": True}
    engine_name = ready(deployment).metadata.name
    assert (
        arg(engine_container(workload)["args"], "--artifact") == f"/mnt/pvc/kiln-engine-cache/{engine_name}"
    )
    assert arg(engine_container(workload)["args"], "--device") == "cpu"
    assert "resources" not in engine_container(workload)  # no GPU for a CPU deployment
    assert pod["nodeSelector"] == deployment.spec.serving.node_selector  # the example's, as given
    assert "tolerations" not in pod


def test_serving_pods_are_restricted() -> None:
    workload = render_serving.workload(inputs(example("llama-3-8b-fp8-h100.yaml")))
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = engine_container(workload)["securityContext"]
    assert security == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def test_user_env_resources_selectors_tolerations_and_template_overrides_merge() -> None:
    deployment = example(
        "llama-3-8b-fp8-h100.yaml",
        serving={
            "env": [{"name": "HOME", "value": "/home/me"}, {"name": "EXTRA", "value": "1"}],
            "resources": {"requests": {"cpu": "4", "memory": "32Gi"}, "limits": {"memory": "64Gi"}},
            "nodeSelector": {"zone": "a"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}
            ],
            "podTemplate": {
                "metadata": {
                    "labels": {"team": "search"},
                    "annotations": {"kiln.dev/simulate-duration": "2s"},
                },
                "spec": {
                    "priorityClassName": "inference",
                    "containers": [{"name": "engine", "volumeMounts": [{"name": "x", "mountPath": "/x"}]}],
                    "volumes": [{"name": "x", "configMap": {"name": "extra"}}],
                },
            },
        },
    )
    workload = render_serving.workload(inputs(deployment))
    template = workload["spec"]["template"]
    container = engine_container(workload)
    env = {item["name"]: item for item in container["env"]}
    assert env["HOME"] == {"name": "HOME", "value": "/home/me"}  # the user's value wins
    assert env["EXTRA"]["value"] == "1" and "POD_IP" in env
    assert container["resources"] == {
        "requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "1"},
    }
    assert template["spec"]["nodeSelector"] == {"zone": "a"}
    assert len(template["spec"]["tolerations"]) == 2
    assert template["spec"]["priorityClassName"] == "inference"
    assert {"name": "x", "mountPath": "/x"} in container["volumeMounts"]  # merged by name
    assert container["args"][0] == "serve" and len(container["volumeMounts"]) > 1
    assert {"name": "x", "configMap": {"name": "extra"}} in template["spec"]["volumes"]
    assert template["metadata"]["labels"]["team"] == "search"
    assert template["metadata"]["annotations"] == {"kiln.dev/simulate-duration": "2s"}
    selector = workload["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()


def test_template_override_cannot_break_the_selector() -> None:
    deployment = example(
        "tiny-cpu.yaml",
        serving={"podTemplate": {"metadata": {"labels": {labels.DEPLOYMENT_LABEL: "someone-else"}}}},
    )
    workload = render_serving.workload(inputs(deployment))
    assert workload["spec"]["template"]["metadata"]["labels"][labels.DEPLOYMENT_LABEL] == "tiny-chat"


def env_of(template: dict[str, Any]) -> dict[str, Any]:
    [container] = template["spec"]["containers"]
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def test_multi_node_replica_is_a_leaderworkerset_whose_pods_know_their_group() -> None:
    deployment = example("llama-3.1-405b-fp8-tp8-pp2.yaml")
    rendered = inputs(deployment)
    assert rendered.placement is not None and rendered.placement.multi_node
    with pytest.raises(render_serving.WorkloadUnavailable) as missing:
        render_serving.workload(rendered)  # without LWS the groups are StatefulSets (several objects)
    assert missing.value.reason == "LeaderWorkerSetRequired"
    lws = render_serving.workload(inputs(deployment, Settings(lws_installed=True)))
    assert lws["kind"] == "LeaderWorkerSet" and lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    # LeaderWorkerSet makes a headless Service named after itself: it must not take the API's name.
    assert lws["metadata"]["name"] != render_service.service(deployment)["metadata"]["name"]
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] == rendered.placement.nodes_per_replica == 4
    assert group["restartPolicy"] == "RecreateGroupOnPodRestart"
    for template in (group["leaderTemplate"], group["workerTemplate"]):
        [container] = template["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"  # per pod, not tp x pp
        assert template["spec"]["affinity"] == rendered.placement.affinity
        env = env_of(template)
        assert env["KILN_GROUP_SIZE"] == "4" and env["KILN_RENDEZVOUS_PORT"] == "29500"
        assert env["KILN_GROUP_INDEX"] == {
            "fieldRef": {"fieldPath": "metadata.labels['leaderworkerset.sigs.k8s.io/worker-index']"}
        }
        # <lws>-<group index>.<lws>.<namespace>.svc: the leader pod in LeaderWorkerSet's headless Service
        lws_name = lws["metadata"]["name"]
        assert env["KILN_LEADER_ADDRESS"] == f"{lws_name}-$(KILN_LWS_GROUP_INDEX).{lws_name}.serving.svc"
        names = [item["name"] for item in container["env"]]
        assert names.index("KILN_LWS_GROUP_INDEX") < names.index("KILN_LEADER_ADDRESS")  # $(...) order
    leader_probe = group["leaderTemplate"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"]
    worker_probe = group["workerTemplate"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"]
    assert (leader_probe, worker_probe) == ("/ready", "/health")  # workers serve only /health
    assert lws["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"]["maxUnavailable"] == 0


def test_previous_engine_keeps_its_own_build_settings() -> None:
    """While a replacement builds, the running engine's pods keep what their artifact was built with."""
    old = example("llama-3-70b-fp8-tp4.yaml")
    changed = example("llama-3-70b-fp8-tp4.yaml", engine={"kvCacheDtype": "bf16"})
    rendered = render_serving.ServingInputs(changed, ready(old), inputs(old).placement, Settings())
    args = engine_container(render_serving.workload(rendered))["args"]
    assert arg(args, "--kv-cache-dtype") == "fp8"


def test_service_selects_serving_pods_and_only_leaders_for_multi_node() -> None:
    deployment = example("tiny-cpu.yaml")
    service = render_service.service(deployment)
    assert service["spec"]["selector"] == render_serving.selector_labels("tiny-chat")
    assert service["spec"]["ports"][0]["port"] == 8000 and service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["metadata"]["ownerReferences"][0]["kind"] == "LLMDeployment"
    big = example("llama-3.1-405b-fp8-tp8-pp2.yaml")
    leaders = render_service.service(big, multi_node=True)["spec"]["selector"]
    assert leaders != render_service.service(big)["spec"]["selector"]
    group = render_serving.workload(inputs(big, Settings(lws_installed=True)))["spec"]["leaderWorkerTemplate"]
    assert leaders.items() <= group["leaderTemplate"]["metadata"]["labels"].items()
    assert not leaders.items() <= group["workerTemplate"]["metadata"]["labels"].items()
    assert render_service.endpoint(deployment) == "http://tiny-chat.serving.svc:8000/v1"


def test_selector_string_matches_selector_labels() -> None:
    text = render_serving.selector_string("x")
    assert dict(part.split("=") for part in text.split(",")) == render_serving.selector_labels("x")
