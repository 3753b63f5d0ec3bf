"""The build Job of an LLMEngine: `kiln-engine build` on a node of the target GPU, writing to the cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kiln import labels
from kiln.api.v1alpha1 import LLMEngine
from kiln.placement import NodeTopology
from kiln.render.common import (
    BUILD_COMPONENT,
    BUILD_CONTAINER,
    TMP_MOUNT,
    Manifest,
    Settings,
    container_security_context,
    credentials_env,
    gpu_toleration,
    join_uri,
    local_uri,
    managed_labels,
    owner_reference,
    pod_security_context,
    pvc_volumes,
)

TERMINATION_LOG = "/dev/termination-log"
JOB_SUFFIX = "-build"
MIN_STEP_TOKENS = 16  # `kiln-engine build --max-num-tokens` refuses less


def job_name(engine_name: str) -> str:
    """The build Job's name: fixed per engine, so an operator restart finds the Job it created."""
    return engine_name[: 63 - len(JOB_SUFFIX)].rstrip("-") + JOB_SUFFIX


def artifact_uri(engine: LLMEngine) -> str:
    """Where the engine's artifact is published: `<cache>/<engine name>`."""
    return join_uri(engine.spec.cache, str(engine.metadata.name))


def build_gpus(engine: LLMEngine, nodes: Sequence[NodeTopology] = ()) -> int:
    """GPUs the build pod requests: tp x pp, capped at the largest node of the product (a build
    shards on one node even when serving spans several); none for a CPU engine."""
    spec = engine.spec
    if not spec.gpu_product:
        return 0
    wanted = spec.parallelism.tensor * spec.parallelism.pipeline
    sizes = [node.gpus for node in nodes if node.product == spec.gpu_product and node.gpus > 0]
    return min(wanted, max(sizes)) if sizes else wanted


def engine_owner(engine: LLMEngine) -> dict[str, Any]:
    """The LLMEngine as an owner (what `owner_reference` reads)."""
    return {"kind": "LLMEngine", "metadata": {"name": engine.metadata.name, "uid": engine.metadata.uid}}


def build_args(engine: LLMEngine, settings: Settings) -> list[str]:
    """The `kiln-engine build` arguments (pvc:// locations given as their mounted paths)."""
    spec = engine.spec
    args = [
        "build",
        "--model",
        local_uri(spec.model.source, settings.pvc_root),
        "--output",
        local_uri(artifact_uri(engine), settings.pvc_root),
        "--backend",
        spec.backend,
        "--quantization",
        spec.quantization,
        "--tp",
        str(spec.parallelism.tensor),
        "--pp",
        str(spec.parallelism.pipeline),
        "--kv-cache-dtype",
        spec.kv_cache_dtype,
        "--max-batch-size",
        str(spec.max_batch_size),
        "--max-num-tokens",
        str(max(MIN_STEP_TOKENS, spec.max_tokens_per_step)),
        "--gpu-arch",
        spec.gpu_arch,
    ]
    if spec.max_sequence_length:
        args += ["--max-seq-len", str(spec.max_sequence_length)]
    if spec.capacity_ttft_target_ms is not None and spec.capacity_ttft_percentile is not None:
        args += ["--ttft-target-ms", str(spec.capacity_ttft_target_ms)]
        args += ["--ttft-percentile", str(spec.capacity_ttft_percentile)]
    if not spec.gpu_product:
        args += ["--device", "cpu"]
    if spec.draft_model is not None:
        args += ["--draft-model", local_uri(spec.draft_model, settings.pvc_root)]
    if spec.parallelism.expert:
        args.append("--expert-parallel")
    return [*args, "--no-progress-bar", "--result-file", TERMINATION_LOG]


def build_job(engine: LLMEngine, settings: Settings, gpus: int) -> Manifest:
    """The Job that builds `engine` once.

    One pod at a time (`parallelism: 1`), retried `spec.retries` times (`backoffLimit`) within
    `spec.timeoutSeconds` (`activeDeadlineSeconds`). The pod lands on a node of the engine's GPU
    product (GFD's `nvidia.com/gpu.product`) plus the build node selector, requests `gpus` GPUs,
    mounts the cache claim (pvc://) or hands the object-store URI to the engine's own upload (s3://),
    and writes its result JSON to the termination log, which the operator reads back.
    """
    spec = engine.spec
    name = str(engine.metadata.name)
    pod_labels = managed_labels(BUILD_COMPONENT, **{labels.ENGINE_LABEL: name})
    sources = {spec.model.source: True, artifact_uri(engine): False}
    if spec.draft_model is not None:
        sources[spec.draft_model] = True
    volumes, mounts = pvc_volumes(sources, settings.pvc_root)
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": TMP_MOUNT})
    env, env_from = credentials_env(spec.model.credentials_secret, spec.model.source)
    if spec.cache_credentials_secret is not None:
        env_from.append({"secretRef": {"name": spec.cache_credentials_secret.name}})
    env = [
        {"name": "HOME", "value": TMP_MOUNT},
        {"name": "HF_HOME", "value": f"{TMP_MOUNT}/hf"},
        {"name": "KILN_PVC_ROOT", "value": settings.pvc_root},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *env,
    ]
    container: dict[str, Any] = {
        "name": BUILD_CONTAINER,
        "image": settings.image_for(spec.backend, spec.image),
        "command": ["kiln-engine"],
        "args": build_args(engine, settings),
        "env": env,
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if env_from:
        container["envFrom"] = env_from
    if gpus > 0:
        container["resources"] = {
            "limits": {labels.GPU_RESOURCE: str(gpus)},
            "requests": {labels.GPU_RESOURCE: str(gpus)},
        }
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    if spec.gpu_product:
        node_selector[labels.GPU_PRODUCT] = spec.gpu_product
        tolerations.append(gpu_toleration())
    node_selector.update(spec.node_selector or {})
    tolerations += list(spec.tolerations or [])
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    template_metadata: dict[str, Any] = {"labels": pod_labels}
    if spec.pod_annotations:
        template_metadata["annotations"] = dict(spec.pod_annotations)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name),
            "namespace": engine.metadata.namespace,
            "labels": pod_labels,
            "ownerReferences": [owner_reference(engine_owner(engine))],
        },
        "spec": {
            "parallelism": 1,
            "completions": 1,
            "backoffLimit": spec.retries,
            "activeDeadlineSeconds": spec.timeout_seconds,
            "podFailurePolicy": {
                # A build that says it failed for a reason of its own (exit 2: bad input) will fail
                # again; retry only crashes and lost nodes.
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": BUILD_CONTAINER, "operator": "In", "values": [2]},
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {"metadata": template_metadata, "spec": pod_spec},
        },
    }
