"""The Kiln API, kiln.dev/v1alpha1: LLMDeployment and LLMEngine as pydantic models.

These models are the single source of truth: `kiln crds generate` turns them into the CRD
YAML in `crds/` (schema, defaults, enums, CEL rules, printer columns, subresources), and the
operator and autoscaler parse cluster objects with them.
"""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonDict

from kiln.api.gpus import products_pattern

GROUP = "kiln.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

Backend = Literal["torch", "tensorrt-llm"]
Quantization = Literal["none", "bf16", "fp16", "fp8", "int8-weight", "int4-awq", "int4-gptq", "mxfp4"]
KVCacheDtype = Literal["auto", "bf16", "fp16", "fp8"]
NVLinkPolicy = Literal["Required", "Preferred", "Ignore"]
NVLinkDomainPolicy = Literal["Required", "Preferred"]
DeploymentPhase = Literal["Pending", "Building", "Deploying", "Ready", "Degraded", "Failed", "ScaledToZero"]
EnginePhase = Literal["Pending", "Building", "Ready", "Failed"]

# Model sources Kiln can fetch: Hugging Face (optionally pinned to a revision), S3-compatible
# object stores, or a path inside a PersistentVolumeClaim.
SOURCE_PATTERN = r"^(hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?)$"
CACHE_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?)$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

# What each backend can build. The CEL rules on EngineOptions are generated from these tables.
BACKEND_QUANTIZATIONS: dict[str, tuple[str, ...]] = {
    "torch": ("none", "bf16", "fp16", "fp8", "int8-weight", "int4-awq", "int4-gptq", "mxfp4"),
    "tensorrt-llm": ("none", "bf16", "fp16", "fp8", "int8-weight", "int4-awq", "int4-gptq"),
}


def _backend_table_rule(field: str, table: dict[str, tuple[str, ...]]) -> str:
    return " || ".join(
        f"(self.backend == '{backend}' && self.{field} in {list(allowed)})"
        for backend, allowed in table.items()
    )


def _cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> JsonDict:
    validation: JsonDict = {"rule": rule, "message": message}
    if field_path:
        validation["fieldPath"] = field_path
    if reason:
        validation["reason"] = reason
    return validation


class KubeModel(BaseModel):
    """Base for API models: camelCase on the wire, snake_case in Python, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as Kubernetes stores it (camelCase, no nulls)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class OpenModel(KubeModel):
    """A model that keeps fields it does not know (Kubernetes objects Kiln passes through)."""

    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------- shared pieces


class SecretKeyRef(KubeModel):
    """A reference to one key of a Secret in the same namespace."""

    name: Annotated[str, Field(min_length=1, max_length=253, description="Name of the Secret.")]
    key: Annotated[
        str | None,
        Field(
            default=None,
            description="Key inside the Secret. Omit to expose every key as an environment variable "
            "(for example HF_TOKEN, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY).",
        ),
    ]


class ModelSource(KubeModel):
    """Where the checkpoint comes from."""

    source: Annotated[
        str,
        Field(
            pattern=SOURCE_PATTERN,
            max_length=1024,
            description="Checkpoint location: hf://org/name[@revision], s3://bucket/prefix, or "
            "pvc://claim/path. Pin a revision for reproducible builds; an unpinned hf:// source is "
            "resolved to a commit when the engine is built.",
            examples=["hf://meta-llama/Meta-Llama-3-8B-Instruct@5f0b02c"],
        ),
    ]
    tokenizer: Annotated[
        str | None,
        Field(
            default=None,
            pattern=SOURCE_PATTERN,
            max_length=1024,
            description="Tokenizer location when it differs from the checkpoint (same URI forms).",
        ),
    ]
    credentials_secret: Annotated[
        SecretKeyRef | None,
        Field(
            default=None,
            description="Secret holding credentials for the source (HF_TOKEN, or S3 keys). Its values "
            "are passed to the build Job as environment variables and never logged or written to status.",
        ),
    ]
    served_name: Annotated[
        str | None,
        Field(
            default=None,
            max_length=256,
            description="Model name clients send in OpenAI requests and see in /v1/models. "
            "Defaults to the LLMDeployment's name.",
        ),
    ]


class Parallelism(KubeModel):
    """How one replica is split across GPUs."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "self.tensor in [1, 2, 4, 8, 16, 32, 64]",
                    "tensor parallelism must be a power of two (1, 2, 4, 8, ...)",
                    ".tensor",
                ),
                _cel(
                    "self.tensor * self.pipeline <= 256",
                    "tensor x pipeline must be at most 256 GPUs per replica",
                    ".pipeline",
                ),
                _cel(
                    "!self.expert || self.tensor > 1",
                    "expert parallelism spreads the experts over the tensor-parallel GPUs: tensor must be "
                    "at least 2",
                    ".expert",
                ),
            ]
        }
    )

    tensor: Annotated[
        int,
        Field(
            default=1,
            ge=1,
            le=64,
            description="Tensor-parallel degree: GPUs that share every layer. A power of two; the "
            "group is placed inside one NVLink island.",
        ),
    ]
    pipeline: Annotated[
        int,
        Field(
            default=1,
            ge=1,
            le=16,
            description="Pipeline-parallel degree: stages of consecutive layers. A replica uses "
            "tensor x pipeline GPUs; when that exceeds one node it spans nodes inside one NVLink clique. "
            "On CPU (no spec.gpu) each stage is a pod of its tensor-parallel ranks.",
        ),
    ]
    expert: Annotated[
        bool,
        Field(
            default=False,
            description="Mixture-of-experts models: each tensor-parallel GPU holds experts / tensor "
            "experts whole instead of a slice of every expert (torch backend; the build fails on a "
            "dense model or an expert count the tensor degree does not divide).",
        ),
    ]


def DraftSource(**field: Any) -> Any:
    """An optional checkpoint URI field, as spec.model.source takes them."""
    return Field(default=None, pattern=SOURCE_PATTERN, max_length=1024, **field)


class SpeculativeDecoding(KubeModel):
    """Speculative decoding: cheap drafts of the next tokens, verified by the model in one step."""

    method: Annotated[
        Literal["ngram", "draft", "eagle"],
        Field(
            description="`ngram`: prompt lookup, drafts copied from earlier text of the same request "
            "(no extra model; pays off when outputs repeat their prompt: code edits, extraction, RAG). "
            "`draft`: a smaller model with the same tokenizer (`draftModel`) proposes the drafts. "
            "`eagle`: an EAGLE head trained for this model (`draftModel`: one decoder layer over the "
            "model's own hidden states, EAGLE-1/2 or EAGLE-3 format) proposes them.",
        ),
    ]
    num_tokens: Annotated[
        int, Field(default=4, ge=1, le=16, description="Most draft tokens verified per request per step.")
    ]
    draft_model: Annotated[
        str | None,
        DraftSource(
            description="The draft checkpoint for `method: draft`, or the EAGLE head for `method: eagle` "
            "(same URI forms and credentials as spec.model.source). The engine build fetches it, checks "
            "that a draft's tokenizer is the model's (a head's hidden size and vocabulary) and carries "
            "it in the engine; it is part of the engine key.",
            examples=["hf://meta-llama/Llama-3.2-1B-Instruct@9213176"],
        ),
    ]


# A LoRA adapter's served name: the OpenAI `model` requests select it with (kiln_engine.lora's rule).
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_LORA_ADAPTERS = 32


class LoraAdapterSource(KubeModel):
    """A LoRA adapter of the model (PEFT format), served next to it under its own `model` name."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("self.name != 'base'", "'base' names the base model, not an adapter", ".name")
            ]
        }
    )

    name: Annotated[
        str,
        Field(
            pattern=LORA_NAME_PATTERN,
            max_length=64,
            description="The OpenAI `model` name that selects this adapter (`base` names the base model).",
            examples=["sql-expert"],
        ),
    ]
    source: Annotated[
        str,
        Field(
            pattern=SOURCE_PATTERN,
            max_length=1024,
            description="Adapter directory (adapter_config.json, adapter_model.safetensors): "
            "hf://org/name[@revision], s3://bucket/prefix, or pvc://claim/path.",
        ),
    ]


class EngineOptions(KubeModel):
    """How the engine is built and run."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    _backend_table_rule("quantization", BACKEND_QUANTIZATIONS),
                    "quantization is not supported by this backend",
                    ".quantization",
                ),
                _cel(
                    "!has(self.speculative) || self.backend == 'torch'",
                    "speculative decoding needs the torch backend",
                    ".speculative",
                ),
                _cel(
                    "!has(self.speculative) || "
                    "(self.speculative.method in ['draft', 'eagle']) == has(self.speculative.draftModel)",
                    "speculative.draftModel goes with method draft or eagle, which need it",
                    ".speculative.draftModel",
                ),
                _cel(
                    "!has(self.lora) || self.backend == 'torch'",
                    "LoRA adapters need the torch backend",
                    ".lora",
                ),
                _cel(
                    "!has(self.lora) || self.lora.all(a, self.lora.exists_one(b, b.name == a.name))",
                    "LoRA adapter names must be unique",
                    ".lora",
                ),
                _cel(
                    "!has(self.maxLoras) || has(self.lora)",
                    "maxLoras sizes the LoRA adapter slots: it needs spec.engine.lora (an empty list "
                    "serves none yet)",
                    ".maxLoras",
                ),
                _cel(
                    "self.maxTokensPerStep >= self.maxBatchSize",
                    "maxTokensPerStep must be at least maxBatchSize (every running request decodes "
                    "one token per step)",
                    ".maxTokensPerStep",
                ),
                _cel(
                    "!has(self.maxSequenceLength) || self.chunkedPrefill || "
                    "self.maxTokensPerStep >= self.maxSequenceLength",
                    "without chunkedPrefill, maxTokensPerStep must hold a whole prompt "
                    "(>= maxSequenceLength)",
                    ".maxTokensPerStep",
                ),
            ]
        }
    )

    backend: Annotated[
        Backend,
        Field(
            default="torch",
            description="Runtime: `torch` (Kiln's own PyTorch runtime) or `tensorrt-llm` "
            "(NVIDIA TensorRT-LLM, production NVIDIA images).",
        ),
    ]
    quantization: Annotated[
        Quantization,
        Field(
            default="none",
            description="Weight format of the built engine. `none` keeps the checkpoint's dtype; "
            "`fp8` needs Ada or Hopper GPUs; `int4-awq`/`int4-gptq` load pre-quantized checkpoints; "
            "`mxfp4` keeps gpt-oss's published MXFP4 experts packed (torch backend).",
        ),
    ]
    kv_cache_dtype: Annotated[
        KVCacheDtype,
        Field(default="auto", description="KV-cache element type; `auto` follows the activation dtype."),
    ]
    max_batch_size: Annotated[
        int,
        Field(default=256, ge=1, le=4096, description="Most requests decoded together in one step."),
    ]
    max_sequence_length: Annotated[
        int | None,
        Field(
            default=None,
            ge=16,
            le=1048576,
            description="Longest prompt plus completion, in tokens. Defaults to the model's context.",
        ),
    ]
    max_tokens_per_step: Annotated[
        int,
        Field(
            default=8192,
            ge=1,
            le=1048576,
            description="Token budget of one engine step (prefill chunks plus decodes).",
        ),
    ]
    prefix_caching: Annotated[
        bool, Field(default=True, description="Reuse KV blocks of shared prompt prefixes across requests.")
    ]
    chunked_prefill: Annotated[
        bool,
        Field(default=True, description="Split long prompts across steps so decoding never stalls."),
    ]
    image: Annotated[
        str | None,
        Field(
            default=None,
            max_length=512,
            description="Engine image override. Defaults to the operator's image for the backend.",
        ),
    ]
    speculative: Annotated[
        SpeculativeDecoding | None,
        Field(
            default=None,
            description="Speculative decoding (torch backend, one GPU per replica). Greedy outputs are "
            "unchanged and sampled ones keep their distribution. Omit to turn it off.",
        ),
    ]
    lora: Annotated[
        list[LoraAdapterSource] | None,
        Field(
            default=None,
            max_length=MAX_LORA_ADAPTERS,
            description="LoRA adapters served by every replica next to the base model (torch backend): "
            "a request's `model` picks one, and one batch mixes adapters and the base model. "
            "Replicas load changes to this list while they run (a pvc:// adapter on a claim no other "
            "adapter uses adds a volume: that rolls the replicas).",
        ),
    ]
    max_lora_rank: Annotated[
        int | None,
        Field(
            default=None,
            ge=1,
            le=256,
            description="Largest adapter rank the replicas accept (default 16); device memory and "
            "per-token work for adapters grow with it.",
        ),
    ]
    max_loras: Annotated[
        int | None,
        Field(
            default=None,
            ge=1,
            le=64,
            description="Adapters a replica holds on its devices at once (default 4); others are "
            "loaded when asked for, in place of the least recently used. Adding, replacing or "
            "removing adapters in `lora` reaches running replicas without a restart; changing this "
            "rolls them.",
        ),
    ]


class GPURequirements(KubeModel):
    """Which GPUs a replica runs on."""

    product: Annotated[
        str,
        Field(
            min_length=1,
            max_length=128,
            pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
            description="GPU product as GPU Feature Discovery labels it (nvidia.com/gpu.product), "
            "for example NVIDIA-H100-80GB-HBM3. Builds run on the same product.",
            examples=["NVIDIA-H100-80GB-HBM3"],
        ),
    ]
    memory_mib: Annotated[
        int | None,
        # bounded: Kubernetes stores int64, and an unbounded model accepted values the server rejects
        Field(
            default=None,
            ge=1,
            le=16777216,
            description="Minimum memory per GPU in MiB (nvidia.com/gpu.memory), at most 16 TiB.",
        ),
    ]
    nvlink: Annotated[
        NVLinkPolicy,
        Field(
            default="Required",
            description="Required: a tensor-parallel group only runs where its GPUs share one NVLink "
            "island. Preferred: prefer such nodes. Ignore: place anywhere.",
        ),
    ]


class PlacementSpec(KubeModel):
    """Where a replica that spans nodes may run (tensor-parallel groups always follow gpu.nvlink)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!self.exclusive || self.nvlinkDomain == 'Required' || has(self.networkBlockLabel)",
                    "exclusive needs a topology domain to own: nvlinkDomain: Required, or a "
                    "networkBlockLabel",
                    ".exclusive",
                ),
            ]
        }
    )

    nvlink_domain: Annotated[
        NVLinkDomainPolicy,
        Field(
            default="Preferred",
            description="Required: the pods of one replica that spans nodes run only on nodes of one "
            "multi-node NVLink domain (the same nvidia.com/gpu.clique, e.g. one GB200 NVL72 rack). "
            "Preferred: inside one clique when one has room, else inside one network block "
            "(networkBlockLabel), else on any nodes.",
        ),
    ]
    network_block_label: Annotated[
        str | None,
        Field(
            default=None,
            max_length=316,
            pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
            description="Node label naming a network block (rack, spine, zone), e.g. "
            "topology.kubernetes.io/zone. A replica that spans nodes and gets no NVLink clique stays "
            "inside one block.",
            examples=["topology.kubernetes.io/zone"],
        ),
    ]
    exclusive: Annotated[
        bool,
        Field(
            default=False,
            description="Give each replica that spans nodes a clique (or network block) of its own: no "
            "other replica's pods share it.",
        ),
    ]


class AutoscalingSpec(KubeModel):
    """Scaling on time to first token and queue depth."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "self.minReplicas <= self.maxReplicas",
                    "minReplicas must be <= maxReplicas",
                    ".minReplicas",
                ),
                _cel(
                    "!has(self.ttftP90TargetMs) || self.ttftP90TargetMs >= self.ttftP50TargetMs",
                    "ttftP90TargetMs must be >= ttftP50TargetMs",
                    ".ttftP90TargetMs",
                ),
                _cel(
                    "!has(self.ttftP95TargetMs) || self.ttftP95TargetMs >= self.ttftP50TargetMs",
                    "ttftP95TargetMs must be >= ttftP50TargetMs",
                    ".ttftP95TargetMs",
                ),
                _cel(
                    "!has(self.ttftP95TargetMs) || !has(self.ttftP90TargetMs)"
                    " || self.ttftP95TargetMs >= self.ttftP90TargetMs",
                    "ttftP95TargetMs must be >= ttftP90TargetMs",
                    ".ttftP95TargetMs",
                ),
                _cel(
                    "!self.scaleToZero || self.minReplicas == 0",
                    "scaleToZero requires minReplicas: 0",
                    ".scaleToZero",
                ),
            ]
        }
    )

    enabled: Annotated[bool, Field(default=False, description="Let the Kiln autoscaler own spec.replicas.")]
    min_replicas: Annotated[int, Field(default=1, ge=0, le=10000, description="Fewest replicas.")]
    max_replicas: Annotated[int, Field(default=4, ge=1, le=10000, description="Most replicas.")]
    ttft_p50_target_ms: Annotated[
        int, Field(default=500, ge=1, le=600000, description="Target median time to first token, ms.")
    ]
    ttft_p90_target_ms: Annotated[
        int | None,
        Field(default=None, ge=1, le=600000, description="Optional target for the 90th percentile, ms."),
    ]
    ttft_p95_target_ms: Annotated[
        int | None,
        Field(default=None, ge=1, le=600000, description="Optional target for the 95th percentile, ms."),
    ]
    itl_target_ms: Annotated[
        int | None,
        Field(
            default=None,
            ge=1,
            le=60000,
            description="Optional target of inter-token latency (time between generated tokens) at "
            "itlPercentile, ms.",
        ),
    ]
    itl_percentile: Annotated[
        Literal[50, 90, 95],
        Field(default=50, description="The inter-token latency percentile itlTargetMs holds (50, 90 or 95)."),
    ]
    queue_depth_target: Annotated[
        int | None,
        Field(default=None, ge=1, le=100000, description="Optional target of waiting requests per replica."),
    ]
    scale_up_window_seconds: Annotated[
        int,
        Field(default=0, ge=0, le=3600, description="Stabilization window before scaling up."),
    ]
    scale_down_window_seconds: Annotated[
        int,
        Field(default=300, ge=0, le=86400, description="Stabilization window before scaling down."),
    ]
    scale_to_zero: Annotated[
        bool, Field(default=False, description="Scale to zero after idleSecondsBeforeZero without requests.")
    ]
    idle_seconds_before_zero: Annotated[
        int, Field(default=900, ge=30, le=604800, description="Idle time before scaling to zero.")
    ]


# ---------------------------------------------------------------- serving.podTemplate

# What serving.podTemplate may never set, and why: each would give whoever may create an
# LLMDeployment pods with more power than Kiln's restricted ones (the node's namespaces, files or
# devices, or another identity). They are declared in the CRD only so that the API server rejects
# them by name (CEL) instead of pruning them; the pydantic models reject them as unknown fields.
# Each denied field is declared with its Kubernetes type, so the CEL rule refusing it compiles.
_ANY_OBJECT: JsonDict = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
_FLAG: JsonDict = {"type": "boolean"}
_NAME: JsonDict = {"type": "string"}
_OBJECTS: JsonDict = {"type": "array", "items": _ANY_OBJECT}
DENIED_POD_FIELDS: dict[str, tuple[JsonDict, str]] = {
    "hostNetwork": (_FLAG, "serving pods never share the node's network"),
    "hostPID": (_FLAG, "serving pods never share the node's process namespace"),
    "hostIPC": (_FLAG, "serving pods never share the node's IPC namespace"),
    "hostUsers": (_FLAG, "serving pods never share the node's user namespace"),
    "securityContext": (_ANY_OBJECT, "Kiln sets the pod security context (restricted)"),
    "serviceAccountName": (_NAME, "serving pods run without a service account token"),
    "serviceAccount": (_NAME, "serving pods run without a service account token"),
    "automountServiceAccountToken": (_FLAG, "serving pods run without a service account token"),
    "nodeName": (_NAME, "Kiln places serving pods; use nodeSelector, affinity or tolerations"),
    "initContainers": (_OBJECTS, "only the engine container runs in serving pods"),
    "ephemeralContainers": (_OBJECTS, "only the engine container runs in serving pods"),
    "shareProcessNamespace": (_FLAG, "the engine's processes stay private"),
    "runtimeClassName": (_NAME, "Kiln chooses the runtime class"),
}
DENIED_CONTAINER_FIELDS: dict[str, tuple[JsonDict, str]] = {
    "securityContext": (
        _ANY_OBJECT,
        "Kiln sets the container security context (restricted: no privileged mode)",
    ),
    "image": (_NAME, "the engine image is Kiln's"),
    "command": ({"type": "array", "items": _NAME}, "the engine's command is Kiln's"),
}
DENIED_VOLUME_FIELDS: dict[str, tuple[JsonDict, str]] = {
    "hostPath": (_ANY_OBJECT, "serving pods never mount the node's files"),
}
# The volume sources a podTemplate may add (each harmless to the node and to other tenants).
ALLOWED_VOLUME_SOURCES = (
    "emptyDir",
    "configMap",
    "secret",
    "persistentVolumeClaim",
    "projected",
    "downwardAPI",
)
ALLOWED_PROJECTED_SOURCES = ("configMap", "secret", "downwardAPI")


def _deny(fields: dict[str, tuple[JsonDict, str]], where: str, *also: JsonDict) -> Any:
    """A json_schema_extra that declares `fields` (with their types) and a CEL rule refusing each by
    name, plus the rules `also`."""

    def extra(schema: JsonDict) -> None:
        properties = schema.setdefault("properties", {})
        assert isinstance(properties, dict)
        rules = schema.setdefault("x-kubernetes-validations", [])
        assert isinstance(rules, list)
        rules.extend(also)
        for name, (schema_type, why) in fields.items():
            properties[name] = {**copy.deepcopy(schema_type), "description": f"Not allowed: {why}."}
            rules.append(
                _cel(
                    f"!has(self.{name})",
                    f"{where} may not set {name}: {why}",
                    f".{name}",
                    "FieldValueForbidden",
                )
            )

    return extra


def _one_of(names: tuple[str, ...], what: str) -> JsonDict:
    present = ", ".join(f"has(self.{name})" for name in names)
    return _cel(
        f"[{present}].filter(x, x).size() == 1", f"{what} must set exactly one of: {', '.join(names)}"
    )


def _free(description: str) -> Any:
    return Field(
        default=None,
        description=description,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class PodTemplateMetadata(KubeModel):
    """Labels and annotations added to serving pods (Kiln's selector labels always win)."""

    labels: Annotated[dict[str, str] | None, Field(default=None, description="Extra pod labels.")]
    annotations: Annotated[dict[str, str] | None, Field(default=None, description="Extra pod annotations.")]


class VolumeMount(KubeModel):
    """Where a podTemplate volume appears in the engine container."""

    name: Annotated[str, Field(max_length=63, pattern=DNS_LABEL_PATTERN, description="The volume's name.")]
    mount_path: Annotated[str, Field(min_length=1, max_length=4096, description="Path in the container.")]
    sub_path: Annotated[
        str | None, Field(default=None, max_length=4096, description="Path inside the volume.")
    ]
    read_only: Annotated[bool | None, Field(default=None, description="Mount read-only.")]


class ContainerOverride(KubeModel):
    """What a podTemplate may change in the engine container (merged by name)."""

    model_config = ConfigDict(
        json_schema_extra=_deny(DENIED_CONTAINER_FIELDS, "serving.podTemplate containers")
    )

    name: Annotated[Literal["engine"], Field(description="The container to change: Kiln's engine container.")]
    env: Annotated[
        list[dict[str, Any]] | None,
        Field(default=None, description="Environment variables (Kubernetes EnvVar)."),
    ]
    env_from: Annotated[
        list[dict[str, Any]] | None,
        Field(default=None, description="Environment from ConfigMaps or Secrets."),
    ]
    resources: Annotated[dict[str, Any] | None, _free("Container resources (requests/limits).")]
    volume_mounts: Annotated[
        list[VolumeMount] | None, Field(default=None, description="Mounts of podTemplate volumes.")
    ]


class ProjectedSource(KubeModel):
    """One source of a projected volume: ConfigMap, Secret or downward API (no service account token)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [_one_of(ALLOWED_PROJECTED_SOURCES, "a projected source")]
        }
    )

    config_map: Annotated[dict[str, Any] | None, _free("A ConfigMap projection.")]
    secret: Annotated[dict[str, Any] | None, _free("A Secret projection.")]
    downward_api: Annotated[
        dict[str, Any] | None,
        Field(
            default=None,
            alias="downwardAPI",
            description="A downward API projection.",
            json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        ),
    ]


class ProjectedVolume(KubeModel):
    """A projected volume of ConfigMaps, Secrets and downward API items."""

    sources: Annotated[list[ProjectedSource], Field(max_length=32, description="What the volume holds.")]
    default_mode: Annotated[int | None, Field(default=None, ge=0, le=511, description="File mode bits.")]


class Volume(KubeModel):
    """A volume a podTemplate adds to serving pods: only sources harmless to the node and to other tenants."""

    model_config = ConfigDict(
        json_schema_extra=_deny(
            DENIED_VOLUME_FIELDS,
            "serving.podTemplate volumes",
            _one_of(ALLOWED_VOLUME_SOURCES, "a serving.podTemplate volume"),
        )
    )

    name: Annotated[str, Field(max_length=63, pattern=DNS_LABEL_PATTERN, description="The volume's name.")]
    empty_dir: Annotated[dict[str, Any] | None, _free("Scratch space (Kubernetes EmptyDirVolumeSource).")]
    config_map: Annotated[dict[str, Any] | None, _free("A ConfigMap (Kubernetes ConfigMapVolumeSource).")]
    secret: Annotated[dict[str, Any] | None, _free("A Secret (Kubernetes SecretVolumeSource).")]
    persistent_volume_claim: Annotated[
        dict[str, Any] | None,
        _free("A claim in the namespace (Kubernetes PersistentVolumeClaimVolumeSource)."),
    ]
    projected: Annotated[ProjectedVolume | None, Field(default=None, description="A projected volume.")]
    downward_api: Annotated[
        dict[str, Any] | None,
        Field(
            default=None,
            alias="downwardAPI",
            description="Pod fields as files (Kubernetes DownwardAPIVolumeSource).",
            json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        ),
    ]


class PodSpecOverride(KubeModel):
    """The pod spec fields a podTemplate may set: scheduling, priority, pull secrets, safe volumes and
    the engine container's env, resources and mounts. Nothing that widens what the pod may do."""

    model_config = ConfigDict(json_schema_extra=_deny(DENIED_POD_FIELDS, "serving.podTemplate"))

    tolerations: Annotated[
        list[dict[str, Any]] | None, Field(default=None, description="Tolerations (Kubernetes Toleration).")
    ]
    affinity: Annotated[dict[str, Any] | None, _free("Affinity, merged over Kiln's placement affinity.")]
    node_selector: Annotated[dict[str, str] | None, Field(default=None, description="Node selector.")]
    topology_spread_constraints: Annotated[
        list[dict[str, Any]] | None,
        Field(default=None, description="Topology spread constraints (Kubernetes TopologySpreadConstraint)."),
    ]
    priority_class_name: Annotated[
        str | None, Field(default=None, max_length=253, description="The serving pods' PriorityClass.")
    ]
    image_pull_secrets: Annotated[
        list[dict[str, Any]] | None, Field(default=None, description="Secrets for pulling the engine image.")
    ]
    volumes: Annotated[list[Volume] | None, Field(default=None, max_length=64, description="Extra volumes.")]
    containers: Annotated[
        list[ContainerOverride] | None,
        Field(default=None, max_length=1, description="Changes to the engine container."),
    ]


class PodTemplateOverride(KubeModel):
    """serving.podTemplate: an allow-list of pod template fields merged over what Kiln renders."""

    metadata: Annotated[
        PodTemplateMetadata | None, Field(default=None, description="Pod labels, annotations.")
    ]
    spec: Annotated[PodSpecOverride | None, Field(default=None, description="Allowed pod spec fields.")]


class ServingSpec(KubeModel):
    """How serving pods run."""

    port: Annotated[int, Field(default=8000, ge=1, le=65535, description="OpenAI-compatible HTTP port.")]
    resources: Annotated[
        dict[str, Any] | None,
        Field(
            default=None,
            description="Container resources (requests/limits) in addition to the GPUs Kiln requests.",
            json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        ),
    ]
    env: Annotated[
        list[dict[str, Any]] | None,
        Field(
            default=None,
            description="Extra environment variables for the engine container (Kubernetes EnvVar).",
        ),
    ]
    node_selector: Annotated[
        dict[str, str] | None, Field(default=None, description="Extra node selector for serving pods.")
    ]
    tolerations: Annotated[
        list[dict[str, Any]] | None, Field(default=None, description="Tolerations for serving pods.")
    ]
    pod_template: Annotated[
        PodTemplateOverride | None,
        Field(
            default=None,
            description="Pod template overrides ({metadata, spec}) merged over what Kiln renders: "
            "scheduling, priority, safe volumes, engine env/resources/mounts. Host access, security "
            "contexts and service accounts are refused.",
        ),
    ]
    termination_grace_period_seconds: Annotated[
        int,
        Field(
            default=120,
            ge=5,
            le=3600,
            description="Time a stopping pod gets to finish in-flight requests (drain).",
        ),
    ]
    api_key_secret: Annotated[
        SecretKeyRef | None,
        Field(default=None, description="When set, clients must send this bearer token."),
    ]


class RouterSpec(KubeModel):
    """Kiln routers in front of the serving pods: each request goes to the replica whose prefix cache
    most likely holds its prompt (balanced by the replicas' queues and KV-cache use), and a request
    whose replica fails before the first byte is retried on another. Off: the Service balances."""

    enabled: Annotated[
        bool, Field(default=False, description="Route through Kiln routers instead of the Service alone.")
    ]
    replicas: Annotated[
        int,
        Field(default=2, ge=1, le=32, description="Router pods; two or more keep routing through a drain."),
    ]
    resources: Annotated[
        dict[str, Any] | None,
        Field(
            default=None,
            description="Router container resources (requests/limits).",
            json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        ),
    ]
    node_selector: Annotated[
        dict[str, str] | None, Field(default=None, description="Node selector for router pods.")
    ]
    tolerations: Annotated[
        list[dict[str, Any]] | None, Field(default=None, description="Tolerations for router pods.")
    ]


class BuildSpec(KubeModel):
    """How and where the engine is built."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!has(self.cacheCredentialsSecret) || !has(self.cacheCredentialsSecret.key)",
                    "cacheCredentialsSecret exposes the whole Secret (its S3 keys and settings): omit key",
                    ".cacheCredentialsSecret.key",
                ),
                _cel(
                    "!has(self.cacheCredentialsSecret) || self.cache.startsWith('s3://')",
                    "cacheCredentialsSecret is for an s3:// cache",
                    ".cacheCredentialsSecret",
                ),
            ]
        }
    )

    cache: Annotated[
        str,
        Field(
            default="pvc://kiln-engine-cache",
            pattern=CACHE_PATTERN,
            max_length=1024,
            description="Where built engines are stored: pvc://claim[/path] or s3://bucket[/prefix].",
        ),
    ]
    cache_credentials_secret: Annotated[
        SecretKeyRef | None,
        Field(
            default=None,
            description="Secret for an s3:// cache, exposed whole as environment to the build Job and "
            "the serving pods: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally "
            "AWS_ENDPOINT_URL_S3 (S3-compatible servers), AWS_REGION, KILN_S3_ADDRESSING_STYLE "
            "(path, virtual or auto). Never logged or written to status.",
        ),
    ]
    node_selector: Annotated[
        dict[str, str] | None, Field(default=None, description="Extra node selector for the build Job.")
    ]
    tolerations: Annotated[
        list[dict[str, Any]] | None, Field(default=None, description="Tolerations for the build Job.")
    ]
    pod_annotations: Annotated[
        dict[str, str] | None,
        Field(default=None, description="Extra annotations on build pods (e.g. for a service mesh)."),
    ]
    timeout_seconds: Annotated[
        int, Field(default=7200, ge=60, le=172800, description="Deadline of one build attempt.")
    ]
    retries: Annotated[
        int, Field(default=2, ge=0, le=10, description="Build attempts after the first one fails.")
    ]


# ---------------------------------------------------------------- status pieces


class Condition(KubeModel):
    """A metav1.Condition."""

    type: Annotated[str, Field(max_length=316, description="Condition type, e.g. Ready.")]
    status: Annotated[Literal["True", "False", "Unknown"], Field(description="True, False or Unknown.")]
    reason: Annotated[str, Field(max_length=1024, description="CamelCase reason for the last transition.")]
    message: Annotated[str, Field(default="", max_length=32768, description="Human-readable details.")]
    observed_generation: Annotated[
        int | None, Field(default=None, ge=0, description="Generation the condition was set for.")
    ]
    last_transition_time: Annotated[datetime, Field(description="When the status last changed.")]


class EngineRef(KubeModel):
    """The LLMEngine a deployment uses."""

    name: Annotated[str, Field(description="LLMEngine name.")]
    key: Annotated[str, Field(description="Engine key (hash of everything that changes the artifact).")]


class ScaleDecision(KubeModel):
    """The autoscaler's last decision."""

    time: Annotated[datetime, Field(description="When it was taken.")]
    from_replicas: Annotated[int, Field(description="Replicas before.")]
    to_replicas: Annotated[int, Field(description="Replicas after.")]
    reason: Annotated[str, Field(description="Why, with the signals that drove it.")]


class Capacity(KubeModel):
    """What one replica of the engine sustains, measured at build time."""

    output_tokens_per_second: Annotated[float | None, Field(default=None, description="Decode throughput.")]
    prefill_tokens_per_second: Annotated[float | None, Field(default=None, description="Prefill throughput.")]
    max_concurrency_at_ttft_target: Annotated[
        int | None, Field(default=None, description="Concurrent requests within the TTFT target.")
    ]
    ttft_target_ms: Annotated[int | None, Field(default=None, description="TTFT target used to measure.")]
    ttft_percentile: Annotated[
        int | None, Field(default=None, description="Percentile the TTFT target held at (50, 90, ...).")
    ]


class Artifact(KubeModel):
    """Where a built engine lives and how to verify it."""

    uri: Annotated[str, Field(description="Artifact location (pvc://... or s3://...).")]
    manifest_sha256: Annotated[str, Field(description="SHA-256 of manifest.json, which lists every file's.")]
    size_bytes: Annotated[int | None, Field(default=None, description="Total artifact size.")]


class LLMDeploymentStatus(KubeModel):
    """Observed state of an LLMDeployment."""

    model_config = ConfigDict(extra="allow")

    phase: Annotated[DeploymentPhase | None, Field(default=None, description="Lifecycle phase.")]
    observed_generation: Annotated[int | None, Field(default=None, description="Last reconciled generation.")]
    conditions: Annotated[
        list[Condition] | None,
        Field(
            default=None,
            description="Ready, Progressing, Degraded, EngineReady, Unschedulable.",
            json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        ),
    ]
    replicas: Annotated[int | None, Field(default=None, description="Serving replicas that exist.")]
    ready_replicas: Annotated[int | None, Field(default=None, description="Replicas ready to serve.")]
    selector: Annotated[str | None, Field(default=None, description="Label selector of serving pods.")]
    layout: Annotated[str | None, Field(default=None, description="TP x PP, for display (e.g. 4x2).")]
    engine: Annotated[EngineRef | None, Field(default=None, description="Engine in use.")]
    pending_engine: Annotated[
        EngineRef | None, Field(default=None, description="Engine being built to replace the one in use.")
    ]
    endpoint: Annotated[str | None, Field(default=None, description="In-cluster URL of the OpenAI API.")]
    router_ready_replicas: Annotated[
        int | None, Field(default=None, description="Kiln routers ready (absent without a router).")
    ]
    ttft_p50_ms: Annotated[float | None, Field(default=None, description="Last observed TTFT p50, ms.")]
    ttft_p90_ms: Annotated[float | None, Field(default=None, description="Last observed TTFT p90, ms.")]
    ttft_p95_ms: Annotated[float | None, Field(default=None, description="Last observed TTFT p95, ms.")]
    itl_p50_ms: Annotated[
        float | None, Field(default=None, description="Last observed inter-token latency p50, ms.")
    ]
    itl_p95_ms: Annotated[
        float | None, Field(default=None, description="Last observed inter-token latency p95, ms.")
    ]
    last_scale_decision: Annotated[ScaleDecision | None, Field(default=None, description="Autoscaler.")]


class LLMEngineStatus(KubeModel):
    """Observed state of an LLMEngine."""

    model_config = ConfigDict(extra="allow")

    phase: Annotated[EnginePhase | None, Field(default=None, description="Lifecycle phase.")]
    observed_generation: Annotated[int | None, Field(default=None, description="Last reconciled generation.")]
    conditions: Annotated[
        list[Condition] | None,
        Field(
            default=None,
            description="Ready, Building, Failed.",
            json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        ),
    ]
    progress: Annotated[int | None, Field(default=None, ge=0, le=100, description="Build progress, %.")]
    step: Annotated[str | None, Field(default=None, description="Current build step.")]
    attempts: Annotated[int | None, Field(default=None, description="Build attempts so far.")]
    job: Annotated[str | None, Field(default=None, description="Current or last build Job.")]
    artifact: Annotated[Artifact | None, Field(default=None, description="Built artifact (when Ready).")]
    capacity: Annotated[Capacity | None, Field(default=None, description="Measured per-replica capacity.")]
    gpu_arch: Annotated[str | None, Field(default=None, description="GPU architecture built for.")]
    log_tail: Annotated[str | None, Field(default=None, description="Last lines of a failed build's log.")]
    users: Annotated[int | None, Field(default=None, description="LLMDeployments using this engine.")]
    last_used_time: Annotated[
        datetime | None, Field(default=None, description="When the last user stopped using it.")
    ]
    started_time: Annotated[datetime | None, Field(default=None, description="Build start.")]
    completed_time: Annotated[datetime | None, Field(default=None, description="Build end.")]


# ---------------------------------------------------------------- kinds


class LLMDeploymentSpec(KubeModel):
    """Desired state of an LLMDeployment."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "has(self.gpu) || !(self.engine.quantization in ['fp8', 'int4-awq', 'int4-gptq'])",
                    "fp8 and int4 quantization need spec.gpu",
                    ".engine.quantization",
                ),
                _cel(
                    "!has(self.engine.speculative) || "
                    "(self.parallelism.tensor == 1 && self.parallelism.pipeline == 1)",
                    "speculative decoding runs on one GPU per replica (no tensor or pipeline parallelism)",
                    ".engine.speculative",
                ),
                _cel(
                    "!has(self.gpu) || self.engine.kvCacheDtype != 'fp8' || "
                    f"!self.gpu.product.matches(r'{products_pattern(fp8=False)}') || "
                    f"self.gpu.product.matches(r'{products_pattern(fp8=True)}')",
                    "an fp8 KV cache needs e4m3 in hardware: a GPU of compute capability 8.9 or newer "
                    "(Ada, Hopper, Blackwell), not this spec.gpu.product",
                    ".engine.kvCacheDtype",
                ),
                _cel(
                    "has(self.gpu) || self.engine.backend == 'torch'",
                    "the tensorrt-llm backend needs spec.gpu",
                    ".engine.backend",
                ),
                _cel(
                    "!self.parallelism.expert || self.engine.backend == 'torch'",
                    "expert parallelism needs the torch backend",
                    ".parallelism.expert",
                ),
                _cel(
                    "!has(self.engine.lora) || self.parallelism.pipeline == 1",
                    "LoRA adapters are not served under pipeline parallelism",
                    ".engine.lora",
                ),
                _cel(
                    "!self.autoscaling.enabled || (self.replicas >= self.autoscaling.minReplicas "
                    "&& self.replicas <= self.autoscaling.maxReplicas)",
                    "with autoscaling enabled, replicas must lie within [minReplicas, maxReplicas]",
                    ".replicas",
                ),
            ]
        }
    )

    model: Annotated[ModelSource, Field(description="What to serve.")]
    engine: Annotated[
        EngineOptions, Field(default_factory=EngineOptions, description="How the engine is built and run.")
    ]
    parallelism: Annotated[
        Parallelism, Field(default_factory=Parallelism, description="How one replica is split across GPUs.")
    ]
    gpu: Annotated[
        GPURequirements | None,
        Field(default=None, description="GPUs to run on. Omit to run on CPU (tiny models, local demo)."),
    ]
    placement: Annotated[
        PlacementSpec,
        Field(
            default_factory=PlacementSpec,
            description="Where replicas that span nodes may run: NVLink clique, network block, exclusivity.",
        ),
    ]
    replicas: Annotated[
        int,
        Field(
            default=1,
            ge=0,
            le=10000,
            description="Serving replicas (scale subresource; owned by the autoscaler when enabled).",
        ),
    ]
    autoscaling: Annotated[
        AutoscalingSpec, Field(default_factory=AutoscalingSpec, description="Scaling on TTFT.")
    ]
    serving: Annotated[ServingSpec, Field(default_factory=ServingSpec, description="Serving pods.")]
    router: Annotated[
        RouterSpec, Field(default_factory=RouterSpec, description="Prefix-cache-aware routing.")
    ]
    build: Annotated[BuildSpec, Field(default_factory=BuildSpec, description="Engine build.")]


class ObjectMeta(OpenModel):
    """The parts of metav1.ObjectMeta Kiln reads."""

    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class LLMDeployment(KubeModel):
    """An LLM served by Kiln: model, engine, parallelism, GPUs, replicas and latency targets."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["kiln.dev/v1alpha1"] = "kiln.dev/v1alpha1"
    kind: Literal["LLMDeployment"] = "LLMDeployment"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: LLMDeploymentSpec
    status: LLMDeploymentStatus | None = None


class EngineModel(KubeModel):
    """The checkpoint an engine is built from, pinned."""

    source: Annotated[str, Field(pattern=SOURCE_PATTERN, max_length=1024, description="Checkpoint URI.")]
    tokenizer: Annotated[str | None, Field(default=None, max_length=1024, description="Tokenizer URI.")]
    credentials_secret: Annotated[
        SecretKeyRef | None, Field(default=None, description="Credentials for the source.")
    ]


class LLMEngineSpec(KubeModel):
    """Everything that changes a built engine. Created by the operator; immutable once created."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("self == oldSelf", "LLMEngine spec is immutable; a different engine gets a new key")
            ]
        }
    )

    key: Annotated[str, Field(pattern=r"^[a-f0-9]{16,64}$", description="Engine key (content hash).")]
    model: Annotated[EngineModel, Field(description="Checkpoint.")]
    draft_model: Annotated[
        str | None, DraftSource(description="Speculative decoding's draft checkpoint, carried in the engine.")
    ]
    backend: Annotated[Backend, Field(default="torch", description="Runtime.")]
    quantization: Annotated[Quantization, Field(default="none", description="Weight format.")]
    kv_cache_dtype: Annotated[KVCacheDtype, Field(default="auto", description="KV-cache element type.")]
    parallelism: Annotated[Parallelism, Field(default_factory=Parallelism, description="TP and PP.")]
    gpu_product: Annotated[
        str | None, Field(default=None, description="GPU product to build on; none for CPU engines.")
    ]
    gpu_arch: Annotated[str, Field(description="GPU architecture (e.g. sm90) or cpu.")]
    runtime_version: Annotated[str, Field(description="Engine runtime version.")]
    max_batch_size: Annotated[int, Field(default=256, ge=1, description="Build-time batch limit.")]
    max_sequence_length: Annotated[int | None, Field(default=None, ge=16, description="Context limit.")]
    max_tokens_per_step: Annotated[int, Field(default=8192, ge=1, description="Step token budget.")]
    image: Annotated[str | None, Field(default=None, description="Builder image override.")]
    cache: Annotated[str, Field(pattern=CACHE_PATTERN, description="Where the artifact is written.")]
    cache_credentials_secret: Annotated[
        SecretKeyRef | None, Field(default=None, description="S3 keys and settings for an s3:// cache.")
    ]
    capacity_ttft_target_ms: Annotated[
        int | None, Field(default=None, ge=1, description="TTFT target the build measures capacity at.")
    ]
    capacity_ttft_percentile: Annotated[
        Literal[50, 90] | None, Field(default=None, description="Percentile that TTFT target holds at.")
    ]
    node_selector: Annotated[dict[str, str] | None, Field(default=None, description="Build node selector.")]
    tolerations: Annotated[list[dict[str, Any]] | None, Field(default=None, description="Build tolerations.")]
    pod_annotations: Annotated[
        dict[str, str] | None, Field(default=None, description="Build pod annotations.")
    ]
    timeout_seconds: Annotated[int, Field(default=7200, ge=60, description="Build deadline.")]
    retries: Annotated[int, Field(default=2, ge=0, le=10, description="Build retries.")]


class LLMEngine(KubeModel):
    """One compiled engine, shared by every LLMDeployment with the same key."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["kiln.dev/v1alpha1"] = "kiln.dev/v1alpha1"
    kind: Literal["LLMEngine"] = "LLMEngine"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: LLMEngineSpec
    status: LLMEngineStatus | None = None
