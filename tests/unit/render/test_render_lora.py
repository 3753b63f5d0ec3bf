"""spec.engine.lora: its CEL rules (evaluated with cel-python from the generated CRD), and the contract
between the rendered `kiln-engine serve` flags and the engine's own command line: the flags parse
into the spec's adapters, each under its name, with a device slot each."""

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
from kiln_engine.cli import _lora_modules
from kiln_engine.cli import serve as serve_command

ROOT = Path(__file__).resolve().parents[3]
ADAPTERS = [
    {"name": "sql-expert", "source": "hf://acme/sql-lora@v1"},
    {"name": "support.v2", "source": "s3://adapters/support"},
]


def _broken_rules(spec: dict[str, Any]) -> list[str]:
    """Messages of the CEL rules on spec, spec.engine and each spec.engine.lora item that `spec` breaks."""
    crd = yaml.safe_load((ROOT / "crds" / "kiln.dev_llmdeployments.yaml").read_text())
    [version] = crd["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    engine = schema["properties"]["engine"]
    checks = [(schema, spec), (engine, spec["engine"])]
    checks += [(engine["properties"]["lora"]["items"], a) for a in spec["engine"].get("lora", [])]
    env = celpy.Environment()
    return [
        rule["message"]
        for part, value in checks
        for rule in part.get("x-kubernetes-validations", [])
        if not bool(env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)}))
    ]


def _deployment(**engine: Any) -> LLMDeployment:
    return example("llama-3-8b-fp8-h100.yaml", engine={"backend": "torch", "quantization": "none", **engine})


def _spec(deployment: LLMDeployment) -> dict[str, Any]:
    spec: dict[str, Any] = deployment.model_dump(by_alias=True, exclude_none=True, mode="json")["spec"]
    return spec


def _serve_params(deployment: LLMDeployment) -> dict[str, Any]:
    args = render_serving.engine_args(
        render_serving.ServingInputs(deployment, ready(deployment), None, Settings())
    )
    assert args[0] == "serve"
    return dict(serve_command.make_context("serve", args[1:]).params)


def test_adapters_render_into_flags_the_engine_parses() -> None:
    d = _deployment(lora=ADAPTERS, maxLoraRank=64)
    assert _broken_rules(_spec(d)) == []
    params = _serve_params(d)
    assert _lora_modules(params["loras"], params["pp"] or 1) == [(a["name"], a["source"]) for a in ADAPTERS]
    assert params["max_loras"] == len(ADAPTERS)
    assert params["max_lora_rank"] == 64


def test_no_adapters_render_no_lora_flags() -> None:
    params = _serve_params(_deployment())
    assert params["loras"] == ()


def test_cel_refuses_duplicate_names_base_tensorrt_llm_and_pipeline_parallelism() -> None:
    spec = _spec(_deployment(lora=ADAPTERS))
    spec["engine"]["lora"] = [ADAPTERS[0], {**ADAPTERS[1], "name": ADAPTERS[0]["name"]}]
    assert _broken_rules(spec) == ["LoRA adapter names must be unique"]
    spec = _spec(_deployment(lora=ADAPTERS))
    spec["engine"]["lora"][1]["name"] = "base"
    assert _broken_rules(spec) == ["'base' names the base model, not an adapter"]
    spec = _spec(_deployment(lora=ADAPTERS))
    spec["engine"]["backend"] = "tensorrt-llm"
    assert "LoRA adapters need the torch backend" in _broken_rules(spec)
    spec = _spec(_deployment(lora=ADAPTERS))
    spec["parallelism"] = {"tensor": 1, "pipeline": 2}
    assert "LoRA adapters are not served under pipeline parallelism" in _broken_rules(spec)


@pytest.mark.parametrize(
    "lora",
    [
        [{"name": "-bad", "source": "hf://a/b"}],
        [{"name": "ok", "source": "http://example.com/x"}],
        [{"name": f"a{i}", "source": "hf://a/b"} for i in range(33)],
    ],
)
def test_bad_adapters_are_rejected_by_the_schema(lora: list[dict[str, str]]) -> None:
    with pytest.raises(ValueError):
        _deployment(lora=lora)
