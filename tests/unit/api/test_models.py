"""The API models: defaults, wire format, and rejection of bad input before it reaches the cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kiln.api.v1alpha1 import LLMDeployment, LLMDeploymentSpec

EXAMPLES = sorted((Path(__file__).parents[3] / "examples").glob("*.yaml"))


def minimal(**overrides: object) -> dict[str, object]:
    spec: dict[str, object] = {"model": {"source": "hf://org/model@abc123"}}
    spec.update(overrides)
    return spec


def test_examples_parse() -> None:
    assert len(EXAMPLES) >= 4
    for path in EXAMPLES:
        deployment = LLMDeployment.model_validate(yaml.safe_load(path.read_text()))
        assert deployment.metadata.name


def test_defaults_fill_every_section() -> None:
    spec = LLMDeploymentSpec.model_validate(minimal())
    assert spec.engine.backend == "torch"
    assert spec.engine.quantization == "none"
    assert spec.engine.prefix_caching and spec.engine.chunked_prefill
    assert (spec.parallelism.tensor, spec.parallelism.pipeline) == (1, 1)
    assert spec.replicas == 1
    assert not spec.autoscaling.enabled
    assert spec.serving.port == 8000
    assert spec.build.cache == "pvc://kiln-engine-cache"
    assert spec.gpu is None


def test_wire_format_is_camel_case_and_round_trips() -> None:
    spec = LLMDeploymentSpec.model_validate(
        minimal(engine={"maxBatchSize": 8, "kvCacheDtype": "bf16"}, autoscaling={"ttftP50TargetMs": 90})
    )
    wire = spec.to_wire()
    assert wire["engine"]["maxBatchSize"] == 8
    assert wire["autoscaling"]["ttftP50TargetMs"] == 90
    assert "max_batch_size" not in wire["engine"]
    assert LLMDeploymentSpec.model_validate(wire) == spec


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"model": {"source": "http://example.com/model"}}, "source"),
        ({"model": {"source": "hf://org"}}, "source"),
        ({"engine": {"quantization": "int3"}}, "quantization"),
        ({"engine": {"backend": "vllm"}}, "backend"),
        ({"engine": {"maxBatchSize": 0}}, "maxBatchSize"),
        ({"parallelism": {"tensor": 0}}, "tensor"),
        ({"replicas": -1}, "replicas"),
        ({"gpu": {"product": "NVIDIA H100"}}, "product"),
        ({"gpu": {"product": "NVIDIA-H100-80GB-HBM3", "nvlink": "Sometimes"}}, "nvlink"),
        ({"serving": {"port": 70000}}, "port"),
        ({"build": {"cache": "file:///tmp"}}, "cache"),
        ({"engine": {"maxBatchSzie": 8}}, "maxBatchSzie"),
    ],
)
def test_bad_fields_are_rejected_naming_the_field(overrides: dict[str, object], field: str) -> None:
    spec = minimal()
    spec.update(overrides)
    with pytest.raises(ValidationError) as error:
        LLMDeploymentSpec.model_validate(spec)
    assert field in str(error.value)


@pytest.mark.parametrize(
    "template",
    [
        {"spec": {"hostNetwork": True}},
        {"spec": {"serviceAccountName": "admin"}},
        {"spec": {"containers": [{"name": "engine", "securityContext": {"privileged": True}}]}},
        {"spec": {"containers": [{"name": "sidecar", "env": []}]}},
        {"spec": {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}},
        {"spec": {"volumes": [{"name": "p", "projected": {"sources": [{"serviceAccountToken": {}}]}}]}},
    ],
)
def test_pod_template_outside_the_allow_list_is_rejected(template: dict[str, object]) -> None:
    """The operator refuses what the CRD refuses, e.g. an object stored under an older, free-form CRD."""
    with pytest.raises(ValidationError):
        LLMDeploymentSpec.model_validate(minimal(serving={"podTemplate": template}))


def test_pod_template_allow_list_round_trips_on_the_wire() -> None:
    template = {
        "metadata": {"labels": {"team": "a"}},
        "spec": {
            "tolerations": [{"key": "k", "operator": "Exists"}],
            "affinity": {"nodeAffinity": {}},
            "volumes": [{"name": "d", "downwardAPI": {"items": []}}],
            "containers": [{"name": "engine", "envFrom": [{"configMapRef": {"name": "c"}}]}],
        },
    }
    spec = LLMDeploymentSpec.model_validate(minimal(serving={"podTemplate": template}))
    assert spec.to_wire()["serving"]["podTemplate"] == template
