"""Shared by the chart tests: the local toolchain's helm (find, lint, render), the RBAC allow-list, and
the Grafana dashboard's queries."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "kiln"
FULL_VALUES = CHART / "ci" / "full-values.yaml"

# Every permission each component's ServiceAccount gets: (apiGroup, resource, verb). Growing this
# list is a security review: the integration test checks it against `kubectl auth can-i --list`.
OPERATOR_VERBS = {
    # its CRDs (kopf keeps progress and finalizers on them), their status and finalizers
    ("kiln.dev", "llmdeployments"): {"get", "list", "watch", "patch", "update"},
    ("kiln.dev", "llmengines"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("kiln.dev", "llmdeployments/status"): {"get", "patch", "update"},
    ("kiln.dev", "llmengines/status"): {"get", "patch", "update"},
    ("kiln.dev", "llmdeployments/finalizers"): {"update"},
    ("kiln.dev", "llmengines/finalizers"): {"update"},
    # the children it applies (server-side apply is a patch) and owns
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
    ("leaderworkerset.x-k8s.io", "leaderworkersets"): {"get", "list", "watch", "create", "patch", "delete"},
    # multi-node pod groups where LeaderWorkerSet is not installed
    ("apps", "statefulsets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "services"): {"get", "list", "watch", "create", "patch", "delete"},
    # the LoRA adapter list of a deployment (spec.engine.lora), which its serving pods mount
    ("", "configmaps"): {"get", "list", "watch", "create", "patch", "delete"},
    # build pods: read their state and termination message, tail their logs on failure; delete:
    # a multi-node group left on an old template is recreated whole
    ("", "pods"): {"get", "list", "watch", "delete"},
    ("", "pods/log"): {"get"},
    ("", "events"): {"create"},
    # Kiln routers (spec.router): their ServiceAccount, its RoleBinding to the chart's router
    # ClusterRole (bind on that one role, by resourceNames), their PodDisruptionBudget
    ("", "serviceaccounts"): {"get", "list", "watch", "create", "patch", "delete"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"get", "list", "watch", "create", "patch", "delete"},
    ("rbac.authorization.k8s.io", "clusterroles"): {"bind"},
    ("policy", "poddisruptionbudgets"): {"get", "list", "watch", "create", "patch", "delete"},
    # placement reads nodes; kopf discovers resources and the operator detects LeaderWorkerSet
    ("", "nodes"): {"get", "list", "watch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    ("coordination.k8s.io", "leases"): {"get", "create", "update", "patch"},
}
# Exactly the calls kiln_autoscaler.kube and kiln.common.leader make.
AUTOSCALER_VERBS = {
    ("kiln.dev", "llmdeployments"): {"list", "patch"},  # patch: server-side apply of spec.replicas
    ("kiln.dev", "llmengines"): {"get"},
    ("kiln.dev", "llmdeployments/status"): {"patch"},
    ("", "pods"): {"list"},
    ("", "events"): {"create"},
    ("coordination.k8s.io", "leases"): {"get", "create", "update"},
}
TOPOLOGY_AGENT_VERBS = {("", "nodes"): {"get", "patch"}}


def find_helm() -> tuple[Path | None, str]:
    """The helm that `kiln local build` builds (or $KILN_HELM), and why there is none if so."""
    override = os.environ.get("KILN_HELM")
    if override:
        path = Path(override)
        return (path, "") if os.access(path, os.X_OK) else (None, f"KILN_HELM={override} is not executable")
    try:
        from kiln.local import build
    except ImportError as error:
        return None, f"kiln.local is unavailable ({error}); it builds helm"
    helm = build.bin_dir() / "helm"  # binary_paths() would refuse while other binaries are missing
    if not os.access(helm, os.X_OK):
        return None, f"helm is not built at {helm}: run `kiln local build`"
    return helm, ""


def kubernetes_version() -> str:
    """The Kubernetes version of the local control plane, for --kube-version (e.g. v1.36.3)."""
    from kiln.local import build

    go_mod = (build.GOTOOLS_DIR / "go.mod").read_text()
    return build.module_versions(go_mod)["k8s.io/kubernetes"]


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Helm:
    path: Path

    def run(self, *args: str, check: bool = True) -> Result:
        env = {
            **os.environ,
            "HELM_CACHE_HOME": "/tmp/kiln-helm/cache",
            "HELM_CONFIG_HOME": "/tmp/kiln-helm/config",
        }
        done = subprocess.run(
            [str(self.path), *args], capture_output=True, text=True, timeout=120, env=env, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{done.stderr}")
        return Result(done.returncode, done.stdout, done.stderr)

    def template_args(
        self,
        values: list[Path] | None = None,
        settings: list[str] | None = None,
        api_versions: list[str] | None = None,
        namespace: str = "kiln-system",
        release: str = "kiln",
    ) -> list[str]:
        args = [
            "template",
            release,
            str(CHART),
            "--namespace",
            namespace,
            "--kube-version",
            kubernetes_version(),
        ]
        for path in values or []:
            args += ["--values", str(path)]
        for setting in settings or []:
            args += ["--set", setting]
        for api_version in api_versions or []:
            args += ["--api-versions", api_version]
        return args

    def render(self, **kwargs: Any) -> list[dict[str, Any]]:
        """`helm template` output as a list of objects (empty documents dropped)."""
        out = self.run(*self.template_args(**kwargs)).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    def render_error(self, **kwargs: Any) -> str:
        """The error of a `helm template` that must fail."""
        done = self.run(*self.template_args(**kwargs), check=False)
        assert done.returncode != 0, "helm template accepted values it must reject"
        return done.stderr


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [obj for obj in by_kind(objects, kind) if obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


# Grafana's variables, replaced as Grafana would before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "3h", "$namespace": ".*", "$llmdeployment": ".*"}


def dashboard() -> dict[str, Any]:
    return json.loads((CHART / "dashboards" / "kiln.json").read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def as_prometheus_sees_it(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr
