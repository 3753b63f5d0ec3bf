"""The serving workload of an LLMDeployment: a Deployment, or a LeaderWorkerSet when a replica spans nodes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln import labels
from kiln.api.v1alpha1 import LLMDeployment, LLMEngine
from kiln.placement import Placement
from kiln.render.build_job import MIN_STEP_TOKENS, artifact_uri
from kiln.render.common import (
    ENGINE_CONTAINER,
    HTTP_PORT_NAME,
    SERVING_COMPONENT,
    TMP_MOUNT,
    Manifest,
    Settings,
    container_security_context,
    deep_merge,
    gpu_toleration,
    local_uri,
    managed_labels,
    merge_env,
    owner_reference,
    pod_security_context,
    pvc_volumes,
)

LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
LWS_WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
ROLE_LABEL = "kiln.dev/role"  # leader or worker, on LeaderWorkerSet pods
DRAIN_MARGIN_SECONDS = 5  # left of the grace period after the engine's drain, for it to exit
STARTUP_PROBE_BUDGET_SECONDS = 1800  # loading a large model may take this long before liveness applies


class WorkloadUnavailable(Exception):
    """The workload cannot be rendered here; `reason` is the condition reason to report."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ServingInputs:
    """What the serving workload is rendered from: the deployment, the Ready engine it runs, and
    where replicas may go (None for CPU deployments, which need no GPU placement)."""

    deployment: LLMDeployment
    engine: LLMEngine
    placement: Placement | None
    settings: Settings


def selector_labels(name: str) -> dict[str, str]:
    """Labels selecting a deployment's serving pods (stable across engines, so rollovers roll)."""
    return managed_labels(SERVING_COMPONENT, **{labels.DEPLOYMENT_LABEL: name})


def selector_string(name: str) -> str:
    """`selector_labels` as a label selector string (status.selector, for the scale subresource)."""
    return ",".join(f"{key}={value}" for key, value in sorted(selector_labels(name).items()))


def served_name(deployment: LLMDeployment) -> str:
    return deployment.spec.model.served_name or str(deployment.metadata.name)


def artifact_location(engine: LLMEngine) -> str:
    """The artifact a Ready engine published (its status), else where its build was told to write."""
    status = engine.status
    if status is not None and status.artifact is not None:
        return status.artifact.uri
    return artifact_uri(engine)


def engine_args(inputs: ServingInputs) -> list[str]:
    """`kiln-engine serve` arguments for the deployment's engine options.

    What the artifact was built with (backend, KV-cache dtype) comes from the engine that runs, so a
    previous engine keeps its own settings while its replacement builds.
    """
    spec = inputs.deployment.spec
    options = spec.engine
    built = inputs.engine.spec
    grace = spec.serving.termination_grace_period_seconds
    args = [
        "serve",
        "--artifact",
        local_uri(artifact_location(inputs.engine), inputs.settings.pvc_root),
        "--host",
        "$(POD_IP)",
        "--port",
        str(spec.serving.port),
        "--served-model-name",
        served_name(inputs.deployment),
        "--backend",
        built.backend,
        "--max-batch-size",
        str(options.max_batch_size),
        "--max-num-tokens",
        str(max(MIN_STEP_TOKENS, options.max_tokens_per_step)),
        "--kv-cache-dtype",
        built.kv_cache_dtype,
        "--prefix-caching" if options.prefix_caching else "--no-prefix-caching",
        "--chunked-prefill" if options.chunked_prefill else "--no-chunked-prefill",
        "--drain-timeout",
        str(max(1, grace - DRAIN_MARGIN_SECONDS)),
    ]
    if options.max_sequence_length:
        args += ["--max-seq-len", str(options.max_sequence_length)]
    if spec.gpu is None:
        args += ["--device", "cpu"]
    return args


def _engine_container(inputs: ServingInputs, gpus: int) -> dict[str, Any]:
    spec = inputs.deployment.spec
    serving = spec.serving
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HOME", "value": TMP_MOUNT},
        {"name": "KILN_PVC_ROOT", "value": inputs.settings.pvc_root},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if serving.api_key_secret is not None:
        env.append(
            {
                "name": "KILN_API_KEY",
                "valueFrom": {
                    "secretKeyRef": {
                        "name": serving.api_key_secret.name,
                        "key": serving.api_key_secret.key or "api-key",
                    }
                },
            }
        )
    resources: dict[str, Any] = {
        key: dict(value) for key, value in (serving.resources or {}).items() if isinstance(value, dict)
    }
    if gpus > 0:
        for part in ("limits", "requests"):
            resources.setdefault(part, {})[labels.GPU_RESOURCE] = str(gpus)
    probe_port = {"path": "/ready", "port": HTTP_PORT_NAME}
    container: dict[str, Any] = {
        "name": ENGINE_CONTAINER,
        "image": inputs.settings.image_for(inputs.engine.spec.backend, inputs.engine.spec.image),
        "command": ["kiln-engine"],
        "args": engine_args(inputs),
        "env": merge_env(env, serving.env),
        "ports": [{"name": HTTP_PORT_NAME, "containerPort": serving.port, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": probe_port, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": HTTP_PORT_NAME},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "startupProbe": {
            "httpGet": {"path": "/health", "port": HTTP_PORT_NAME},
            "periodSeconds": 10,
            "failureThreshold": STARTUP_PROBE_BUDGET_SECONDS // 10,
        },
        "securityContext": container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if resources:
        container["resources"] = resources
    return container


def pod_template(inputs: ServingInputs, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The serving pod template: engine container, GPUs, placement, artifact read-only, restricted,
    with the user's env/resources/nodeSelector/tolerations and pod template overrides merged in."""
    deployment, placement = inputs.deployment, inputs.placement
    spec = deployment.spec
    name = str(deployment.metadata.name)
    gpus = placement.gpus_per_node if (placement is not None and spec.gpu is not None) else 0
    container = _engine_container(inputs, gpus)
    volumes, mounts = pvc_volumes({artifact_location(inputs.engine): True}, inputs.settings.pvc_root)
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": TMP_MOUNT})
    if gpus > 1:  # NCCL and tensor-parallel ranks exchange through shared memory
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    container["volumeMounts"] = mounts
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": spec.serving.termination_grace_period_seconds,
        "securityContext": pod_security_context(),
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
    }
    if placement is not None and placement.affinity:
        pod_spec["affinity"] = placement.affinity
    tolerations = ([gpu_toleration()] if spec.gpu is not None else []) + list(spec.serving.tolerations or [])
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if spec.serving.node_selector:
        pod_spec["nodeSelector"] = dict(spec.serving.node_selector)
    template: dict[str, Any] = {
        "metadata": {
            "labels": {
                **selector_labels(name),
                labels.ENGINE_LABEL: str(inputs.engine.metadata.name),
                **(extra_labels or {}),
            }
        },
        "spec": pod_spec,
    }
    override = spec.serving.pod_template
    if override:
        template = deep_merge(template, override.to_wire())
        # The selector must keep matching whatever the override did to the labels.
        template["metadata"]["labels"].update(selector_labels(name))
    return template


def _metadata(deployment: LLMDeployment, kind_labels: dict[str, str]) -> dict[str, Any]:
    name = str(deployment.metadata.name)
    return {
        "name": name,
        "namespace": deployment.metadata.namespace,
        "labels": kind_labels,
        "ownerReferences": [owner_reference(deployment_owner(deployment))],
    }


def deployment_owner(deployment: LLMDeployment) -> dict[str, Any]:
    return {
        "kind": "LLMDeployment",
        "metadata": {"name": deployment.metadata.name, "uid": deployment.metadata.uid},
    }


def deployment(inputs: ServingInputs) -> Manifest:
    """A Deployment of single-node replicas. Rolling updates never take a ready pod away before its
    replacement is ready (maxUnavailable 0), which is how an engine rollover keeps serving."""
    llmd = inputs.deployment
    name = str(llmd.metadata.name)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(llmd, selector_labels(name)),
        "spec": {
            "replicas": llmd.spec.replicas,
            "selector": {"matchLabels": selector_labels(name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": STARTUP_PROBE_BUDGET_SECONDS,
            "template": pod_template(inputs),
        },
    }


def leader_worker_set(inputs: ServingInputs) -> Manifest:
    """A LeaderWorkerSet: each replica is one group of `nodes_per_replica` pods kept in one NVLink
    clique (or network block) by the placement's pod affinity; the leader (worker index 0) serves."""
    llmd, placement = inputs.deployment, inputs.placement
    assert placement is not None and placement.multi_node
    name = str(llmd.metadata.name)
    metadata = _metadata(llmd, selector_labels(name))
    if placement.lws_annotations:
        metadata["annotations"] = dict(placement.lws_annotations)
    return {
        "apiVersion": LWS_API_VERSION,
        "kind": "LeaderWorkerSet",
        "metadata": metadata,
        "spec": {
            "replicas": llmd.spec.replicas,
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {
                "type": "RollingUpdate",
                "rollingUpdateConfiguration": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "leaderWorkerTemplate": {
                "size": placement.nodes_per_replica,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": pod_template(inputs, {ROLE_LABEL: "leader"}),
                "workerTemplate": pod_template(inputs, {ROLE_LABEL: "worker"}),
            },
        },
    }


def workload(inputs: ServingInputs) -> Manifest:
    """The serving workload for the placement: Deployment, or LeaderWorkerSet for multi-node replicas.

    Raises WorkloadUnavailable when a replica spans nodes and LeaderWorkerSet is not installed.
    """
    placement = inputs.placement
    if placement is not None and placement.multi_node:
        if not inputs.settings.lws_installed:
            raise WorkloadUnavailable(
                "LeaderWorkerSetRequired",
                f"one replica spans {placement.nodes_per_replica} nodes ({placement.reason}); that needs "
                "the LeaderWorkerSet CRD (leaderworkersets.leaderworkerset.x-k8s.io, sigs.k8s.io/lws), "
                "which is not installed",
            )
        return leader_worker_set(inputs)
    return deployment(inputs)
