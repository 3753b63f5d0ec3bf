"""A serving replica fails under load: SIGKILL of one engine process, then a graceful pod deletion.

With tiny-chat at 2 ready replicas, a few clients ask it through its Service back to back. One
replica's engine process (found through the pod's `containerID`, `containerd://<id>`, in runc's
state on the real node, and checked against the engine processes its containers run) is SIGKILLed: the
clients must keep getting answers (no gap between two answers longer than `MAX_GAP_S`), and the
requests that fail are counted: at most those in flight at the kill plus one per client (sent
before the Service dropped the dead endpoint), none begun later than `FAILURE_WINDOW_S`. The container
comes back, the deployment returns to Ready with 2 ready replicas. Then one pod is deleted normally
(SIGTERM: it drains): the Deployment replaces it and not one request fails.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from kiln.demo import manifests
from kiln.demo.kube import Kubectl, is_true, pod_ready, wait_for
from kiln.demo.stack import Stack, repo_root
from kiln.demo.steps import DemoError, Progress
from kiln.demo.story import Story, ask

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.engine]

EXAMPLE = repo_root() / "examples" / "tiny-cpu.yaml"
NAME = "tiny-chat"
CLIENTS = 3
# "The Service keeps answering": the longest time without any answer, across all clients.
MAX_GAP_S = float(os.environ.get("KILN_E2E_MAX_GAP_S", "5"))
# A request that never reached an engine (connection refused, or a draining engine's 503 before it
# admits the request) is sent again to a ready replica, as a load balancer does; up to this often.
RESENDS = 3
# After a SIGKILL the requests in flight on the dead replica are lost, and so can be a request sent
# right after it, before the Service drops the endpoint: the API server's service proxy reuses its
# pooled connection to the pod and gets EOF. The bound is the requests in flight at the kill plus
# one per client, and no failed request may have begun later than this after the kill.
FAILURE_WINDOW_S = 5.0


@dataclass
class Tally:
    """What the clients saw; `answered_at` holds the monotonic time of every answer."""

    ok: int = 0
    resent: int = 0
    failures: list[str] = field(default_factory=list)
    failed_started: list[float] = field(default_factory=list)  # when each failed request began
    in_flight: int = 0
    answered_at: list[float] = field(default_factory=list)
    resend_reasons: dict[str, int] = field(default_factory=dict)  # why requests were sent again

    def longest_gap(self, since: float, until: float) -> float:
        """The longest stretch in [since, until] without an answer."""
        points = [since, *sorted(t for t in self.answered_at if since < t < until), until]
        return max(b - a for a, b in itertools.pairwise(points))


class Clients:
    """`CLIENTS` threads asking tiny-chat through the Service until stopped.

    Like the other scenarios' loop they follow the Service's ready endpoints before each request
    (or go through the API server's service proxy, when that is the route that answered). Each
    request uses a fresh connection, so a request that fails was sent after the fault, not on a
    pooled connection the fault had already closed.
    """

    def __init__(self, story: Story) -> None:
        self.story = story
        self.tally = Tally()
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(CLIENTS)]
        self.turn = 0

    def urls(self) -> list[str]:
        if self.story.route == "endpoints":
            endpoints = self.story.ready_pod_endpoints()
            return [f"{endpoint}/v1/completions" for endpoint in endpoints]
        return self.story.completion_urls()

    def next_url(self, refused: set[str]) -> str | None:
        """The next ready endpoint round-robin, leaving out those that just refused a connection."""
        try:
            urls = [url for url in self.urls() if url not in refused]
        except (DemoError, httpx.HTTPError):  # the API server did not answer: the lookup, not the model
            return None
        with self.lock:
            self.turn += 1
            return urls[self.turn % len(urls)] if urls else None

    def note_resend(self, why: str) -> None:
        with self.lock:
            self.tally.resend_reasons[why] = self.tally.resend_reasons.get(why, 0) + 1

    def ask_once(self, client: httpx.Client, body: dict[str, Any]) -> str | None:
        """One request (resent when it was not admitted); None if answered, else what went wrong."""
        problem = "no ready endpoint"
        refused: set[str] = set()
        for attempt in range(RESENDS + 1):
            if attempt:
                with self.lock:
                    self.tally.resent += 1
                time.sleep(0.1)
            url = self.next_url(refused)
            if url is None:
                continue
            try:
                response = client.post(url, json=body)
            except httpx.ConnectError as error:
                problem = f"{url}: {type(error).__name__}: {error}"
                refused.add(url)
                self.note_resend(type(error).__name__)
                continue
            except httpx.HTTPError as error:  # sent, then lost: a failure, never resent
                return f"{url}: {type(error).__name__}: {error}"
            if not_admitted(response):
                problem = f"{url}: HTTP 503 {response.text[:200]}"
                self.note_resend(f"HTTP 503 {response.text[:80]}")
                continue
            if response.status_code == 200 and response.json()["choices"][0]["text"]:
                return None
            return f"{url}: HTTP {response.status_code} {response.text[:200]}"
        return problem

    def run(self) -> None:
        body = manifests.completion_request(self.story.served_name, "What is Kiln?", max_tokens=16)
        verify = self.story.stack.api.ssl_context
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=60.0, verify=verify, limits=limits) as client:
            while not self.halt.is_set():
                with self.lock:
                    self.tally.in_flight += 1
                started = time.monotonic()
                problem = self.ask_once(client, body)
                with self.lock:
                    self.tally.in_flight -= 1
                    if problem is None:
                        self.tally.ok += 1
                        self.tally.answered_at.append(time.monotonic())
                    else:
                        self.tally.failures.append(problem)
                        self.tally.failed_started.append(started)
                if problem is not None:
                    time.sleep(0.2)  # do not spin on an outage

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        wait_for(lambda: self.tally.ok >= 5, 60, "the clients to get answers")
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        for thread in self.threads:
            thread.join(timeout=90)

    def kill(self, pid: int) -> int:
        """SIGKILL `pid`; return how many requests were in flight at that moment."""
        with self.lock:  # no request starts or ends between the count and the kill
            in_flight = self.tally.in_flight
            os.kill(pid, signal.SIGKILL)
        return in_flight


def not_admitted(response: httpx.Response) -> bool:
    """Whether a 503 says the request never reached a model: the engine refused it while draining,
    or the API server's service proxy could not connect. Any other answer, a 503 that says the
    request was aborted or the connection broke mid-request included, means it was lost."""
    if response.status_code != 503:
        return False
    if "connection refused" in response.text:
        return True
    try:
        error = response.json().get("error")
    except ValueError:
        return False
    return isinstance(error, dict) and error.get("code") == "draining"


def engine_pid(story: Story, pod: dict[str, Any]) -> int:
    """The host pid of the pod's engine process, from its container ID (runc's state on the node)."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    ids = [s.get("containerID") or "" for s in statuses if (s.get("state") or {}).get("running")]
    found = [story.stack.container_pid(i) for i in ids]
    assert len(found) == 1 and found[0], (
        f"pod {pod['metadata']['name']} has no single running container: {statuses}"
    )
    return found[0]


def restarts(pod: dict[str, Any]) -> int:
    return sum(s.get("restartCount") or 0 for s in (pod.get("status") or {}).get("containerStatuses") or [])


def ready_pods(story: Story) -> list[dict[str, Any]]:
    return [pod for pod in story.pods() if pod_ready(pod)]


def back_to_two(story: Story, timeout: float = 180.0) -> None:
    """Wait until 2 pods are ready, 2 engine processes run and the LLMDeployment says Ready with 2."""

    def settled() -> bool:
        deployment = story.deployment()
        return (
            len(ready_pods(story)) == 2
            and len(story.engine_processes()) == 2
            and (deployment.get("status") or {}).get("readyReplicas") == 2
            and is_true(deployment, "Ready")
        )

    wait_for(settled, timeout, f"{NAME} back to Ready with 2 ready replicas", interval=0.5)


def patch(kubectl: Kubectl, spec: dict[str, Any]) -> None:
    kubectl("patch", "llmdeployment", NAME, "--type=merge", "-p", json.dumps({"spec": spec}))


@pytest.fixture(scope="module")
def two_replicas(kiln_stack: Stack, kubectl: Kubectl) -> Iterator[Story]:
    """tiny-chat with 2 ready replicas, scaled by hand; afterwards 1 replica and autoscaling again,
    as the manifest has it (the scenarios that run next start from there)."""
    kubectl("apply", "-f", str(EXAMPLE))
    story = Story(kiln_stack, EXAMPLE)
    result = kubectl.run(
        "wait", "--for=condition=Ready", f"llmdeployment/{NAME}", "--timeout=600s", check=False, timeout=630
    )
    assert result.returncode == 0, f"{NAME} not Ready: {result.stderr} {story.deployment().get('status')}"
    story.find_service()
    story.endpoints = story.ready_pod_endpoints()
    ask(story, Progress(total=1, echo=lambda line: None))  # learns the route: service proxy or endpoints
    patch(kubectl, {"autoscaling": {"enabled": False}})  # or the autoscaler would undo the scaling
    try:
        kubectl("scale", f"llmdeployment/{NAME}", "--replicas=2")
        back_to_two(story, timeout=300)
        yield story
    finally:
        kubectl("scale", f"llmdeployment/{NAME}", "--replicas=1")
        patch(kubectl, {"autoscaling": {"enabled": True}})
        wait_for(
            lambda: len(ready_pods(story)) == 1 and len(story.engine_processes()) == 1,
            180,
            f"{NAME} back to 1 replica",
            interval=1.0,
        )


def test_sigkill_of_one_replica_loses_at_most_its_in_flight_requests(two_replicas: Story) -> None:
    story = two_replicas
    victim = ready_pods(story)[0]
    name = victim["metadata"]["name"]
    pid = engine_pid(story, victim)
    assert pid in story.engine_processes(), f"pid {pid} of {name} is not an engine process the node runs"
    before = restarts(victim)
    with Clients(story) as clients:
        time.sleep(2.0)
        killed_at = time.monotonic()
        in_flight = clients.kill(pid)
        ok_before = clients.tally.ok

        def recovered() -> bool:
            pods = {p["metadata"]["name"]: p for p in story.pods()}
            pod = pods.get(name)
            # The container restarts in the same pod; were the pod replaced, its name would be gone.
            return pod is None or (restarts(pod) > before and pod_ready(pod))

        wait_for(recovered, 120, f"{name}'s engine to restart (or the pod to be replaced)", interval=0.5)
        back_to_two(story)
        recovered_at = time.monotonic()
        settled = clients.tally.ok
        wait_for(lambda: clients.tally.ok >= settled + 5, 60, "answers after the recovery")
    tally = clients.tally
    gap = tally.longest_gap(killed_at - 2.0, time.monotonic())
    lost_in_flight = sum(1 for t in tally.failed_started if t <= killed_at)
    print(
        f"route {story.route}; resent because: {tally.resend_reasons}; failures: {tally.failures[:5]}\n"
        f"SIGKILL of {name}'s engine (pid {pid}): {in_flight} requests in flight at the kill, "
        f"{len(tally.failures)} failed ({lost_in_flight} of them begun before the kill, "
        f"{len(tally.failures) - lost_in_flight} after), "
        f"{tally.resent} resent after a refused connection or 503, "
        f"{tally.ok} answered ({tally.ok - ok_before} after the kill); longest gap without an answer "
        f"{gap:.2f} s; back to 2 ready replicas {recovered_at - killed_at:.1f} s after the kill"
    )
    assert pid not in story.engine_processes()
    assert gap <= MAX_GAP_S, f"no answer for {gap:.1f} s (limit {MAX_GAP_S} s)"
    late = [round(t - killed_at, 2) for t in tally.failed_started if t > killed_at + FAILURE_WINDOW_S]
    assert not late, f"requests begun {late} s after the kill failed: {tally.failures[:5]}"
    assert len(tally.failures) <= in_flight + CLIENTS, (
        f"{len(tally.failures)} failed, more than the {in_flight} in flight at the kill plus one per client: "
        f"{tally.failures[:5]}"
    )


def test_graceful_pod_deletion_loses_no_request(two_replicas: Story, kubectl: Kubectl) -> None:
    story = two_replicas
    back_to_two(story)
    victim = ready_pods(story)[0]["metadata"]["name"]
    with Clients(story) as clients:
        time.sleep(2.0)
        deleted_at = time.monotonic()
        kubectl("delete", "pod", victim, "--wait=false")

        def replaced() -> bool:
            names = {p["metadata"]["name"] for p in ready_pods(story)}
            return victim not in names and len(names) == 2

        wait_for(replaced, 120, f"the Deployment to replace {victim}", interval=0.5)
        back_to_two(story)
        wait_for(lambda: victim not in {p["metadata"]["name"] for p in story.pods()}, 60, f"{victim} to go")
        replaced_at = time.monotonic()
        settled = clients.tally.ok
        wait_for(lambda: clients.tally.ok >= settled + 5, 60, "answers after the replacement")
    tally = clients.tally
    gap = tally.longest_gap(deleted_at - 2.0, time.monotonic())
    print(
        f"route {story.route}; resent because: {tally.resend_reasons}\n"
        f"graceful deletion of {victim}: {len(tally.failures)} failed, {tally.resent} resent after a "
        f"draining 503 or refused connection, {tally.ok} answered; longest gap without an answer "
        f"{gap:.2f} s; replaced and back to 2 ready replicas {replaced_at - deleted_at:.1f} s after "
        f"the delete"
    )
    assert tally.failures == [], f"{len(tally.failures)} failed: {tally.failures[:5]}"
    assert gap <= MAX_GAP_S, f"no answer for {gap:.1f} s (limit {MAX_GAP_S} s)"
