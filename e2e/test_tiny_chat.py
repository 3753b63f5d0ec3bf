"""The main job as a story, driven through kubectl and HTTP on one shared cluster whose real node
runs Kiln's images (the chart's pods, the build Jobs and serving pods) in containers.

Apply the tiny CPU example, follow its build (the build Job's progress shows in LLMEngine status and
events before Ready), wait for Ready, ask it through its Service (by DNS name from a pod, and
through the API server's service proxy); change the quantization
(a new engine is built and rolled over while a client keeps asking, and no request fails); scale by
hand; autoscale under load; delete (nothing is left: pods, Deployments, Services, Jobs, engines,
engine processes in the node's containers). The tests run in this order and share the deployment.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kiln.demo import manifests
from kiln.demo.kube import Kubectl, wait_for
from kiln.demo.stack import CLIENT_POD, NODE, Stack, repo_root
from kiln.demo.steps import DemoError, Progress
from kiln.demo.story import Story, ask, ask_in_cluster, autoscale
from kiln.render.common import Settings

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.engine]

EXAMPLE = repo_root() / "examples" / "tiny-cpu.yaml"
NAME = "tiny-chat"
# A weight format the CPU torch backend builds and serves (fp8/int4 need a GPU: CRD rule).
NEW_QUANTIZATION = os.environ.get("KILN_E2E_QUANTIZATION", "int8-weight")
PRINTER_COLUMNS = ("NAME", "MODEL", "QUANT", "READY", "PHASE")
# The engines examples/tiny-cpu.yaml builds (`<model>-<quantization>-tp1-cpu-<key>`, see
# kiln.api.enginekey.engine_name), whatever their key.
ENGINE_PREFIX = f"{NAME}-none-tp1-cpu-"


def quiet() -> Progress:
    lines: list[str] = []
    return Progress(total=1, echo=lines.append)


@pytest.fixture(scope="module")
def story(kiln_stack: Stack, kubectl: Kubectl) -> Iterator[Story]:
    story = Story(kiln_stack, EXAMPLE)
    start_from_an_empty_cache(story, kubectl)
    kubectl("apply", "-f", str(EXAMPLE))
    yield story


def start_from_an_empty_cache(story: Story, kubectl: Kubectl) -> None:
    """Make this module's first build a real one: an earlier e2e module of the session may have
    built the same engine, and a build that finds its artifact published goes straight to done,
    with no step to report. Deletes the deployment an earlier module left (test_replica_fault
    leaves this very one, Ready, as the story would find it), waits for the unused LLMEngines to be
    collected (the e2e retention is seconds), then removes their artifacts from the engine cache."""
    kubectl("delete", "llmdeployment", NAME, "-n", story.namespace, "--ignore-not-found", "--wait=true",
            "--timeout=120s", timeout=150)  # fmt: skip

    def engines() -> list[str]:
        return [
            e["metadata"]["name"]
            for e in kubectl.items("llmengines", "-n", story.namespace)
            if e["metadata"]["name"].startswith(ENGINE_PREFIX)
        ]

    wait_for(lambda: not engines(), 120, f"earlier {ENGINE_PREFIX}* LLMEngines to be collected", interval=1.0)
    for artifact in story.stack.cache_dir.glob(f"{ENGINE_PREFIX}*"):
        shutil.rmtree(artifact)


def follow_build(story: Story, timeout: float = 600.0) -> dict[str, list[tuple[Any, Any, Any]]]:
    """Each LLMEngine's (phase, progress, step), every change in order, read every 0.5 s until the
    engines seen have all left Building (Ready or Failed) or `timeout` passes."""
    seen: dict[str, list[tuple[Any, Any, Any]]] = {}
    path = f"/apis/kiln.dev/v1alpha1/namespaces/{story.namespace}/llmengines"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for engine in story.get(path).get("items", []):
            status = engine.get("status") or {}
            observed = (status.get("phase"), status.get("progress"), status.get("step"))
            history = seen.setdefault(engine["metadata"]["name"], [])
            if not history or history[-1] != observed:
                history.append(observed)
        if seen and all(history[-1][0] in ("Ready", "Failed") for history in seen.values()):
            break
        time.sleep(0.5)
    return seen


def wait_ready(kubectl: Kubectl, timeout: float = 600.0) -> None:
    result = kubectl.run(
        "wait",
        "--for=condition=Ready",
        f"llmdeployment/{NAME}",
        f"--timeout={timeout:.0f}s",
        check=False,
        timeout=timeout + 30,
    )
    if result.returncode != 0:
        status = kubectl.json("get", "llmdeployment", NAME).get("status")
        engines = kubectl("get", "llmengines", "-o", "yaml")
        pytest.fail(f"{NAME} not Ready: {result.stderr}\nstatus: {json.dumps(status, indent=1)}\n{engines}")


def serving_engines(story: Story) -> set[str]:
    """The engine label of every serving pod that is not terminating."""
    return {
        pod["metadata"].get("labels", {}).get("kiln.dev/engine", "?")
        for pod in story.pods()
        if not pod["metadata"].get("deletionTimestamp")
    }


class RequestLoop(threading.Thread):
    """Asks the model through the Service back to back until stopped; counts answers and failures.

    Like a load balancer that follows the Service's endpoints, it looks up the ready pods before
    each request, and sends a request that a draining replica refused (503, before admitting it)
    once more to another replica; those are counted as `retried`, not hidden.
    """

    def __init__(self, story: Story) -> None:
        super().__init__(daemon=True)
        self.story = story
        self.ok = 0
        self.retried = 0
        self.failures: list[str] = []
        self.halt = threading.Event()

    def urls(self) -> list[str]:
        if self.story.route == "endpoints":
            self.story.endpoints = self.story.ready_pod_endpoints() or self.story.endpoints
        return self.story.completion_urls()

    def run(self) -> None:
        body = manifests.completion_request(self.story.served_name, "What is Kiln?", max_tokens=16)
        verify = self.story.stack.api.ssl_context
        with httpx.Client(timeout=60.0, verify=verify) as client:
            turn = 0
            while not self.halt.is_set():
                turn += 1
                try:
                    urls = self.urls()
                    if not urls:
                        self.failures.append("no ready replica to ask")
                        self.halt.wait(0.5)
                        continue
                    url = urls[turn % len(urls)]
                    response = client.post(url, json=body)
                    if response.status_code == 503:
                        self.retried += 1
                        urls = self.urls() or urls
                        url = urls[(turn + 1) % len(urls)]
                        response = client.post(url, json=body)
                    if response.status_code == 200 and response.json()["choices"][0]["text"]:
                        self.ok += 1
                    else:
                        self.failures.append(f"{url}: HTTP {response.status_code} {response.text[:200]}")
                except (httpx.HTTPError, DemoError) as error:
                    self.failures.append(f"{type(error).__name__}: {error}")


def test_apply_wait_ready_and_answer_through_the_service(story: Story, kubectl: Kubectl) -> None:
    seen = follow_build(story)
    wait_ready(kubectl)
    deployment = story.deployment()
    name = deployment["status"]["engine"]["name"]
    engine = kubectl.json("get", "llmengine", name)
    assert engine["status"]["phase"] == "Ready"
    # The build Job's `kiln-engine build` reports its steps; the operator copied them into the
    # engine's status while it was Building (progress strictly between 0 and 100, and a step),
    # and recorded a BuildProgress event.
    statuses = seen.get(name, [])
    building = [(progress, step) for phase, progress, step in statuses if phase == "Building"]
    assert any(p is not None and 0 < p < 100 for p, _ in building), f"statuses seen: {statuses}"
    assert any(step for _, step in building), f"statuses seen: {statuses}"
    selector = f"involvedObject.name={name},reason=BuildProgress"
    progress_events = kubectl.items("events", "-n", story.namespace, "--field-selector", selector)
    assert progress_events, f"no BuildProgress event for {name}; statuses seen: {statuses}"
    print(f"build statuses seen: {statuses}")
    assert engine["status"]["artifact"]["uri"].startswith("pvc://kiln-engine-cache")
    story.endpoints = story.ready_pod_endpoints()
    assert len(story.endpoints) == 1
    # The engine image the operator names, run by the real node's containerd.
    (pod,) = [pod for pod in story.pods() if not pod["metadata"].get("deletionTimestamp")]
    assert pod["spec"]["nodeName"] == NODE
    (container,) = pod["status"]["containerStatuses"]
    assert container["containerID"].startswith("containerd://")
    assert container["image"] == Settings().image_for("torch")
    assert story.stack.container_pid(container["containerID"]) in story.engine_processes()
    # tiny-chat was trained on this question: a greedy answer mentions Kiln. Asked from a pod by
    # the Service's DNS name (CoreDNS, kube-proxy), and through the API server's service proxy.
    try:
        assert "Kiln" in ask_in_cluster(story, quiet())
    finally:  # the last scenario checks that the namespace is left empty
        kubectl("delete", "pod", CLIENT_POD, "--wait=true", "--timeout=60s")
    answer = ask(story, quiet())
    assert "Kiln" in answer, answer
    table = kubectl("get", "llmdeployments")
    header = table.splitlines()[0].split()
    assert all(column in header for column in PRINTER_COLUMNS), table
    assert NAME in table


def test_quantization_change_builds_a_new_engine_and_rolls_over_without_a_failed_request(
    story: Story, kubectl: Kubectl
) -> None:
    wait_ready(kubectl)
    old_engine = story.deployment()["status"]["engine"]["name"]
    loop = RequestLoop(story)
    loop.start()
    try:
        wait_for(lambda: loop.ok >= 3, 60, "the request loop to get answers")
        kubectl(
            "patch",
            "llmdeployment",
            NAME,
            "--type=merge",
            "-p",
            json.dumps({"spec": {"engine": {"quantization": NEW_QUANTIZATION}}}),
        )
        generation = story.deployment()["metadata"]["generation"]

        def rolled_over() -> bool:
            deployment = story.deployment()
            status = deployment.get("status") or {}
            engine = (status.get("engine") or {}).get("name")
            return bool(
                engine
                and engine != old_engine
                and not status.get("pendingEngine")
                and (status.get("observedGeneration") or 0) >= generation
                and serving_engines(story) == {engine}
                and (status.get("readyReplicas") or 0) >= 1
            )

        wait_for(rolled_over, 600, f"{NAME} to roll over to a {NEW_QUANTIZATION} engine", interval=1.0)
        wait_ready(kubectl)
        settled = loop.ok
        wait_for(lambda: loop.ok >= settled + 3, 60, "answers from the new engine")
    finally:
        loop.halt.set()
        loop.join(timeout=90)
    new_engine = kubectl.json("get", "llmengine", story.deployment()["status"]["engine"]["name"])
    assert new_engine["spec"]["quantization"] == NEW_QUANTIZATION
    assert new_engine["status"]["phase"] == "Ready"
    assert loop.failures == [], (
        f"{len(loop.failures)} failed of {loop.ok + len(loop.failures)}: {loop.failures[:5]}"
    )
    assert loop.ok >= 6
    print(f"rollover: {loop.ok} answered, {loop.retried} retried after a draining 503, 0 failed")


def autoscaling(kubectl: Kubectl, enabled: bool) -> None:
    patch = {"spec": {"autoscaling": {"enabled": enabled}}}
    kubectl("patch", "llmdeployment", NAME, "--type=merge", "-p", json.dumps(patch))


def settle(story: Story, replicas: int, timeout: float = 300.0) -> list[str]:
    """Wait until exactly `replicas` pods are ready and as many engine processes run in the real
    node's containers; return the pods' endpoints."""

    def settled() -> list[str] | None:
        found = story.ready_pod_endpoints()
        return found if len(found) == replicas and len(story.engine_processes()) == replicas else None

    return wait_for(settled, timeout, f"{replicas} ready pods and {replicas} engine processes", interval=1.0)


def test_scale_by_hand_runs_two_engine_containers(story: Story, kubectl: Kubectl) -> None:
    wait_ready(kubectl)
    # Manual scaling: the autoscaler must not undo it, so hand the replica count to the user.
    kubectl(
        "patch", "llmdeployment", NAME, "--type=merge", "-p", '{"spec":{"autoscaling":{"enabled":false}}}'
    )
    try:
        kubectl("scale", f"llmdeployment/{NAME}", "--replicas=1")
        settle(story, 1)
        kubectl("scale", f"llmdeployment/{NAME}", "--replicas=2")
        endpoints = settle(story, 2)
        body = manifests.completion_request(story.served_name, "Say hello.", max_tokens=16)
        with httpx.Client(timeout=60.0) as client:
            answers = [client.post(f"{endpoint}/v1/completions", json=body) for endpoint in endpoints]
        assert [a.status_code for a in answers] == [200, 200]
        texts = {a.json()["choices"][0]["text"] for a in answers}
        assert len(texts) == 1 and texts != {""}, texts  # the same engine: the same greedy answer
        wait_for(lambda: story.deployment()["status"].get("readyReplicas") == 2, 60, "readyReplicas 2")
    finally:
        kubectl("scale", f"llmdeployment/{NAME}", "--replicas=1")
        kubectl(
            "patch", "llmdeployment", NAME, "--type=merge", "-p", '{"spec":{"autoscaling":{"enabled":true}}}'
        )
    settle(story, 1)


def test_autoscaler_adds_a_replica_under_load_and_ttft_falls_back(story: Story, kubectl: Kubectl) -> None:
    wait_ready(kubectl)
    story.endpoints = story.ready_pod_endpoints()
    assert len(story.endpoints) == 1
    if not story.route:
        ask(story, quiet())
    result = autoscale(
        story,
        quiet(),
        concurrency=int(os.environ.get("KILN_E2E_CONCURRENCY", "32")),
        before_s=5.0,
        after_s=15.0,
        timeout=240.0,
    )
    target = story.ttft_target_ms
    print(
        f"autoscale: TTFT p50 before {result.ttft_before_ms} ms, during {result.ttft_during_ms} ms, "
        f"after {result.ttft_after_ms} ms (target {target} ms); scaled after {result.scaled_after_s} s"
    )
    assert result.replicas_after == 2
    assert len(result.engine_pids) == 2
    assert result.ttft_during_ms is not None and result.ttft_during_ms > target, result
    assert result.ttft_after_ms is not None and result.ttft_after_ms < target, result
    assert result.stats.failed == 0, result.stats.errors
    decision = story.deployment()["status"].get("lastScaleDecision") or {}
    assert decision.get("toReplicas") == 2, decision


def test_delete_leaves_nothing_behind(story: Story, kubectl: Kubectl, kiln_stack: Stack) -> None:
    engines = [e["metadata"]["name"] for e in kubectl.items("llmengines")]
    assert engines
    kubectl("delete", "llmdeployment", NAME, "--wait=true", "--timeout=120s")

    # The story's namespace holds nothing else: whatever is left there was left by Kiln.
    def left() -> dict[str, list[str]]:
        found = {
            kind: [
                item["metadata"]["name"]
                for item in kubectl.items(kind, "-n", story.namespace)
                if (kind, item["metadata"]["name"]) != ("services", "kubernetes")
            ]
            for kind in ("pods", "deployments", "services", "jobs", "llmengines")
        }
        found["engine processes"] = [str(pid) for pid in kiln_stack.engine_processes()]
        return {kind: names for kind, names in found.items() if names}

    remaining: dict[str, list[str]] = {}

    def nothing_left() -> bool:
        remaining.clear()
        remaining.update(left())
        return not remaining

    try:
        wait_for(nothing_left, 180, "every child, engine and process to go", interval=2.0)
    except DemoError as error:
        pytest.fail(f"{error}; left behind: {remaining}")
