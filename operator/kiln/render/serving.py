"""The serving pods of an LLMDeployment: their template, and a Deployment or a LeaderWorkerSet of them.

A replica that spans nodes is one pod group; every pod of a group gets the group's rendezvous
contract with the engine (`group_env`): KILN_GROUP_SIZE, KILN_GROUP_INDEX (0 leads and serves the
OpenAI API, the others only GET /health), KILN_LEADER_ADDRESS (a DNS name of pod 0 that resolves
before it is Ready) and KILN_RENDEZVOUS_PORT. Groups made of core objects live in `groups`.
"""

from __future__ import annotations

import json
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
LWS_GROUP_INDEX = "leaderworkerset.sigs.k8s.io/group-index"
ROLE_LABEL = "kiln.dev/role"  # leader or worker, on every pod of a multi-node replica
LEADER, WORKER = "leader", "worker"
# The engine's pod-group contract (engine-image/kiln_engine reads these).
GROUP_SIZE_ENV = "KILN_GROUP_SIZE"
GROUP_INDEX_ENV = "KILN_GROUP_INDEX"
LEADER_ADDRESS_ENV = "KILN_LEADER_ADDRESS"
RENDEZVOUS_PORT_ENV = "KILN_RENDEZVOUS_PORT"
RENDEZVOUS_PORT = 29500  # torch.distributed's customary port
RENDEZVOUS_PORT_NAME = "rendezvous"
DRAIN_MARGIN_SECONDS = 5  # left of the grace period after the engine's drain, for it to exit
STARTUP_PROBE_BUDGET_SECONDS = 1800  # loading a large model may take this long before liveness applies
# LoRA adapters reach the engine as a file it polls (--lora-file), from a ConfigMap: a change to the
# list updates the mounted file in running pods instead of the pod template (no rollout).
LORA_COMPONENT = "lora-adapters"
LORA_MOUNT = "/etc/kiln/lora"
LORA_FILE = "adapters.json"
DEFAULT_MAX_LORAS = 4


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


def selector_string(name: str, leaders_only: bool = False) -> str:
    """`selector_labels` as a label selector string; with `leaders_only`, only the pods that serve the
    API (status.selector, for the scale subresource and the autoscaler's pod metrics)."""
    selector = leader_selector(name, leaders_only)
    return ",".join(f"{key}={value}" for key, value in sorted(selector.items()))


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
    if options.speculative is not None:
        args += ["--speculative", options.speculative.method]
        args += ["--num-speculative-tokens", str(options.speculative.num_tokens)]
    if options.lora is not None:
        args += ["--lora-file", f"{LORA_MOUNT}/{LORA_FILE}"]
        args += ["--max-loras", str(options.max_loras or DEFAULT_MAX_LORAS)]
    if options.max_lora_rank is not None:
        args += ["--max-lora-rank", str(options.max_lora_rank)]
    if spec.gpu is None:
        args += ["--device", "cpu"]
    return args


@dataclass(frozen=True)
class GroupMember:
    """A pod's place in its replica's pod group: the env that tells the engine, and whether it leads
    (a worker is Ready once it has joined: GET /health; only the leader serves /ready)."""

    env: tuple[dict[str, Any], ...]
    leader: bool


def _label_ref(label: str) -> dict[str, Any]:
    return {"fieldRef": {"fieldPath": f"metadata.labels['{label}']"}}


def group_env(size: int, index: dict[str, Any] | int, leader_address: str) -> tuple[dict[str, Any], ...]:
    """The engine's group variables: `index` is a number or an env `valueFrom` (a label of the pod)."""
    index_var: dict[str, Any] = {"name": GROUP_INDEX_ENV}
    if isinstance(index, int):
        index_var["value"] = str(index)
    else:
        index_var["valueFrom"] = index
    return (
        {"name": GROUP_SIZE_ENV, "value": str(size)},
        index_var,
        {"name": LEADER_ADDRESS_ENV, "value": leader_address},
        {"name": RENDEZVOUS_PORT_ENV, "value": str(RENDEZVOUS_PORT)},
    )


def lws_name(name: str) -> str:
    """The LeaderWorkerSet's name: not the deployment's, because LeaderWorkerSet creates a headless
    Service named after itself and the deployment's Service already has that name."""
    return f"{name}-group"


def lws_member(inputs: ServingInputs, leader: bool) -> GroupMember:
    """The group env of a LeaderWorkerSet pod, from the labels LeaderWorkerSet puts on it (the same
    facts as its LWS_WORKER_INDEX / LWS_LEADER_ADDRESS / LWS_GROUP_SIZE, without depending on where
    its webhook inserts those in the env list, which `$(VAR)` expansion would)."""
    placement = inputs.placement
    assert placement is not None
    lws, namespace = lws_name(str(inputs.deployment.metadata.name)), inputs.deployment.metadata.namespace
    env = (
        {"name": "KILN_LWS_GROUP_INDEX", "valueFrom": _label_ref(LWS_GROUP_INDEX)},
        *group_env(
            placement.nodes_per_replica,
            _label_ref(LWS_WORKER_INDEX),
            # the leader pod is <lws>-<group index>, in the headless Service <lws>
            f"{lws}-$(KILN_LWS_GROUP_INDEX).{lws}.{namespace}.svc",
        ),
    )
    return GroupMember(env=env, leader=leader)


def _engine_container(inputs: ServingInputs, gpus: int, member: GroupMember | None = None) -> dict[str, Any]:
    spec = inputs.deployment.spec
    serving = spec.serving
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HOME", "value": TMP_MOUNT},
        {"name": "KILN_PVC_ROOT", "value": inputs.settings.pvc_root},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *(member.env if member is not None else ()),
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
    ready_path = "/ready" if member is None or member.leader else "/health"
    probe_port = {"path": ready_path, "port": HTTP_PORT_NAME}
    ports = [{"name": HTTP_PORT_NAME, "containerPort": serving.port, "protocol": "TCP"}]
    if member is not None:
        ports.append({"name": RENDEZVOUS_PORT_NAME, "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": ENGINE_CONTAINER,
        "image": inputs.settings.image_for(inputs.engine.spec.backend, inputs.engine.spec.image),
        "command": ["kiln-engine"],
        "args": engine_args(inputs),
        "env": merge_env(env, serving.env),
        "ports": ports,
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
    cache_secret = spec.build.cache_credentials_secret
    if cache_secret is not None and artifact_location(inputs.engine).startswith("s3://"):
        # The pod downloads the engine from the s3:// cache with the deployment's own keys.
        container["envFrom"] = [{"secretRef": {"name": cache_secret.name}}]
    return container


def pod_template(
    inputs: ServingInputs, extra_labels: dict[str, str] | None = None, member: GroupMember | None = None
) -> dict[str, Any]:
    """The serving pod template: engine container, GPUs, placement, artifact read-only, restricted,
    with the user's env/resources/nodeSelector/tolerations and pod template overrides merged in;
    `member` places the pod in a multi-node replica's group."""
    deployment, placement = inputs.deployment, inputs.placement
    spec = deployment.spec
    name = str(deployment.metadata.name)
    gpus = placement.gpus_per_node if (placement is not None and spec.gpu is not None) else 0
    container = _engine_container(inputs, gpus, member)
    adapters = spec.engine.lora
    read_only = {artifact_location(inputs.engine): True, **{a.source: True for a in adapters or []}}
    volumes, mounts = pvc_volumes(read_only, inputs.settings.pvc_root)
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": TMP_MOUNT})
    if adapters is not None:
        volumes.append({"name": "lora", "configMap": {"name": lora_config_map_name(name)}})
        mounts.append({"name": "lora", "mountPath": LORA_MOUNT, "readOnly": True})
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


def lora_config_map_name(name: str) -> str:
    return f"{name}-adapters"


def lora_config_map(deployment: LLMDeployment) -> Manifest | None:
    """The adapter list the serving pods poll (--lora-file); None when the deployment serves no LoRA."""
    adapters = deployment.spec.engine.lora
    if adapters is None:
        return None
    listed = {"adapters": [{"name": a.name, "source": a.source} for a in adapters]}
    name = str(deployment.metadata.name)
    metadata = _metadata(deployment, managed_labels(LORA_COMPONENT, **{labels.DEPLOYMENT_LABEL: name}))
    metadata["name"] = lora_config_map_name(name)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {LORA_FILE: json.dumps(listed, indent=2) + "\n"},
    }


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
    metadata["name"] = lws_name(name)
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
                "leaderTemplate": pod_template(inputs, {ROLE_LABEL: LEADER}, lws_member(inputs, True)),
                "workerTemplate": pod_template(inputs, {ROLE_LABEL: WORKER}, lws_member(inputs, False)),
            },
        },
    }


def leader_selector(name: str, multi_node: bool) -> dict[str, str]:
    """Labels selecting the pods that serve the OpenAI API: every serving pod, or only the leaders of
    multi-node replicas (whichever workload made them)."""
    selector = selector_labels(name)
    if multi_node:
        selector[ROLE_LABEL] = LEADER
    return selector


def workload(inputs: ServingInputs) -> Manifest:
    """The single-object workload: a Deployment, or a LeaderWorkerSet for multi-node replicas.

    Raises WorkloadUnavailable for multi-node replicas when LeaderWorkerSet is not installed: those
    are groups of StatefulSets (`kiln.render.groups`), several objects.
    """
    placement = inputs.placement
    if placement is not None and placement.multi_node:
        if not inputs.settings.lws_installed:
            raise WorkloadUnavailable(
                "LeaderWorkerSetRequired",
                f"one replica spans {placement.nodes_per_replica} nodes ({placement.reason}); without "
                "the LeaderWorkerSet CRD it runs as StatefulSet groups (kiln.render.groups)",
            )
        return leader_worker_set(inputs)
    return deployment(inputs)
