"""Faults under a real `kiln operator run` on the local control plane (KWOK GPU nodes): the operator
SIGKILLed during builds, a rollout and a deletion; the API server and etcd restarted under it; a build
that keeps failing; two writers on one LLMDeployment. After each: one build Job per engine, no
orphaned children, status that matches the world, and nobody's fields lost.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kiln import labels
from kiln.local import cluster
from kiln.local.testing import LocalCluster, wait_for
from tests.integration.test_operator import (
    BUILD,
    GROUP,
    VERSION,
    Operator,
    condition,
    create,
    example,
    get,
    leftover_children,
    phase_is,
    ready_on,
    ready_serving_pods,
    requantize,
    with_secret,
)
from tests.reliability.report import Report

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TP2 = {"tensor": 2}  # two GPUs a replica: several deployments fit the two 8-GPU H100 nodes


def deployment(name: str, build_seconds: int = 6, **spec: Any) -> dict[str, Any]:
    body = example(
        "llama-3-70b-fp8-tp4.yaml",
        parallelism=TP2,
        build={"podAnnotations": {"kiln.dev/simulate-duration": f"{build_seconds}s"}},
        **spec,
    )
    body["metadata"]["name"] = name
    return body


def items(obj: Any) -> list[Any]:
    return list(obj["items"] if isinstance(obj, dict) else obj.items)


def audit(
    custom: client.CustomObjectsApi,
    core_v1: client.CoreV1Api,
    apps_v1: client.AppsV1Api,
    batch_v1: client.BatchV1Api,
    namespace: str,
) -> list[str]:
    """Everything wrong with the namespace: engines without exactly one build Job, children whose
    owner is gone, deployments whose status does not match the world."""
    problems: list[str] = []
    engines = items(custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "llmengines"))
    deployments = items(custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "llmdeployments"))
    uids = {o["metadata"]["uid"] for o in engines + deployments}
    jobs = items(batch_v1.list_namespaced_job(namespace, label_selector=BUILD))
    for engine in engines:
        name = engine["metadata"]["name"]
        mine = [j for j in jobs if j.metadata.labels.get(labels.ENGINE_LABEL) == name]
        if len(mine) != 1:
            problems.append(f"engine {name} has {len(mine)} build Jobs")
    children: list[Any] = jobs + items(apps_v1.list_namespaced_deployment(namespace))
    children += items(core_v1.list_namespaced_service(namespace))
    for child in children:
        owners = child.metadata.owner_references or []
        if not owners or not any(o.uid in uids for o in owners):
            problems.append(f"orphan {child.kind or type(child).__name__} {child.metadata.name}")
    for dep in deployments:
        name, status = dep["metadata"]["name"], dep.get("status") or {}
        if dep["metadata"].get("deletionTimestamp"):
            continue
        if status.get("observedGeneration") != dep["metadata"]["generation"]:
            problems.append(f"{name}: observedGeneration {status.get('observedGeneration')}")
        engine_name = (status.get("engine") or {}).get("name")
        engine = next((e for e in engines if e["metadata"]["name"] == engine_name), None)
        if status.get("phase") == "Ready":
            if engine is None or (engine.get("status") or {}).get("phase") != "Ready":
                problems.append(f"{name}: Ready on engine {engine_name}, which is not Ready")
            pods = ready_serving_pods(core_v1, namespace, name)
            if len(pods) != dep["spec"]["replicas"] or status.get("readyReplicas") != len(pods):
                problems.append(
                    f"{name}: {len(pods)} ready pods, spec {dep['spec']['replicas']}, "
                    f"status {status.get('readyReplicas')}"
                )
            stale = [
                p.metadata.name for p in pods if p.metadata.labels.get(labels.ENGINE_LABEL) != engine_name
            ]
            if stale:
                problems.append(f"{name}: pods of another engine still serve: {stale}")
    return problems


def settled(custom: client.CustomObjectsApi, namespace: str, names: list[str], timeout: float = 120) -> None:
    for name in names:
        wait_for(
            lambda n=name: phase_is(custom, namespace, "llmdeployments", n, "Ready"), timeout, f"{name} Ready"
        )


def wait_clean(check: Any, timeout: float = 60) -> list[str]:
    """Poll the audit until it is clean (level-based controllers converge); the last findings."""
    deadline = time.monotonic() + timeout
    while True:
        problems: list[str] = check()
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(1)


# ------------------------------------------------------------------------------ operator killed


def test_operator_killed_during_builds(
    operator: Operator,
    custom: client.CustomObjectsApi,
    core_v1: client.CoreV1Api,
    apps_v1: client.AppsV1Api,
    batch_v1: client.BatchV1Api,
    namespace: str,
    reliability_report: Report,
) -> None:
    with_secret(core_v1, namespace)
    # "a" and "b" need the same engine (one build); "c" another one.
    bodies = [deployment("a"), deployment("b"), deployment("c", engine={"quantization": "int8-weight"})]
    kills = 0
    for body in bodies:
        create(custom, namespace, body)
    operator.kill()  # before it has seen them all
    kills += 1
    operator.start()
    wait_for(lambda: batch_v1.list_namespaced_job(namespace, label_selector=BUILD).items, 30, "a build Job")
    operator.kill()  # with builds running
    kills += 1
    time.sleep(2)
    operator.start()
    time.sleep(2)
    operator.kill()  # again, mid-way
    kills += 1
    operator.start()
    names = [b["metadata"]["name"] for b in bodies]
    settled(custom, namespace, names)
    problems = wait_clean(lambda: audit(custom, core_v1, apps_v1, batch_v1, namespace))
    engines = {get(custom, namespace, "llmdeployments", n)["status"]["engine"]["name"] for n in names}
    jobs = batch_v1.list_namespaced_job(namespace, label_selector=BUILD).items
    if len(engines) != 2 or len(jobs) != 2:
        problems.append(
            f"{len(engines)} engines, {len(jobs)} build Jobs for 3 deployments (expected 2 and 2)"
        )
    reliability_report.record(
        "operator SIGKILLed during builds (3 deployments, 2 engines)",
        kills,
        len(problems),
        f"{len(jobs)} build Jobs for {len(engines)} engines; all Ready; "
        + (f"PROBLEMS: {problems}" if problems else "no orphans, status right"),
    )
    assert not problems, problems


def test_operator_killed_during_rollout(
    operator: Operator,
    custom: client.CustomObjectsApi,
    core_v1: client.CoreV1Api,
    apps_v1: client.AppsV1Api,
    batch_v1: client.BatchV1Api,
    namespace: str,
    reliability_report: Report,
) -> None:
    with_secret(core_v1, namespace)
    body = deployment("roll", build_seconds=6, replicas=2)
    create(custom, namespace, body)
    first = wait_for(lambda: phase_is(custom, namespace, "llmdeployments", "roll", "Ready"), 120, "Ready")
    old_engine = first["status"]["engine"]["name"]
    pending = requantize(custom, namespace, "roll", "int8-weight")
    operator.kill()  # while the new engine builds
    time.sleep(1)
    operator.start()

    def rolling() -> bool:  # the new engine is Ready and pods of both engines exist
        engine = get(custom, namespace, "llmengines", pending["name"])
        return (engine.get("status") or {}).get("phase") == "Ready"

    wait_for(rolling, 60, "the new engine Ready")
    operator.kill()  # while the workload rolls over
    time.sleep(1)
    operator.start()
    done = ready_on(custom, namespace, "roll", pending["name"], 120)
    problems = wait_clean(lambda: audit(custom, core_v1, apps_v1, batch_v1, namespace))
    if done["status"].get("pendingEngine"):
        problems.append(f"pendingEngine left behind: {done['status']['pendingEngine']}")
    if condition(done, "Ready").get("status") != "True":
        problems.append(f"Ready condition: {condition(done, 'Ready')}")
    reliability_report.record(
        "operator SIGKILLed during a rollout (engine build, then pod rollover)",
        2,
        len(problems),
        f"{old_engine} -> {pending['name']}; {problems or 'one Job per engine, only new pods, status right'}",
    )
    assert not problems, problems


def test_operator_killed_during_deletion(
    operator: Operator,
    custom: client.CustomObjectsApi,
    core_v1: client.CoreV1Api,
    apps_v1: client.AppsV1Api,
    batch_v1: client.BatchV1Api,
    namespace: str,
    reliability_report: Report,
) -> None:
    with_secret(core_v1, namespace)
    names = ["del-a", "del-b"]
    for name in names:
        create(
            custom,
            namespace,
            deployment(name, build_seconds=2, engine={"maxBatchSize": 64 if name == "del-a" else 32}),
        )
    settled(custom, namespace, names)
    for delay, name in zip((0.0, 1.0), names, strict=True):
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "llmdeployments", name)
        time.sleep(delay)
        operator.kill()
        operator.start()
    left = wait_clean(lambda: leftover_children(custom, core_v1, apps_v1, batch_v1, namespace), timeout=90)
    reliability_report.record(
        "operator SIGKILLed during deletion (at 0 s and 1 s)",
        2,
        len(left),
        f"left behind: {left}" if left else "every child and both engines gone",
    )
    assert not left, left


# ------------------------------------------------------------------------------ control plane restarts


def test_api_server_and_etcd_restart_under_a_running_operator(
    local_cluster: LocalCluster,
    operator: Operator,
    custom: client.CustomObjectsApi,
    core_v1: client.CoreV1Api,
    apps_v1: client.AppsV1Api,
    batch_v1: client.BatchV1Api,
    namespace: str,
    reliability_report: Report,
) -> None:
    with_secret(core_v1, namespace)
    create(custom, namespace, deployment("steady", build_seconds=2))
    settled(custom, namespace, ["steady"])
    assert operator.process is not None
    pid = operator.process.pid
    problems: list[str] = []
    downtime = {}
    for component, replicas, newcomer in (
        ("kube-apiserver", 2, "after-apiserver"),
        ("etcd", 3, "after-etcd"),
    ):
        downtime[component] = cluster.restart_component(
            local_cluster.state, component, down_seconds=3, die_with_parent=True
        )
        # The operator must notice new objects and changes without being restarted itself.
        create(
            custom, namespace, deployment(newcomer, build_seconds=2, engine={"maxBatchSize": replicas * 16})
        )
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "llmdeployments", "steady", {"spec": {"replicas": replicas}}
        )
        try:
            settled(custom, namespace, [newcomer], timeout=120)
            wait_for(
                lambda r=replicas: (
                    get(custom, namespace, "llmdeployments", "steady")["status"].get("readyReplicas") == r
                ),
                90,
                f"steady at {replicas} ready replicas",
            )
        except AssertionError as exc:
            problems.append(f"after restarting {component}: {exc}")
        if operator.process.poll() is not None or operator.process.pid != pid:
            problems.append(f"the operator exited when {component} restarted")
    problems += wait_clean(lambda: audit(custom, core_v1, apps_v1, batch_v1, namespace))
    reliability_report.record(
        "kube-apiserver, then etcd, restarted under a running operator",
        2,
        len(problems),
        ", ".join(f"{c} away {s:.1f} s" for c, s in downtime.items())
        + "; operator pid unchanged; a new deployment and a scale handled after each"
        + (f"; PROBLEMS: {problems}" if problems else ""),
    )
    assert not problems, problems


# ------------------------------------------------------------------------------ failing builds


def test_a_failing_build_retries_within_the_limit_then_fails_with_the_reason(
    operator: Operator,
    custom: client.CustomObjectsApi,
    core_v1: client.CoreV1Api,
    namespace: str,
    reliability_report: Report,
) -> None:
    with_secret(core_v1, namespace)
    retries = 1
    body = deployment("doomed")
    body["spec"]["build"].update(retries=retries, podAnnotations={"kiln.dev/simulate-fail": "true"})
    create(custom, namespace, body)
    failed = wait_for(
        lambda: phase_is(custom, namespace, "llmdeployments", "doomed", "Failed"), 120, "Failed"
    )
    engine = get(custom, namespace, "llmengines", failed["status"]["engine"]["name"])
    time.sleep(12)  # longer than the Job's first back-off: no further attempt may start
    pods = core_v1.list_namespaced_pod(namespace, label_selector=BUILD).items
    problems = []
    if len(pods) != retries + 1:
        problems.append(f"{len(pods)} build pods for retries={retries}")
    status = engine.get("status") or {}
    if status.get("phase") != "Failed" or status.get("attempts") != retries + 1:
        problems.append(f"engine status phase {status.get('phase')}, attempts {status.get('attempts')}")
    reason = condition(engine, "Failed")
    if reason.get("reason") != "BackoffLimitExceeded" or not reason.get("message"):
        problems.append(f"Failed condition without a reason: {reason}")
    if condition(failed, "Ready").get("reason") != "EngineBuildFailed":
        problems.append(f"deployment Ready condition: {condition(failed, 'Ready')}")
    reliability_report.record(
        f"build Job that always fails (retries: {retries})",
        len(pods),
        len(problems),
        f"{len(pods)} attempts, engine Failed/{reason.get('reason')}: {reason.get('message', '')[:80]}",
    )
    assert not problems, problems


# ------------------------------------------------------------------------------ two writers


def test_a_user_and_the_autoscaler_never_lose_each_others_fields(
    local_cluster: LocalCluster, custom: client.CustomObjectsApi, namespace: str, reliability_report: Report
) -> None:
    """The user applies the spec (server-side apply, manager `kubectl`) while the autoscaler applies
    replicas (its own Kube client, manager `kiln-autoscaler`, forced for that one field)."""
    from kiln_autoscaler.kube import Kube

    autoscaler = Kube(local_cluster.api_client)
    base = deployment("shared", autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 50})
    base["spec"].pop("replicas", None)  # with autoscaling on, the user leaves replicas to the autoscaler
    rounds = 40
    user_values: list[int] = []
    scaled: list[int] = []
    errors: list[str] = []

    def user() -> None:
        for i in range(rounds):
            body = copy.deepcopy(base)
            body["spec"]["autoscaling"]["ttftP50TargetMs"] = 100 + i
            body["spec"]["serving"] = {"env": [{"name": "ROUND", "value": str(i)}]}
            try:
                custom.patch_namespaced_custom_object(
                    GROUP, VERSION, namespace, "llmdeployments", "shared", body,
                    field_manager="kubectl", _content_type="application/apply-patch+yaml",
                )  # fmt: skip
                user_values.append(100 + i)
            except ApiException as exc:
                errors.append(f"user apply {i}: {exc.status} {exc.reason}")

    def scaler() -> None:
        for i in range(rounds):
            try:
                autoscaler.scale(namespace, "shared", 1 + (i * 7) % 50)
                scaled.append(1 + (i * 7) % 50)
            except ApiException as exc:
                errors.append(f"autoscaler scale {i}: {exc.status} {exc.reason}")

    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "llmdeployments", "shared", base,
        field_manager="kubectl", _content_type="application/apply-patch+yaml",
    )  # fmt: skip
    threads = [threading.Thread(target=user), threading.Thread(target=scaler)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    final = get(custom, namespace, "llmdeployments", "shared")
    spec = final["spec"]
    lost = list(errors)
    if spec["autoscaling"]["ttftP50TargetMs"] != user_values[-1]:
        lost.append(
            f"user's ttftP50TargetMs {user_values[-1]} became {spec['autoscaling']['ttftP50TargetMs']}"
        )
    if spec["serving"].get("env") != [{"name": "ROUND", "value": str(rounds - 1)}]:
        lost.append(f"user's env became {spec['serving'].get('env')}")
    if spec["replicas"] != scaled[-1]:
        lost.append(f"autoscaler's replicas {scaled[-1]} became {spec['replicas']}")
    # Two read-modify-write clients (kubectl edit) from the same version: the second gets a 409.
    seen = get(custom, namespace, "llmdeployments", "shared")
    first, second = copy.deepcopy(seen), copy.deepcopy(seen)
    first["spec"]["autoscaling"]["ttftP50TargetMs"] = 777
    second["spec"]["serving"]["port"] = 9000
    custom.replace_namespaced_custom_object(GROUP, VERSION, namespace, "llmdeployments", "shared", first)
    try:
        custom.replace_namespaced_custom_object(GROUP, VERSION, namespace, "llmdeployments", "shared", second)
        lost.append("a stale kubectl edit overwrote a newer change")
    except ApiException as exc:
        if exc.status != 409:
            lost.append(f"stale edit answered {exc.status}")
    reliability_report.record(
        "two writers: user server-side apply vs autoscaler replicas apply",
        len(user_values) + len(scaled) + 1,
        len(lost),
        f"{rounds} concurrent rounds each; final ttft {spec['autoscaling']['ttftP50TargetMs']} (user), "
        f"replicas {spec['replicas']} (autoscaler); stale kubectl edit -> 409"
        + (f"; LOST: {lost}" if lost else ""),
    )
    assert not lost, lost


def test_an_apply_naming_replicas_conflicts_with_the_autoscaler(
    local_cluster: LocalCluster, custom: client.CustomObjectsApi, namespace: str, reliability_report: Report
) -> None:
    """A user whose manifest names replicas is told of the autoscaler's change (409), never silently wins."""
    from kiln_autoscaler.kube import FIELD_MANAGER, Kube

    base = deployment("named", autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 50}, replicas=1)
    apply = {"field_manager": "kubectl", "_content_type": "application/apply-patch+yaml"}
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "llmdeployments", "named", base, **apply)
    Kube(local_cluster.api_client).scale(namespace, "named", 7)
    managers = {
        m["manager"] for m in get(custom, namespace, "llmdeployments", "named")["metadata"]["managedFields"]
    }
    with pytest.raises(ApiException) as conflict:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "llmdeployments", "named", base, **apply
        )
    replicas = get(custom, namespace, "llmdeployments", "named")["spec"]["replicas"]
    reliability_report.record(
        "two writers: apply naming replicas after an autoscaler write",
        1,
        int(conflict.value.status != 409 or replicas != 7),
        f"managers {sorted(managers)}; re-apply answered {conflict.value.status}; replicas stay {replicas}",
    )
    assert FIELD_MANAGER in managers, managers
    assert conflict.value.status == 409 and FIELD_MANAGER in (conflict.value.body or "")
    assert replicas == 7


def test_a_first_apply_of_replicas_conflicts_with_the_autoscaler(
    local_cluster: LocalCluster, custom: client.CustomObjectsApi, namespace: str, reliability_report: Report
) -> None:
    """A manifest that first leaves replicas to the autoscaler and names them later gets a 409 naming
    `kiln-autoscaler` (the autoscaler applies replicas, so it owns them even when nobody did before);
    forcing the apply, as a user who means it does, takes them back."""
    from kiln_autoscaler.kube import FIELD_MANAGER, Kube

    base = deployment("late", autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 50})
    base["spec"].pop("replicas", None)
    apply = {"field_manager": "kubectl", "_content_type": "application/apply-patch+yaml"}
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "llmdeployments", "late", base, **apply)
    Kube(local_cluster.api_client).scale(namespace, "late", 7)
    base["spec"]["replicas"] = 2
    with pytest.raises(ApiException) as conflict:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "llmdeployments", "late", base, **apply
        )
    kept = get(custom, namespace, "llmdeployments", "late")["spec"]["replicas"]
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "llmdeployments", "late", base, force=True, **apply
    )
    forced = get(custom, namespace, "llmdeployments", "late")["spec"]["replicas"]
    reliability_report.record(
        "two writers: first apply naming replicas after an autoscaler write",
        1,
        int(conflict.value.status != 409 or kept != 7 or forced != 2),
        f"apply answered {conflict.value.status}; replicas stay {kept}; a forced apply sets {forced}",
    )
    assert conflict.value.status == 409 and FIELD_MANAGER in (conflict.value.body or "")
    assert kept == 7
    assert forced == 2


def test_the_autoscaler_never_scales_a_deployment_recreated_since_it_read_it(
    local_cluster: LocalCluster, custom: client.CustomObjectsApi, namespace: str
) -> None:
    """Its apply names the uid it read: a deployment deleted for good is not brought back (409, uid
    mismatch); one recreated under the same name keeps its own replicas (422, uid is immutable)."""
    from kiln_autoscaler.kube import Kube

    autoscaler = Kube(local_cluster.api_client)
    base = deployment("again", autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 50}, replicas=1)
    old_uid = create(custom, namespace, base)["metadata"]["uid"]
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "llmdeployments", "again")
    wait_for(lambda: "again" not in names(custom, namespace), timeout=30, what="the deployment to go")
    with pytest.raises(ApiException) as gone:
        autoscaler.scale(namespace, "again", 5, old_uid)
    assert gone.value.status == 409 and "uid mismatch" in (gone.value.body or ""), gone.value
    assert "again" not in names(custom, namespace)
    create(custom, namespace, base)
    with pytest.raises(ApiException) as stale:
        autoscaler.scale(namespace, "again", 5, old_uid)
    assert stale.value.status == 422 and "metadata.uid" in (stale.value.body or ""), stale.value
    assert get(custom, namespace, "llmdeployments", "again")["spec"]["replicas"] == 1


def names(custom: client.CustomObjectsApi, namespace: str) -> list[str]:
    listed = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "llmdeployments")
    return [o["metadata"]["name"] for o in items(listed)]
