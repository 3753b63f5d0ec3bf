"""spec.parallelism.expert: what the API admits (schema and CEL, as the API server judges it), and
how it reaches the build (the engine's flag, name and key)."""

from __future__ import annotations

from typing import Any

from render_helpers import engine_for, example

from kiln.render import build_job as render_build
from kiln.render.common import Settings
from tests.reliability.spec_strategies import judge


def _spec(**parallelism: Any) -> dict[str, Any]:
    d = example("llama-3-70b-fp8-tp4.yaml", parallelism=parallelism, engine={"backend": "torch"})
    spec: dict[str, Any] = d.model_dump(by_alias=True, exclude_none=True, mode="json")["spec"]
    return spec


def test_expert_parallelism_over_tensor_parallel_gpus_is_admitted_and_built() -> None:
    spec = _spec(tensor=4, expert=True)
    assert judge(spec).accepted, judge(spec).errors
    engine = engine_for(example("llama-3-70b-fp8-tp4.yaml", parallelism={"tensor": 4, "expert": True}))
    assert "--expert-parallel" in render_build.build_args(engine, Settings())
    assert "-ep4-" in str(engine.metadata.name)
    plain = engine_for(example("llama-3-70b-fp8-tp4.yaml"))
    assert "--expert-parallel" not in render_build.build_args(plain, Settings())
    assert plain.spec.key != engine.spec.key  # another layout of the weights: another engine


def test_expert_parallelism_without_tensor_parallel_gpus_or_on_tensorrt_llm_is_refused() -> None:
    one = judge(_spec(tensor=1, expert=True))
    assert not one.accepted and "spec.parallelism.expert" in one.error_paths
    assert any("tensor must be at least 2" in m for m in one.errors)
    trt = _spec(tensor=4, expert=True)
    trt["engine"]["backend"] = "tensorrt-llm"
    verdict = judge(trt)
    assert not verdict.accepted and "expert parallelism needs the torch backend" in verdict.errors
