"""spec.engine.speculative: its CEL rules (evaluated with cel-python from the generated CRD) and the
`kiln-engine serve` flags it renders into."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from render_helpers import engine_for, example, ready

from kiln.api.v1alpha1 import LLMDeployment
from kiln.render import build_job as render_build
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
        _deployment(speculative={"method": "medusa"})
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


DRAFT = "hf://meta-llama/Llama-3.2-1B-Instruct@9213176"


def _torch(speculative: dict[str, Any] | None) -> LLMDeployment:
    return _deployment(backend="torch", quantization="none", speculative=speculative)


def test_a_draft_model_is_built_into_the_engine_and_served() -> None:
    d = _deployment(
        backend="torch", quantization="none", speculative={"method": "draft", "draftModel": DRAFT}
    )
    assert _broken_rules(_spec_json(d)) == []
    engine = engine_for(d)
    assert engine.spec.draft_model == DRAFT
    args = render_build.build_args(engine, Settings())
    assert args[args.index("--draft-model") + 1] == DRAFT
    serve = render_serving.engine_args(render_serving.ServingInputs(d, ready(d), None, Settings()))
    assert serve[serve.index("--speculative") + 1] == "draft"
    # The draft is part of what the engine is: another draft (or none) is another engine.
    keys = {
        engine_for(x).spec.key
        for x in (
            d,
            _deployment(
                backend="torch",
                quantization="none",
                speculative={"method": "draft", "draftModel": DRAFT + "x"},
            ),
            _torch({"method": "ngram"}),
        )
    }
    assert len(keys) == 3
    ngram = _torch({"method": "ngram"})
    assert engine_for(ngram).spec.key == engine_for(_torch(None)).spec.key
    assert "--draft-model" not in render_build.build_args(engine_for(ngram), Settings())


def test_a_pvc_draft_is_mounted_read_only_in_the_build() -> None:
    draft = "pvc://drafts/llama-1b"
    d = _deployment(
        backend="torch", quantization="none", speculative={"method": "draft", "draftModel": draft}
    )
    job = render_build.build_job(engine_for(d), Settings(), gpus=1)
    pod = job["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
              for v in pod["volumes"] if "persistentVolumeClaim" in v}  # fmt: skip
    assert claims.get("drafts") is True
    args = pod["containers"][0]["args"]
    mounted = args[args.index("--draft-model") + 1]
    assert not mounted.startswith("pvc://") and mounted.endswith("/llama-1b")


def test_cel_pairs_the_draft_method_with_its_model() -> None:
    d = _torch({"method": "ngram"})
    spec = _spec_json(d)
    rule = "speculative.draftModel goes with method draft or eagle, which need it"
    for method in ("draft", "eagle"):
        spec["engine"]["speculative"] = {"method": method, "numTokens": 4}
        assert rule in _broken_rules(spec)
        spec["engine"]["speculative"] = {"method": method, "numTokens": 4, "draftModel": DRAFT}
        assert rule not in _broken_rules(spec)
    spec["engine"]["speculative"] = {"method": "ngram", "numTokens": 4, "draftModel": DRAFT}
    assert rule in _broken_rules(spec)


def test_an_eagle_head_is_built_into_the_engine_and_served_as_one() -> None:
    head = "hf://yuhuili/EAGLE-LLaMA3-Instruct-8B@main"
    d = _torch({"method": "eagle", "draftModel": head, "numTokens": 5})
    args = render_build.build_args(engine_for(d), Settings())
    assert args[args.index("--draft-model") + 1] == head
    serve = render_serving.engine_args(render_serving.ServingInputs(d, ready(d), None, Settings()))
    assert serve[serve.index("--speculative") + 1] == "eagle"
    assert serve[serve.index("--num-speculative-tokens") + 1] == "5"
    assert engine_for(d).spec.key != engine_for(_torch({"method": "ngram"})).spec.key
