"""The contract between the chart and the operator: every selector the chart renders for Kiln's
engine pods (PodMonitor, NetworkPolicy peers) selects the serving pods the operator renders, on a
port those pods have, and relabels from labels those pods carry into the labels the autoscaler
queries. Both sides are rendered by their own code; nothing here restates either side's literal."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from kiln_chart import Helm, by_kind

from kiln.placement import ReplicaShape, plan
from kiln.render import build_job as render_build_job
from kiln.render import router as render_router
from kiln.render import serving as render_serving
from kiln.render.common import Settings
from kiln_autoscaler.kube import scaled_from_object
from kiln_autoscaler.sources import DEFAULT_DEPLOYMENT_LABEL
from tests.unit.render.render_helpers import engine_for, example, matches, nodes, ready

MONITORING_API = "monitoring.coreos.com/v1"
EXAMPLES = (
    "tiny-cpu.yaml",
    "llama-3-8b-fp8-h100.yaml",
    "llama-3-70b-fp8-tp4.yaml",
    "llama-3.1-405b-fp8-tp8-pp2.yaml",
)
META_POD_LABEL = "__meta_kubernetes_pod_label_"
SERVING_NAMESPACE = "llm-serving"


def test_matches_follows_label_selector_semantics() -> None:
    labels = {"a": "1", "b": "2"}
    assert matches({}, labels)
    assert matches({"matchLabels": {"a": "1"}}, labels)
    assert not matches({"matchLabels": {"a": "2"}}, labels)
    assert not matches({"matchLabels": {"c": "1"}}, labels)
    assert matches({"matchExpressions": [{"key": "a", "operator": "In", "values": ["0", "1"]}]}, labels)
    assert not matches({"matchExpressions": [{"key": "c", "operator": "In", "values": ["1"]}]}, labels)
    assert matches({"matchExpressions": [{"key": "c", "operator": "NotIn", "values": ["1"]}]}, labels)
    assert not matches({"matchExpressions": [{"key": "b", "operator": "DoesNotExist"}]}, labels)
    assert matches({"matchExpressions": [{"key": "b", "operator": "Exists"}]}, labels)


def serving_templates() -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every pod that serves the OpenAI API, for each example; the
    template's metadata gets the workload's namespace, where its pods will run."""
    settings = Settings(lws_installed=True)
    for name in EXAMPLES:
        deployment = example(name, namespace=SERVING_NAMESPACE)
        placement = None
        if deployment.spec.gpu is not None:
            placement = plan(ReplicaShape.from_spec(deployment.spec), nodes(), deployment.spec.gpu.nvlink)
        inputs = render_serving.ServingInputs(deployment, ready(deployment), placement, settings)
        workload = render_serving.workload(inputs)
        if workload["kind"] == "LeaderWorkerSet":
            # the leader serves; workers hold the other pipeline stages
            where, template = f"{name} leader", workload["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
        else:
            where, template = name, workload["spec"]["template"]
        template["metadata"]["namespace"] = workload["metadata"]["namespace"]
        yield where, template


def build_templates() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in EXAMPLES:
        engine = engine_for(example(name, namespace=SERVING_NAMESPACE))
        job = render_build_job.build_job(engine, Settings(), gpus=1)
        yield f"{name} build", job["spec"]["template"]


def port_names(template: Mapping[str, Any]) -> set[str]:
    return {
        port["name"]
        for container in template["spec"]["containers"]
        for port in container.get("ports", [])
        if "name" in port
    }


def prometheus_label_name(label: str) -> str:
    """How Prometheus' Kubernetes discovery names a pod label: every other character becomes `_`."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def chart(helm: Helm, *settings: str) -> list[dict[str, Any]]:
    """The chart with its default values (Prometheus Operator present) plus `settings`."""
    return helm.render(api_versions=[MONITORING_API], settings=list(settings))


def engine_pod_monitor(objects: list[dict[str, Any]]) -> dict[str, Any]:
    [monitor] = by_kind(objects, "PodMonitor")
    return monitor


def test_pod_monitor_scrapes_every_serving_pod_and_no_build_pod(helm: Helm) -> None:
    monitor = engine_pod_monitor(chart(helm))["spec"]
    for where, template in serving_templates():
        labels = template["metadata"]["labels"]
        assert matches(monitor["selector"], labels), f"the PodMonitor misses {where} ({labels})"
        namespaces = monitor["namespaceSelector"]
        namespace = template["metadata"]["namespace"]
        assert namespaces.get("any") or namespace in namespaces.get("matchNames", []), where
        for endpoint in monitor["podMetricsEndpoints"]:
            assert endpoint["port"] in port_names(template), f"{where} has no port {endpoint['port']}"
    for where, template in build_templates():
        assert not matches(monitor["selector"], template["metadata"]["labels"]), f"scrapes {where}"


def test_pod_monitor_relabels_from_labels_the_pods_carry_into_what_the_autoscaler_reads(
    helm: Helm,
) -> None:
    endpoints = engine_pod_monitor(chart(helm))["spec"]["podMetricsEndpoints"]
    relabelings = [rule for endpoint in endpoints for rule in endpoint.get("relabelings", [])]
    targets = {rule["targetLabel"] for rule in relabelings}
    assert DEFAULT_DEPLOYMENT_LABEL in targets
    for where, template in serving_templates():
        carried = {prometheus_label_name(label) for label in template["metadata"]["labels"]}
        for rule in relabelings:
            for source in rule.get("sourceLabels", []):
                if source.startswith(META_POD_LABEL):
                    assert source.removeprefix(META_POD_LABEL) in carried, f"{where} lacks {source}"


def namespace_labels(template: Mapping[str, Any]) -> dict[str, str]:
    """The labels the API server puts on the namespace of a rendered pod (its name, since 1.22)."""
    return {"kubernetes.io/metadata.name": template["metadata"]["namespace"]}


def autoscaler_engine_peers(
    objects: list[dict[str, Any]],
) -> list[tuple[dict[str, Any] | None, dict[str, Any], set[str]]]:
    """(namespace selector, pod selector, ports) of every egress peer of the autoscaler's
    NetworkPolicy that names pods; no namespace selector means the policy's own namespace only."""
    [policy] = [p for p in by_kind(objects, "NetworkPolicy") if p["metadata"]["name"].endswith("autoscaler")]
    peers = []
    for rule in policy["spec"].get("egress", []):
        ports = {str(port["port"]) for port in rule.get("ports", [])}
        for peer in rule.get("to", []):
            if "podSelector" in peer:
                peers.append((peer.get("namespaceSelector"), peer["podSelector"], ports))
    return peers


@pytest.mark.parametrize("watch", [[], [SERVING_NAMESPACE]], ids=["all-namespaces", "watched-namespaces"])
def test_autoscaler_network_policy_lets_it_scrape_every_serving_pod(helm: Helm, watch: list[str]) -> None:
    settings = [f"watchNamespaces={{{','.join(watch)}}}"] if watch else []
    peers = autoscaler_engine_peers(chart(helm, "autoscaler.metricsSource=pods", *settings))
    assert peers, "the autoscaler may reach no pods at all"
    for where, template in serving_templates():
        labels = template["metadata"]["labels"]
        allowed = [
            ports
            for namespaces, pods, ports in peers
            if namespaces is not None
            and matches(namespaces, namespace_labels(template))
            and matches(pods, labels)
        ]
        assert allowed, f"the autoscaler's NetworkPolicy blocks its scrape of {where} ({labels})"
        assert any(ports & port_names(template) for ports in allowed), f"no allowed port on {where}"


def router_template() -> dict[str, Any]:
    """The pod template of the routers the operator renders for the tiny example with a router."""
    deployment = example("tiny-cpu.yaml", namespace=SERVING_NAMESPACE)
    deployment.spec.router.enabled = True
    router = render_router.router_deployment(deployment, Settings())
    template: dict[str, Any] = router["spec"]["template"]
    template["metadata"]["namespace"] = router["metadata"]["namespace"]
    return template


@pytest.mark.parametrize(
    "source",
    [["autoscaler.metricsSource=pods"],
     ["autoscaler.metricsSource=prometheus", "autoscaler.prometheus.url=http://prometheus:9090"]],
    ids=["pods", "prometheus"],
)  # fmt: skip
def test_autoscaler_network_policy_lets_it_ask_the_routers_what_they_hold(
    helm: Helm, source: list[str]
) -> None:
    # At zero replicas the routers' held requests are the only sign of demand, whatever the source.
    template = router_template()
    labels = template["metadata"]["labels"]
    allowed = [
        ports
        for namespaces, pods, ports in autoscaler_engine_peers(chart(helm, *source))
        if namespaces is not None
        and matches(namespaces, namespace_labels(template))
        and matches(pods, labels)
    ]
    assert any(ports & port_names(template) for ports in allowed), f"blocked from routers ({labels})"


def test_the_autoscalers_router_selector_selects_the_router_pods_and_no_engine() -> None:
    template = router_template()
    scaled = scaled_from_object(
        {
            "metadata": {"namespace": SERVING_NAMESPACE, "name": "tiny-chat", "uid": "u"},
            "spec": {"autoscaling": {"enabled": True}, "router": {"enabled": True}},
        }
    )
    assert scaled is not None and scaled.routed
    selector = dict(pair.split("=", 1) for pair in scaled.router_selector.split(","))
    assert matches({"matchLabels": selector}, template["metadata"]["labels"])
    for where, engine in serving_templates():
        assert not matches({"matchLabels": selector}, engine["metadata"]["labels"]), where
