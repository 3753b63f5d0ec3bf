"""The engine key: which LLMDeployments can share one built engine.

Two deployments share an engine exactly when everything that changes the built artifact is
equal: model and revision, tokenizer, backend, quantization, KV-cache dtype, parallelism, GPU
architecture, runtime version, the cache it is stored in, and (for TensorRT-LLM, whose engines
bake them in) the build limits. Where the build measures capacity (torch, one rank), the TTFT
target and percentile it measures at and the limits it measures with change the artifact's
manifest, so they are part of the key too. Replicas and serving options never change the key.
"""

from __future__ import annotations

import hashlib
import json
import re

from kiln.api.gpus import gpu_arch
from kiln.api.v1alpha1 import EngineModel, LLMDeploymentSpec, LLMEngineSpec

KEY_LENGTH = 20  # hex characters (80 bits): collisions are not a practical concern


def measures_capacity(spec: LLMDeploymentSpec) -> bool:
    """Whether the build measures capacity itself (torch, one rank); serving pods measure the rest."""
    return spec.engine.backend == "torch" and spec.parallelism.tensor * spec.parallelism.pipeline == 1


def capacity_target(spec: LLMDeploymentSpec) -> tuple[int, int]:
    """(percentile, ms) the build measures capacity at: the deployment's p90 target where it sets
    one (the tail the autoscaler then also holds it to), else its p50 target."""
    autoscaling = spec.autoscaling
    if autoscaling.ttft_p90_target_ms is not None:
        return 90, autoscaling.ttft_p90_target_ms
    return 50, autoscaling.ttft_p50_target_ms


def draft_model(spec: LLMDeploymentSpec) -> str | None:
    """The draft checkpoint or EAGLE head the engine carries for speculative decoding, if any."""
    speculative = spec.engine.speculative
    carries = speculative is not None and speculative.method in ("draft", "eagle")
    return speculative.draft_model if carries and speculative is not None else None


def artifact_inputs(spec: LLMDeploymentSpec, runtime_version: str) -> dict[str, object]:
    """Everything that changes the built artifact, as a plain JSON-able dict."""
    engine = spec.engine
    inputs: dict[str, object] = {
        "model": spec.model.source,
        "tokenizer": spec.model.tokenizer,
        "backend": engine.backend,
        "quantization": engine.quantization,
        "kvCacheDtype": engine.kv_cache_dtype,
        "tensor": spec.parallelism.tensor,
        "pipeline": spec.parallelism.pipeline,
        "gpuArch": gpu_arch(spec.gpu.product if spec.gpu else None),
        "runtimeVersion": runtime_version,
        "image": engine.image,
        "cache": spec.build.cache,
    }
    if spec.parallelism.expert:  # only when set: keys of engines built before the field stay as they were
        inputs["expert"] = True
    draft = draft_model(spec)
    if draft is not None:
        inputs["draftModel"] = draft
    if measures_capacity(spec):
        percentile, target_ms = capacity_target(spec)
        inputs["capacityTtftPercentile"] = percentile
        inputs["capacityTtftTargetMs"] = target_ms
        inputs["maxBatchSize"] = engine.max_batch_size
        inputs["maxSequenceLength"] = engine.max_sequence_length
        inputs["maxTokensPerStep"] = engine.max_tokens_per_step
    if engine.backend == "tensorrt-llm":
        inputs["maxBatchSize"] = engine.max_batch_size
        inputs["maxSequenceLength"] = engine.max_sequence_length
        inputs["maxTokensPerStep"] = engine.max_tokens_per_step
    return inputs


# Settings of where and how a shared engine is built: they never change the artifact, so they stay
# out of the key, and a deployment sharing an engine built with other ones is told (an event).
BUILD_SETTINGS = {
    "node_selector": "build.nodeSelector",
    "tolerations": "build.tolerations",
    "pod_annotations": "build.podAnnotations",
    "timeout_seconds": "build.timeoutSeconds",
    "retries": "build.retries",
    "cache_credentials_secret": "build.cacheCredentialsSecret",
}


def build_setting_conflicts(existing: LLMEngineSpec, wanted: LLMEngineSpec) -> list[str]:
    """The build settings (as spec paths) in which an existing engine differs from the one wanted."""
    differing = [
        path for field, path in BUILD_SETTINGS.items() if getattr(existing, field) != getattr(wanted, field)
    ]
    if existing.model.credentials_secret != wanted.model.credentials_secret:
        differing.append("model.credentialsSecret")
    return differing


def engine_key(spec: LLMDeploymentSpec, runtime_version: str) -> str:
    """A stable hex digest of `artifact_inputs`: the same inputs give the same key on any machine."""
    canonical = json.dumps(artifact_inputs(spec, runtime_version), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:KEY_LENGTH]


def engine_name(spec: LLMDeploymentSpec, key: str) -> str:
    """A readable LLMEngine name, e.g. `meta-llama-3-8b-instruct-fp8-tp1-sm90-<key>`.

    The model part is shortened first, so quantization, layout and architecture stay visible.
    """
    model = spec.model.source.split("://", 1)[1].split("@", 1)[0].rsplit("/", 1)[-1]
    parallel = f"{'ep' if spec.parallelism.expert else 'tp'}{spec.parallelism.tensor}" + (
        f"pp{spec.parallelism.pipeline}" if spec.parallelism.pipeline > 1 else ""
    )
    arch = gpu_arch(spec.gpu.product if spec.gpu else None)
    suffix = _slug("-".join((spec.engine.quantization, parallel, arch, key)))
    model_room = max(0, 63 - len(suffix) - 1)
    model_slug = _slug(model)[:model_room].strip("-")
    return f"{model_slug}-{suffix}" if model_slug else suffix


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]+", "-", text.lower())).strip("-")


def engine_spec(spec: LLMDeploymentSpec, runtime_version: str) -> LLMEngineSpec:
    """The LLMEngine spec a deployment needs."""
    return LLMEngineSpec(
        key=engine_key(spec, runtime_version),
        model=EngineModel(
            source=spec.model.source,
            tokenizer=spec.model.tokenizer,
            credentials_secret=spec.model.credentials_secret,
        ),
        draft_model=draft_model(spec),
        backend=spec.engine.backend,
        quantization=spec.engine.quantization,
        kv_cache_dtype=spec.engine.kv_cache_dtype,
        parallelism=spec.parallelism,
        gpu_product=spec.gpu.product if spec.gpu else None,
        gpu_arch=gpu_arch(spec.gpu.product if spec.gpu else None),
        runtime_version=runtime_version,
        max_batch_size=spec.engine.max_batch_size,
        max_sequence_length=spec.engine.max_sequence_length,
        max_tokens_per_step=spec.engine.max_tokens_per_step,
        image=spec.engine.image,
        cache=spec.build.cache,
        cache_credentials_secret=spec.build.cache_credentials_secret,
        capacity_ttft_percentile=capacity_target(spec)[0] if measures_capacity(spec) else None,
        capacity_ttft_target_ms=capacity_target(spec)[1] if measures_capacity(spec) else None,
        node_selector=spec.build.node_selector,
        tolerations=spec.build.tolerations,
        timeout_seconds=spec.build.timeout_seconds,
        retries=spec.build.retries,
    )
