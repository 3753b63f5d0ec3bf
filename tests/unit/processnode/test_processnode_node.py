"""The Node and Lease manifests, the pod IP pool and the log endpoint's pure parts."""

from __future__ import annotations

from pathlib import Path

from kiln.processnode import ips, logserver, nodeobj

FACTS = nodeobj.NodeFacts(name="pn", cpu="2", memory="8Gi", pods=110, kubelet_port=10250, arch="amd64")
NOW = "2026-12-02T14:00:00Z"


def test_node_manifest_is_a_labelled_untainted_ready_cpu_node() -> None:
    node = nodeobj.node_manifest(FACTS, NOW)
    labels = node["metadata"]["labels"]
    assert labels["kiln.dev/process-node"] == "true"
    assert labels["kubernetes.io/hostname"] == "pn" and labels["kubernetes.io/os"] == "linux"
    assert labels["kubernetes.io/arch"] == "amd64"
    assert "taints" not in node["spec"]
    status = node["status"]
    assert status["capacity"] == {"cpu": "2", "memory": "8Gi", "pods": "110"}
    assert "nvidia.com/gpu" not in status["allocatable"]
    assert {"type": "InternalIP", "address": "127.0.0.1"} in status["addresses"]
    assert status["daemonEndpoints"] == {"kubeletEndpoint": {"Port": 10250}}
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"


def test_stopped_node_reports_not_ready() -> None:
    status = nodeobj.node_status(FACTS, False, NOW, NOW, "ProcessNodeStopped")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ProcessNodeStopped")


def test_lease_is_owned_by_the_node() -> None:
    lease = nodeobj.lease_manifest("pn", "uid-1", "2026-12-02T14:00:00.000000Z")
    assert lease["metadata"]["namespace"] == "kube-node-lease"
    assert lease["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert lease["spec"]["holderIdentity"] == "pn" and lease["spec"]["leaseDurationSeconds"] == 40


def test_go_arch() -> None:
    assert nodeobj.go_arch("x86_64") == "amd64" and nodeobj.go_arch("aarch64") == "arm64"


def test_ip_candidates_skip_the_first_hosts() -> None:
    first = list(ips.candidates("10.244.255.0/24"))
    assert first[0] == "10.244.255.10" and first[-1] == "10.244.255.254"
    assert next(ips.candidates("127.0.0.0/24")) == "127.0.0.10"


def test_ip_pool_never_hands_out_one_address_twice_across_pools(tmp_path: Path) -> None:
    a, b = ips.IpPool("127.0.0.0/24", tmp_path), ips.IpPool("127.0.0.0/24", tmp_path)
    first = a.acquire()
    second = b.acquire(preferred=first)  # held by the other pool: not given out again
    assert first != second
    a.release(first)
    assert b.acquire(preferred=first) == first
    a.release_all()
    b.release_all()


def test_select_log() -> None:
    data = b"a\nb\nc\n"
    assert logserver.select_log(data, None, None) == data
    assert logserver.select_log(data, 2, None) == b"b\nc\n"
    assert logserver.select_log(data, 0, None) == b""
    assert logserver.select_log(data, None, 3) == b"a\nb"


def test_parse_log_path() -> None:
    assert logserver.parse_log_path("/containerLogs/ns/pod/c") == ("ns", "pod", "c")
    assert logserver.parse_log_path("/containerLogs/ns/pod") is None
    assert logserver.parse_log_path("/stats/summary") is None


def test_event_manifest_points_at_the_pod_and_container() -> None:
    from kiln.processnode import events

    pod = {"metadata": {"name": "web", "namespace": "ns", "uid": "u"}}
    event = events.event_manifest(
        pod, events.UNHEALTHY, "Readiness probe failed", "pn", NOW, "srv", warning=True
    )
    assert event["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "namespace": "ns",
        "name": "web",
        "uid": "u",
        "fieldPath": "spec.containers{srv}",
    }
    assert event["type"] == "Warning" and event["metadata"]["namespace"] == "ns"
    assert event["metadata"]["name"].startswith("web.") and event["source"] == {
        "component": "kiln-process-node",
        "host": "pn",
    }


def test_run_slice_current_and_previous_runs() -> None:
    assert logserver.run_slice(30, [0, 10, 25], previous=False) == (25, 30)
    assert logserver.run_slice(30, [0, 10, 25], previous=True) == (10, 25)
    assert logserver.run_slice(30, [0], previous=True) is None
    assert logserver.run_slice(30, [], previous=False) == (0, 30)  # no record: the whole log
    assert logserver.run_slice(5, [0, 10], previous=False) == (0, 5)  # a stale offset is ignored
