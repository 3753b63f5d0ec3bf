"""Build the local control plane's binaries from the pinned Go module and cache them per version.

The Go module in `gotools/` pins etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
KWOK, helm, and the real node's kubelet and kube-proxy. Each binary is built with
`go build -trimpath -ldflags=-s -w`, one at a time, into `~/.cache/kiln/bin/<version>-<hash>/`,
where the hash covers go.mod, go.sum and the build flags: a second build with the same pins finds
everything there and builds nothing.
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
    # The real node's kubelet and kube-proxy (`kiln local up --real-node`), same pins as the API server.
    Binary("kubelet", "k8s.io/kubernetes/cmd/kubelet"),
    Binary("kube-proxy", "k8s.io/kubernetes/cmd/kube-proxy"),
)

# Parallel compile jobs: the build machine may have two cores and other work to do.
GO_BUILD_JOBS = 2


class BuildError(RuntimeError):
    """A binary could not be built; the message names it and carries the tail of Go's output."""


def module_versions(go_mod: str) -> dict[str, str]:
    """The `require`d module versions in a go.mod text (module path -> version)."""
    versions: dict[str, str] = {}
    for match in re.finditer(r"^\s*([\w.\-/]+)\s+(v[\w.\-+]+)(?:\s*//.*)?$", go_mod, re.MULTILINE):
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
    helm = versions.get("helm.sh/helm/v3")
    if helm and binary.name == "helm":
        flags.append(f"-X helm.sh/helm/v3/internal/version.version={helm}")
    return " ".join(flags)


def build_command(versions: dict[str, str], binary: Binary, output: Path) -> list[str]:
    """The `go build` command line for one binary."""
    return [
        "go",
        "build",
        "-p",
        str(GO_BUILD_JOBS),
        "-trimpath",
        f"-ldflags={ldflags(versions, binary)}",
        "-o",
        str(output),
        binary.package,
    ]


def build_key(go_mod: str, go_sum: str, target: str) -> str:
    """The cache key: Kubernetes version plus a hash of the pins, the build flags and the platform."""
    versions = module_versions(go_mod)
    digest = hashlib.sha256()
    for part in (
        go_mod,
        go_sum,
        target,
        *(" ".join(build_command(versions, b, Path(b.name))) for b in BINARIES),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return f"{versions.get('k8s.io/kubernetes', 'unknown')}-{digest.hexdigest()[:12]}"


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


def bin_dir() -> Path:
    """The cache folder for the current pins: where `build` puts binaries and `up` runs them from."""
    go_mod = (GOTOOLS_DIR / "go.mod").read_text()
    go_sum = (GOTOOLS_DIR / "go.sum").read_text()
    return cache_root() / build_key(go_mod, go_sum, target_platform())


def missing(directory: Path) -> list[Binary]:
    """The binaries not yet built into `directory`."""
    return [b for b in BINARIES if not os.access(directory / b.name, os.X_OK)]


def binary_paths(directory: Path | None = None) -> dict[str, Path]:
    """Each binary's path in the cache; raises BuildError if any is missing."""
    directory = directory or bin_dir()
    absent = missing(directory)
    if absent:
        names = ", ".join(b.name for b in absent)
        raise BuildError(f"{names} not built in {directory}; run `kiln local build`")
    return {b.name: directory / b.name for b in BINARIES}


def go_environment() -> dict[str, str]:
    """Environment for `go build`: module mode that may update go.sum, no workspace, no cgo."""
    env = dict(os.environ)
    flags = env.get("GOFLAGS", "").split()
    env["GOFLAGS"] = " ".join([*(f for f in flags if not f.startswith("-mod=")), "-mod=mod"])
    env["GOWORK"] = "off"
    env.setdefault("CGO_ENABLED", "0")
    return env


def build(progress: Callable[[str], None] = print) -> Path:
    """Build every missing binary into the cache folder, one at a time; return the folder.

    Concurrent builds (two test sessions on a fresh machine) take turns on a lock file, and the
    second finds the first one's binaries.
    """
    directory = bin_dir()
    if not missing(directory):
        progress(f"all {len(BINARIES)} binaries cached in {directory}")
        return directory
    if shutil.which("go") is None:
        raise BuildError("Go is not installed (https://go.dev/dl/); it builds the control-plane binaries")
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _build_missing(directory, progress)
        # `-mod=mod` lets go complete go.mod/go.sum, which changes the key: file the binaries
        # (built from the completed files) under the new key. Commit the updated files.
        final = bin_dir()
        if final != directory:
            progress(f"go.mod/go.sum in {GOTOOLS_DIR} changed while building; commit them")
            if not final.exists():
                directory.rename(final)
                directory = final
    progress(f"binaries in {directory}")
    return directory


def _build_missing(directory: Path, progress: Callable[[str], None]) -> None:
    todo = missing(directory)
    versions = module_versions((GOTOOLS_DIR / "go.mod").read_text())
    env = go_environment()
    for index, binary in enumerate(BINARIES, start=1):
        if binary not in todo:
            progress(f"[{index}/{len(BINARIES)}] {binary.name}: cached")
            continue
        started = time.monotonic()
        partial = directory / f".{binary.name}.{os.getpid()}.partial"
        result = subprocess.run(
            build_command(versions, binary, partial),
            cwd=GOTOOLS_DIR,
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
        progress(f"[{index}/{len(BINARIES)}] {binary.name}: built in {seconds:.0f} s ({size_mib:.0f} MiB)")
