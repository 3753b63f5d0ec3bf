"""The pinned Go module, the build cache key and the control plane's command lines."""

from __future__ import annotations

import re
from pathlib import Path

from kiln.local import build, cluster, kwok, topology

GO_MOD = (build.GOTOOLS_DIR / "go.mod").read_text()


def test_every_binary_comes_from_a_required_module() -> None:
    versions = build.module_versions(GO_MOD)
    for binary in build.BINARIES:
        assert any(binary.package.startswith(module) for module in versions), binary
        assert f"\t{binary.package}\n" in GO_MOD, f"{binary.package} is not a `tool` of go.mod"


def test_staging_modules_are_pinned_to_the_kubernetes_release() -> None:
    kubernetes = build.module_versions(GO_MOD)["k8s.io/kubernetes"]
    staging = "v0." + kubernetes.split(".", 1)[1]
    replaces = re.findall(r"^\s*(k8s\.io/[\w-]+) => (k8s\.io/[\w-]+) (\S+)$", GO_MOD, re.MULTILINE)
    assert len(replaces) > 20
    for module, target, version in replaces:
        assert module == target
        assert version == staging, f"{module} pinned to {version}, not {staging}"


def test_cache_key_changes_with_the_pins_only() -> None:
    key = build.build_key(GO_MOD, "sum", "linux-amd64")
    assert key == build.build_key(GO_MOD, "sum", "linux-amd64")
    assert key.startswith(build.module_versions(GO_MOD)["k8s.io/kubernetes"] + "-")
    assert key != build.build_key(GO_MOD, "other sum", "linux-amd64")
    assert key != build.build_key(GO_MOD, "sum", "linux-arm64")
    assert key != build.build_key(GO_MOD.replace("v0.8.0", "v0.7.0"), "sum", "linux-amd64")


def test_kubernetes_binaries_report_their_release() -> None:
    versions = build.module_versions(GO_MOD)
    apiserver = next(b for b in build.BINARIES if b.name == "kube-apiserver")
    etcd = next(b for b in build.BINARIES if b.name == "etcd")
    flags = build.ldflags(versions, apiserver)
    assert f"k8s.io/component-base/version.gitVersion={versions['k8s.io/kubernetes']}" in flags
    assert build.ldflags(versions, etcd) == "-s -w"
    command = build.build_command(versions, apiserver, Path("out"))
    assert command[:2] == ["go", "build"] and "-trimpath" in command and command[-1] == apiserver.package


def test_missing_lists_what_is_not_built(tmp_path: Path) -> None:
    assert build.missing(tmp_path) == list(build.BINARIES)
    for binary in build.BINARIES[:2]:
        (tmp_path / binary.name).write_text("#!/bin/sh\n")
        (tmp_path / binary.name).chmod(0o755)
    assert build.missing(tmp_path) == list(build.BINARIES[2:])


def test_components_listen_on_loopback_ports_only(tmp_path: Path) -> None:
    ports = cluster.free_ports(
        ("etcd", "etcd-peer", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
    )
    assert len(set(ports.values())) == len(ports)
    bins = {b.name: tmp_path / b.name for b in build.BINARIES}
    commands = cluster.component_commands(bins, tmp_path, ports)
    assert set(commands) == set(cluster.COMPONENTS)
    for name, argv in commands.items():
        assert argv[0] == str(bins[name])
        joined = " ".join(argv)
        assert f"{ports[name]}" in joined, f"{name} does not use its port"
        hosts = re.findall(r"(?:address=|://|address=)(\d+\.\d+\.\d+\.\d+)", joined)
        assert hosts and set(hosts) == {"127.0.0.1"}, name
    assert f"--service-cluster-ip-range={cluster.SERVICE_CIDR}" in commands["kube-apiserver"]
    assert "--leader-elect=false" in commands["kube-scheduler"]


def test_kwok_manages_exactly_the_topology_nodes() -> None:
    documents = [kwok.configuration(), *kwok.stages()]
    options = documents[0]["options"]
    assert options["manageAllNodes"] is False
    key, value = options["manageNodesWithLabelSelector"].split("=")
    for node in topology.load_topology("mixed"):
        assert node["metadata"]["labels"][key] == value
    names = [stage["metadata"]["name"] for stage in documents[1:]]
    assert len(names) == len(set(names))
    assert {"node-initialize", "pod-ready", "pod-complete", "pod-fail", "pod-delete"} <= set(names)
