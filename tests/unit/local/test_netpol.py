"""kiln.local.netpol's pure parts: pods as the API serves them into cyclonus' traffic objects, and
cyclonus' answers read back (from a recorded `cyclonus analyze --mode query-traffic` output of three
flows: allowed, denied, allowed); and the local cluster's API server port in the chart's values."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.demo.manifests import api_server_values
from kiln.local.netpol import (
    Flow,
    NetpolError,
    Peer,
    bare_policy,
    container_port,
    parse_verdicts,
    pod_peer,
    to_pod,
    traffic,
)

RECORDED = Path(__file__).parent / "data" / "cyclonus-query-traffic.txt"
NAMESPACES = {"kiln-system": {"metadata": {"labels": {"kubernetes.io/metadata.name": "kiln-system"}}}}
POD = {
    "metadata": {"name": "op-1", "namespace": "kiln-system", "labels": {"app": "op"}},
    "spec": {"containers": [{"ports": [{"name": "metrics", "containerPort": 8080}]}]},
    "status": {"podIP": "10.0.0.6"},
}


def test_recorded_answers_read_back_in_order() -> None:
    assert parse_verdicts(RECORDED.read_text()) == [True, False, True]
    assert parse_verdicts("no table here") == []


def test_a_flow_to_a_named_port_becomes_cyclonus_traffic() -> None:
    source = Peer("10.0.0.5", "default", {"app": "x"}, {"kubernetes.io/metadata.name": "default"})
    flow = to_pod("x -> op metrics", source, POD, "metrics", NAMESPACES)
    [item] = traffic([flow])
    assert item == {
        "Source": {
            "IP": "10.0.0.5",
            "Internal": {
                "PodLabels": {"app": "x"},
                "NamespaceLabels": {"kubernetes.io/metadata.name": "default"},
                "Namespace": "default",
            },
        },
        "Destination": {
            "IP": "10.0.0.6",
            "Internal": {
                "PodLabels": {"app": "op"},
                "NamespaceLabels": {"kubernetes.io/metadata.name": "kiln-system"},
                "Namespace": "kiln-system",
            },
        },
        "Protocol": "TCP",
        "ResolvedPort": 8080,
        "ResolvedPortName": "metrics",
    }
    to_api = Flow("op -> api", pod_peer(POD, NAMESPACES), Peer("192.168.0.1"), 6443)
    assert traffic([to_api])[0]["Destination"] == {"IP": "192.168.0.1"}  # an address, not a pod


def test_a_port_the_pod_does_not_name_is_an_error() -> None:
    with pytest.raises(NetpolError, match="no container port named 'health'"):
        container_port(POD, "health")


def test_the_local_api_servers_port_joins_the_charts() -> None:
    assert api_server_values("https://127.0.0.1:38211") == {
        "networkPolicy": {"apiServer": {"ports": [443, 6443, 38211]}}
    }
    assert api_server_values("https://10.0.0.1:6443")["networkPolicy"]["apiServer"]["ports"] == [443, 6443]


def test_a_served_policy_is_cut_down_to_what_cyclonus_parses() -> None:
    served = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "kiln-system", "uid": "u", "managedFields": [{}]},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
        "status": {},
    }
    assert bare_policy(served) == {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "kiln-system"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }
