"""An s3:// engine cache: the build Job and the serving pods get the cache Secret, and the build
measures capacity at the deployment's own TTFT target and percentile."""

from __future__ import annotations

from typing import Any

from render_helpers import engine_for, example, ready

from kiln.render import build_job as render_build
from kiln.render import serving as render_serving
from kiln.render.common import Settings

S3_BUILD = {"cache": "s3://kiln-engines/cache", "cacheCredentialsSecret": {"name": "engine-cache-keys"}}


def engine_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == "engine")


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_the_build_job_and_serving_pods_read_the_s3_cache_with_the_secret() -> None:
    deployment = example("tiny-cpu.yaml", build=S3_BUILD)
    job = render_build.build_job(engine_for(deployment), Settings(), 0)
    [build] = job["spec"]["template"]["spec"]["containers"]
    assert arg(build["args"], "--output").startswith("s3://kiln-engines/cache/")
    assert {"secretRef": {"name": "engine-cache-keys"}} in build["envFrom"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]  # fmt: skip
    assert claims == ["kiln-models"]  # the model's claim; the cache is on S3

    engine = ready(deployment)
    workload = render_serving.workload(render_serving.ServingInputs(deployment, engine, None, Settings()))
    serve = engine_container(workload["spec"]["template"]["spec"])
    assert arg(serve["args"], "--artifact") == engine.status.artifact.uri  # type: ignore[union-attr]
    assert serve["envFrom"] == [{"secretRef": {"name": "engine-cache-keys"}}]


def test_a_pvc_cache_gives_serving_pods_no_secret() -> None:
    deployment = example("tiny-cpu.yaml")
    workload = render_serving.workload(
        render_serving.ServingInputs(deployment, ready(deployment), None, Settings())
    )
    assert "envFrom" not in engine_container(workload["spec"]["template"]["spec"])


def test_the_build_measures_capacity_at_the_deployments_target_and_percentile() -> None:
    p50 = example("tiny-cpu.yaml", autoscaling={"ttftP50TargetMs": 300})
    args = render_build.build_args(engine_for(p50), Settings())
    assert (arg(args, "--ttft-target-ms"), arg(args, "--ttft-percentile")) == ("300", "50")
    p90 = example("tiny-cpu.yaml", autoscaling={"ttftP50TargetMs": 300, "ttftP90TargetMs": 900})
    args = render_build.build_args(engine_for(p90), Settings())
    assert (arg(args, "--ttft-target-ms"), arg(args, "--ttft-percentile")) == ("900", "90")
    # serving pods measure multi-rank engines; their build measures nothing
    tp4 = render_build.build_args(engine_for(example("llama-3-70b-fp8-tp4.yaml")), Settings())
    assert "--ttft-target-ms" not in tp4 and "--ttft-percentile" not in tp4
