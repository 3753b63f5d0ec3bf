"""Run Argo CD against a local cluster as processes of this machine, syncing from a local git repository.

Dev tooling for the GitOps e2e (e2e/test_gitops.py). Argo CD runs the way a user installs it, minus
the pods: its CRDs from the module's `manifests/crds`, the `argocd` namespace, `argocd-cm` with
Kiln's health checks under `resource.customizations.health.<group>_<kind>` (read from the chart's
`argocd/` folder, the files docs/gitops.md tells users to install), and the application controller,
repo server and Redis on loopback ports. The controller reaches the cluster through the kubeconfig
as its in-cluster destination (`https://kubernetes.default.svc`, ARGOCD_FAKE_IN_CLUSTER).

Applications read a `file://` git repository (`GitRepo`). A refresh request (the annotation that
argocd-server's git webhook sets) makes Argo CD look at a new commit at once instead of at its
next poll.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from kiln.demo.kube import Kubectl, wait_for
from kiln.local import argocd, cluster

NAMESPACE = "argocd"
IN_CLUSTER = "https://kubernetes.default.svc"
PART_OF = {"app.kubernetes.io/part-of": "argocd"}
# Set by argocd-server's webhook handler (and `argocd app get --refresh`) to re-read git now.
REFRESH_ANNOTATION = "argocd.argoproj.io/refresh"
# Without it, deleting an Application leaves its resources in the cluster.
CASCADE_FINALIZER = "resources-finalizer.argocd.argoproj.io"
PROCESSES = ("redis", "repo-server", "application-controller")


def health_customizations(checks_dir: Path) -> dict[str, str]:
    """argocd-cm keys for every `<group>/<Kind>/health.lua` under `checks_dir` (the chart's `argocd/`)."""
    found = {
        f"resource.customizations.health.{script.parent.parent.name}_{script.parent.name}": script.read_text()
        for script in sorted(checks_dir.glob("*/*/health.lua"))
    }
    if not found:
        raise FileNotFoundError(f"no <group>/<Kind>/health.lua under {checks_dir}")
    return found


def argocd_cm(data: Mapping[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "argocd-cm", "namespace": NAMESPACE, "labels": dict(PART_OF)},
        "data": dict(data),
    }


def base_objects(cm_data: Mapping[str, str]) -> list[dict[str, Any]]:
    """The namespace, argocd-cm, argocd-secret (the settings manager requires it) and the default project."""
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        argocd_cm(cm_data),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "argocd-secret", "namespace": NAMESPACE, "labels": dict(PART_OF)},
            "type": "Opaque",
        },
        {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "AppProject",
            "metadata": {"name": "default", "namespace": NAMESPACE},
            "spec": {
                "sourceRepos": ["*"],
                "destinations": [{"server": "*", "namespace": "*"}],
                "clusterResourceWhitelist": [{"group": "*", "kind": "*"}],
            },
        },
    ]


def application(
    name: str,
    repo_url: str,
    path: str,
    namespace: str,
    sync_policy: Mapping[str, Any],
    ignore_differences: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """An Application of plain manifests at `path` in `repo_url`, deleting its resources with it."""
    spec: dict[str, Any] = {
        "project": "default",
        "source": {"repoURL": repo_url, "targetRevision": "HEAD", "path": path},
        "destination": {"server": IN_CLUSTER, "namespace": namespace},
        "syncPolicy": dict(sync_policy),
    }
    if ignore_differences:
        spec["ignoreDifferences"] = ignore_differences
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {"name": name, "namespace": NAMESPACE, "finalizers": [CASCADE_FINALIZER]},
        "spec": spec,
    }


def commands(bin_dir: Path, kubeconfig: Path, ports: Mapping[str, int], work: Path) -> dict[str, list[str]]:
    """The command line of each process, every one on loopback ports of its own."""
    redis = shutil.which("redis-server")
    if redis is None:
        raise FileNotFoundError(
            "redis-server is not installed (Debian: redis-server; e2e/system-packages.sh)"
        )
    repo_server = f"127.0.0.1:{ports['repo-server']}"
    redis_address = f"127.0.0.1:{ports['redis']}"
    return {
        "redis": [
            redis,
            "--bind",
            "127.0.0.1",
            "--port",
            str(ports["redis"]),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(work),
        ],
        "repo-server": [
            str(argocd.component("argocd-repo-server", bin_dir)),
            f"--port={ports['repo-server']}",
            f"--metrics-port={ports['repo-server-metrics']}",
            f"--redis={redis_address}",
            "--disable-tls",
            "--client-ca-path=",  # its default (an in-pod path) is refused together with --disable-tls
            "--loglevel=info",
        ],
        "application-controller": [
            str(argocd.component("argocd-application-controller", bin_dir)),
            f"--kubeconfig={kubeconfig}",
            f"--namespace={NAMESPACE}",
            f"--repo-server={repo_server}",
            "--repo-server-plaintext",
            # Keep each resource's health (status and the Lua's message) in the Application's
            # .status.resources, where the test reads it; by default v3 keeps it only in Redis.
            "--persist-resource-health=true",
            f"--redis={redis_address}",
            f"--metrics-port={ports['controller-metrics']}",
            "--loglevel=info",
        ],
    }


class GitRepo:
    """A git repository in a local folder that Applications read as `file://<folder>`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.url = f"file://{directory}"
        directory.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main")

    def git(self, *args: str) -> str:
        result = subprocess.run(
            ["git", "-c", "user.name=kiln-e2e", "-c", "user.email=e2e@kiln.dev", *args],
            cwd=self.directory,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def commit(self, files: Mapping[str, Any], message: str) -> str:
        """Write each `path: objects` (a list of manifests) as YAML, commit, and return the commit's sha."""
        for relative, documents in files.items():
            target = self.directory / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(yaml.safe_dump_all(documents, sort_keys=False))
            self.git("add", relative)
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")


class ArgoCD:
    """Argo CD's processes and settings on one local cluster; `stop` ends every process it started."""

    def __init__(
        self, directory: Path, kubeconfig: Path, bin_dir: Path, die_with_parent: bool = True
    ) -> None:
        self.directory = directory
        self.kubeconfig = kubeconfig
        self.bin_dir = bin_dir
        self.die_with_parent = die_with_parent
        self.kubectl = Kubectl(kubeconfig)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def log(self, name: str) -> Path:
        return self.directory / "logs" / f"{name}.log"

    def install(self, cm_data: Mapping[str, str]) -> None:
        """The CRDs (server-side: they exceed the last-applied annotation's size), then the settings."""
        # The folder also holds a kustomization.yaml, which is not an object.
        for path in sorted(argocd.crds_dir(self.bin_dir).glob("*-crd.yaml")):
            self.kubectl("apply", "--server-side", "--field-manager=argocd-install", "-f", str(path))
        for crd in ("applications.argoproj.io", "appprojects.argoproj.io"):
            wait_for(partial(self._established, crd), 60, f"CRD {crd} to be established")
        self.kubectl.apply(base_objects(cm_data))

    def _established(self, crd: str) -> bool:
        conditions = (self.kubectl.json("get", "crd", crd).get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    def start(self, timeout: float = 60.0) -> None:
        ports = cluster.free_ports(("redis", "repo-server", "repo-server-metrics", "controller-metrics"))
        work = self.directory / "work"
        work.mkdir(parents=True, exist_ok=True)
        self.log("x").parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "ARGOCD_FAKE_IN_CLUSTER": "true",
            "ARGOCD_GPG_ENABLED": "false",
            "TMPDIR": str(work),
            "HOME": str(work),
            "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '')}",  # the repo server's helper script
        }
        for name, command in commands(self.bin_dir, self.kubeconfig, ports, work).items():
            with self.log(name).open("wb") as log:
                self.processes[name] = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=work,
                    env=env,
                    start_new_session=True,
                    preexec_fn=cluster._kill_me_with_parent if self.die_with_parent else None,
                )
        url = f"http://127.0.0.1:{ports['controller-metrics']}/metrics"
        wait_for(lambda: self._check() and _answers(url), timeout, "Argo CD's application controller")

    def _check(self) -> bool:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited ({process.returncode}):\n{cluster.log_tail(self.log(name))}"
                )
        return True

    def app(self, name: str) -> dict[str, Any]:
        self._check()
        found: dict[str, Any] = self.kubectl.json("get", "applications.argoproj.io", name, "-n", NAMESPACE)
        return found

    def refresh(self, name: str) -> None:
        """What argocd-server's webhook does on a push: ask the controller to compare with git now."""
        self.kubectl(
            "annotate",
            "applications.argoproj.io",
            name,
            "-n",
            NAMESPACE,
            f"{REFRESH_ANNOTATION}=normal",
            "--overwrite",
        )

    def stop(self) -> list[str]:
        """Stop every process (SIGTERM, then SIGKILL); return the names of those that needed SIGKILL."""
        killed = []
        for name in reversed(PROCESSES):
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            cluster.stop_groups([process.pid], grace_seconds=15.0)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                killed.append(name)
        self.processes.clear()
        return killed

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(
            f"--- {self.log(n)}\n{cluster.log_tail(self.log(n), lines)}"
            for n in PROCESSES
            if self.log(n).exists()
        )


def _answers(url: str) -> bool:
    import httpx

    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=2.0).status_code == 200
    return False


def elapsed_since(started: float) -> float:
    return round(time.monotonic() - started, 1)
