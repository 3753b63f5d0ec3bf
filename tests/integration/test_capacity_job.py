"""The capacity Job on the local control plane: a TensorRT-LLM TP8xPP2 engine (which the build does not
measure) gets, once its first replica is Ready, one `kiln-engine measure-capacity` Job aimed at that
replica's leader pod, owned by the engine; when the Job ends the engine records the outcome in its
CapacityMeasured condition. KWOK runs no containers, so the Job ends with no result here: this
proves the trigger, the target and the read-back, not the figures (tests/engine covers those).
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from kiln.local.testing import wait_for
from kiln.render import capacity_job as render_capacity
from kiln.render import groups
from tests.integration.test_multi_node_groups import (  # noqa: F401 (fixtures)
    EXAMPLE,
    LAB_LABEL,
    custom,
    group_pods,
    lab,
    operator,
    ready_replicas,
)
from tests.integration.test_operator import Operator, create, example, get, with_secret

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_first_ready_replica_of_an_unmeasured_engine_gets_one_capacity_job(
    operator: Operator,  # noqa: F811
    custom: client.CustomObjectsApi,  # noqa: F811
    core_v1: client.CoreV1Api,
    batch_v1: client.BatchV1Api,
    namespace: str,
    lab: str,  # noqa: F811
) -> None:
    with_secret(core_v1, namespace)
    body = example(
        EXAMPLE,
        serving={"nodeSelector": {LAB_LABEL: lab}},
        placement={"exclusive": True},
        build={"nodeSelector": {LAB_LABEL: lab}, "podAnnotations": {"kiln.dev/simulate-duration": "1s"}},
    )
    name = body["metadata"]["name"]
    create(custom, namespace, body)
    obj = ready_replicas(custom, namespace, name, 1)
    engine_name = obj["status"]["engine"]["name"]
    engine = get(custom, namespace, "llmengines", engine_name)
    assert engine["status"]["phase"] == "Ready" and not engine["status"].get("capacity")

    job_name = render_capacity.job_name(engine_name)
    job = wait_for(lambda: _job(batch_v1, namespace, job_name), 30, "the capacity Job")
    [leader] = [
        p for p in group_pods(core_v1, namespace, name) if p.metadata.labels[groups.POD_INDEX_LABEL] == "0"
    ]
    args = job.spec.template.spec.containers[0].args
    assert (
        args[0] == "measure-capacity"
        and args[args.index("--url") + 1] == f"http://{leader.status.pod_ip}:8000"
    )
    assert job.metadata.owner_references[0].uid == engine["metadata"]["uid"]

    # The Job ends (KWOK: no result), the engine records it once and no second Job is made.
    def marked() -> dict[str, Any] | None:
        status = get(custom, namespace, "llmengines", engine_name).get("status") or {}
        found = [c for c in status.get("conditions") or [] if c["type"] == render_capacity.CONDITION]
        return found[0] if found else None

    mark = wait_for(marked, 120, "the CapacityMeasured condition")
    assert mark["status"] == "False" and "without a result" in mark["message"], mark
    assert (
        len(
            batch_v1.list_namespaced_job(
                namespace, label_selector="app.kubernetes.io/component=capacity"
            ).items
        )
        == 1
    )


def _job(batch_v1: client.BatchV1Api, namespace: str, name: str) -> Any:
    try:
        return batch_v1.read_namespaced_job(name, namespace)
    except client.ApiException as error:
        if error.status == 404:
            return None
        raise
