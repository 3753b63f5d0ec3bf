"""Kiln driven by Argo CD: every change of the app's objects is a git commit that Argo CD syncs.

Argo CD (built from its Go module, kiln.local.argocd) runs as processes against the e2e cluster
(kiln.local.gitops) with Kiln's health checks loaded into argocd-cm from the chart's `argocd/`
folder. One Application follows `serving/` in a local git repository holding the tiny CPU
example. The tests run in order on the shared deployment: first sync (Progressing while the engine
waits for its build node, Healthy once it serves); a quantization commit rolled over under a
request loop; a commit whose model cannot be built (Degraded with Kiln's reason, the old replicas
keep serving); the autoscaler's replica count under automated sync with self-heal, without and
(under a real burst) with the ignoreDifferences docs/gitops.md prescribes; deleting the
Application deletes everything.

Set KILN_GITOPS_RESULTS to a file path to write the measured times there as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.test_tiny_chat import RequestLoop, serving_engines
from kiln.demo import manifests
from kiln.demo.kube import Kubectl, wait_for
from kiln.demo.load import Load
from kiln.demo.stack import NODE, Stack, repo_root
from kiln.demo.steps import Progress
from kiln.demo.story import LOAD_QUESTION, Story, ask
from kiln.local import argocd, gitops

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.engine]

EXAMPLE = repo_root() / "examples" / "tiny-cpu.yaml"
HEALTH_CHECKS = repo_root() / "charts" / "kiln" / "argocd"
APP = "tiny-chat"
MANIFEST = "serving/tiny-chat.yaml"
NEW_QUANTIZATION = "int8-weight"
RESULTS_ENV = "KILN_GITOPS_RESULTS"
SYNC_POLICY: dict[str, Any] = {"automated": {"prune": True, "selfHeal": True}}
GITOPS_DOC = repo_root() / "docs" / "gitops.md"
# How long the autoscaler's count must survive self-heal while the burst goes on. The issue asks
# for 5 minutes: a run with KILN_GITOPS_HOLD_SECONDS=300 is committed (gitops_e2e-run3.json); the
# suite holds one minute to keep the test command's time.
HOLD_SECONDS = float(os.environ.get("KILN_GITOPS_HOLD_SECONDS", "60"))
BURST_CLIENTS = 32  # 2x the example's maxBatchSize: TTFT climbs past its target on one replica
SCALE_UP_TIMEOUT = 300.0


def documented_application(flow: GitOps, ignore: bool) -> dict[str, Any]:
    """The Application for the test's repository with the sync policy and ignoreDifferences of
    docs/gitops.md's `serving` Application; without `ignore`, plain automated sync with self-heal."""
    if not ignore:
        return gitops.application(APP, flow.repo.url, "serving", flow.story.namespace, SYNC_POLICY)
    documented = documented_serving_application()["spec"]
    return gitops.application(
        APP,
        flow.repo.url,
        "serving",
        flow.story.namespace,
        documented["syncPolicy"],
        documented["ignoreDifferences"],
    )


def documented_serving_application() -> dict[str, Any]:
    """The `serving` Application of docs/gitops.md: the settings users are told to copy."""
    blocks = re.findall(r"```yaml\n(.*?)```", GITOPS_DOC.read_text(), flags=re.DOTALL)
    documents = [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]
    return next(d for d in documents if d.get("kind") == "Application" and d["metadata"]["name"] == "serving")


def quiet() -> Progress:
    return Progress(total=1, echo=lambda line: None)


@dataclass
class Seen:
    """One look at the Application: sync status and revision, and the LLMDeployment's health."""

    at: float
    sync: str
    revision: str
    operation: str
    health: str
    message: str


@dataclass
class GitOps:
    """What the tests share: Argo CD, the repository, the deployment they follow."""

    argo: gitops.ArgoCD
    repo: gitops.GitRepo
    story: Story
    kubectl: Kubectl
    manifest: dict[str, Any]
    results: dict[str, Any] = field(default_factory=dict)

    def look(self) -> Seen:
        app = self.argo.app(APP)
        status = app.get("status") or {}
        resource: dict[str, Any] = next(
            (
                r
                for r in status.get("resources") or []
                if r.get("kind") == "LLMDeployment" and r.get("name") == APP
            ),
            {},
        )
        health = resource.get("health") or {}
        return Seen(
            at=time.monotonic(),
            sync=(status.get("sync") or {}).get("status", ""),
            revision=(status.get("sync") or {}).get("revision", ""),
            operation=((status.get("operationState") or {}).get("syncResult") or {}).get("revision", ""),
            health=health.get("status", ""),
            message=health.get("message", ""),
        )

    def commit(self, manifest: dict[str, Any], message: str) -> tuple[str, float]:
        """Commit the LLMDeployment to git and tell Argo CD (as the git webhook would); return sha, time."""
        sha = self.repo.commit({MANIFEST: [manifest]}, message)
        started = time.monotonic()
        self.argo.refresh(APP)
        self.manifest = manifest
        return sha, started

    def follow(self, sha: str, until: str, timeout: float, saying: str = "") -> list[Seen]:
        """Look every second until Argo CD has synced `sha` and shows the LLMDeployment `until`,
        with a health message that contains `saying` (case-insensitive)."""
        seen: list[Seen] = []

        def reached() -> bool:
            now = self.look()
            if not seen or (now.sync, now.health, now.message) != (
                seen[-1].sync,
                seen[-1].health,
                seen[-1].message,
            ):
                seen.append(now)
            return (
                now.operation == sha
                and now.sync == "Synced"
                and now.health == until
                and saying.lower() in now.message.lower()
            )

        try:
            wait_for(reached, timeout, f"Argo CD to show {APP} {until} at {sha[:8]}", interval=1.0)
        except Exception:
            pytest.fail(f"history: {seen}\n{self.argo.log_tails()}")
        return seen

    def record(self, key: str, value: Any) -> None:
        self.results[key] = value
        print(f"{key}: {value}")


def health_sequence(seen: list[Seen], sha: str) -> list[str]:
    """The LLMDeployment health states Argo CD showed once it had synced `sha`, repeats dropped."""
    states: list[str] = []
    for look in seen:
        if look.operation == sha and look.health and (not states or states[-1] != look.health):
            states.append(look.health)
    return states


@pytest.fixture(scope="module")
def flow(
    kiln_stack: Stack, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[GitOps]:
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    started = time.monotonic()
    bin_dir = argocd.ensure_built(
        progress=lambda line: reporter.write_line(f"[gitops] {line}") if reporter else None
    )
    directory = tmp_path_factory.mktemp("argocd")
    argo = gitops.ArgoCD(directory, kiln_stack.kubeconfig, bin_dir)
    argo.install(gitops.health_customizations(HEALTH_CHECKS))
    argo.start()
    repo = gitops.GitRepo(directory / "repo")
    manifest = yaml.safe_load(EXAMPLE.read_text())
    state = GitOps(argo, repo, Story(kiln_stack, EXAMPLE), kubectl, manifest)
    state.record("argocd_up_s", round(time.monotonic() - started, 1))
    try:
        yield state
    finally:
        # A test that failed half-way leaves the Application: delete it (and, through its finalizer,
        # what it deployed) while Argo CD still runs, so later e2e modules find the namespace clean.
        kubectl.run(
            "delete",
            "applications.argoproj.io",
            "--all",
            "-n",
            gitops.NAMESPACE,
            "--timeout=120s",
            check=False,
            timeout=150,
        )
        killed = argo.stop()
        results = os.environ.get(RESULTS_ENV)
        if results:
            Path(results).write_text(json.dumps(state.results, indent=2) + "\n")
        assert not killed, f"Argo CD processes needed SIGKILL: {killed}"


def test_first_sync_shows_progressing_while_the_engine_waits_then_healthy_and_answers(flow: GitOps) -> None:
    sha = flow.repo.commit({MANIFEST: [flow.manifest]}, "tiny-chat on CPU")
    started = time.monotonic()
    # The only node the example's build may use is cordoned until Argo CD shows the engine waiting
    # for it: on an idle machine the tiny engine builds within Argo CD's health refresh, so without
    # the hold whether Argo CD ever showed the build was a race (it once saw only the operator's
    # first message, then Healthy).
    flow.kubectl("cordon", NODE)
    try:
        flow.kubectl.apply([documented_application(flow, ignore=True)])
        held = flow.follow(sha, "Progressing", 300, saying="pending")
    finally:
        flow.kubectl("uncordon", NODE)
    node_free = time.monotonic()
    engine = flow.story.deployment()["status"]["engine"]["name"]
    assert engine in held[-1].message, held[-1]
    seen = held + flow.follow(sha, "Healthy", 900)
    flow.record("first_sync_commit_to_progressing_s", round(held[-1].at - started, 1))
    flow.record("first_sync_node_free_to_healthy_s", round(seen[-1].at - node_free, 1))
    assert health_sequence(seen, sha)[-2:] == ["Progressing", "Healthy"], seen
    deployment = flow.story.deployment()
    ready = next(c for c in deployment["status"]["conditions"] if c["type"] == "Ready")
    assert seen[-1].message == ready["message"]
    flow.story.endpoints = flow.story.ready_pod_endpoints()
    assert "Kiln" in ask(flow.story, quiet())


def test_quantization_commit_rolls_over_without_a_failed_request(flow: GitOps) -> None:
    old_engine = flow.story.deployment()["status"]["engine"]["name"]
    loop = RequestLoop(flow.story)
    loop.start()
    try:
        wait_for(lambda: loop.ok >= 3, 60, "the request loop to get answers")
        changed = copy.deepcopy(flow.manifest)
        changed["spec"]["engine"]["quantization"] = NEW_QUANTIZATION
        sha, started = flow.commit(changed, f"tiny-chat: {NEW_QUANTIZATION}")
        seen = flow.follow(sha, "Healthy", 600)
        flow.record("quantization_commit_to_healthy_s", round(seen[-1].at - started, 1))
        settled = loop.ok
        wait_for(lambda: loop.ok >= settled + 3, 60, "answers after the rollover")
    finally:
        loop.halt.set()
        loop.join(timeout=90)
    assert "Progressing" in health_sequence(seen, sha), seen
    status = flow.story.deployment()["status"]
    assert status["engine"]["name"] != old_engine
    assert serving_engines(flow.story) == {status["engine"]["name"]}
    assert loop.failures == [], (
        f"{len(loop.failures)} failed of {loop.ok + len(loop.failures)}: {loop.failures[:5]}"
    )
    flow.record(
        "quantization_requests", {"answered": loop.ok, "retried_after_503": loop.retried, "failed": 0}
    )


def test_unbuildable_model_is_degraded_with_kilns_reason_and_old_replicas_keep_serving(flow: GitOps) -> None:
    good = flow.manifest
    serving = flow.story.deployment()["status"]["engine"]["name"]
    broken = copy.deepcopy(good)
    broken["spec"]["model"]["source"] = "pvc://kiln-models/no-such-model"
    broken["spec"]["build"]["retries"] = 0  # fail on the first attempt
    sha, started = flow.commit(broken, "tiny-chat: a model that does not exist")
    seen = flow.follow(sha, "Degraded", 600)
    flow.record("broken_commit_to_degraded_s", round(seen[-1].at - started, 1))
    degraded = next(c for c in flow.story.deployment()["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "EngineBuildFailed", degraded
    assert seen[-1].message == degraded["message"]
    assert serving in seen[-1].message  # "...; still serving with <the old engine>"
    failed = [
        next(c["message"] for c in engine["status"]["conditions"] if c["type"] == "Failed")
        for engine in flow.kubectl.items("llmengines", "-n", flow.story.namespace)
        if (engine.get("status") or {}).get("phase") == "Failed"
    ]
    assert len(failed) == 1 and failed[0] in seen[-1].message, (failed, seen[-1])
    assert serving_engines(flow.story) == {serving}
    assert "Kiln" in ask(flow.story, quiet())
    sha, started = flow.commit(good, "tiny-chat: back to the model that builds")
    seen = flow.follow(sha, "Healthy", 300)
    flow.record("revert_commit_to_healthy_s", round(seen[-1].at - started, 1))


class Burst(threading.Thread):
    """Clients posting completions back to back to the ready replicas (followed each second, the way
    a Service's endpoints move), so that the autoscaler running in the cluster sees TTFT rise."""

    def __init__(self, story: Story, clients: int) -> None:
        super().__init__(daemon=True)
        self.story = story
        self.clients = clients
        self.urls: list[str] = []
        self.loop = asyncio.new_event_loop()
        body = manifests.completion_request(story.served_name, LOAD_QUESTION, max_tokens=48)
        body.pop("stop", None)
        self.load = Load(lambda: self.urls, {**body, "ignore_eos": True}, clients)

    def follow_endpoints(self) -> None:
        with contextlib.suppress(Exception):
            self.urls = [f"{endpoint}/v1/completions" for endpoint in self.story.ready_pod_endpoints()]

    async def _run(self) -> None:
        async def refresh() -> None:
            while True:
                await asyncio.to_thread(self.follow_endpoints)
                await asyncio.sleep(1.0)

        refresher = asyncio.create_task(refresh())
        try:
            await self.load.run()
        finally:
            refresher.cancel()

    def run(self) -> None:
        try:
            self.loop.run_until_complete(self._run())
        finally:
            self.loop.close()

    def halt(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop already ended
            self.loop.call_soon_threadsafe(self.load.stop)
        self.join(timeout=180)


def autoscaler_writes_replicas(flow: GitOps, replicas: int) -> float:
    """Scale the way the autoscaler does (its own Kube.scale: server-side apply, forced); return when."""
    from kubernetes import config as kube_config

    from kiln_autoscaler.kube import Kube

    uid = flow.story.deployment()["metadata"]["uid"]
    with kube_config.new_client_from_config(config_file=str(flow.argo.kubeconfig)) as api_client:
        Kube(api_client).scale(flow.story.namespace, APP, replicas, uid)
    return time.monotonic()


def live_replicas(flow: GitOps) -> int:
    return int(flow.story.deployment()["spec"]["replicas"])


def replicas_managers(flow: GitOps) -> set[str]:
    """The field managers that own `.spec.replicas` of the LLMDeployment."""
    return {
        entry["manager"]
        for entry in flow.story.deployment()["metadata"].get("managedFields") or []
        if "f:replicas" in (entry.get("fieldsV1") or {}).get("f:spec", {})
    }


AUTOSCALER = ("deployment/kiln-autoscaler", "-n", "kiln-system")


@contextlib.contextmanager
def autoscaler_paused(flow: GitOps) -> Iterator[None]:
    """The in-cluster autoscaler scaled to zero, then back. Idle, it would itself restore git's count
    after the write this test makes in its name, racing Argo CD's self-heal to the same value; when
    it won, Argo CD had nothing to write back (CI, 2026-12-06: timed out waiting for Argo CD)."""
    flow.kubectl("scale", *AUTOSCALER, "--replicas=0")
    selector = ("-n", "kiln-system", "-l", "app.kubernetes.io/component=autoscaler")
    wait_for(lambda: not flow.kubectl.items("pods", *selector), 120, "the autoscaler's pod to stop")
    try:
        yield
    finally:
        flow.kubectl("scale", *AUTOSCALER, "--replicas=1")
        flow.kubectl("rollout", "status", *AUTOSCALER, "--timeout=180s", timeout=200)


def test_self_heal_reverts_the_autoscalers_replicas_unless_ignored(flow: GitOps) -> None:
    git_replicas = int(flow.manifest["spec"]["replicas"])
    scaled = git_replicas + 1
    # Automated sync with self-heal and nothing ignored: Argo CD writes git's count back.
    with autoscaler_paused(flow):
        flow.kubectl.apply([documented_application(flow, ignore=False)])
        written = autoscaler_writes_replicas(flow, scaled)
        wait_for(
            lambda: live_replicas(flow) == git_replicas and "argocd-controller" in replicas_managers(flow),
            120,
            "self-heal to write git's replicas back",
            interval=0.5,
        )
        flow.record("self_heal_reverted_autoscaler_after_s", round(time.monotonic() - written, 1))

    # The documented Application: Argo CD leaves spec.replicas to the autoscaler. A real burst makes
    # the autoscaler in the cluster add a replica, and the burst goes on while Argo CD is watched.
    flow.kubectl.apply([documented_application(flow, ignore=True)])
    flow.argo.refresh(APP)
    wait_for(lambda: live_replicas(flow) == git_replicas, 180, "the autoscaler back at git's count")
    burst = Burst(flow.story, BURST_CLIENTS)
    burst.start()
    looks: list[Seen] = []
    try:
        started = time.monotonic()
        wait_for(lambda: live_replicas(flow) > git_replicas, SCALE_UP_TIMEOUT, "a scale-up under the burst")
        flow.record("burst_to_autoscaler_scale_up_s", round(time.monotonic() - started, 1))
        deadline = time.monotonic() + HOLD_SECONDS
        while time.monotonic() < deadline:
            looks.append(flow.look())
            # Argo CD must never write replicas back, and the count must not flap while the load lasts.
            assert replicas_managers(flow) == {"kiln-autoscaler"}, (replicas_managers(flow), looks[-3:])
            assert live_replicas(flow) > git_replicas, ("scaled back during the burst", looks[-3:])
            time.sleep(1.0)
    finally:
        burst.halt()
    assert {look.sync for look in looks} == {"Synced"}, looks
    stats = burst.load.stats
    flow.record("ignored_replicas_held_under_burst_s", HOLD_SECONDS)
    flow.record("burst_requests", {"answered": stats.ok, "failed": stats.failed, "errors": stats.errors})


def test_deleting_the_application_deletes_the_deployment_and_its_children(
    flow: GitOps, kiln_stack: Stack
) -> None:
    namespace = flow.story.namespace
    flow.kubectl("delete", "applications.argoproj.io", APP, "-n", gitops.NAMESPACE, "--wait=false")

    def left() -> dict[str, list[str]]:
        found = {
            kind: [
                item["metadata"]["name"]
                for item in flow.kubectl.items(kind, "-n", namespace)
                if (kind, item["metadata"]["name"]) != ("services", "kubernetes")
            ]
            for kind in ("llmdeployments", "pods", "deployments", "services", "jobs", "llmengines")
        }
        found["applications"] = [
            a["metadata"]["name"]
            for a in flow.kubectl.items("applications.argoproj.io", "-n", gitops.NAMESPACE)
        ]
        found["engine processes"] = [str(pid) for pid in kiln_stack.engine_processes()]
        return {kind: names for kind, names in found.items() if names}

    remaining: dict[str, list[str]] = {}

    def nothing_left() -> bool:
        remaining.clear()
        remaining.update(left())
        return not remaining

    started = time.monotonic()
    try:
        wait_for(
            nothing_left,
            180,
            "the Application, the deployment, its children and processes to go",
            interval=2.0,
        )
    except Exception:
        pytest.fail(f"left behind: {remaining}\n{flow.argo.log_tails()}")
    flow.record("delete_to_nothing_left_s", round(time.monotonic() - started, 1))
