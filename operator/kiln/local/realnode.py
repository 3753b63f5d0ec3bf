"""The local cluster's real node: containerd, kubelet, kube-proxy and CoreDNS on this machine, and
the teardown that leaves nothing of them behind.

`kiln local up --real-node` adds node `kiln-real-node` next to the KWOK nodes. Its parts live in
`<cluster>/node/` and on a few host objects, all named here:

    ~/.cache/kiln/containerd/  containerd's root (images, snapshots): one for the machine, kept
                            across `up`s and clusters (one real node runs at a time), so a
                            multi-GB image is imported once, not per cluster
    node/state/             containerd's state, runc's root and the pods' network namespaces
    node/kubelet/           the kubelet's root dir (pod volumes)
    node/pod-logs/          container logs
    node/cni/               CNI config, host-local's IP allocations
    node/host.json          what `up` changed on the host (sysctls) and must restore

    link kiln-node0         a portless bridge holding the node's address NODE_IP (not loopback:
                            `kubectl logs/exec` reach the kubelet there)
    bridge kiln-cni0        the pods' bridge (subnet NODE_POD_CIDR), one veth per pod
    iptables KUBE-*         kube-proxy's Service rules (iptables mode), and the kubelet's canaries

Only one real node can run on a machine (kube-proxy's chains are global); OWNER_FILE says whose.
Pods reach the API server only through CoreDNS' own kubeconfig: the API server listens on
loopback, so the `kubernetes` Service has no endpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from kiln import labels
from kiln.local import build, nodeimages, pki

NODE_NAME = "kiln-real-node"
NODE_IP = "10.250.250.1"
NODE_LINK = "kiln-node0"
BRIDGE = "kiln-cni0"
CNI_NETWORK = "kiln-real-node"
NODE_POD_CIDR = "10.244.0.0/24"  # a slice of the cluster's POD_CIDR
CLUSTER_DNS_IP = "10.96.0.10"  # in the cluster's SERVICE_CIDR
CLUSTER_DOMAIN = "cluster.local"
KUBELET_PORT = 10250  # on NODE_IP, which is ours alone
NODE_LABEL = labels.REAL_NODE_LABEL
OWNER_FILE = Path("/run/kiln-real-node")
# Components in start order; `teardown` stops them in its own order.
COMPONENTS = ("containerd", "kubelet", "kube-proxy")
# Host settings the node changes: ip_forward (pods reach each other through Services), and what the
# kubelet sets at start (its kernel "defaults"). `teardown` restores the values found at `up`.
SYSCTLS = (
    "net/ipv4/ip_forward",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
DNS_LABELS = {"k8s-app": "kube-dns"}
# Folders the kubelet, containerd and CNI create whatever they are told (container log links, the
# device-plugin socket, shim sockets, CNI results): `teardown` removes them, if `up` did not find
# them, as far as they hold only folders and sockets. The shim-socket folder is listed on its own:
# another containerd (a test's private one, the host's) may have made /run/containerd without it.
HOST_FOLDERS = (
    "/var/log/containers",
    "/var/lib/kubelet",
    "/run/containerd",
    "/run/containerd/s",
    "/var/lib/cni",
)
CGROUP_PARENT = "k8s.io"  # where containerd puts pod cgroups when the kubelet names no parent


class NodeError(RuntimeError):
    """The real node could not start or be torn down; the message says which step and why."""


@dataclass(frozen=True)
class Layout:
    """Paths of one cluster's real node."""

    root: Path

    @property
    def containerd_root(self) -> Path:
        return shared_containerd_root()

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def socket(self) -> Path:
        return self.state / "containerd.sock"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def pod_logs(self) -> Path:
        return self.root / "pod-logs"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.root / "cni" / "ipam"

    @property
    def host_file(self) -> Path:
        return self.root / "host.json"

    def config(self, component: str) -> Path:
        return self.root / f"{component}.yaml"

    def kubeconfig(self, component: str) -> Path:
        return self.root / f"{component}.kubeconfig"


def shared_containerd_root() -> Path:
    """containerd's root, next to the binary cache (default `~/.cache/kiln/containerd`): the images
    the node imported. Kiln's engine image is 6.4 GB unpacked and takes minutes to import: one copy
    for the machine, reused by every cluster's node (only one runs at a time)."""
    return build.cache_root().parent / "containerd"


def layout(cluster_dir: Path) -> Layout:
    return Layout(cluster_dir / "node")


# --- configuration (pure) ---------------------------------------------------------------------


def containerd_config(node: Layout, bins: dict[str, Path]) -> str:
    """containerd's config (version 3): CRI with runc (cgroupfs), the overlayfs snapshotter, our CNI."""
    cri_runtime = "plugins.'io.containerd.cri.v1.runtime'"
    runc = f"{cri_runtime}.containerd.runtimes.runc"
    return f"""version = 3
root = "{node.containerd_root}"
state = "{node.state}"
# Plugins that would create files outside our folders (/var/run/nri, /opt/containerd).
disabled_plugins = ["io.containerd.nri.v1.nri", "io.containerd.internal.v1.opt"]

[grpc]
  address = "{node.socket}"

[ttrpc]
  address = "{node.state}/ttrpc.sock"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "{nodeimages.SNAPSHOTTER}"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{nodeimages.PAUSE_REF}"

[{cri_runtime}]
  # The sandbox lacks CAP_SYS_RESOURCE here: without this every sandbox fails in runc
  # ("can't get final child's PID from pipe: EOF").
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  [{cri_runtime}.cni]
    bin_dirs = ["{bins["bridge"].parent}"]
    conf_dir = "{node.cni_conf_dir}"
    max_conf_num = 1
  [{cri_runtime}.containerd]
    default_runtime_name = "runc"
  [{runc}]
    runtime_type = "io.containerd.runc.v2"
    runtime_path = "{bins["containerd-shim-runc-v2"]}"
  [{runc}.options]
    BinaryName = "/usr/sbin/runc"
    Root = "{node.state}/runc"
    SystemdCgroup = false
"""


def cni_config(node: Layout) -> dict[str, Any]:
    """The pods' network: a bridge with host-local addresses, and portmap for hostPorts.

    No masquerading: no pod traffic leaves the machine."""
    return {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": NODE_POD_CIDR}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(node.cni_ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(node: Layout, ca: Path, healthz_port: int) -> dict[str, Any]:
    """The kubelet's configuration: what works on this host (cgroup v1, cgroupfs, no QoS cgroups)."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{node.socket}",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "localStorageCapacityIsolation": False,
        "clusterDNS": [CLUSTER_DNS_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": "/etc/resolv.conf",
        "podLogsDir": str(node.pod_logs),
        "volumePluginDir": str(node.kubelet_root / "volume-plugins"),
        # Images are imported, not pulled: collecting them would lose them for good.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "serializeImagePulls": False,
    }


def kube_proxy_config(node: Layout, healthz_port: int, metrics_port: int) -> dict[str, Any]:
    """kube-proxy in iptables mode, leaving the host's conntrack settings alone."""
    from kiln.local import cluster

    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(node.kubeconfig("kube-proxy"))},
        "mode": "iptables",
        "hostnameOverride": NODE_NAME,
        "clusterCIDR": cluster.POD_CIDR,
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "nodePortAddresses": [f"{NODE_IP}/32"],
        # Pods share one bridge: masquerade Service traffic so replies come back through the host.
        "iptables": {"masqueradeAll": True, "localhostNodePorts": False},
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }


def commands(node: Layout, bins: dict[str, Path]) -> dict[str, list[str]]:
    """Command lines of the node's components (pure)."""
    return {
        "containerd": [str(bins["containerd"]), f"--config={node.config('containerd').with_suffix('.toml')}"],
        "kubelet": [
            str(bins["kubelet"]),
            f"--config={node.config('kubelet')}",
            f"--kubeconfig={node.kubeconfig('kubelet')}",
            f"--root-dir={node.kubelet_root}",
            f"--cert-dir={node.kubelet_root / 'pki'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}",
            f"--node-labels={NODE_LABEL}=true",
        ],
        "kube-proxy": [str(bins["kube-proxy"]), f"--config={node.config('kube-proxy')}"],
    }


def corefile() -> str:
    """CoreDNS' configuration: cluster names from the API, served on the node's address."""
    return f""".:53 {{
    bind {NODE_IP}
    errors
    health {NODE_IP}:8080
    ready {NODE_IP}:8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig /etc/coredns-kubeconfig/kubeconfig kiln-local
        pods insecure
    }}
    cache 30
}}
"""


def dns_manifests(image: str, kubeconfig_yaml: str) -> list[dict[str, Any]]:
    """CoreDNS as a Deployment on the real node, with its RBAC, config and the `kube-dns` Service.

    CoreDNS uses the host's network: the API server listens on loopback only."""
    namespace = "kube-system"
    meta = {"name": "coredns", "namespace": namespace, "labels": DNS_LABELS}
    pod_spec = {
        "hostNetwork": True,
        "dnsPolicy": "Default",
        "nodeSelector": {"kubernetes.io/hostname": NODE_NAME},
        "containers": [
            {
                "name": "coredns",
                "image": image,
                "imagePullPolicy": "Never",
                "ports": [
                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                ],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                "volumeMounts": [
                    {"name": "config", "mountPath": "/etc/coredns", "readOnly": True},
                    {"name": "kubeconfig", "mountPath": "/etc/coredns-kubeconfig", "readOnly": True},
                ],
            }
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": "coredns"}},
            {"name": "kubeconfig", "secret": {"secretName": "coredns-kubeconfig"}},
        ],
    }
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": pki.COREDNS.user},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": pki.COREDNS.user},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": pki.COREDNS.user,
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": pki.COREDNS.user}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": namespace},
            "data": {"Corefile": corefile()},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "coredns-kubeconfig", "namespace": namespace},
            "stringData": {"kubeconfig": kubeconfig_yaml},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": DNS_LABELS},
                "template": {"metadata": {"labels": DNS_LABELS}, "spec": pod_spec},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": namespace, "labels": DNS_LABELS},
            "spec": {
                "clusterIP": CLUSTER_DNS_IP,
                "selector": DNS_LABELS,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                ],
            },
        },
    ]


def api_path(manifest: dict[str, Any]) -> str:
    """The API path of a manifest's object (for server-side apply)."""
    group_version = manifest["apiVersion"]
    prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    plural = {
        "ClusterRole": "clusterroles",
        "ClusterRoleBinding": "clusterrolebindings",
        "ConfigMap": "configmaps",
        "Secret": "secrets",
        "Deployment": "deployments",
        "Service": "services",
    }[manifest["kind"]]
    namespace = manifest["metadata"].get("namespace")
    scope = f"/namespaces/{namespace}" if namespace else ""
    return f"{prefix}{scope}/{plural}/{manifest['metadata']['name']}"


# --- start ------------------------------------------------------------------------------------

Launch = Callable[[str, list[str]], None]
WaitUntil = Callable[[str, Callable[[], bool], float, str], None]


def start(
    cluster_dir: Path,
    server: str,
    client: httpx.Client,
    launch: Launch,
    wait_until: WaitUntil,
    progress: Callable[[str], None],
    timeout: float,
) -> dict[str, list[str]]:
    """Start the real node of the cluster in `cluster_dir` and wait until it and cluster DNS are
    Ready; returns the components' command lines (launched through `launch`)."""
    from kiln.local import cluster

    _claim(cluster_dir)
    node = layout(cluster_dir)
    bins = build.node_binary_paths()
    started = time.monotonic()
    for folder in (node.state, node.kubelet_root, node.pod_logs, node.cni_ipam_dir):
        _remove_tree(folder)
    for folder in (node.root, node.containerd_root, node.state, node.cni_conf_dir, node.pod_logs):
        folder.mkdir(parents=True, exist_ok=True)
    _write_configs(node, bins, server, cluster_dir)
    _record_host(node)
    _add_node_link()
    argv = commands(node, bins)

    launch("containerd", argv["containerd"])
    wait_until("containerd", node.socket.exists, timeout, f"{node.socket} to appear")
    images = [nodeimages.pause_image(), nodeimages.coredns_image(bins["coredns"])]
    nodeimages.import_archives(bins["ctr"], node.socket, [nodeimages.archive(spec) for spec in images])
    progress(f"containerd ready, {len(images)} images imported after {time.monotonic() - started:.1f} s")

    launch("kubelet", argv["kubelet"])
    launch("kube-proxy", argv["kube-proxy"])
    wait_until(
        "kubelet",
        lambda: cluster.node_ready(client, server, NODE_NAME),
        timeout,
        f"node {NODE_NAME} to become Ready",
    )
    progress(f"node {NODE_NAME} Ready at {NODE_IP} after {time.monotonic() - started:.1f} s")

    coredns_kubeconfig = node.kubeconfig("coredns").read_text()
    for manifest in dns_manifests(images[1].ref, coredns_kubeconfig):
        response = client.patch(
            f"{server}{api_path(manifest)}",
            params={"fieldManager": cluster.FIELD_MANAGER, "force": "true"},
            content=json.dumps(manifest),
            headers={"Content-Type": "application/apply-patch+yaml"},
        )
        if not response.is_success:
            raise NodeError(f"applying {manifest['kind']} {manifest['metadata']['name']}: {response.text}")
    wait_until(
        "kubelet",
        lambda: _deployment_ready(client, server, "kube-system", "coredns"),
        timeout,
        "CoreDNS (kube-system/coredns) to become Ready",
    )
    progress(f"cluster DNS at {CLUSTER_DNS_IP} Ready after {time.monotonic() - started:.1f} s")
    return argv


def import_images(cluster_dir: Path, archives: list[Path]) -> list[Path]:
    """Import image archives into the running real node's containerd (for pods with local images);
    returns those imported (an image already there under the same id is skipped)."""
    node = layout(cluster_dir)
    return nodeimages.import_archives(build.node_binary_paths()["ctr"], node.socket, archives)


def _deployment_ready(client: httpx.Client, server: str, namespace: str, name: str) -> bool:
    response = client.get(f"{server}/apis/apps/v1/namespaces/{namespace}/deployments/{name}")
    return response.is_success and (response.json().get("status", {}).get("readyReplicas") or 0) >= 1


def _claim(cluster_dir: Path) -> None:
    """Record this cluster as the machine's real node; refuse if another cluster's node runs."""
    owner = _owner()
    unowned = [link for link in (NODE_LINK, BRIDGE) if _link_exists(link)]
    if owner is None and unowned:
        # No cluster of this machine claimed them, so a real node of another mount namespace
        # (another container sharing this network namespace) made them: taking them over would
        # cut that node's pods off.
        raise NodeError(
            f"links {', '.join(unowned)} exist but no Kiln cluster of this machine owns them "
            f"({OWNER_FILE} is absent): another real node shares this network namespace; stop it, or "
            f"if they are stale, `ip link del` them"
        )
    if owner is not None and owner != cluster_dir and containerd_running(layout(owner)):
        raise NodeError(
            f"a real node of the cluster in {owner} runs on this machine (only one can): "
            f"`kiln local down --dir {owner}` first"
        )
    if owner is not None and owner != cluster_dir:
        clear_stale_node()
    OWNER_FILE.write_text(f"{cluster_dir}\n")


def clear_stale_node() -> Path | None:
    """Tear down what a killed cluster's real node left (links, chains, cgroups, OWNER_FILE).

    A node is stale when OWNER_FILE names a cluster whose containerd no longer runs (its
    `kiln local` process was killed before `down`). Returns that cluster's folder, or None.
    """
    owner = _owner()
    if owner is None or containerd_running(layout(owner)):
        return None
    teardown(owner, lambda name: None)  # frees OWNER_FILE
    return owner


def containerd_running(node: Layout) -> bool:
    """Whether `node`'s containerd runs (a killed cluster's components die with it, soon after)."""
    config = f"--config={node.root}/containerd.toml"
    return any(argv[0].endswith("/containerd") and config in argv for _, argv in _processes())


def _write_configs(node: Layout, bins: dict[str, Path], server: str, cluster_dir: Path) -> None:
    from kiln.local import cluster

    p = pki.Pki(cluster_dir / "pki")
    node.config("containerd").with_suffix(".toml").write_text(containerd_config(node, bins))
    (node.cni_conf_dir / f"10-{CNI_NETWORK}.conflist").write_text(json.dumps(cni_config(node), indent=2))
    ports = cluster.free_ports(("kubelet-healthz", "kube-proxy-healthz", "kube-proxy-metrics"))
    node.config("kubelet").write_text(
        yaml.safe_dump(kubelet_config(node, p.ca_cert, ports["kubelet-healthz"]))
    )
    node.config("kube-proxy").write_text(
        yaml.safe_dump(kube_proxy_config(node, ports["kube-proxy-healthz"], ports["kube-proxy-metrics"]))
    )
    for identity in (pki.KUBELET, pki.KUBE_PROXY, pki.COREDNS):
        config = cluster.kubeconfig(
            server, p.ca_cert, p.client_cert(identity), p.client_key(identity), identity.user
        )
        path = node.kubeconfig(identity.file_stem)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)


def _record_host(node: Layout) -> None:
    """Remember the sysctls the node changes (unless a previous `up` already did), then set ours."""
    if not node.host_file.exists():
        values = {key: Path("/proc/sys", key).read_text().strip() for key in SYSCTLS}
        absent = [folder for folder in HOST_FOLDERS if not Path(folder).exists()]
        node.host_file.write_text(json.dumps({"sysctls": values, "absent_folders": absent}, indent=2))
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")


def _add_node_link() -> None:
    if _link_exists(NODE_LINK):
        _ip("link", "del", NODE_LINK)
    # A bridge without ports, not a dummy link: this host's kernel has no dummy driver.
    _ip("link", "add", NODE_LINK, "type", "bridge")
    _ip("addr", "add", f"{NODE_IP}/32", "dev", NODE_LINK)
    _ip("link", "set", NODE_LINK, "up")


# --- teardown ---------------------------------------------------------------------------------


def teardown(cluster_dir: Path, stop: Callable[[str], None]) -> list[str]:
    """Stop the node's pods through the runtime, then its components, and remove what they left:
    processes, mounts, network namespaces, links, iptables chains, host settings. `stop(name)`
    stops one recorded component. Returns what it removed itself, beyond the runtime's own
    cleanup (for logs); safe to run again."""
    node = layout(cluster_dir)
    if _owner() != cluster_dir:
        # Nothing of this cluster is on the host (torn down already, or refused by _claim before it
        # launched anything), or another cluster's node owns the host's links and chains.
        return []
    forced: list[str] = []
    stop("kubelet")
    crictl = build.bin_dir(build.CRITOOLS) / "crictl"
    if containerd_running(node) and crictl.exists():
        result = subprocess.run(
            [
                str(crictl),
                f"--runtime-endpoint=unix://{node.socket}",
                "--timeout=30s",
                "rmp",
                "--all",
                "--force",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            forced.append(f"crictl rmp failed: {result.stderr.strip()[-500:]}")
    stop("kube-proxy")
    stop("containerd")
    forced += _kill_leftovers(node)
    forced += _unmount_under(node.root)
    forced += _delete_network_namespaces(node)
    for link in (BRIDGE, NODE_LINK):
        if _link_exists(link):
            _ip("link", "del", link)
    forced += _delete_chains()
    for folder in (node.state, node.kubelet_root, node.cni_ipam_dir):
        _remove_tree(folder)
    _remove_log_links(node)
    _restore_host(node)
    _remove_cgroups()
    OWNER_FILE.unlink(missing_ok=True)
    return forced


def _owner() -> Path | None:
    """The cluster folder whose real node owns this machine's node objects, if any."""
    try:
        return Path(OWNER_FILE.read_text().strip())
    except FileNotFoundError:
        return None


def _processes() -> list[tuple[int, list[str]]]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                if argv and argv[0]:
                    found.append((int(entry.name), argv))
    return found


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def node_processes(node: Layout) -> list[tuple[int, list[str]]]:
    """Processes of this node still running: its shims (and their containers) or anything started
    with one of its config files."""
    marker = f"{node.root}/"
    return [(pid, argv) for pid, argv in _processes() if any(marker in arg for arg in argv)]


def _kill_leftovers(node: Layout) -> list[str]:
    """SIGKILL what the runtime left: containers (each the init of its PID namespace) then shims."""
    leftovers = node_processes(node)
    for pid, _ in leftovers:
        for child in _children(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while node_processes(node) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [f"killed pid {pid} ({' '.join(argv)[:80]})" for pid, argv in leftovers]


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest first."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == str(root) or point.startswith(f"{root}/"):
            points.append(point)
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


def _unmount_under(root: Path) -> list[str]:
    points = mounts_under(root)
    for point in points:
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
    return [f"unmounted {point}" for point in points]


def _delete_network_namespaces(node: Layout) -> list[str]:
    """Network namespaces the runtime left (files under its state folder, or /run/netns/cni-*
    holding an address of our pod subnet)."""
    prefix = NODE_POD_CIDR.rsplit(".", 1)[0] + "."
    removed = []
    for path in sorted(Path("/run/netns").glob("cni-*")) if Path("/run/netns").is_dir() else []:
        result = subprocess.run(["ip", "-n", path.name, "-4", "-o", "addr"], capture_output=True, text=True)
        if f"inet {prefix}" in result.stdout:
            _ip("netns", "delete", path.name)
            removed.append(f"deleted netns {path.name}")
    return removed


def iptables_chains(table_dump: str) -> list[str]:
    """Chains of ours in an `iptables-save` dump: kube-proxy's and the kubelet's (KUBE-*), and
    portmap's top-level CNI-HOSTPORT-* chains (their per-pod rules go with the pods)."""
    return re.findall(r"^:((?:KUBE-|CNI-HOSTPORT-)\S*) ", table_dump, re.MULTILINE)


def _delete_chains() -> list[str]:
    """Delete the chains of ours (and the rules that jump to them) from every table, v4 and v6."""
    removed = []
    for family in ("iptables", "ip6tables"):
        dump = subprocess.run([f"{family}-save"], capture_output=True, text=True, check=False).stdout
        table = ""
        jumps: list[tuple[str, str]] = []
        chains: list[tuple[str, str]] = []
        for line in dump.splitlines():
            if line.startswith("*"):
                table = line[1:]
                chains += [(table, c) for c in iptables_chains(_table_section(dump, table))]
            elif line.startswith("-A ") and re.search(r" -j (KUBE-|CNI-HOSTPORT-)", line):
                chain = line.split()[1]
                if not chain.startswith(("KUBE-", "CNI-HOSTPORT-")):
                    jumps.append((table, line[3:]))
        for table, rule in jumps:
            subprocess.run([family, "-t", table, "-D", *_split_rule(rule)], capture_output=True, check=False)
        for table, chain in chains:
            subprocess.run([family, "-t", table, "-F", chain], capture_output=True, check=False)
        for table, chain in chains:
            subprocess.run([family, "-t", table, "-X", chain], capture_output=True, check=False)
        removed += [f"{family} -t {table} -X {chain}" for table, chain in chains]
    return removed


def _table_section(dump: str, table: str) -> str:
    section = dump.split(f"*{table}\n", 1)[1]
    return section.split("COMMIT", 1)[0]


def _split_rule(rule: str) -> list[str]:
    import shlex

    return shlex.split(rule)


def _restore_host(node: Layout) -> None:
    with contextlib.suppress(FileNotFoundError):
        recorded = json.loads(node.host_file.read_text())
        for key, value in recorded["sysctls"].items():
            with contextlib.suppress(OSError):
                Path("/proc/sys", key).write_text(value)
        for folder in map(Path, recorded["absent_folders"]):
            remove_if_only_sockets(folder)
        node.host_file.unlink()


def remove_if_only_sockets(folder: Path) -> None:
    """Remove `folder` bottom-up as far as it holds only folders and sockets (no data)."""
    for parent, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = Path(parent, name)
            if path.is_socket():
                path.unlink()
        for name in [*dirs, ""]:
            with contextlib.suppress(OSError):
                Path(parent, name).rmdir()


def _remove_cgroups() -> None:
    """The pods' cgroups (cgroupfs, no QoS tiers) are /k8s.io/<container> in each hierarchy; runc
    removes the leaves, the parent stays. Only empty cgroups can be removed, so others' are safe."""
    for parent in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_PARENT}"):
        for leaf in [*parent.iterdir(), parent]:
            if leaf.is_dir():
                with contextlib.suppress(OSError):
                    leaf.rmdir()


def _remove_log_links(node: Layout) -> None:
    """The kubelet links each container's log into /var/log/containers; drop the links to ours."""
    folder = Path("/var/log/containers")
    for link in folder.glob("*.log") if folder.is_dir() else []:
        with contextlib.suppress(OSError):
            if link.is_symlink() and str(node.pod_logs) in os.readlink(link):
                link.unlink()


def _remove_tree(folder: Path) -> None:
    if folder.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(folder)], capture_output=True, check=False)


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NodeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
