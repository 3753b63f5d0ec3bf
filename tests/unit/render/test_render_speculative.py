"""spec.engine.speculative: its CEL rules (evaluated with cel-python from the generated CRD) and the
`kiln-engine serve` flags it renders into."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from render_helpers import example, ready

from kiln.api.v1alpha1 import LLMDeployment
from kiln.render import serving as render_serving
from kiln.render.common import Settings

ROOT = Path(__file__).resolve().parents[3]


def _spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / "crds" / "kiln.dev_llmdeployments.yaml").read_text())
    [version] = crd["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def _broken_rules(spec: dict[str, Any]) -> list[str]:
    """Messages of the CEL rules on spec and spec.engine that `spec` breaks."""
    env = celpy.Environment()
    schema = _spec_schema()
    checks = [(schema, spec), (schema["properties"]["engine"], spec["engine"])]
    return [
        rule["message"]
        for part, value in checks
        for rule in part.get("x-kubernetes-validations", [])
        if not bool(env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)}))
    ]


def _deployment(**engine: Any) -> LLMDeployment:
    return example("llama-3-8b-fp8-h100.yaml", engine=engine)


def _spec_json(deployment: LLMDeployment) -> dict[str, Any]:
    dumped: dict[str, Any] = deployment.model_dump(by_alias=True, exclude_none=True, mode="json")["spec"]
    return dumped


def test_speculation_is_accepted_on_one_gpu_with_the_torch_backend() -> None:
    d = _deployment(backend="torch", quantization="none", speculative={"method": "ngram", "numTokens": 3})
    assert d.spec.engine.speculative is not None and d.spec.engine.speculative.num_tokens == 3
    assert _broken_rules(_spec_json(d)) == []


def test_cel_refuses_speculation_with_parallelism_or_tensorrt_llm() -> None:
    d = _deployment(backend="torch", quantization="none", speculative={"method": "ngram"})
    spec = _spec_json(d)
    spec["parallelism"] = {"tensor": 2, "pipeline": 1}
    assert any("no tensor or pipeline parallelism" in m for m in _broken_rules(spec))
    spec = _spec_json(d)
    spec["engine"]["backend"] = "tensorrt-llm"
    assert "speculative decoding needs the torch backend" in _broken_rules(spec)


def test_bad_speculative_values_are_rejected_by_the_schema() -> None:
    with pytest.raises(ValueError):
        _deployment(speculative={"method": "eagle"})
    with pytest.raises(ValueError):
        _deployment(speculative={"method": "ngram", "numTokens": 0})


def test_speculation_renders_into_the_serve_flags() -> None:
    for speculative, want in (({"method": "ngram", "numTokens": 5}, ["ngram", "5"]), (None, None)):
        d = _deployment(backend="torch", quantization="none", speculative=speculative)
        args = render_serving.engine_args(render_serving.ServingInputs(d, ready(d), None, Settings()))
        if want is None:
            assert "--speculative" not in args
        else:
            i = args.index("--speculative")
            assert [args[i + 1], args[args.index("--num-speculative-tokens") + 1]] == want
