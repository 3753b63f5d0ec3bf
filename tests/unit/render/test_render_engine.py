"""The LLMEngine a deployment needs: named from its engine key, sharing decided by the key only."""

from __future__ import annotations

from render_helpers import VERSION, example

from kiln.api.enginekey import engine_key, engine_name
from kiln.api.v1alpha1 import LLMEngine
from kiln.render import engine as render_engine


def test_engine_is_named_by_enginekey_and_carries_the_build_spec() -> None:
    deployment = example("llama-3-8b-fp8-h100.yaml")
    manifest = render_engine.engine(deployment, VERSION)
    key = engine_key(deployment.spec, VERSION)
    assert manifest["metadata"]["name"] == engine_name(deployment.spec, key)
    assert manifest["metadata"]["namespace"] == "serving"
    assert "ownerReferences" not in manifest["metadata"]  # shared, and kept after its users go
    engine = LLMEngine.model_validate(manifest)
    assert engine.spec.key == key
    assert (engine.spec.quantization, engine.spec.gpu_product, engine.spec.gpu_arch) == (
        "fp8",
        "NVIDIA-H100-80GB-HBM3",
        "sm90",
    )
    assert engine.spec.cache == "pvc://kiln-engine-cache"
    assert engine.spec.model.credentials_secret is not None


def test_replicas_and_serving_changes_share_the_engine_quantization_does_not() -> None:
    base = render_engine.engine_identity(example("llama-3-8b-fp8-h100.yaml"), VERSION)
    scaled = example("llama-3-8b-fp8-h100.yaml", replicas=7, serving={"port": 9000})
    assert render_engine.engine_identity(scaled, VERSION) == base
    requantized = example("llama-3-8b-fp8-h100.yaml", engine={"quantization": "int8-weight"})
    other = render_engine.engine_identity(requantized, VERSION)
    assert other.key != base.key and other.name != base.name and "int8-weight" in other.name


def test_build_pod_annotations_reach_the_engine_without_changing_its_key() -> None:
    plain = example("tiny-cpu.yaml")
    annotated = example("tiny-cpu.yaml", build={"podAnnotations": {"kiln.dev/simulate-fail": "true"}})
    assert render_engine.engine_identity(plain, VERSION) == render_engine.engine_identity(annotated, VERSION)
    spec = render_engine.engine(annotated, VERSION)["spec"]
    assert spec["podAnnotations"] == {"kiln.dev/simulate-fail": "true"}
    assert "podAnnotations" not in render_engine.engine(plain, VERSION)["spec"]
