"""The engine key: stable across runs, and changed by each input that changes the artifact only."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kiln.api.enginekey import engine_key, engine_name, engine_spec
from kiln.api.gpus import gpu_arch
from kiln.api.v1alpha1 import LLMDeploymentSpec

BASE: dict[str, object] = {
    "model": {"source": "hf://meta-llama/Meta-Llama-3-8B@abc"},
    "engine": {"quantization": "fp8"},
    "gpu": {"product": "NVIDIA-H100-80GB-HBM3"},
}


def spec_with(path: str, value: object, base: dict[str, object] | None = None) -> LLMDeploymentSpec:
    data = LLMDeploymentSpec.model_validate(base or BASE).to_wire()
    node = data
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return LLMDeploymentSpec.model_validate(data)


def test_key_is_stable_across_processes() -> None:
    here = engine_key(LLMDeploymentSpec.model_validate(BASE), "1.0")
    code = (
        "from kiln.api.enginekey import engine_key; from kiln.api.v1alpha1 import LLMDeploymentSpec; "
        f"print(engine_key(LLMDeploymentSpec.model_validate({BASE!r}), '1.0'))"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert there.stdout.strip() == here
    assert len(here) == 20 and int(here, 16) >= 0


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("model.source", "hf://meta-llama/Meta-Llama-3-8B@def"),
        ("model.tokenizer", "hf://meta-llama/other-tokenizer"),
        ("engine.quantization", "int8-weight"),
        ("engine.backend", "tensorrt-llm"),
        ("engine.image", "registry.example/engine:2"),
        ("parallelism.tensor", 2),
        ("parallelism.pipeline", 2),
        ("parallelism.expert", True),
        ("gpu.product", "NVIDIA-A100-SXM4-80GB"),
        ("build.cache", "s3://kiln-engines/cache"),
        # the build measures capacity (torch, one rank) at the deployment's target, with its limits
        ("autoscaling.ttftP50TargetMs", 200),
        ("autoscaling.ttftP90TargetMs", 900),
        ("engine.maxBatchSize", 64),
    ],
)
def test_each_artifact_input_changes_the_key(path: str, value: object) -> None:
    base = engine_key(LLMDeploymentSpec.model_validate(BASE), "1.0")
    assert engine_key(spec_with(path, value), "1.0") != base


def test_a_field_added_at_its_default_keeps_the_keys_of_engines_built_before_it() -> None:
    # Keys computed before `parallelism.expert` existed (2026-12-07): an upgrade must not rebuild
    # every engine in every cluster.
    tp2 = {"model": {"source": "hf://Qwen/Qwen3-30B-A3B@abc"}, "parallelism": {"tensor": 2},
           "gpu": {"product": "NVIDIA-H100-80GB-HBM3"}}  # fmt: skip
    assert engine_key(LLMDeploymentSpec.model_validate(BASE), "1.0") == "8a677cd2b84a3f4333c0"
    assert engine_key(LLMDeploymentSpec.model_validate(tp2), "1.0") == "a6b831bcaf795b31dd60"


def test_runtime_version_changes_the_key() -> None:
    spec = LLMDeploymentSpec.model_validate(BASE)
    assert engine_key(spec, "1.0") != engine_key(spec, "1.1")


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("replicas", 7),
        ("autoscaling.enabled", True),
        ("serving.port", 9000),
        ("serving.terminationGracePeriodSeconds", 600),
        ("build.timeoutSeconds", 900),
        ("gpu.product", "NVIDIA-H200"),  # same architecture (sm90): the engine is reusable
        ("build.cacheCredentialsSecret", {"name": "other-keys"}),  # access, not content
    ],
)
def test_serving_only_changes_keep_the_key(path: str, value: object) -> None:
    base = engine_key(LLMDeploymentSpec.model_validate(BASE), "1.0")
    assert engine_key(spec_with(path, value), "1.0") == base


def test_tensorrt_llm_bakes_build_limits_into_the_key() -> None:
    trt = spec_with("engine.backend", "tensorrt-llm")
    trt_base = engine_key(trt, "1.0")
    changed = spec_with("engine.maxBatchSize", 64, base=trt.to_wire())
    assert engine_key(changed, "1.0") != trt_base


@pytest.mark.parametrize(
    ("product", "arch"),
    [
        ("NVIDIA-H100-80GB-HBM3", "sm90"),
        ("NVIDIA-H200", "sm90"),
        ("NVIDIA-A100-SXM4-80GB", "sm80"),
        ("NVIDIA-L40S", "sm89"),
        ("NVIDIA-GB200", "sm100"),
        ("NVIDIA-A10G", "sm86"),
        (None, "cpu"),
        ("Mystery Accelerator 9000", "gpu-mystery-accelerator-9000"),
    ],
)
def test_gpu_arch(product: str | None, arch: str) -> None:
    assert gpu_arch(product) == arch


def test_engine_name_is_a_valid_label_value_and_ends_with_the_key() -> None:
    long_model = "hf://org/" + "a-very-long-model-name" * 5 + "@rev"
    spec = spec_with("model.source", long_model)
    key = engine_key(spec, "1.0")
    name = engine_name(spec, key)
    assert len(name) <= 63
    assert name.endswith(key)
    assert "-fp8-tp1-sm90-" in name


def test_engine_spec_carries_the_key_and_build_settings() -> None:
    spec = spec_with("parallelism.tensor", 4)
    built = engine_spec(spec, "1.0")
    assert built.key == engine_key(spec, "1.0")
    assert built.parallelism.tensor == 4
    assert built.gpu_arch == "sm90"
    assert built.cache == spec.build.cache


def test_capacity_settings_stay_out_of_the_key_where_the_build_does_not_measure() -> None:
    """Serving pods measure multi-rank engines: their target and limits do not change the artifact."""
    tp2 = spec_with("parallelism.tensor", 2)
    for path, value in (("autoscaling.ttftP50TargetMs", 200), ("engine.maxBatchSize", 64)):
        assert engine_key(spec_with(path, value, base=tp2.to_wire()), "1.0") == engine_key(tp2, "1.0")
    assert engine_spec(tp2, "1.0").capacity_ttft_percentile is None


def test_the_build_measures_at_the_deployments_tightest_stated_percentile() -> None:
    p50_only = engine_spec(spec_with("autoscaling.ttftP50TargetMs", 300), "1.0")
    assert (p50_only.capacity_ttft_percentile, p50_only.capacity_ttft_target_ms) == (50, 300)
    with_p90 = engine_spec(spec_with("autoscaling.ttftP90TargetMs", 900), "1.0")
    assert (with_p90.capacity_ttft_percentile, with_p90.capacity_ttft_target_ms) == (90, 900)
