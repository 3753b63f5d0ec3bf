"""spec.engine.lora: its CEL rules (evaluated with cel-python from the generated CRD), and the contract
between what the operator renders and what the engine reads: the `kiln-engine serve` flags parse on the
engine's own command line and name the file where the pod mounts the rendered ConfigMap, which the
engine's own reader turns back into the spec's adapters; changing the adapters changes the ConfigMap
and not the pod template (so running replicas load the change instead of rolling)."""

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
from kiln_engine.cli import serve as serve_command
from kiln_engine.server.lora_watch import read_adapter_file

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


def _inputs(deployment: LLMDeployment) -> render_serving.ServingInputs:
    return render_serving.ServingInputs(deployment, ready(deployment), None, Settings())


def _serve_params(deployment: LLMDeployment) -> dict[str, Any]:
    args = render_serving.engine_args(_inputs(deployment))
    assert args[0] == "serve"
    return dict(serve_command.make_context("serve", args[1:]).params)


def _mounted_file(deployment: LLMDeployment, file: Path, root: Path) -> Path:
    """Where `file` (a path inside the engine container) lies under `root`, which holds the pod's
    volumes as the kubelet would fill them: each ConfigMap volume's keys as files at its mountPath."""
    spec = render_serving.pod_template(_inputs(deployment))["spec"]
    [container] = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in container["volumeMounts"]:
        source = volumes[mount["name"]].get("configMap")
        if source is None or not str(file).startswith(mount["mountPath"] + "/"):
            continue
        config_map = render_serving.lora_config_map(deployment)
        assert config_map is not None and config_map["metadata"]["name"] == source["name"]
        assert config_map["metadata"]["namespace"] == deployment.metadata.namespace
        for key, text in config_map["data"].items():
            (root / mount["mountPath"].lstrip("/")).mkdir(parents=True, exist_ok=True)
            (root / mount["mountPath"].lstrip("/") / key).write_text(text)
    return root / str(file).lstrip("/")


def test_adapters_reach_the_engine_through_the_mounted_config_map(tmp_path: Path) -> None:
    d = _deployment(lora=ADAPTERS, maxLoraRank=64, maxLoras=6)
    assert _broken_rules(_spec(d)) == []
    params = _serve_params(d)
    assert params["loras"] == ()
    adapter_file = _mounted_file(d, params["lora_file"], tmp_path)
    assert read_adapter_file(adapter_file) == [(a["name"], a["source"]) for a in ADAPTERS]
    assert params["max_loras"] == 6
    assert params["max_lora_rank"] == 64


def test_changing_the_adapters_leaves_the_pod_template_alone() -> None:
    one, two = _deployment(lora=ADAPTERS[:1]), _deployment(lora=ADAPTERS)
    assert render_serving.pod_template(_inputs(one)) == render_serving.pod_template(_inputs(two))
    assert render_serving.lora_config_map(one) != render_serving.lora_config_map(two)
    none = _deployment(lora=[])
    assert render_serving.pod_template(_inputs(none)) == render_serving.pod_template(_inputs(one))


def test_a_pvc_adapter_mounts_its_claim_read_only() -> None:
    d = _deployment(lora=[{"name": "mine", "source": "pvc://adapters/team-a/sql"}])
    spec = render_serving.pod_template(_inputs(d))["spec"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v for v in spec["volumes"] if "persistentVolumeClaim" in v
    }
    assert claims["adapters"]["persistentVolumeClaim"]["readOnly"] is True


def test_no_adapters_render_no_lora_flags_and_no_config_map() -> None:
    d = _deployment()
    params = _serve_params(d)
    assert params["loras"] == () and params["lora_file"] is None
    assert render_serving.lora_config_map(d) is None
    assert _broken_rules({**_spec(d), "engine": {**_spec(d)["engine"], "maxLoras": 2}}) == [
        "maxLoras sizes the LoRA adapter slots: it needs spec.engine.lora (an empty list serves none yet)"
    ]


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
