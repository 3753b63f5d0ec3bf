"""The real node's configuration: the pieces agree with each other and stay in the node's folder."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

from kiln.local import cluster, nodeimages, realnode

NODE = realnode.Layout(Path("/tmp/cluster/node"))
BINS = {
    name: Path("/cache") / name
    for name in ("containerd", "containerd-shim-runc-v2", "bridge", "kubelet", "kube-proxy")
}


def under_node(path: str) -> bool:
    return Path(path).is_relative_to(NODE.root)


def test_containerd_state_in_the_node_folder_images_in_the_cache_local_sandbox_image() -> None:
    config = tomllib.loads(realnode.containerd_config(NODE, BINS))
    assert config["version"] == 3
    assert under_node(config["state"])
    # The images stay for the machine (one real node at a time), not per cluster.
    assert config["root"] == str(realnode.shared_containerd_root())
    assert config["grpc"]["address"] == str(NODE.socket)
    images = config["plugins"]["io.containerd.cri.v1.images"]
    assert images["snapshotter"] == nodeimages.SNAPSHOTTER  # the one images are unpacked for
    assert images["pinned_images"]["sandbox"] == nodeimages.PAUSE_REF
    runtime = config["plugins"]["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True
    assert runtime["netns_mounts_under_state_dir"] is True
    assert runtime["cni"]["conf_dir"] == str(NODE.cni_conf_dir)
    assert runtime["cni"]["bin_dirs"] == [str(BINS["bridge"].parent)]
    runc = runtime["containerd"]["runtimes"]["runc"]
    assert runc["options"]["SystemdCgroup"] is False
    assert under_node(runc["options"]["Root"])


def test_pod_network_is_a_slice_of_the_cluster_pod_range() -> None:
    config = realnode.cni_config(NODE)
    bridge = config["plugins"][0]
    subnet = ipaddress.IPv4Network(bridge["ipam"]["ranges"][0][0]["subnet"])
    assert subnet.subnet_of(ipaddress.IPv4Network(cluster.POD_CIDR))
    assert bridge["bridge"] == realnode.BRIDGE
    assert under_node(bridge["ipam"]["dataDir"])


def test_kubelet_serves_on_a_node_address_and_points_pods_at_cluster_dns() -> None:
    config = realnode.kubelet_config(NODE, Path("/pki/ca.crt"), 12345)
    address = ipaddress.ip_address(config["address"])
    assert not address.is_loopback
    assert config["address"] == realnode.NODE_IP
    dns = ipaddress.ip_address(config["clusterDNS"][0])
    assert dns in ipaddress.ip_network(cluster.SERVICE_CIDR)
    assert dns != ipaddress.ip_address(cluster.SERVICE_IP)
    assert config["containerRuntimeEndpoint"] == f"unix://{NODE.socket}"
    assert all(under_node(config[key]) for key in ("podLogsDir", "volumePluginDir"))
    argv = realnode.commands(NODE, BINS)["kubelet"]
    assert f"--node-ip={realnode.NODE_IP}" in argv
    assert f"--root-dir={NODE.kubelet_root}" in argv


def test_dns_service_matches_kubelet_and_selects_the_coredns_pods() -> None:
    manifests = {m["kind"]: m for m in realnode.dns_manifests("image:tag", "kubeconfig: yes")}
    service, deployment = manifests["Service"], manifests["Deployment"]
    kubelet = realnode.kubelet_config(NODE, Path("/pki/ca.crt"), 1)
    assert service["spec"]["clusterIP"] == kubelet["clusterDNS"][0]
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= template_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template_labels.items()
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/hostname": realnode.NODE_NAME}
    probe_port = pod["containers"][0]["readinessProbe"]["httpGet"]["port"]
    assert f"ready {realnode.NODE_IP}:{probe_port}" in manifests["ConfigMap"]["data"]["Corefile"]
    assert realnode.CLUSTER_DOMAIN in manifests["ConfigMap"]["data"]["Corefile"]


def test_api_paths_of_namespaced_and_cluster_objects() -> None:
    manifests = {m["kind"]: m for m in realnode.dns_manifests("image:tag", "")}
    assert (
        realnode.api_path(manifests["Deployment"])
        == "/apis/apps/v1/namespaces/kube-system/deployments/coredns"
    )
    assert realnode.api_path(manifests["Service"]) == "/api/v1/namespaces/kube-system/services/kube-dns"
    role = manifests["ClusterRole"]
    assert (
        realnode.api_path(role)
        == f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{role['metadata']['name']}"
    )


def test_only_our_chains_are_picked_from_an_iptables_dump() -> None:
    dump = "\n".join(
        [
            "*nat",
            ":PREROUTING ACCEPT [0:0]",
            ":KUBE-SERVICES - [0:0]",
            ":CNI-HOSTPORT-DNAT - [0:0]",
            ":CNI-abc123 - [0:0]",
            ":NETAVARK-1 - [0:0]",
            "-A PREROUTING -j KUBE-SERVICES",
            "COMMIT",
        ]
    )
    assert realnode.iptables_chains(dump) == ["KUBE-SERVICES", "CNI-HOSTPORT-DNAT"]


def test_down_removes_a_created_folder_only_while_it_holds_no_data(tmp_path: Path) -> None:
    import socket

    sockets = tmp_path / "kubelet" / "device-plugins"
    sockets.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(sockets / "kubelet.sock"))
    data = tmp_path / "cni" / "networks"
    data.mkdir(parents=True)
    (data / "allocation").write_text("10.244.0.2")
    realnode.remove_if_only_sockets(tmp_path / "kubelet")
    realnode.remove_if_only_sockets(tmp_path / "cni")
    assert not (tmp_path / "kubelet").exists()
    assert (data / "allocation").read_text() == "10.244.0.2"


def test_a_docker_archive_names_its_tags_and_image_id(tmp_path: Path) -> None:
    import io
    import json
    import tarfile

    archive = tmp_path / "image.tar"
    manifest = json.dumps([{"Config": "abc123.json", "RepoTags": ["example/kiln:1"], "Layers": []}]).encode()
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    assert nodeimages.archive_image(archive) == (["example/kiln:1"], "abc123")
    (tmp_path / "not-a-tar").write_text("x")
    assert nodeimages.archive_image(tmp_path / "not-a-tar") is None


def test_imported_image_ids_are_read_back_from_ctr_images_ls() -> None:
    # The shape of `ctr images ls` (containerd 2.2): the import's label is what marks an image current.
    listing = (
        "REF                 TYPE   DIGEST      SIZE    PLATFORMS   LABELS\n"
        f"example/kiln:1      docker sha256:aa 510 MiB linux/amd64 io.cri-containerd.image=managed,"
        f"{nodeimages.IMAGE_ID_LABEL}=abc123\n"
        "example/other:2     docker sha256:bb 1 MiB   linux/amd64 io.cri-containerd.image=managed\n"
    )
    assert nodeimages.image_labels(listing) == {"example/kiln:1": "abc123"}
