"""Build the local control plane's binaries from the pinned Go module and cache them per version.

The Go module in `gotools/` pins etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
KWOK and helm (and the real node's kubelet and kube-proxy, toolset KUBE_NODE). Each binary is
built with `go build -trimpath -ldflags=-s -w`, one at a time, into
`~/.cache/kiln/bin/<version>-<hash>/`, where the hash covers go.mod, go.sum and the build flags:
a second build with the same pins finds everything there and builds nothing.

The real node's other parts come from Go modules of their own (their dependency versions differ
from Kubernetes' pins), each a `Toolset` cached the same way under `<toolset>-<version>-<hash>/`:
containerd with its runc shim and ctr (`gotools-containerd/`), the CNI plugins (`gotools-cni/`),
CoreDNS (`gotools-coredns/`) and crictl (`gotools-critools/`); so is MinIO, the S3 server of the
S3 tests (`gotools-minio/`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GOTOOLS_DIR = Path(__file__).resolve().parent / "gotools"


@dataclass(frozen=True)
class Binary:
    """One executable of the local control plane and the Go package it is built from."""

    name: str
    package: str


BINARIES: tuple[Binary, ...] = (
    Binary("etcd", "go.etcd.io/etcd/server/v3"),
    Binary("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
    Binary("kube-controller-manager", "k8s.io/kubernetes/cmd/kube-controller-manager"),
    Binary("kube-scheduler", "k8s.io/kubernetes/cmd/kube-scheduler"),
    Binary("kwok", "sigs.k8s.io/kwok/cmd/kwok"),
    Binary("kubectl", "k8s.io/kubernetes/cmd/kubectl"),
    Binary("helm", "helm.sh/helm/v3/cmd/helm"),
)


@dataclass(frozen=True)
class Toolset:
    """A Go module and the binaries built from it into one cache folder."""

    name: str
    directory: Path
    binaries: tuple[Binary, ...]
    # The module whose version names the cache folder.
    main_module: str
    tags: tuple[str, ...] = ()


LOCAL_DIR = GOTOOLS_DIR.parent
CONTROL_PLANE = Toolset("control-plane", GOTOOLS_DIR, BINARIES, "k8s.io/kubernetes")
# The real node's kubelet and kube-proxy: same module and pins as the API server, but a folder of
# their own, so clusters without a real node never wait for them.
KUBE_NODE = Toolset(
    "kube-node",
    GOTOOLS_DIR,
    (
        Binary("kubelet", "k8s.io/kubernetes/cmd/kubelet"),
        Binary("kube-proxy", "k8s.io/kubernetes/cmd/kube-proxy"),
    ),
    "k8s.io/kubernetes",
)
CONTAINERD = Toolset(
    "containerd",
    LOCAL_DIR / "gotools-containerd",
    (
        Binary("containerd", "github.com/containerd/containerd/v2/cmd/containerd"),
        Binary("containerd-shim-runc-v2", "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"),
        Binary("ctr", "github.com/containerd/containerd/v2/cmd/ctr"),
    ),
    "github.com/containerd/containerd/v2",
    # Snapshotters the node does not use (it uses `native`) and that would need cgo or host libraries.
    tags=("no_btrfs", "no_devmapper", "no_zfs", "no_aufs"),
)
CNI = Toolset(
    "cni",
    LOCAL_DIR / "gotools-cni",
    tuple(
        Binary(package.rsplit("/", 1)[1], f"github.com/containernetworking/plugins/plugins/{package}")
        for package in ("main/bridge", "ipam/host-local", "main/loopback", "meta/portmap")
    ),
    "github.com/containernetworking/plugins",
)
COREDNS = Toolset(
    "coredns",
    LOCAL_DIR / "gotools-coredns",
    (Binary("coredns", "kiln.dev/local/gotools-coredns"),),
    "github.com/coredns/coredns",
)
CRITOOLS = Toolset(
    "critools",
    LOCAL_DIR / "gotools-critools",
    (Binary("crictl", "sigs.k8s.io/cri-tools/cmd/crictl"),),
    "sigs.k8s.io/cri-tools",
)
NODE_TOOLSETS = (KUBE_NODE, CONTAINERD, CNI, COREDNS, CRITOOLS)
# A real S3 server for the S3 model-source and engine-cache tests (kiln.local.s3server).
MINIO = Toolset(
    "minio",
    LOCAL_DIR / "gotools-minio",
    (Binary("minio", "github.com/minio/minio"),),
    "github.com/minio/minio",
)

# Parallel compile jobs: the build machine may have two cores and other work to do.
GO_BUILD_JOBS = 2


class BuildError(RuntimeError):
    """A binary could not be built; the message names it and carries the tail of Go's output."""


def module_versions(go_mod: str) -> dict[str, str]:
    """The `require`d module versions in a go.mod text (module path -> version)."""
    versions: dict[str, str] = {}
    for match in re.finditer(
        r"^\s*(?:require\s+)?([\w.\-/]+)\s+(v[\w.\-+]+)(?:\s*//.*)?$", go_mod, re.MULTILINE
    ):
        versions.setdefault(match.group(1), match.group(2))
    return versions


def ldflags(versions: dict[str, str], binary: Binary) -> str:
    """Linker flags: strip symbols, and stamp release versions the way upstream's release builds do.

    Without the stamp, kube-apiserver reports v0.0.0-master, which breaks Helm's kubeVersion checks.
    """
    flags = ["-s", "-w"]
    kubernetes = versions.get("k8s.io/kubernetes")
    if kubernetes and binary.package.startswith("k8s.io/kubernetes/"):
        major, minor = kubernetes.lstrip("v").split(".")[:2]
        for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
            flags += [
                f"-X {package}.gitVersion={kubernetes}",
                f"-X {package}.gitMajor={major}",
                f"-X {package}.gitMinor={minor}",
                f"-X {package}.gitTreeState=clean",
            ]
    containerd = versions.get("github.com/containerd/containerd/v2")
    if containerd and binary.package.startswith("github.com/containerd/containerd/v2/"):
        flags.append(f"-X github.com/containerd/containerd/v2/version.Version={containerd}")
    helm = versions.get("helm.sh/helm/v3")
    if helm and binary.name == "helm":
        flags.append(f"-X helm.sh/helm/v3/internal/version.version={helm}")
    return " ".join(flags)


def build_command(
    versions: dict[str, str], binary: Binary, output: Path, tags: tuple[str, ...] = ()
) -> list[str]:
    """The `go build` command line for one binary."""
    return [
        "go",
        "build",
        "-p",
        str(GO_BUILD_JOBS),
        "-trimpath",
        *([f"-tags={','.join(tags)}"] if tags else []),
        f"-ldflags={ldflags(versions, binary)}",
        "-o",
        str(output),
        binary.package,
    ]


def build_key(go_mod: str, go_sum: str, target: str, toolset: Toolset = CONTROL_PLANE) -> str:
    """The cache key: the toolset's main version plus a hash of the pins, build flags and platform."""
    versions = module_versions(go_mod)
    digest = hashlib.sha256()
    for part in (
        go_mod,
        go_sum,
        target,
        *(" ".join(build_command(versions, b, Path(b.name), toolset.tags)) for b in toolset.binaries),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    version = f"{versions.get(toolset.main_module, 'unknown')}-{digest.hexdigest()[:12]}"
    # The control plane's folders keep their historical name (no prefix), so existing caches stay valid.
    return version if toolset is CONTROL_PLANE else f"{toolset.name}-{version}"


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/kiln/bin` (default `~/.cache/kiln/bin`), or `$KILN_BIN_CACHE` when set."""
    override = os.environ.get("KILN_BIN_CACHE")
    if override:
        return Path(override).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "kiln" / "bin"


def target_platform() -> str:
    """The platform the binaries are for, as Go names it (e.g. linux-amd64)."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
    return f"{platform.system().lower()}-{arch}"


def bin_dir(toolset: Toolset = CONTROL_PLANE) -> Path:
    """The cache folder for the current pins: where `build` puts binaries and `up` runs them from."""
    go_mod = (toolset.directory / "go.mod").read_text()
    go_sum = (toolset.directory / "go.sum").read_text()
    return cache_root() / build_key(go_mod, go_sum, target_platform(), toolset)


def missing(directory: Path, binaries: tuple[Binary, ...] = BINARIES) -> list[Binary]:
    """The binaries not yet built into `directory`."""
    return [b for b in binaries if not os.access(directory / b.name, os.X_OK)]


def binary_paths(directory: Path | None = None, toolset: Toolset = CONTROL_PLANE) -> dict[str, Path]:
    """Each binary's path in the cache; raises BuildError if any is missing."""
    directory = directory or bin_dir(toolset)
    absent = missing(directory, toolset.binaries)
    if absent:
        names = ", ".join(b.name for b in absent)
        flag = "" if toolset is CONTROL_PLANE else " --real-node"
        raise BuildError(f"{names} not built in {directory}; run `kiln local build{flag}`")
    return {b.name: directory / b.name for b in toolset.binaries}


def node_binary_paths() -> dict[str, Path]:
    """The real node's binaries; raises BuildError if any is missing."""
    found: dict[str, Path] = {}
    for toolset in NODE_TOOLSETS:
        found.update(binary_paths(toolset=toolset))
    return found


def go_environment() -> dict[str, str]:
    """Environment for `go build`: module mode that may update go.sum, no workspace, no cgo."""
    env = dict(os.environ)
    flags = env.get("GOFLAGS", "").split()
    env["GOFLAGS"] = " ".join([*(f for f in flags if not f.startswith("-mod=")), "-mod=mod"])
    env["GOWORK"] = "off"
    env.setdefault("CGO_ENABLED", "0")
    return env


def build(progress: Callable[[str], None] = print, toolset: Toolset = CONTROL_PLANE) -> Path:
    """Build every missing binary of `toolset` into its cache folder, one at a time; return the folder.

    Concurrent builds (two test sessions on a fresh machine) take turns on a lock file, and the
    second finds the first one's binaries.
    """
    directory = bin_dir(toolset)
    if not missing(directory, toolset.binaries):
        progress(f"all {len(toolset.binaries)} {toolset.name} binaries cached in {directory}")
        return directory
    if shutil.which("go") is None:
        raise BuildError("Go is not installed (https://go.dev/dl/); it builds the control-plane binaries")
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _build_missing(directory, progress, toolset)
        # `-mod=mod` lets go complete go.mod/go.sum, which changes the key: file the binaries
        # (built from the completed files) under the new key. Commit the updated files.
        final = bin_dir(toolset)
        if final != directory:
            progress(f"go.mod/go.sum in {toolset.directory} changed while building; commit them")
            if not final.exists():
                directory.rename(final)
                directory = final
    progress(f"binaries in {directory}")
    return directory


def build_node(progress: Callable[[str], None] = print) -> list[Path]:
    """Build the real node's toolsets (after the control plane's, which holds kubelet and kube-proxy)."""
    return [build(progress, toolset) for toolset in (CONTROL_PLANE, *NODE_TOOLSETS)]


def _build_missing(directory: Path, progress: Callable[[str], None], toolset: Toolset) -> None:
    binaries = toolset.binaries
    todo = missing(directory, binaries)
    versions = module_versions((toolset.directory / "go.mod").read_text())
    env = go_environment()
    for index, binary in enumerate(binaries, start=1):
        if binary not in todo:
            progress(f"[{index}/{len(binaries)}] {binary.name}: cached")
            continue
        started = time.monotonic()
        partial = directory / f".{binary.name}.{os.getpid()}.partial"
        result = subprocess.run(
            build_command(versions, binary, partial, toolset.tags),
            cwd=toolset.directory,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            tail = "\n".join(result.stdout.splitlines()[-30:])
            raise BuildError(f"building {binary.name} ({binary.package}) failed:\n{tail}")
        partial.replace(directory / binary.name)
        size_mib = (directory / binary.name).stat().st_size / 2**20
        seconds = time.monotonic() - started
        progress(f"[{index}/{len(binaries)}] {binary.name}: built in {seconds:.0f} s ({size_mib:.0f} MiB)")
