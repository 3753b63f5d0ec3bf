"""The build Job: `kiln-engine build` per the contract, on the right GPU, writing to the cache."""

from __future__ import annotations

from typing import Any

import pytest
from render_helpers import engine_for, example, nodes

from kiln import labels
from kiln.render import build_job as render_build
from kiln.render.common import Settings


def container(job: dict[str, Any]) -> dict[str, Any]:
    [only] = job["spec"]["template"]["spec"]["containers"]
    return only


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_gpu_build_runs_on_the_product_with_tp_times_pp_gpus_and_the_contract() -> None:
    engine = engine_for(example("llama-3-70b-fp8-tp4.yaml"))
    job = render_build.build_job(engine, Settings(), render_build.build_gpus(engine, nodes()))
    pod = job["spec"]["template"]["spec"]
    build = container(job)
    assert job["metadata"]["name"] == render_build.job_name(str(engine.metadata.name))
    assert job["metadata"]["ownerReferences"][0] == {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "LLMEngine",
        "name": engine.metadata.name,
        "uid": "uid-engine",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert pod["nodeSelector"] == {labels.GPU_PRODUCT: "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert build["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    assert build["command"] == ["kiln-engine"]
    args = build["args"]
    assert args[0] == "build"
    assert arg(args, "--result-file") == "/dev/termination-log"
    assert build["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert (arg(args, "--tp"), arg(args, "--pp"), arg(args, "--quantization")) == ("4", "1", "fp8")
    assert (arg(args, "--backend"), arg(args, "--gpu-arch"), arg(args, "--kv-cache-dtype")) == (
        "tensorrt-llm",
        "sm90",
        "fp8",
    )
    # s3 cache: the engine uploads itself; the URI is passed as is, nothing mounted for it.
    assert arg(args, "--output") == f"s3://kiln-engines/prod/{engine.metadata.name}"
    assert arg(args, "--model").startswith("hf://meta-llama/Meta-Llama-3-70B-Instruct@")
    assert not any("persistentVolumeClaim" in volume for volume in pod["volumes"])
    assert build["image"].endswith("-tensorrt-llm")
    assert job["spec"]["backoffLimit"] == 2
    assert job["spec"]["activeDeadlineSeconds"] == 14400
    assert pod["restartPolicy"] == "Never"


def test_build_gpus_are_capped_at_the_largest_node_of_the_product() -> None:
    engine = engine_for(example("llama-3.1-405b-fp8-tp8-pp2.yaml"))
    assert render_build.build_gpus(engine, nodes()) == 4  # GB200 trays have 4; tp x pp is 16
    assert render_build.build_gpus(engine, ()) == 16  # nothing known: ask for what it needs


def test_cpu_build_requests_no_gpu_and_mounts_its_claims() -> None:
    deployment = example("tiny-cpu.yaml")
    engine = engine_for(deployment)
    job = render_build.build_job(engine, Settings(), render_build.build_gpus(engine, nodes()))
    pod = job["spec"]["template"]["spec"]
    build = container(job)
    assert render_build.build_gpus(engine, nodes()) == 0
    assert "resources" not in build
    assert pod["nodeSelector"] == deployment.spec.build.node_selector  # the node the user picked
    assert "tolerations" not in pod
    args = build["args"]
    assert arg(args, "--model") == "/mnt/pvc/kiln-models/tiny-chat"
    assert arg(args, "--output") == f"/mnt/pvc/kiln-engine-cache/{engine.metadata.name}"
    assert arg(args, "--device") == "cpu"
    assert arg(args, "--max-seq-len") == "512"
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"kiln-models": True, "kiln-engine-cache": False}
    mounts = {m["mountPath"]: m["readOnly"] for m in build["volumeMounts"] if m["name"] != "tmp"}
    assert mounts == {"/mnt/pvc/kiln-models": True, "/mnt/pvc/kiln-engine-cache": False}
    assert {"name": "KILN_PVC_ROOT", "value": "/mnt/pvc"} in build["env"]
    assert job["spec"]["activeDeadlineSeconds"] == 600


def test_build_pod_is_restricted() -> None:
    job = render_build.build_job(engine_for(example("tiny-cpu.yaml")), Settings(), 0)
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container(job)["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    assert any(m["mountPath"] == "/tmp" for m in container(job)["volumeMounts"])  # writable scratch


def test_credentials_and_annotations_and_node_selection_reach_the_pod() -> None:
    deployment = example(
        "llama-3-8b-fp8-h100.yaml",
        build={
            "nodeSelector": {"pool": "builders"},
            "tolerations": [{"key": "builders", "operator": "Exists"}],
            "podAnnotations": {"kiln.dev/simulate-duration": "3s"},
        },
    )
    job = render_build.build_job(engine_for(deployment), Settings(), 1)
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {labels.GPU_PRODUCT: "NVIDIA-H100-80GB-HBM3", "pool": "builders"}
    assert {"key": "builders", "operator": "Exists"} in pod["tolerations"]
    assert job["spec"]["template"]["metadata"]["annotations"] == {"kiln.dev/simulate-duration": "3s"}
    # A whole Secret (no key) becomes environment variables: HF_TOKEN, AWS_*.
    assert container(job)["envFrom"] == [{"secretRef": {"name": "hf-token"}}]


@pytest.mark.parametrize("length", [10, 40, 63])
def test_job_name_is_a_stable_dns_label(length: int) -> None:
    name = ("a" * (length - 1)) + "z"
    job = render_build.job_name(name)
    assert job == render_build.job_name(name) and len(job) <= 63 and job.endswith("-build")


def test_engine_image_follows_settings_and_spec_override() -> None:
    engine = engine_for(example("tiny-cpu.yaml"))
    assert container(render_build.build_job(engine, Settings(), 0))["image"] == (
        "ghcr.io/kiln-dev/kiln-engine:0.1.0-torch"
    )
    custom = Settings(engine_image="registry.local/kiln-engine:dev")
    assert container(render_build.build_job(engine, custom, 0))["image"] == "registry.local/kiln-engine:dev"
    pinned = engine_for(example("tiny-cpu.yaml", engine={"image": "mine/kiln-engine:1"}))
    assert container(render_build.build_job(pinned, custom, 0))["image"] == "mine/kiln-engine:1"
