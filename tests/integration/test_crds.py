"""Kiln's CRDs in a real kube-apiserver: examples are accepted, bad specs rejected naming the field."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from kiln.local import build
from kiln.local.testing import LocalCluster

pytestmark = pytest.mark.cluster

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
GROUP, VERSION, PLURAL = "kiln.dev", "v1alpha1", "llmdeployments"


def create(api: client.CustomObjectsApi, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    return result


def deployment(name: str, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"source": "hf://org/model@abc"},
        "gpu": {"product": "NVIDIA-H100-80GB-HBM3"},
    }
    for path, value in spec.items():
        node = base
        *parents, leaf = path.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMDeployment",
        "metadata": {"name": name},
        "spec": base,
    }


@pytest.fixture
def custom(local_cluster: LocalCluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(local_cluster.api_client)


def test_every_example_is_accepted_with_defaults_applied(
    custom: client.CustomObjectsApi, namespace: str
) -> None:
    assert len(EXAMPLES) >= 4
    for path in EXAMPLES:
        created = create(custom, namespace, yaml.safe_load(path.read_text()))
        spec = created["spec"]
        # Structural defaults reach nested sections the example left out.
        assert spec["engine"]["prefixCaching"] is True, path
        assert (
            spec["serving"]["port"] == 8000 or "port" in yaml.safe_load(path.read_text())["spec"]["serving"]
        )
        assert spec["build"]["retries"] == 2, path
        assert spec["parallelism"]["pipeline"] >= 1, path


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"parallelism__tensor": 3}, "spec.parallelism.tensor", "power of two"),
        (
            {"autoscaling__minReplicas": 5, "autoscaling__maxReplicas": 2},
            "spec.autoscaling.minReplicas",
            "<=",
        ),
        ({"model__source": "ftp://nowhere/model"}, "spec.model.source", "should match"),
        ({"engine__quantization": "int3"}, "spec.engine.quantization", "Unsupported value"),
        (
            {"gpu__product": "NVIDIA-A100-SXM4-80GB", "engine__kvCacheDtype": "fp8"},
            "spec.engine.kvCacheDtype",
            "compute capability 8.9",
        ),
        ({"parallelism__tensor": 64, "parallelism__pipeline": 16}, "spec.parallelism.pipeline", "256"),
        ({"autoscaling__scaleToZero": True}, "spec.autoscaling.scaleToZero", "minReplicas: 0"),
        (
            {"engine__maxBatchSize": 512, "engine__maxTokensPerStep": 256},
            "spec.engine.maxTokensPerStep",
            "maxBatch",
        ),
        (
            {"autoscaling__enabled": True, "autoscaling__minReplicas": 2, "replicas": 1},
            "spec.replicas",
            "minReplicas",
        ),
        ({"serving__port": 0}, "spec.serving.port", "greater than or equal to 1"),
        ({"placement__exclusive": True}, "spec.placement.exclusive", "topology domain"),
        (
            {"engine__lora": [{"name": "a", "source": "hf://o/a"}, {"name": "a", "source": "hf://o/b"}]},
            "spec.engine.lora",
            "unique",
        ),
        (
            {"engine__lora": [{"name": "base", "source": "hf://o/a"}]},
            "spec.engine.lora[0].name",
            "base model",
        ),
    ],
)
def test_invalid_specs_are_rejected_naming_the_field(
    custom: client.CustomObjectsApi, namespace: str, spec: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(ApiException) as error:
        create(custom, namespace, deployment("bad", **spec))
    assert error.value.status == 422
    message = json.loads(error.value.body)["message"]
    assert field in message, message
    assert words in message, message


def test_an_fp8_kv_cache_is_accepted_for_both_backends_on_gpus_with_e4m3(
    custom: client.CustomObjectsApi, namespace: str
) -> None:
    """Where the GPU has e4m3 in hardware (Ada and newer; an Ada label that also reads like an
    Ampere one included) both backends take an fp8 KV cache; the refusal above is the A100's."""
    for i, (product, backend) in enumerate(
        (
            ("NVIDIA-H100-80GB-HBM3", "torch"),
            ("NVIDIA-L40S", "tensorrt-llm"),
            ("NVIDIA-RTX-A6000-Ada", "torch"),
        )
    ):
        body = deployment(
            f"fp8kv{i}", gpu__product=product, engine__backend=backend, engine__kvCacheDtype="fp8"
        )
        assert create(custom, namespace, body)["spec"]["engine"]["kvCacheDtype"] == "fp8"


def test_cpu_deployment_may_split_into_pipeline_stages(
    custom: client.CustomObjectsApi, namespace: str
) -> None:
    """On CPU each stage is a pod of its tensor-parallel ranks (gloo): TP2 x PP2 is accepted."""
    body = deployment("cpu", parallelism__tensor=2, parallelism__pipeline=2)
    del body["spec"]["gpu"]
    created = create(custom, namespace, body)
    assert created["spec"]["parallelism"] == {"tensor": 2, "pipeline": 2, "expert": False}  # defaulted
    assert "gpu" not in created["spec"]


def test_engine_spec_is_immutable(
    local_cluster: LocalCluster, custom: client.CustomObjectsApi, namespace: str
) -> None:
    engine = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMEngine",
        "metadata": {"name": "e1"},
        "spec": {
            "key": "0123456789abcdef0123",
            "model": {"source": "hf://org/model@abc"},
            "gpuArch": "sm90",
            "runtimeVersion": "0.1.0",
            "cache": "pvc://kiln-engine-cache",
        },
    }
    created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "llmengines", engine)
    changed = copy.deepcopy(created)
    changed["spec"]["quantization"] = "fp8"
    with pytest.raises(ApiException) as error:
        custom.replace_namespaced_custom_object(GROUP, VERSION, namespace, "llmengines", "e1", changed)
    assert "immutable" in error.value.body


def test_scale_subresource_and_kubectl(
    local_cluster: LocalCluster, custom: client.CustomObjectsApi, namespace: str
) -> None:
    create(custom, namespace, deployment("scaled"))
    kubectl = [
        str(build.binary_paths()["kubectl"]),
        "--kubeconfig",
        str(local_cluster.kubeconfig),
        "-n",
        namespace,
    ]
    subprocess.run(
        [*kubectl, "scale", "llmdeployment/scaled", "--replicas=3"], check=True, capture_output=True
    )
    assert (
        custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "scaled")["spec"]["replicas"]
        == 3
    )
    table = subprocess.run([*kubectl, "get", "llmd"], check=True, capture_output=True, text=True).stdout
    header = table.splitlines()[0].split()
    assert header[:4] == ["NAME", "MODEL", "QUANT", "TPXPP"]
    assert "TTFT-P50(MS)" in header
    explain = subprocess.run(
        [*kubectl, "explain", "llmdeployment.spec.autoscaling.ttftP50TargetMs"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "Target median time to first token" in explain
