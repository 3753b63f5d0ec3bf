"""The acts of `kiln demo` after Kiln is installed: apply, build, serve, answer, autoscale.

Each act is a function of a `Story` (the running stack plus what earlier acts learned) that prints
through `Progress.info` and raises `DemoError` with an explanation when the cluster does not do
what the act expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from kiln.demo import manifests
from kiln.demo.kube import ready_endpoints
from kiln.demo.load import Load, LoadStats, scrape_ttft, ttft_window
from kiln.demo.stack import NODE, Stack, repo_root
from kiln.demo.steps import DemoError, Progress
from kiln_engine.build.progress import parse_line

QUESTION = "What is Kiln?"
LOAD_QUESTION = "How does Kiln scale?"


@dataclass
class Story:
    """What the acts share: the stack, the deployment they follow, and how to reach it."""

    stack: Stack
    manifest: Path
    namespace: str = "default"
    name: str = ""
    served_name: str = ""
    port: int = 8000
    ttft_target_ms: float = 0.0
    max_replicas: int = 1
    max_batch_size: int = 0
    service: str = ""
    route: str = ""  # "service-proxy" or "endpoints", once the first request was answered
    answer: str = ""
    cluster_ip: str = ""
    endpoints: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        spec = manifest_spec(self.manifest)
        self.name = spec["metadata"]["name"]
        self.namespace = spec["metadata"].get("namespace", self.namespace)
        self.served_name = spec["spec"]["model"].get("servedName") or self.name
        self.port = int(spec["spec"].get("serving", {}).get("port", 8000))
        autoscaling = spec["spec"].get("autoscaling", {})
        self.ttft_target_ms = float(autoscaling.get("ttftP50TargetMs", 0) or 0)
        self.max_replicas = int(autoscaling.get("maxReplicas", 1) or 1)
        self.max_batch_size = int(spec["spec"].get("engine", {}).get("maxBatchSize", 0) or 0)
        self.service = self.name

    # -------------------------------------------------------------- reading the cluster

    def get(self, path: str) -> dict[str, Any]:
        """One object from the API server (faster than a kubectl process; used in tight loops)."""
        response = self.stack.api.get(path)
        if not response.is_success:
            raise DemoError(f"GET {path}: HTTP {response.status_code} {response.text[:300]}")
        result: dict[str, Any] = response.json()
        return result

    def deployment(self) -> dict[str, Any]:
        return self.get(f"/apis/kiln.dev/v1alpha1/namespaces/{self.namespace}/llmdeployments/{self.name}")

    def find_service(self) -> None:
        """Learn the Service's name and port from the deployment's status.endpoint, if it says."""
        endpoint = (self.deployment().get("status") or {}).get("endpoint")
        if endpoint:
            self.service, self.port = service_from_endpoint(endpoint, self.port)

    def pods(self) -> list[dict[str, Any]]:
        """The pods the Service selects (what its endpoints would be)."""
        service = self.get(f"/api/v1/namespaces/{self.namespace}/services/{self.service}")
        selector = ",".join(f"{k}={v}" for k, v in (service.get("spec", {}).get("selector") or {}).items())
        if not selector:
            raise DemoError(f"service {self.service} has no selector")
        response = self.stack.api.get(f"/api/v1/namespaces/{self.namespace}/pods?labelSelector={selector}")
        response.raise_for_status()
        items: list[dict[str, Any]] = response.json().get("items", [])
        return items

    def ready_pod_endpoints(self) -> list[str]:
        return ready_endpoints(self.pods(), self.port)

    def completion_urls(self) -> list[str]:
        """Where a completion goes: the service proxy URL, or each ready pod behind the Service."""
        if self.route == "service-proxy":
            assert self.stack.state is not None
            path = manifests.service_proxy_path(self.namespace, self.service, self.port, "/v1/completions")
            return [f"{self.stack.state.server}{path}"]
        return [f"{endpoint}/v1/completions" for endpoint in self.endpoints]

    def engine_processes(self) -> list[int]:
        """Host pids of the `kiln-engine serve` processes in the real node's containers."""
        return self.stack.engine_processes()


def service_from_endpoint(endpoint: str, default_port: int) -> tuple[str, int]:
    """(Service name, port) of an in-cluster URL like http://tiny-chat.default.svc:8000/v1."""
    parsed = urlparse(endpoint)
    return (parsed.hostname or "").split(".")[0], parsed.port or default_port


def manifest_spec(path: Path) -> dict[str, Any]:
    import yaml

    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for document in documents:
        if document.get("kind") == "LLMDeployment":
            return dict(document)
    raise DemoError(f"{path} holds no LLMDeployment")


def engine_line(engine: dict[str, Any]) -> str:
    status = engine.get("status") or {}
    parts = [engine["metadata"]["name"], status.get("phase") or "Pending"]
    if status.get("progress") is not None:
        parts.append(f"{status['progress']}%")
    if status.get("step"):
        parts.append(str(status["step"]))
    if status.get("job"):
        parts.append(f"(job {status['job']})")
    return " ".join(parts)


# ------------------------------------------------------------------------ acts


def apply_example(story: Story, p: Progress) -> None:
    relative = (
        story.manifest.relative_to(repo_root())
        if story.manifest.is_relative_to(repo_root())
        else story.manifest
    )
    p.info(f"$ kubectl apply -f {relative}")
    p.info(story.stack.kubectl("apply", "-f", str(story.manifest)).strip())


def watch_engine_build(story: Story, p: Progress, timeout: float = 900.0) -> dict[str, Any]:
    """Follow the LLMEngine the deployment asks for until it is Ready; return it."""
    started = time.monotonic()
    deadline = started + timeout
    last = ""
    last_log = ""
    next_log = 0.0
    engine_name = ""
    next_check = time.monotonic() + 10.0
    while True:
        story.stack.check_processes()
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + 10.0
            trouble = story.stack.controller_trouble()
            if trouble and "CrashLoopBackOff" in trouble:
                raise DemoError(f"Kiln's controllers are crash-looping: {trouble}")
        status = story.deployment().get("status") or {}
        if status.get("phase") == "Failed":
            raise DemoError(f"llmdeployment/{story.name} Failed: {json.dumps(status.get('conditions'))}")
        ref = status.get("pendingEngine") or status.get("engine") or {}
        engine_name = ref.get("name") or engine_name
        if engine_name:
            result = story.stack.kubectl.run("get", "llmengine", engine_name, "-o", "json", check=False)
            if result.returncode == 0:
                engine = json.loads(result.stdout)
                line = engine_line(engine)
                if line != last:
                    p.info(f"LLMEngine {line}")
                    last = line
                status = engine.get("status") or {}
                if status.get("phase") == "Building" and status.get("job") and time.monotonic() >= next_log:
                    # The build's own progress lines, between the operator's status updates.
                    next_log = time.monotonic() + 3.0
                    seen = build_log_progress(story, status["job"])
                    if seen and seen != last_log:
                        p.info(f"  build log: {seen}")
                        last_log = seen
                phase = (engine.get("status") or {}).get("phase")
                if phase == "Ready":
                    artifact = (engine.get("status") or {}).get("artifact") or {}
                    p.info(f"artifact {artifact.get('uri', '?')}")
                    capacity = (engine.get("status") or {}).get("capacity")
                    if capacity:
                        p.info(f"measured capacity per replica: {json.dumps(capacity)}")
                    return dict(engine)
                if phase == "Failed":
                    status = engine.get("status") or {}
                    raise DemoError(
                        f"the engine build failed: {json.dumps(status.get('conditions'))}\n"
                        f"log tail:\n{status.get('logTail') or '(none)'}"
                    )
        elif time.monotonic() > started + 60 and not last:
            last = "waiting"
            p.info("no LLMEngine yet after 60 s: is the operator running? (see its log below on failure)")
        if time.monotonic() > deadline:
            raise DemoError(
                f"the engine was not Ready after {timeout:.0f} s (last: {last or 'no LLMEngine'})"
            )
        time.sleep(1.0)


def build_log_progress(story: Story, job: str) -> str | None:
    """The last progress line of a build Job's log, as `42% quantize: message`, if any."""
    result = story.stack.kubectl.run(
        "logs", f"job/{job}", "-n", story.namespace, "--tail=20", check=False, timeout=15
    )
    found = None
    for line in result.stdout.splitlines() if result.returncode == 0 else []:
        found = parse_line(line) or found
    if not found:
        return None
    message = f": {found['message']}" if found.get("message") else ""
    return f"{float(found.get('percent', 0)):.0f}% {found.get('step', '?')}{message}"


@contextlib.contextmanager
def serving_example(stack: Stack, example: Path, timeout: float = 600.0) -> Iterator[Story]:
    """Apply `example`, wait until it serves, and delete it again on the way out."""
    kubectl = stack.kubectl
    kubectl("apply", "-f", str(example))
    story = Story(stack, example)
    try:
        wait_serving(story, Progress(total=1, echo=lambda line: None), timeout=timeout)
        yield story
    finally:
        kubectl.run("delete", "-f", str(example), "--wait=true", "--timeout=120s", check=False, timeout=150)


def wait_serving(story: Story, p: Progress, timeout: float = 300.0) -> None:
    p.info(f"$ kubectl wait --for=condition=Ready llmdeployment/{story.name} --timeout={timeout:.0f}s")
    result = story.stack.kubectl.run(
        "wait",
        "--for=condition=Ready",
        f"llmdeployment/{story.name}",
        "-n",
        story.namespace,
        f"--timeout={timeout:.0f}s",
        check=False,
        timeout=timeout + 30,
    )
    if result.returncode != 0:
        status = story.deployment().get("status") or {}
        raise DemoError(
            f"llmdeployment/{story.name} not Ready: {result.stderr.strip()}; "
            f"conditions: {json.dumps(status.get('conditions'))}"
        )
    story.find_service()
    service = story.get(f"/api/v1/namespaces/{story.namespace}/services/{story.service}")
    story.cluster_ip = str(service.get("spec", {}).get("clusterIP") or "")
    selector = (story.deployment().get("status") or {}).get("selector") or ""
    p.info(story.stack.kubectl("get", "pods", "-n", story.namespace, "-l", selector, "-o", "wide").rstrip())
    story.endpoints = story.ready_pod_endpoints()
    pids = story.engine_processes()
    p.info(
        f"engine processes in the node's containers: {len(pids)} "
        f"(host pids {', '.join(map(str, pids)) or '-'})"
    )
    p.info(f"$ crictl ps --name engine   # on {NODE}, through its containerd")
    p.info(story.stack.crictl("ps", "--name", "engine").rstrip())


def ask_in_cluster(story: Story, p: Progress, question: str = QUESTION) -> str:
    """One completion from a pod in the cluster to the Service's DNS name (CoreDNS resolves it to
    the ClusterIP, kube-proxy's rules pick a serving pod)."""
    client = story.stack.start_client(story.namespace)
    host = f"{story.service}.{story.namespace}.svc.cluster.local"
    looked_up = story.stack.kubectl.run(
        "exec", "-n", story.namespace, client, "--", "nslookup", host, check=False
    )
    p.info(f"$ kubectl exec {client} -- nslookup {host}")
    p.info(looked_up.stdout.strip() or looked_up.stderr.strip())
    url = manifests.service_url(story.service, story.namespace, story.port, "/v1/completions")
    body = manifests.completion_request(story.served_name, question)
    p.info(
        f"$ kubectl exec {client} -- wget -q -O - --header 'Content-Type: application/json' "
        f"--post-data '...' {url}"
    )
    p.info(f"     prompt: {question!r}")
    result = story.stack.kubectl.run(
        "exec",
        "-n",
        story.namespace,
        client,
        "--",
        *manifests.in_cluster_completion(url, body),
        check=False,
        timeout=90,
    )
    if result.returncode != 0:
        raise DemoError(
            f"the model did not answer at {url} from pod {client}: {result.stderr.strip() or result.stdout}"
        )
    try:
        answer = str(json.loads(result.stdout)["choices"][0]["text"]).strip()
    except (ValueError, KeyError, IndexError) as error:
        raise DemoError(f"not a completion from {url}: {result.stdout[:300]}") from error
    p.info(f"     answer: {answer!r}")
    if not answer:
        raise DemoError("the model answered with an empty text")
    story.answer = answer
    return answer


def ask(story: Story, p: Progress, question: str = QUESTION) -> str:
    """One completion through the Service: the API server's service proxy, else the endpoints."""
    body = manifests.completion_request(story.served_name, question)
    path = manifests.service_proxy_path(story.namespace, story.service, story.port, "/v1/completions")
    p.info(f"POST {path}")
    p.info(f"     prompt: {question!r}")
    response: httpx.Response | None = None
    try:
        response = story.stack.api.post(path, body)
    except httpx.HTTPError as error:
        p.info(f"the service proxy failed ({type(error).__name__}: {error})")
    if response is not None and response.status_code == 200:
        story.route = "service-proxy"
    else:
        if response is not None:
            p.info(f"the service proxy answered HTTP {response.status_code}: {response.text[:300]}")
        story.endpoints = story.ready_pod_endpoints()
        if not story.endpoints:
            raise DemoError("no ready endpoint behind the Service")
        url = f"{story.endpoints[0]}/v1/completions"
        p.info("so asking a pod the Service selects directly (the address its endpoint would hold):")
        p.info(f"POST {url}")
        with httpx.Client(timeout=60.0) as client:
            response = client.post(url, json=body)
        if response.status_code != 200:
            raise DemoError(f"the engine answered HTTP {response.status_code}: {response.text[:500]}")
        story.route = "endpoints"
    answer = str(response.json()["choices"][0]["text"]).strip()
    usage = response.json().get("usage") or {}
    p.info(f"     answer: {answer!r}")
    p.info(f"     ({usage.get('completion_tokens', '?')} tokens, model {response.json().get('model')})")
    if not answer:
        raise DemoError("the model answered with an empty text")
    story.answer = answer
    return answer


def show_resources(story: Story, p: Progress) -> None:
    for kind in ("llmdeployments", "llmengines"):
        p.info(f"$ kubectl get {kind}")
        p.info(
            story.stack.kubectl(
                "get", kind, "-A" if kind == "llmengines" else f"-n={story.namespace}"
            ).rstrip()
        )


@dataclass
class AutoscaleResult:
    ttft_before_ms: float | None
    ttft_during_ms: float | None
    ttft_after_ms: float | None
    replicas_before: int
    replicas_after: int
    scaled_after_s: float | None
    stats: LoadStats
    engine_pids: list[int]


def fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"


def autoscale(
    story: Story,
    p: Progress,
    concurrency: int = 32,
    before_s: float = 8.0,
    after_s: float = 20.0,
    timeout: float = 300.0,
) -> AutoscaleResult:
    """A quiet window, then a burst until a replica is added, then the same burst on two replicas."""
    return asyncio.run(_autoscale(story, p, concurrency, before_s, after_s, timeout))


async def _autoscale(
    story: Story, p: Progress, concurrency: int, before_s: float, after_s: float, timeout: float
) -> AutoscaleResult:
    target = story.ttft_target_ms
    body = {
        **manifests.completion_request(story.served_name, LOAD_QUESTION, max_tokens=48),
        "ignore_eos": True,
    }
    body.pop("stop", None)
    # The load goes to the Service's ready endpoints, round-robin, the way kube-proxy spreads a
    # Service's traffic: through the API server's proxy, the API server (on the same few cores)
    # would be the bottleneck, and the engines would never see the burst.
    verify = True
    story.endpoints = story.ready_pod_endpoints()
    urls: list[str] = [f"{endpoint}/v1/completions" for endpoint in story.endpoints]

    async def refresh() -> None:
        while True:
            with contextlib.suppress(Exception):
                story.endpoints = await asyncio.to_thread(story.ready_pod_endpoints)
                urls[:] = [f"{endpoint}/v1/completions" for endpoint in story.endpoints]
            await asyncio.sleep(1.0)

    async def scrape() -> dict[str, dict[float, float]]:
        return await asyncio.to_thread(scrape_ttft, list(story.endpoints))

    refresher = asyncio.create_task(refresh())
    replicas_before = len(story.endpoints)
    try:
        # Quiet: one client, one request at a time.
        p.info(f"quiet: 1 client for {before_s:.0f} s (TTFT target p50 {target:.0f} ms)")
        start = await scrape()
        quiet = Load(lambda: urls, body, 1, verify)
        task = asyncio.create_task(quiet.run())
        await asyncio.sleep(before_s)
        quiet.stop()
        await task
        before, count = ttft_window(await scrape(), start)
        p.info(f"quiet: TTFT p50 {fmt_ms(before)} over {count} requests, replicas {replicas_before}")

        # Burst: many clients until the autoscaler's new replica is ready.
        p.info(
            f"burst: {concurrency} concurrent clients (maxBatchSize {story.max_batch_size} per replica), "
            "spread over the Service's ready endpoints, until the autoscaler adds a replica"
        )
        burst = Load(lambda: urls, body, concurrency, verify)
        task = asyncio.create_task(burst.run())
        began = time.monotonic()
        burst_start = await scrape()
        window_start = burst_start
        scaled_at: float | None = None
        during: float | None = None
        while True:
            await asyncio.sleep(5.0)
            story.stack.check_processes()
            now = await scrape()
            window, count = ttft_window(now, window_start)
            window_start = now
            spec_replicas, ready = await asyncio.to_thread(_replicas, story)
            p.info(
                f"+{time.monotonic() - began:4.0f} s  TTFT p50 {fmt_ms(window):>8} ({count} req)  "
                f"replicas {ready} ready / {spec_replicas} desired  ok {burst.stats.ok} "
                f"failed {burst.stats.failed}"
            )
            if ready > replicas_before and len(story.endpoints) <= replicas_before:
                story.endpoints = await asyncio.to_thread(story.ready_pod_endpoints)
                urls[:] = [f"{endpoint}/v1/completions" for endpoint in story.endpoints]
            if len(story.endpoints) > replicas_before and ready > replicas_before:
                scaled_at = time.monotonic() - began
                during, _ = ttft_window(now, burst_start)
                break
            if time.monotonic() - began > timeout:
                burst.stop()
                await task
                raise DemoError(
                    f"no replica was added within {timeout:.0f} s of load "
                    f"(TTFT p50 last window {fmt_ms(window)}, target {target:.0f} ms); "
                    "see the autoscaler's log"
                )
        p.info(
            f"scaled to {len(story.endpoints)} ready replicas after {scaled_at:.0f} s of load; "
            f"TTFT p50 during the burst {fmt_ms(during)}"
        )
        pids = story.engine_processes()
        p.info(f"engine processes in the node's containers: {len(pids)} (pids {', '.join(map(str, pids))})")

        # After: the same burst, now spread over the replicas.
        await asyncio.sleep(2.0)  # let the new replica's first requests (cold caches) pass
        after_start = await scrape()
        await asyncio.sleep(after_s)
        after, count = ttft_window(await scrape(), after_start)
        burst.stop()
        stats = await task
        p.info(f"after: TTFT p50 {fmt_ms(after)} over {count} requests on {len(story.endpoints)} replicas")
        if stats.failed:
            p.info(f"{stats.failed} requests failed; the first: {'; '.join(stats.errors)}")
        p.info(f"$ kubectl get llmdeployment {story.name}   # TTFT-P50 as the autoscaler last saw it")
        table = await asyncio.to_thread(
            story.stack.kubectl, "get", "llmdeployment", story.name, "-n", story.namespace
        )
        p.info(table.rstrip())
        return AutoscaleResult(
            before, during, after, replicas_before, len(story.endpoints), scaled_at, stats, pids
        )
    finally:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher


def _replicas(story: Story) -> tuple[int, int]:
    deployment = story.deployment()
    spec = int(deployment.get("spec", {}).get("replicas") or 0)
    ready = int((deployment.get("status") or {}).get("readyReplicas") or 0)
    return spec, ready
