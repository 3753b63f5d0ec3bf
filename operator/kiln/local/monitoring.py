"""The local cluster's monitoring: the Prometheus Operator and a Prometheus on the real node.

`kiln local up --real-node --monitoring` installs, after the node is Ready:

* the operator's CRDs and RBAC, and its Deployment, all read from the pinned Go module
  (`gotools-promop/`, the same version as the binaries) and adapted only where the local cluster
  needs it (namespace, local image references, the real node);
* images built with buildah on busybox (`nodeimages`) from static Go binaries that
  `kiln local build --monitoring` builds: the operator, its prometheus-config-reloader, and
  Prometheus itself, from the version of its module that the operator pins, with Kubernetes
  service discovery (what every monitor the operator turns into scrape configuration needs; Debian's
  Prometheus is built without it);
* a `Prometheus` object that selects every PodMonitor, ServiceMonitor and PrometheusRule carrying
  `app.kubernetes.io/part-of: kiln` (what the chart puts on all of them), in any namespace.

The operator then runs Prometheus as its StatefulSet (`prometheus-kiln-0`, the reloader as
sidecar), exactly as on a user's cluster. Its API answers on the pod's IP (the node's bridge is
reachable from the host) and in-cluster at `PROMETHEUS_SERVICE_URL`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from kiln.local import build, nodeimages, realnode

MODULE = "github.com/prometheus-operator/prometheus-operator"
TOOLSET = build.Toolset(
    "prometheus-operator",
    build.LOCAL_DIR / "gotools-promop",
    (
        build.Binary("prometheus-operator", f"{MODULE}/cmd/operator"),
        build.Binary("prometheus-config-reloader", f"{MODULE}/cmd/prometheus-config-reloader"),
    ),
    MODULE,
)
PROMETHEUS_MODULE = "github.com/prometheus/prometheus"
# Prometheus' service discovery plugins that the build keeps (`plugins/plugins.go`, which upstream
# generates from plugins.yml for exactly this choice; file and HTTP SD are always in). Kubernetes
# SD is what the operator's scrape configuration uses; the cloud SDs would triple the compile.
PROMETHEUS_PLUGINS = ("kubernetes",)
NAMESPACE = "monitoring"
PROMETHEUS_NAME = "kiln"
PROMETHEUS_PORT = 9090
# The operator's governing Service of every Prometheus StatefulSet in the namespace.
PROMETHEUS_SERVICE_URL = f"http://prometheus-operated.{NAMESPACE}.svc:{PROMETHEUS_PORT}"
# What the chart labels every monitor and rule with (charts/kiln/templates/_helpers.tpl, kiln.labels).
MONITOR_SELECTOR = {"matchLabels": {"app.kubernetes.io/part-of": "kiln"}}
REAL_NODE_SELECTOR = {realnode.NODE_LABEL: "true"}
CRD_FOLDER = "example/prometheus-operator-crd"
OPERATOR_RBAC_FOLDER = "example/rbac/prometheus-operator"
PROMETHEUS_RBAC_FOLDER = "example/rbac/prometheus"


class MonitoringError(RuntimeError):
    """Monitoring could not be installed or did not become ready; the message says which part."""


# --- pure: versions, images, manifests --------------------------------------------------------


def operator_version() -> str:
    """The pinned Prometheus Operator version (e.g. v0.85.0)."""
    return build.module_versions((TOOLSET.directory / "go.mod").read_text())[MODULE]


def prometheus_release(module_version: str) -> str:
    """Prometheus' release from its Go module's version: v0.305.0 is v3.5.0, v0.54.1 is v2.54.1
    (upstream tags each release `v0.<major-2 digit><minor>.<patch>` for Go)."""
    match = re.fullmatch(r"v0\.(\d+)\.(\d+)", module_version)
    if match is None:
        raise MonitoringError(f"not a Prometheus module version (v0.<minor>.<patch>): {module_version!r}")
    minor, patch = int(match.group(1)), match.group(2)
    major, minor = (3, minor - 300) if minor >= 300 else (2, minor)
    return f"v{major}.{minor}.{patch}"


def plugins_source(plugins: Sequence[str]) -> str:
    """Prometheus' `plugins/plugins.go` that links in only these service discovery plugins."""
    if not plugins:
        raise MonitoringError("Prometheus needs at least one service discovery plugin")
    imports = "".join(f'\t_ "{PROMETHEUS_MODULE}/discovery/{name}"\n' for name in plugins)
    header = "// Written by kiln.local.monitoring: the SD plugins Kiln's Prometheus keeps.\n"
    return f"{header}\npackage plugins\n\nimport (\n{imports})\n"


def prometheus_image(binary: Path, version: str) -> nodeimages.ImageSpec:
    """Prometheus, a static Go binary, on busybox."""
    return nodeimages.ImageSpec(
        f"localhost/kiln/prometheus:{version}", ("/bin/prometheus",), {"bin/prometheus": binary}
    )


def operator_image(binary: Path, version: str) -> nodeimages.ImageSpec:
    return nodeimages.ImageSpec(
        f"localhost/kiln/prometheus-operator:{version}", ("/bin/operator",), {"bin/operator": binary}
    )


def reloader_image(binary: Path, version: str) -> nodeimages.ImageSpec:
    return nodeimages.ImageSpec(
        f"localhost/kiln/prometheus-config-reloader:{version}",
        ("/bin/prometheus-config-reloader",),
        {"bin/prometheus-config-reloader": binary},
    )


def operator_manifests(upstream: Sequence[dict[str, Any]], image: str, reloader: str) -> list[dict[str, Any]]:
    """Upstream's operator objects (ServiceAccount, RBAC, Deployment, Service) for the local cluster:
    in NAMESPACE, with local images, on the real node, without the kubelet Service (nothing here
    scrapes kubelets). Upstream's own ServiceMonitor of the operator is left out."""
    objects: list[dict[str, Any]] = []
    for source in upstream:
        manifest = json.loads(json.dumps(source))
        kind = manifest["kind"]
        if kind == "ServiceMonitor":
            continue
        if kind not in ("ClusterRole", "ClusterRoleBinding"):
            manifest["metadata"]["namespace"] = NAMESPACE
        for subject in manifest.get("subjects", []):
            subject["namespace"] = NAMESPACE
        if kind == "Deployment":
            pod = manifest["spec"]["template"]["spec"]
            pod["nodeSelector"] = {**pod.get("nodeSelector", {}), **REAL_NODE_SELECTOR}
            (container,) = pod["containers"]
            container["image"] = image
            container["imagePullPolicy"] = "Never"
            container["args"] = [f"--prometheus-config-reloader={reloader}"]
        objects.append(manifest)
    return objects


def prometheus_manifests(
    upstream_rbac: Sequence[dict[str, Any]], image: str, version: str, scrape_interval: str = "15s"
) -> list[dict[str, Any]]:
    """Upstream's Prometheus ServiceAccount and RBAC (in NAMESPACE), and our Prometheus object."""
    objects: list[dict[str, Any]] = []
    for source in upstream_rbac:
        if source["kind"] == "Prometheus":
            continue  # upstream's example selects `team: frontend`; ours follows
        manifest = json.loads(json.dumps(source))
        if manifest["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            manifest["metadata"]["namespace"] = NAMESPACE
        for subject in manifest.get("subjects", []):
            subject["namespace"] = NAMESPACE
        objects.append(manifest)
    (account,) = (m["metadata"]["name"] for m in objects if m["kind"] == "ServiceAccount")
    everywhere: dict[str, Any] = {}
    objects.append(
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "Prometheus",
            "metadata": {"name": PROMETHEUS_NAME, "namespace": NAMESPACE},
            "spec": {
                "replicas": 1,
                "version": version,  # the operator writes config and flags this version understands
                "image": image,
                "imagePullPolicy": "Never",
                "serviceAccountName": account,
                "nodeSelector": REAL_NODE_SELECTOR,
                "scrapeInterval": scrape_interval,
                "evaluationInterval": scrape_interval,
                "podMonitorSelector": MONITOR_SELECTOR,
                "podMonitorNamespaceSelector": everywhere,
                "serviceMonitorSelector": MONITOR_SELECTOR,
                "serviceMonitorNamespaceSelector": everywhere,
                "ruleSelector": MONITOR_SELECTOR,
                "ruleNamespaceSelector": everywhere,
            },
        }
    )
    return objects


def namespace_manifest() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}


# --- edges: the module, the binaries, the cluster ---------------------------------------------


def downloaded_module(module: str) -> dict[str, Any]:
    """`go mod download -json` of a module (at `module@version`, or at the version the toolset's
    module graph selects): its Version and its source folder (Dir) in Go's module cache."""
    result = subprocess.run(
        ["go", "mod", "download", "-json", module],
        cwd=TOOLSET.directory,
        env=build.go_environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise MonitoringError(f"go mod download {module} failed:\n{result.stderr[-2000:]}")
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def module_dir() -> Path:
    """The pinned operator module's source folder in Go's module cache (downloaded if absent)."""
    return Path(downloaded_module(f"{MODULE}@{operator_version()}")["Dir"])


def prometheus_toolset(progress: Callable[[str], None] = print) -> build.Toolset:
    """The toolset that builds Prometheus at the version the operator's module pins, from a copy of
    its source whose plugins.go keeps only PROMETHEUS_PLUGINS, with Prometheus' own dependency pins
    (a module that requires only Prometheus and replaces it by the copy; with the operator's newer
    client-go, Prometheus' Kubernetes SD does not compile).

    Both live in the binary cache, made once per pin set and plugin choice:
    `<cache>/prometheus-module-<hash>/{prometheus,build}`. Go refuses to overlay files of its
    module cache, hence the copy (28 MiB of source)."""
    go_mod = (TOOLSET.directory / "go.mod").read_text()
    go_sum = (TOOLSET.directory / "go.sum").read_text()
    plugins = plugins_source(PROMETHEUS_PLUGINS)
    key = hashlib.sha256("\0".join((go_mod, go_sum, plugins)).encode()).hexdigest()[:12]
    work = build.cache_root() / f"prometheus-module-{key}"
    if not (work / "build" / "go.mod").is_file():
        module = downloaded_module(PROMETHEUS_MODULE)
        progress(f"Prometheus {module['Version']} source with SD plugins {', '.join(PROMETHEUS_PLUGINS)}")
        build.cache_root().mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".prometheus-module-", dir=build.cache_root()))
        source = partial / "prometheus"
        shutil.copytree(module["Dir"], source, copy_function=shutil.copyfile)
        for folder in (source, *(path for path in source.rglob("*") if path.is_dir())):
            folder.chmod(0o755)  # the module cache's folders are read-only
        (source / "plugins" / "plugins.go").write_text(plugins)
        (partial / "build").mkdir()
        shutil.copyfile(source / "go.sum", partial / "build" / "go.sum")
        (partial / "build" / "go.mod").write_text(
            f"// Prometheus with SD plugins {', '.join(PROMETHEUS_PLUGINS)} (kiln.local.monitoring)\n"
            f"module kiln.dev/local/prometheus\n\ngo {prometheus_go_version(source / 'go.mod')}\n\n"
            f"require {PROMETHEUS_MODULE} {module['Version']}\n\n"
            f"replace {PROMETHEUS_MODULE} => ../prometheus\n"
        )
        shutil.rmtree(work, ignore_errors=True)
        partial.rename(work)
    return build.Toolset(
        "prometheus",
        work / "build",
        (build.Binary("prometheus", f"{PROMETHEUS_MODULE}/cmd/prometheus"),),
        PROMETHEUS_MODULE,
    )


def prometheus_go_version(go_mod: Path) -> str:
    """The `go` directive of a go.mod (the wrapper module asks for the same language version)."""
    match = re.search(r"^go\s+(\S+)", go_mod.read_text(), re.MULTILINE)
    if match is None:
        raise MonitoringError(f"{go_mod} has no go directive")
    return match.group(1)


def toolsets(progress: Callable[[str], None] = print) -> tuple[build.Toolset, ...]:
    """What `kiln local build --monitoring` builds: the operator's toolset and Prometheus'."""
    return (TOOLSET, prometheus_toolset(progress))


def read_documents(folder: Path) -> list[dict[str, Any]]:
    """Every YAML document of the folder's *.yaml files, in name order."""
    documents: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def images() -> list[nodeimages.ImageSpec]:
    """The operator's, the reloader's and Prometheus' images (from the built binaries)."""
    bins = build.binary_paths(toolset=TOOLSET)
    prometheus = prometheus_toolset()
    version = operator_version()
    return [
        operator_image(bins["prometheus-operator"], version),
        reloader_image(bins["prometheus-config-reloader"], version),
        prometheus_image(
            build.binary_paths(toolset=prometheus)["prometheus"],
            prometheus_release(
                build.module_versions((prometheus.directory / "go.mod").read_text())[PROMETHEUS_MODULE]
            ),
        ),
    ]


def kubectl(kubeconfig: Path, *args: str) -> str:
    """kubectl's output; raises MonitoringError with its stderr when it fails."""
    binary = build.binary_paths()["kubectl"]
    result = subprocess.run(
        [str(binary), f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise MonitoringError(f"kubectl {' '.join(args[:3])} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def kubectl_apply(kubeconfig: Path, documents: Sequence[dict[str, Any]]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as manifest:
        yaml.safe_dump_all(documents, manifest)
        manifest.flush()
        kubectl(kubeconfig, "apply", "--server-side", "--field-manager=kiln-local", "-f", manifest.name)


def install_crds(kubeconfig: Path, folder: Path, timeout: float) -> None:
    """Server-side apply (the CRDs are too large for client-side apply's annotation), as files:
    their YAML is not all PyYAML can read (a bare `=` list item)."""
    kubectl(kubeconfig, "apply", "--server-side", "--field-manager=kiln-local", "-f", str(folder))
    kubectl(kubeconfig, "wait", "--for=condition=Established", f"--timeout={timeout:.0f}s", "-f", str(folder))


def kubectl_json(kubeconfig: Path, *args: str) -> dict[str, Any]:
    """An object as JSON; empty when kubectl cannot get it (not there yet)."""
    try:
        loaded: dict[str, Any] = json.loads(kubectl(kubeconfig, *args, "-o", "json"))
    except MonitoringError:
        return {}
    return loaded


def prometheus_pod(kubeconfig: Path) -> dict[str, Any]:
    """The Prometheus pod the operator runs (empty when there is none yet)."""
    return kubectl_json(kubeconfig, "get", "pod", "-n", NAMESPACE, f"prometheus-{PROMETHEUS_NAME}-0")


def pod_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def prometheus_url(kubeconfig: Path) -> str:
    """Prometheus' HTTP API from this machine: the pod's IP on the real node's bridge."""
    ip = prometheus_pod(kubeconfig).get("status", {}).get("podIP")
    if not ip:
        raise MonitoringError(f"pod prometheus-{PROMETHEUS_NAME}-0 in {NAMESPACE} has no IP")
    return f"http://{ip}:{PROMETHEUS_PORT}"


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise MonitoringError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(1.0)


def install(
    cluster_dir: Path, kubeconfig: Path, progress: Callable[[str], None] = print, timeout: float = 180.0
) -> str:
    """Install the operator and a Prometheus on the running real node; return Prometheus' URL
    (from this machine) once it is Ready and answers /-/ready."""
    started = time.monotonic()
    source = module_dir()
    specs = images()
    realnode.import_images(cluster_dir, [nodeimages.archive(spec) for spec in specs])
    progress(f"monitoring images imported after {time.monotonic() - started:.1f} s")
    operator_ref, reloader_ref, prometheus_ref = (spec.ref for spec in specs)
    install_crds(kubeconfig, source / CRD_FOLDER, timeout)
    kubectl_apply(
        kubeconfig,
        [
            namespace_manifest(),
            *operator_manifests(read_documents(source / OPERATOR_RBAC_FOLDER), operator_ref, reloader_ref),
            *prometheus_manifests(
                read_documents(source / PROMETHEUS_RBAC_FOLDER),
                prometheus_ref,
                prometheus_ref.rsplit(":", 1)[1],
            ),
        ],
    )
    wait_for(
        lambda: pod_ready(prometheus_pod(kubeconfig)), timeout, f"Prometheus {NAMESPACE}/{PROMETHEUS_NAME}"
    )
    url = prometheus_url(kubeconfig)
    wait_for(lambda: _answers(f"{url}/-/ready"), timeout, f"{url}/-/ready")
    progress(f"Prometheus Operator and Prometheus ready at {url} after {time.monotonic() - started:.1f} s")
    return url


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=3.0).is_success
    except httpx.HTTPError:
        return False
