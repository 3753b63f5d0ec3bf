"""A multi-pod replica really serves, on the shared real-node cluster: examples/tiny-cpu-pp2.yaml
(the tiny chat model, TP2 x PP2 on CPU) is built by the operator and rendered as a pod group made
of core objects (a leader StatefulSet, a worker StatefulSet, the headless `<name>-ranks` Service;
no LeaderWorkerSet here). Both pods run the engine image in the node's containerd, their ranks meet
over gloo at the leader's DNS name, and the leader's greedy answers through the Service equal
TP=1's, token for token (the same checkpoint served by `kiln-engine serve` on the host).

Then the worker pod is deleted while clients ask back to back: the group comes back (the leader's
rank exits when the worker's heartbeat stops, its container restarts, the StatefulSet recreates the
worker under the same name) and the clients' failures are counted. A request the group never
admitted (no ready endpoint, connection refused, a draining 503) is sent again, as a load balancer
would; one that was admitted and then lost counts as failed. None may fail that began after the
group was Ready again.

With KILN_E2E_MULTI_NODE_RESULTS=<path> the measured times and counts are written there as JSON
(bench/results-committed/multi_node_serve-cpu.json came from such a run).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiln import labels
from kiln.demo import manifests
from kiln.demo.kube import Kubectl, pod_ready, wait_for
from kiln.demo.stack import NODE, Stack, repo_root
from kiln.demo.steps import DemoError
from kiln.demo.story import Story
from kiln.render import groups
from kiln.render.common import Settings

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.engine]

EXAMPLE = repo_root() / "examples" / "tiny-cpu-pp2.yaml"
CHECKPOINT = repo_root() / "examples" / "tiny-chat"  # what the example's pvc://kiln-models/tiny-chat holds
NAME = "tiny-chat-pp2"
QUESTIONS = ["What is Kiln?", "How does Kiln scale?", "Say hello."]
MAX_TOKENS = 24
CLIENTS = 2
READY_TIMEOUT_S = 900.0  # the build, then the group's start
RECOVERY_TIMEOUT_S = 300.0
CAPACITY_TIMEOUT_S = 150.0  # then the scenario goes on (the capacity Job may still be running)
RESULTS_ENV = "KILN_E2E_MULTI_NODE_RESULTS"


def greedy(question: str) -> dict[str, Any]:
    body = manifests.completion_request(NAME, question, max_tokens=MAX_TOKENS)
    return {**body, "logprobs": 0}


def tokens_of(answer: dict[str, Any]) -> dict[str, Any]:
    choice = answer["choices"][0]
    return {"text": choice["text"], "tokens": choice["logprobs"]["tokens"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tp1_answers() -> list[dict[str, Any]]:
    """TP=1: the checkpoint served by `kiln-engine serve` on the host, one process."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "KILN_GROUP_SIZE", "KILN_GROUP_INDEX"):
        env.pop(name, None)
    command = [sys.executable, "-m", "kiln_engine.cli", "serve", "--model", str(CHECKPOINT),
               "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
               "--max-model-len", "512", "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/ready", timeout=2).status_code == 200
            return False

        wait_for(up, 120, "the TP=1 server on the host")
        answers = [httpx.post(f"{url}/v1/completions", json=greedy(q), timeout=60) for q in QUESTIONS]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        return [tokens_of(a.json()) for a in answers]
    finally:
        server.terminate()
        server.wait(30)


@dataclass
class Group:
    """The deployment under test and what the scenarios measured (written to the results file)."""

    story: Story
    kubectl: Kubectl
    applied_at: float
    reference: list[dict[str, Any]] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)

    def pods(self) -> dict[str, dict[str, Any]]:
        """The group's pods (leader and worker), by name, leaving out those being deleted."""
        selector = f"{groups.GROUP_LABEL}={groups.group_name(NAME, 0)}"
        response = self.story.stack.api.get(f"/api/v1/namespaces/default/pods?labelSelector={selector}")
        response.raise_for_status()
        return {
            pod["metadata"]["name"]: pod
            for pod in response.json()["items"]
            if not pod["metadata"].get("deletionTimestamp")
        }

    def ready(self) -> bool:
        status = self.story.deployment().get("status") or {}
        conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
        return conditions.get("Ready") == "True" and (status.get("readyReplicas") or 0) >= 1

    def logs(self) -> str:
        found = []
        for name in self.pods():
            result = self.kubectl.run("logs", name, "--tail=15", check=False)
            found.append(f"--- {name}\n{result.stdout}{result.stderr}")
        return "\n".join(found)


@pytest.fixture(scope="module")
def group(kiln_stack: Stack, kubectl: Kubectl) -> Iterator[Group]:
    kubectl("apply", "-f", str(EXAMPLE))
    found = Group(Story(kiln_stack, EXAMPLE), kubectl, time.monotonic())
    try:
        found.reference = tp1_answers()  # while the cluster builds the engine
        yield found
    finally:
        path = os.environ.get(RESULTS_ENV)
        if path and found.numbers:
            Path(path).write_text(json.dumps(found.numbers, indent=2) + "\n")
        kubectl("delete", "-f", str(EXAMPLE), "--wait=true", "--timeout=120s")


def wait_ready(group: Group, timeout: float) -> None:
    try:
        wait_for(group.ready, timeout, f"{NAME} to be Ready", interval=1.0)
    except DemoError as error:
        status = group.story.deployment().get("status")
        pytest.fail(f"{error}\nstatus: {json.dumps(status, indent=1)}\n{group.logs()}")


def test_the_group_serves_tp1s_tokens_through_the_service(group: Group, kubectl: Kubectl) -> None:
    story = group.story

    def engine_ready() -> bool:
        name = ((story.deployment().get("status") or {}).get("engine") or {}).get("name")
        engine = kubectl.json("get", "llmengine", name) if name else {}
        return (engine.get("status") or {}).get("phase") == "Ready"

    wait_for(engine_ready, READY_TIMEOUT_S, "the TP2xPP2 engine to be built", interval=2.0)
    built = time.monotonic()
    wait_ready(group, READY_TIMEOUT_S)
    ready = time.monotonic()
    group.numbers.update(
        engine_built_s=round(built - group.applied_at, 1),
        group_ready_after_build_s=round(ready - built, 1),
        apply_to_ready_s=round(ready - group.applied_at, 1),
    )

    # The core-object group: a leader and a worker StatefulSet, the headless Service of its ranks.
    owned = f"{labels.DEPLOYMENT_LABEL}={NAME}"
    sets = {s["metadata"]["name"]: s for s in kubectl.items("statefulsets", "-l", owned)}
    assert set(sets) == {groups.group_name(NAME, 0), groups.workers_name(NAME, 0)}, set(sets)
    ranks = kubectl.json("get", "service", groups.ranks_service_name(NAME))
    assert ranks["spec"]["clusterIP"] == "None" and ranks["spec"]["publishNotReadyAddresses"] is True
    # Both pods run the engine image in the real node's containerd and are Ready.
    pods = group.pods()
    leader, worker = f"{groups.group_name(NAME, 0)}-0", f"{groups.workers_name(NAME, 0)}-1"
    assert set(pods) == {leader, worker}, set(pods)
    for pod in pods.values():
        assert pod["spec"]["nodeName"] == NODE and pod_ready(pod)
        (container,) = pod["status"]["containerStatuses"]
        assert container["containerID"].startswith("containerd://")
        assert container["image"] == Settings().image_for("torch")
    # Each pod runs its stage's two ranks (the pod index from the StatefulSet's label).
    assert "rank 0 (stage 0, tp rank 0) loaded" in kubectl("logs", leader)
    assert "rank 2 (stage 1, tp rank 0) loaded" in kubectl("logs", worker)
    # Only the leader is behind the API Service.
    endpoints = story.ready_pod_endpoints()
    assert endpoints == [f"http://{pods[leader]['status']['podIP']}:{story.port}"], endpoints

    # Through the Service (the API server's service proxy): TP=1's greedy tokens.
    path = manifests.service_proxy_path("default", NAME, story.port, "/v1/completions")
    answers = []
    for question in QUESTIONS:
        response = story.stack.api.post(path, greedy(question))
        assert response.status_code == 200, response.text
        answers.append(tokens_of(response.json()))
    assert answers == group.reference
    assert "Kiln" in answers[0]["text"], answers[0]  # tiny-chat was trained on this question
    group.numbers["answers_equal_tp1"] = len(answers)


def is_draining(response: httpx.Response) -> bool:
    """The engine refused the request before admitting it (it is stopping)."""
    return response.status_code == 503


@dataclass
class Tally:
    ok: int = 0
    resent: int = 0
    failed: list[tuple[float, str]] = field(default_factory=list)  # (when the request began, why)
    answered_at: list[float] = field(default_factory=list)


class Clients:
    """`CLIENTS` threads asking the leader back to back, each request on a fresh connection.

    Like a load balancer that follows the Service's endpoints, each request goes to a ready leader
    pod; one the group never admitted (no ready endpoint, connection refused, a draining 503) is sent
    again until `deadline`; one that was sent and then lost is a failure.
    """

    def __init__(self, story: Story, deadline_s: float) -> None:
        self.story = story
        self.deadline_s = deadline_s
        self.tally = Tally()
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(CLIENTS)]

    def ask(self, client: httpx.Client, body: dict[str, Any]) -> str | None:
        """None when answered, else why the request failed."""
        started = time.monotonic()
        while time.monotonic() - started < self.deadline_s:
            try:
                endpoints = self.story.ready_pod_endpoints()
            except (DemoError, httpx.HTTPError):
                endpoints = []
            if not endpoints:
                self.resent(0.5)
                continue
            url = f"{endpoints[0]}/v1/completions"
            try:
                response = client.post(url, json=body)
            except httpx.ConnectError:
                self.resent(0.2)
                continue
            except httpx.HTTPError as error:  # sent, then lost
                return f"{url}: {type(error).__name__}: {error}"
            if is_draining(response):
                self.resent(0.2)
                continue
            if response.status_code == 200 and response.json()["choices"][0]["text"]:
                return None
            return f"{url}: HTTP {response.status_code} {response.text[:200]}"
        return f"not admitted within {self.deadline_s:.0f} s"

    def resent(self, pause: float) -> None:
        with self.lock:
            self.tally.resent += 1
        time.sleep(pause)

    def run(self) -> None:
        body = greedy(QUESTIONS[0])
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=120.0, limits=limits) as client:
            while not self.halt.is_set():
                began = time.monotonic()
                problem = self.ask(client, body)
                with self.lock:
                    if problem is None:
                        self.tally.ok += 1
                        self.tally.answered_at.append(time.monotonic())
                    else:
                        self.tally.failed.append((began, problem))

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        for thread in self.threads:
            thread.join(timeout=self.deadline_s + 30)


def restarts(pod: dict[str, Any]) -> int:
    return sum(int(c.get("restartCount") or 0) for c in pod["status"].get("containerStatuses") or [])


def test_a_deleted_worker_brings_the_group_back(group: Group, kubectl: Kubectl) -> None:
    wait_ready(group, READY_TIMEOUT_S)
    capacity = wait_for_capacity(group, kubectl)
    leader, worker = f"{groups.group_name(NAME, 0)}-0", f"{groups.workers_name(NAME, 0)}-1"
    before = group.pods()
    worker_uid = before[worker]["metadata"]["uid"]
    leader_restarts = restarts(before[leader])
    with Clients(group.story, RECOVERY_TIMEOUT_S) as clients:
        wait_for(lambda: clients.tally.ok >= 3, 60, "answers before the fault")
        deleted_at = time.monotonic()
        kubectl("delete", "pod", worker, "--wait=false")

        def back() -> bool:
            pods = group.pods()
            return (
                worker in pods
                and pods[worker]["metadata"]["uid"] != worker_uid
                and all(pod_ready(pod) for pod in pods.values())
                and group.ready()
            )

        try:
            wait_for(back, RECOVERY_TIMEOUT_S, "the group to come back whole", interval=1.0)
        except DemoError as error:
            pytest.fail(f"{error}\n{group.logs()}")
        ready_at = time.monotonic()
        answered = clients.tally.ok
        wait_for(lambda: clients.tally.ok >= answered + 3, 120, "answers from the group that came back")
    after = group.pods()
    tally = clients.tally
    lost_after_ready = [why for began, why in tally.failed if began >= ready_at]
    group.numbers.update(
        worker_deleted_to_group_ready_s=round(ready_at - deleted_at, 1),
        leader_restarts=restarts(after[leader]) - leader_restarts,
        requests_answered=tally.ok,
        requests_resent_not_admitted=tally.resent,
        requests_failed=len(tally.failed),
        requests_failed_after_ready_again=len(lost_after_ready),
        failures=[f"+{began - deleted_at:.1f} s: {why}" for began, why in tally.failed],
        clients=CLIENTS,
        capacity=capacity,
    )
    print(json.dumps(group.numbers, indent=1))
    # The leader's ranks exited when the worker's stopped, and came back with the new worker.
    assert restarts(after[leader]) > leader_restarts, group.logs()
    assert lost_after_ready == [], lost_after_ready
    assert tally.ok >= 6


def wait_for_capacity(group: Group, kubectl: Kubectl) -> dict[str, Any]:
    """The first Ready replica of a multi-rank engine is measured by the capacity Job: let it finish
    (its load would mix with the scenario's) and return what it recorded, or that it did not end."""
    name = group.story.deployment()["status"]["engine"]["name"]

    def measured() -> dict[str, Any] | None:
        status = kubectl.json("get", "llmengine", name).get("status") or {}
        found = [c for c in status.get("conditions") or [] if c["type"] == "CapacityMeasured"]
        return {"condition": found[0], "capacity": status.get("capacity")} if found else None

    try:
        return wait_for(measured, CAPACITY_TIMEOUT_S, "the capacity Job to measure the replica", interval=3.0)
    except DemoError as error:
        return {"not measured": str(error)}
