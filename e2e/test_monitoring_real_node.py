"""Kiln monitored the way a platform team monitors it, on the shared e2e cluster: the Prometheus
Operator and a Prometheus on the real node (`kiln.local.monitoring`), the chart upgraded in place
with its defaults (NetworkPolicy and monitoring on) plus `autoscaler.metricsSource: prometheus`,
and examples/tiny-cpu.yaml deployed.

Checks, in order: the Prometheus that the local cluster packages understands the Kubernetes service
discovery the operator configures; the chart's PodMonitor and ServiceMonitor reach Prometheus'
loaded configuration; the engine pods are UP targets, labelled with their LLMDeployment; the
engine's TTFT histogram answers a query after a few requests; the chart's alert rules are loaded;
and the autoscaler, reading TTFT from this Prometheus, adds a replica under load.

The module installs monitoring into the session's cluster and hands it back as it found it: the
chart's values restored, the deployment and the `monitoring` namespace deleted.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kiln.demo import manifests
from kiln.demo.kube import Kubectl, wait_for
from kiln.demo.stack import RELEASE_NAMESPACE, Stack, repo_root
from kiln.demo.steps import Progress
from kiln.demo.story import Story, ask, autoscale
from kiln.local import build, monitoring
from kiln_engine import metric_names

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.engine]

EXAMPLE = repo_root() / "examples" / "tiny-cpu.yaml"
NAME = "tiny-chat"
# The chart scrapes every 30 s (monitoring.interval): a target's first scrape, and a sample that
# reflects new requests, each come within about two intervals.
SCRAPE_WAIT_S = 100.0


def quiet() -> Progress:
    lines: list[str] = []
    return Progress(total=1, echo=lines.append)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_the_packaged_prometheus_loads_the_kubernetes_sd_the_operator_writes(tmp_path: Path) -> None:
    # Every job the operator writes for a PodMonitor or ServiceMonitor discovers its targets with
    # kubernetes_sd_configs. Debian's Prometheus is built without that plugin and refused each
    # such configuration, so Prometheus kept running with none (the chart's monitors never arrived).
    build.build(progress=lambda line: None, toolset=monitoring.prometheus_toolset(lambda line: None))
    (image,) = [spec for spec in monitoring.images() if "/prometheus:" in spec.ref]
    config = {
        "scrape_configs": [
            {
                "job_name": "pods",
                "kubernetes_sd_configs": [{"role": "pod", "api_server": "http://127.0.0.1:9"}],
            }
        ]
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = [
        str(image.files["bin/prometheus"]),
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as server:
        try:

            def loaded() -> dict[str, Any] | None:
                assert server.poll() is None, (
                    f"Prometheus exited: {server.stdout.read() if server.stdout else ''}"
                )
                try:
                    answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/status/config", timeout=2.0)
                except httpx.HTTPError:
                    return None
                return yaml.safe_load(answer.json()["data"]["yaml"]) if answer.is_success else None

            running = wait_for(loaded, 60.0, "Prometheus to answer on loopback")
        finally:
            server.terminate()
            server.wait(timeout=30)
    (job,) = running["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"


@pytest.fixture(scope="module")
def prometheus(kiln_stack: Stack, kubectl: Kubectl) -> Iterator[str]:
    """Prometheus' URL from this machine, with the chart upgraded to be monitored and read by the
    autoscaler, and the tiny example applied; everything undone afterwards."""
    started = time.monotonic()
    for toolset in monitoring.toolsets(lambda line: None):  # built by tests/run.sh in the background
        build.build(progress=lambda line: None, toolset=toolset)
    url = monitoring.install(kiln_stack.directory, kiln_stack.kubeconfig, progress=lambda line: None)
    installed = time.monotonic()
    defaults = dict(kiln_stack.values)
    kiln_stack.values = manifests.merge(
        defaults,
        {
            "autoscaler": {
                "metricsSource": "prometheus",
                "prometheus": {"url": monitoring.PROMETHEUS_SERVICE_URL},
            }
        },
    )
    try:
        kiln_stack.install_kiln()
        print(
            f"monitoring installed in {installed - started:.0f} s, chart upgraded in "
            f"{time.monotonic() - installed:.0f} s"
        )
        kubectl("apply", "-f", str(EXAMPLE))
        yield url
    finally:
        kubectl("delete", "llmdeployment", NAME, "--ignore-not-found", "--timeout=120s", timeout=150)
        kiln_stack.values = defaults
        kiln_stack.install_kiln()
        # The Prometheus object while its operator still runs (to settle its StatefulSet), then the rest.
        kubectl(
            "delete",
            "prometheus",
            monitoring.PROMETHEUS_NAME,
            "-n",
            monitoring.NAMESPACE,
            "--timeout=120s",
            timeout=150,
        )
        kubectl("delete", "namespace", monitoring.NAMESPACE, "--wait=false")


@pytest.fixture(scope="module")
def story(kiln_stack: Stack, kubectl: Kubectl, prometheus: str) -> Story:
    result = kubectl.run(
        "wait", "--for=condition=Ready", f"llmdeployment/{NAME}", "--timeout=600s", check=False, timeout=630
    )
    assert result.returncode == 0, f"{NAME} not Ready: {result.stderr}"
    return Story(kiln_stack, EXAMPLE)


def api(url: str, path: str, **params: str) -> Any:
    answer = httpx.get(f"{url}{path}", params=params, timeout=10.0)
    answer.raise_for_status()
    body = answer.json()
    assert body["status"] == "success", body
    return body["data"]


def chart_objects(kubectl: Kubectl, kind: str) -> list[dict[str, Any]]:
    return kubectl.items(kind, "-n", RELEASE_NAMESPACE)


def test_the_charts_monitors_reach_prometheus_configuration(prometheus: str, kubectl: Kubectl) -> None:
    monitors = [
        (kind, m["metadata"]["name"])
        for kind in ("PodMonitor", "ServiceMonitor")
        for m in chart_objects(kubectl, f"{kind.lower()}s.monitoring.coreos.com")
    ]
    assert {kind for kind, _ in monitors} == {"PodMonitor", "ServiceMonitor"}
    wanted = {f"{kind[0].lower()}{kind[1:]}/{RELEASE_NAMESPACE}/{name}/0" for kind, name in monitors}

    def jobs() -> set[str] | None:
        loaded = yaml.safe_load(api(prometheus, "/api/v1/status/config")["yaml"])
        found = {job["job_name"] for job in loaded.get("scrape_configs") or []}
        return found if wanted <= found else None

    wait_for(jobs, 180.0, f"Prometheus to load the scrape jobs {sorted(wanted)}", interval=2.0)


def test_the_engine_pods_are_up_targets_of_the_charts_podmonitor(
    prometheus: str, story: Story, kubectl: Kubectl
) -> None:
    (monitor,) = chart_objects(kubectl, "podmonitors.monitoring.coreos.com")
    pool = f"podMonitor/{RELEASE_NAMESPACE}/{monitor['metadata']['name']}/0"
    pods = {pod["metadata"]["name"] for pod in story.pods()}
    assert pods

    def up() -> list[dict[str, Any]] | None:
        targets = [t for t in api(prometheus, "/api/v1/targets")["activeTargets"] if t["scrapePool"] == pool]
        healthy = [t for t in targets if t["health"] == "up"]
        return healthy if {t["labels"].get("pod") for t in healthy} >= pods else None

    targets = wait_for(up, SCRAPE_WAIT_S, f"engine pods {sorted(pods)} UP in {pool}", interval=2.0)
    for target in targets:
        assert target["labels"]["llmdeployment"] == NAME  # what the autoscaler's queries select


def test_the_engine_ttft_histogram_answers_a_query_after_requests(prometheus: str, story: Story) -> None:
    count = f'sum({metric_names.TTFT_SECONDS}_count{{namespace="{story.namespace}", llmdeployment="{NAME}"}})'

    def observed() -> float:
        result = api(prometheus, "/api/v1/query", query=count)["result"]
        return float(result[0]["value"][1]) if result else 0.0

    before = observed()
    requests = 3
    for _ in range(requests):
        ask(story, quiet())
    wait_for(
        lambda: observed() >= before + requests,
        SCRAPE_WAIT_S,
        f"{requests} more TTFT observations in Prometheus (had {before:.0f})",
        interval=2.0,
    )
    quantile = (
        f'histogram_quantile(0.5, sum by (le) ({metric_names.TTFT_SECONDS}_bucket{{llmdeployment="{NAME}"}}))'
    )
    (sample,) = api(prometheus, "/api/v1/query", query=quantile)["result"]
    assert 0.0 < float(sample["value"][1]) < 60.0


def test_the_charts_alert_rules_are_loaded(prometheus: str, kubectl: Kubectl) -> None:
    (rule,) = chart_objects(kubectl, "prometheusrules.monitoring.coreos.com")
    wanted = {
        (group["name"], r.get("alert") or r.get("record"))
        for group in rule["spec"]["groups"]
        for r in group["rules"]
    }

    def loaded() -> set[tuple[str, str]] | None:
        groups = api(prometheus, "/api/v1/rules")["groups"]
        found = {(group["name"], r["name"]) for group in groups for r in group["rules"]}
        return found if wanted <= found else None

    wait_for(
        loaded,
        120.0,
        f"Prometheus to load the {len(wanted)} rules of {rule['metadata']['name']}",
        interval=2.0,
    )
    alerts = [
        r for g in api(prometheus, "/api/v1/rules")["groups"] for r in g["rules"] if r["type"] == "alerting"
    ]
    assert all(r["health"] != "err" for r in alerts), [r for r in alerts if r["health"] == "err"]


def test_the_autoscaler_scales_on_ttft_read_from_prometheus(
    prometheus: str, story: Story, kubectl: Kubectl
) -> None:
    (autoscaler,) = [
        d
        for d in kubectl.items("deployments", "-n", RELEASE_NAMESPACE)
        if "autoscaler" in d["metadata"]["name"]
    ]
    args = " ".join(autoscaler["spec"]["template"]["spec"]["containers"][0].get("args") or [])
    assert monitoring.PROMETHEUS_SERVICE_URL in args, args
    if not story.route:
        ask(story, quiet())
    result = autoscale(story, quiet(), concurrency=32, before_s=5.0, after_s=10.0, timeout=300.0)
    print(
        f"autoscale from Prometheus: TTFT p50 before {result.ttft_before_ms} ms, during "
        f"{result.ttft_during_ms} ms, after {result.ttft_after_ms} ms (target {story.ttft_target_ms} ms); "
        f"scaled after {result.scaled_after_s} s"
    )
    assert result.replicas_after == 2
    decision = story.deployment()["status"].get("lastScaleDecision") or {}
    assert decision.get("toReplicas") == 2, decision
