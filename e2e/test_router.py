"""Kiln routers on the real node, as a user turns them on: the tiny CPU example with
`spec.router.enabled`, installed Kiln's way (the chart's RBAC, the control-plane image).

The operator runs two routers from the control-plane image in containerd; their ServiceAccount
reads the engines' EndpointSlices through the RoleBinding the operator made; a pod asks the model
by the Service's DNS name (kube-proxy → a router → an engine); a conversation sent turn by turn
through either router stays on one engine replica (the engines' own request counters show it); an
engine SIGKILLed under streamed load fails no request that had not begun streaming (the router
sends it to the other replica).
The engine is the one test_tiny_chat's deployment uses (same key): nothing is built again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from e2e.test_replica_fault import engine_pid, restarts
from kiln.demo.kube import Kubectl, pod_ready, ready_endpoints, wait_for
from kiln.demo.stack import CLIENT_POD, NODE, Stack, repo_root
from kiln.demo.steps import Progress
from kiln.demo.story import Story, ask_in_cluster, wait_serving

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.engine]

NAME = "tiny-routed"
ENGINE_SELECTOR = f"app.kubernetes.io/component=serving,kiln.dev/deployment={NAME}"
ROUTER_SELECTOR = f"app.kubernetes.io/component=router,kiln.dev/deployment={NAME}"
SYSTEM = "You are the Kiln assistant. You answer questions about running language models on GPUs."


def quiet() -> Progress:
    return Progress(total=1, echo=lambda line: None)


@contextlib.contextmanager
def tiny_with_routers(
    kiln_stack: Stack, kubectl: Kubectl, folder: Path, name: str, spec: dict[str, Any]
) -> Iterator[Story]:
    """The tiny CPU example named `name`, with two routers on the real node and `spec` merged into
    its spec, applied and Ready; deleted afterwards."""
    manifest = yaml.safe_load((repo_root() / "examples" / "tiny-cpu.yaml").read_text())
    manifest["metadata"]["name"] = name
    manifest["spec"].update(spec)
    manifest["spec"]["router"] = {
        "enabled": True,
        "replicas": 2,
        "nodeSelector": {"kiln.dev/real-node": "true"},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    story = Story(kiln_stack, path)
    kubectl("apply", "-f", str(path))
    try:
        wait_serving(story, quiet(), timeout=600)
        yield story
    finally:
        kubectl.run(
            "delete", "llmdeployment", name, "--wait=true", "--timeout=120s", check=False, timeout=150
        )


@pytest.fixture(scope="module")
def routed(kiln_stack: Stack, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    spec = {"replicas": 2, "autoscaling": {"enabled": False}}
    with tiny_with_routers(kiln_stack, kubectl, tmp_path_factory.mktemp("router"), NAME, spec) as story:
        yield story


def pods(kubectl: Kubectl, selector: str) -> list[dict[str, Any]]:
    return kubectl.items("pods", "-l", selector)


def ok_requests(endpoint: str) -> float:
    """The engine's own count of requests it answered (kiln_engine_requests_total{status="ok"})."""
    text = httpx.get(f"{endpoint}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kiln_engine_requests_total" and sample.labels.get("status") == "ok":
                return sample.value
    return 0.0


def test_routers_run_from_the_control_plane_image_and_the_service_reaches_the_model(
    routed: Story, kubectl: Kubectl, kiln_stack: Stack
) -> None:
    status = routed.deployment()["status"]
    assert status["routerReadyReplicas"] == 2, status
    routers = pods(kubectl, ROUTER_SELECTOR)
    assert len(routers) == 2
    operator = kubectl.items("pods", "-n", "kiln-system", "-l", "app.kubernetes.io/component=operator")
    for pod in routers:
        assert pod["spec"]["nodeName"] == NODE
        (container,) = pod["status"]["containerStatuses"]
        assert container["containerID"].startswith("containerd://") and container["ready"]
        assert container["image"] == operator[0]["spec"]["containers"][0]["image"]
    # The Service sends to the routers; a pod asks by its DNS name.
    assert {endpoint for endpoint in routed.ready_pod_endpoints()} == set(
        ready_endpoints(routers, routed.port)
    )
    try:
        assert ask_in_cluster(routed, quiet())
    finally:  # later e2e modules expect the namespace empty
        kubectl("delete", "pod", CLIENT_POD, "--wait=true", "--timeout=60s")


def test_a_conversation_stays_on_one_engine_through_either_router(routed: Story, kubectl: Kubectl) -> None:
    routers = ready_endpoints(pods(kubectl, ROUTER_SELECTOR), routed.port)
    engines = ready_endpoints(pods(kubectl, ENGINE_SELECTOR), routed.port)
    assert len(routers) == 2 and len(engines) == 2
    before = {engine: ok_requests(engine) for engine in engines}
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    questions = ["What is Kiln?", "How does it scale?", "And on GPUs?"]
    with httpx.Client(timeout=120) as client:
        for turn, question in enumerate(questions):
            messages.append({"role": "user", "content": question})
            router = routers[turn % len(routers)]
            body = {"model": routed.served_name, "messages": messages, "max_tokens": 8, "temperature": 0}
            response = client.post(f"{router}/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            messages.append(
                {"role": "assistant", "content": response.json()["choices"][0]["message"]["content"]}
            )
    wait_for(
        lambda: sum(ok_requests(e) - before[e] for e in engines) == len(questions), 30, "the engines' counts"
    )
    answered = sorted(ok_requests(engine) - before[engine] for engine in engines)
    assert answered == [0, len(questions)], answered


@dataclass
class StreamedLoad:
    """Clients that stream chat requests through one router until stopped; each outcome is
    (started, ok, whether a body byte had arrived, error)."""

    url: str
    body: dict[str, Any]
    clients: int
    outcomes: list[tuple[float, bool, bool, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def one(self, client: httpx.Client) -> tuple[float, bool, bool, str]:
        started, first_byte = time.monotonic(), False
        try:
            with client.stream("POST", f"{self.url}/v1/chat/completions", json=self.body) as response:
                if response.status_code != 200:
                    return started, False, False, f"HTTP {response.status_code} {response.read()[:120]!r}"
                for line in response.iter_lines():
                    first_byte = True
                    if line.strip() == "data: [DONE]":
                        return started, True, True, ""
        except httpx.HTTPError as error:
            return started, False, first_byte, f"{type(error).__name__}: {error}"
        return started, False, first_byte, "stream ended without [DONE]"

    def client(self) -> None:
        with httpx.Client(timeout=httpx.Timeout(120.0, connect=5.0)) as client:
            while not self.stop.is_set():
                self.outcomes.append(self.one(client))


def engine_loads(engines: list[dict[str, Any]], port: int) -> dict[str, float]:
    """Requests running or queued on each engine pod, by pod name (the engine's own gauges)."""
    names = ("kiln_engine_running_requests", "kiln_engine_queue_depth")
    loads = {}
    with httpx.Client(timeout=10) as http:
        for pod in engines:
            text = http.get(f"http://{pod['status']['podIP']}:{port}/metrics").text
            samples = (s for f in text_string_to_metric_families(text) for s in f.samples)
            loads[pod["metadata"]["name"]] = sum(s.value for s in samples if s.name in names)
    return loads


def test_an_engine_killed_under_load_fails_no_request_that_had_not_begun_streaming(
    routed: Story, kubectl: Kubectl
) -> None:
    (router, *_) = ready_endpoints(pods(kubectl, ROUTER_SELECTOR), routed.port)
    body = {
        "model": routed.served_name,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is Kiln?"}],
        "max_tokens": 24,
        "stream": True,
    }
    load = StreamedLoad(router, body, clients=8)
    with ThreadPoolExecutor(load.clients) as pool:
        for _ in range(load.clients):
            pool.submit(load.client)
        try:
            time.sleep(5.0)
            engines = [p for p in pods(kubectl, ENGINE_SELECTOR) if pod_ready(p)]
            busy = engine_loads(engines, routed.port)
            victim = max(engines, key=lambda p: busy[p["metadata"]["name"]])
            name, before = victim["metadata"]["name"], restarts(victim)
            os.kill(engine_pid(routed, victim), signal.SIGKILL)
            killed_at = time.monotonic()

            def back() -> bool:
                pod = {p["metadata"]["name"]: p for p in pods(kubectl, ENGINE_SELECTOR)}.get(name)
                return pod is None or (restarts(pod) > before and pod_ready(pod))

            wait_for(back, 180, f"{name}'s engine back after the SIGKILL", interval=1.0)
            time.sleep(3.0)
        finally:
            load.stop.set()
    failed = [o for o in load.outcomes if not o[1]]
    before_first_byte = [o for o in failed if not o[2]]
    answered_after = sum(1 for started, ok, _, _ in load.outcomes if ok and started > killed_at)
    print(
        f"SIGKILL of {name} (running + queued per engine: {busy}): {len(load.outcomes)} requests, "
        f"{len(failed)} failed ({len(before_first_byte)} before their first byte): {failed[:5]}"
    )
    assert busy[name] > 0, "the killed engine had no request: the kill tested nothing"
    assert not before_first_byte, f"not sent to the other engine: {before_first_byte[:5]}"
    assert answered_after > 0
