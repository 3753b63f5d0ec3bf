"""The chart's NetworkPolicies, on by default, evaluated against the real pods of the e2e cluster by
cyclonus (kiln.local.netpol; the CNI bridge here enforces no policy): the flows Kiln needs are
allowed, and the others tried are denied. The pods are the ones running: the chart's operator and
autoscaler, CoreDNS, the demo's client pod, and a serving pod of the tiny example applied here under
its own name (the engine test_tiny_chat's deployment uses: nothing is built again). The API server
is the address and port the `kubernetes` Service's endpoints name, as policies see it after NAT.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from kiln.demo.kube import Kubectl
from kiln.demo.stack import CLIENT_POD, RELEASE_NAMESPACE, Stack, repo_root
from kiln.demo.steps import Progress
from kiln.demo.story import Story, wait_serving
from kiln.local import build, netpol
from kiln.local.netpol import Flow, Peer, pod_peer, to_pod

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.engine]

NAME = "tiny-netpol"
OUTSIDE = "203.0.113.7"  # TEST-NET-3: an address outside the cluster


@pytest.fixture(scope="module")
def serving(kiln_stack: Stack, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    manifest = yaml.safe_load((repo_root() / "examples" / "tiny-cpu.yaml").read_text())
    manifest["metadata"]["name"] = NAME
    manifest["spec"]["autoscaling"] = {"enabled": False}
    path = tmp_path_factory.mktemp("netpol") / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    story = Story(kiln_stack, path)
    kubectl("apply", "-f", str(path))
    kiln_stack.start_client()
    try:
        wait_serving(story, Progress(total=1, echo=lambda line: None), timeout=600)
        yield story
    finally:
        kubectl.run("delete", "-f", str(path), "--wait=true", "--timeout=120s", check=False, timeout=150)
        kubectl.run("delete", "pod", CLIENT_POD, "--wait=false", check=False)


def one_pod(pods: list[dict[str, Any]], namespace: str, **labels: str) -> dict[str, Any]:
    found = [
        pod
        for pod in pods
        if pod["metadata"]["namespace"] == namespace
        and all((pod["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())
        and (pod.get("status") or {}).get("podIP")
    ]
    assert found, f"no running pod in {namespace} with labels {labels}"
    return found[0]


def test_kilns_flows_are_allowed_and_the_others_denied(kubectl: Kubectl, serving: Story) -> None:
    binary = build.build(progress=lambda line: None, toolset=netpol.TOOLSET) / "cyclonus"
    policies = kubectl.json("get", "networkpolicies", "-A")["items"]  # all of them decide the flows
    chart = {p["metadata"]["name"] for p in policies if p["metadata"]["namespace"] == RELEASE_NAMESPACE}
    assert {"kiln-operator", "kiln-autoscaler"} <= chart  # the chart's, on by default
    namespaces = {ns["metadata"]["name"]: ns for ns in kubectl.json("get", "namespaces")["items"]}
    pods = kubectl.json("get", "pods", "-A")["items"]
    component = "app.kubernetes.io/component"
    operator = one_pod(pods, RELEASE_NAMESPACE, **{component: "operator"})
    autoscaler = one_pod(pods, RELEASE_NAMESPACE, **{component: "autoscaler"})
    dns = one_pod(pods, "kube-system", **{"k8s-app": "kube-dns"})
    engine = one_pod(pods, "default", **{component: "serving", "kiln.dev/deployment": NAME})
    client = pod_peer(one_pod(pods, "default", **{"app.kubernetes.io/part-of": "kiln-demo"}), namespaces)
    [api_slice] = kubectl.json(
        "get", "endpointslices", "-n", "default", "-l", "kubernetes.io/service-name=kubernetes"
    )["items"]
    api = Peer(api_slice["endpoints"][0]["addresses"][0])
    api_port = int(api_slice["ports"][0]["port"])
    op, scaler = pod_peer(operator, namespaces), pod_peer(autoscaler, namespaces)

    allowed = [
        Flow("operator -> API server", op, api, api_port),
        Flow("autoscaler -> API server", scaler, api, api_port),
        Flow("operator -> cluster DNS", op, pod_peer(dns, namespaces), 53, "dns", "UDP"),
        Flow("autoscaler -> cluster DNS", scaler, pod_peer(dns, namespaces), 53, "dns", "UDP"),
        to_pod("autoscaler -> engine /metrics (metricsSource: pods)", scaler, engine, "http", namespaces),
        to_pod("a pod -> operator metrics (metricsFrom: anyone)", client, operator, "metrics", namespaces),
        to_pod("a pod -> autoscaler metrics", client, autoscaler, "metrics", namespaces),
        to_pod("a pod -> engine API (no policy on engines)", client, engine, "http", namespaces),
    ]
    denied = [
        to_pod("a pod -> operator health port", client, operator, "health", namespaces),
        to_pod("a pod -> autoscaler health port", client, autoscaler, "health", namespaces),
        to_pod("operator -> engine API", op, engine, "http", namespaces),
        Flow("operator -> outside, port 80", op, Peer(OUTSIDE), 80),
        Flow("autoscaler -> outside, port 80", scaler, Peer(OUTSIDE), 80),
    ]
    flows = allowed + denied
    verdicts = netpol.evaluate(binary, policies, flows)
    print(f"\n{netpol.table(flows, verdicts)}")
    assert verdicts == [True] * len(allowed) + [False] * len(denied), netpol.table(flows, verdicts)
