"""The Helm chart, rendered with the local toolchain's helm: lint, workloads, pod security, RBAC,
NetworkPolicies, monitoring gates, and values that must be rejected with a message naming them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kiln_chart import (
    AUTOSCALER_VERBS,
    CHART,
    FULL_VALUES,
    OPERATOR_VERBS,
    ROOT,
    TOPOLOGY_AGENT_VERBS,
    Helm,
    by_kind,
    one,
)

VALUE_SETS = {"default": [], "full": [FULL_VALUES]}
WORKLOAD_KINDS = ("Deployment", "DaemonSet")
MONITORING_API = "monitoring.coreos.com/v1"
MONITORING_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}


def pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        obj["metadata"]["name"]: obj["spec"]["template"]["spec"]
        for obj in objects
        if obj["kind"] in WORKLOAD_KINDS
    }


def granted(objects: list[dict[str, Any]], service_account: str) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs, over every Role/ClusterRole bound to the ServiceAccount."""
    roles = {
        (obj["kind"], obj["metadata"]["name"]): obj
        for obj in objects
        if obj["kind"] in ("Role", "ClusterRole")
    }
    result: dict[tuple[str, str], set[str]] = {}
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(
            s["kind"] == "ServiceAccount" and s["name"] == service_account for s in binding["subjects"]
        ):
            continue
        role = roles[(binding["roleRef"]["kind"], binding["roleRef"]["name"])]
        for rule in role["rules"]:
            assert "resourceNames" not in rule or rule["resourceNames"], rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    result.setdefault((group, resource), set()).update(rule["verbs"])
    return result


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_lint_passes_strict(helm: Helm, values: list[Path]) -> None:
    args = ["lint", str(CHART), "--strict"]
    for path in values:
        args += ["--values", str(path)]
    helm.run(*args)


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_object_is_labelled_and_namespaced(helm: Helm, values: list[Path]) -> None:
    cluster_scoped = {
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    for obj in helm.render(values=values):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "kiln", obj["metadata"]["name"]
        assert labels["app.kubernetes.io/part-of"] == "kiln"
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in obj["metadata"]
        elif obj["kind"] not in ("RoleBinding", "ConfigMap"):
            assert obj["metadata"]["namespace"] == "kiln-system", obj["metadata"]["name"]


def test_default_install_has_every_component(helm: Helm) -> None:
    objects = helm.render()
    operator = one(objects, "Deployment", "kiln-operator")
    assert operator["spec"]["replicas"] == 2
    container = operator["spec"]["template"]["spec"]["containers"][0]
    assert (
        container["image"]
        == f"ghcr.io/kiln-dev/kiln:{yaml.safe_load((CHART / 'Chart.yaml').read_text())['appVersion']}"
    )
    assert container["args"][:2] == ["operator", "run"]
    assert "--leader-election" in container["args"]
    assert "--leader-election-lease=kiln-operator" in container["args"]
    assert "--all-namespaces" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert not any(arg.startswith("--engine-image") for arg in container["args"])
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 8080, "health": 8081}
    pdb = one(objects, "PodDisruptionBudget", "kiln-operator")
    assert pdb["spec"]["minAvailable"] == 1

    autoscaler = one(objects, "Deployment", "kiln-autoscaler")
    assert autoscaler["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["autoscaler", "run"]
    # Both servers bind the pod IP (the kubelet expands $(POD_IP) from the container's env), so
    # installs whose pods share a host's network never contend for their ports.
    for controller in (operator, autoscaler):
        bound = controller["spec"]["template"]["spec"]["containers"][0]
        assert "--bind-address=$(POD_IP)" in bound["args"], controller["metadata"]["name"]
        assert "POD_IP" in {e["name"] for e in bound["env"]}
    assert {s["metadata"]["name"] for s in by_kind(objects, "Service")} == {
        "kiln-operator-metrics",
        "kiln-autoscaler-metrics",
    }

    agent = one(objects, "DaemonSet", "kiln-topology-agent")["spec"]["template"]["spec"]
    assert agent["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert agent["runtimeClassName"] == "nvidia"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in agent["tolerations"]
    env = {e["name"]: e for e in agent["containers"][0]["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert agent["containers"][0]["args"][0] == "topology-agent"


def test_operator_replicas_spread_across_nodes_by_default(helm: Helm) -> None:
    spec = one(helm.render(), "Deployment", "kiln-operator")["spec"]["template"]["spec"]
    term = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert (
        term["podAffinityTerm"]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    )


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_pods_meet_the_restricted_pod_security_standard(helm: Helm, values: list[Path]) -> None:
    specs = pod_specs(helm.render(values=values))
    assert set(specs) == {"kiln-operator", "kiln-autoscaler", "kiln-topology-agent"}
    for name, spec in specs.items():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["runAsUser"] != 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert "hostNetwork" not in spec and "hostPID" not in spec and "hostIPC" not in spec, name
        assert all("hostPath" not in volume for volume in spec.get("volumes", [])), name
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["privileged"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            requests = container["resources"]["requests"]
            assert requests["cpu"] and requests["memory"], name
            assert container["resources"]["limits"]["memory"], name


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_each_component_gets_only_its_allow_listed_permissions(helm: Helm, values: list[Path]) -> None:
    objects = helm.render(values=values)
    accounts = {obj["metadata"]["name"] for obj in by_kind(objects, "ServiceAccount")}
    assert accounts == {"kiln-operator", "kiln-autoscaler", "kiln-topology-agent"}
    assert granted(objects, "kiln-operator") == OPERATOR_VERBS
    assert granted(objects, "kiln-autoscaler") == AUTOSCALER_VERBS
    assert granted(objects, "kiln-topology-agent") == TOPOLOGY_AGENT_VERBS
    for role in by_kind(objects, "ClusterRole") + by_kind(objects, "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role["metadata"]["name"]
            assert "secrets" not in rule["resources"], f"{role['metadata']['name']} may read secrets"


def test_leases_are_granted_only_in_the_release_namespace(helm: Helm) -> None:
    objects = helm.render()
    for role in by_kind(objects, "ClusterRole"):
        assert all("leases" not in rule["resources"] for rule in role["rules"]), role["metadata"]["name"]
    lease_roles = [
        r for r in by_kind(objects, "Role") if any("leases" in rule["resources"] for rule in r["rules"])
    ]
    assert {r["metadata"]["namespace"] for r in lease_roles} == {"kiln-system"}


def test_watch_namespaces_bind_namespaced_permissions_per_namespace(helm: Helm) -> None:
    objects = helm.render(settings=["watchNamespaces={team-a,team-b}"])
    bindings = [b for b in by_kind(objects, "RoleBinding") if b["roleRef"]["kind"] == "ClusterRole"]
    assert sorted((b["roleRef"]["name"], b["metadata"]["namespace"]) for b in bindings) == [
        ("kiln-autoscaler", "team-a"),
        ("kiln-autoscaler", "team-b"),
        ("kiln-operator", "team-a"),
        ("kiln-operator", "team-b"),
    ]
    cluster_bindings = {b["roleRef"]["name"] for b in by_kind(objects, "ClusterRoleBinding")}
    assert cluster_bindings == {"kiln-operator-cluster", "kiln-topology-agent"}
    args = one(objects, "Deployment", "kiln-operator")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_pod_is_selected_by_a_default_deny_network_policy(helm: Helm, values: list[Path]) -> None:
    objects = helm.render(values=values)
    policies = by_kind(objects, "NetworkPolicy")
    for workload in (obj for obj in objects if obj["kind"] in WORKLOAD_KINDS):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        selecting = [
            p
            for p in policies
            if all(labels.get(k) == v for k, v in p["spec"]["podSelector"]["matchLabels"].items())
        ]
        assert len(selecting) == 1, workload["metadata"]["name"]
        policy = selecting[0]["spec"]
        assert policy["policyTypes"] == ["Ingress", "Egress"]
        egress_ports = {port["port"] for rule in policy["egress"] for port in rule.get("ports", [])}
        assert 53 in egress_ports, "DNS"
        assert egress_ports & {443, 6443}, "API server"


def test_monitoring_objects_follow_the_prometheus_operator_api(helm: Helm) -> None:
    without = {obj["kind"] for obj in helm.render()}
    assert not without & MONITORING_KINDS, "rendered Prometheus Operator objects on a cluster without them"
    detected = {obj["kind"] for obj in helm.render(api_versions=[MONITORING_API])}
    assert detected >= MONITORING_KINDS
    forced = {obj["kind"] for obj in helm.render(settings=["monitoring.prometheusOperator=enabled"])}
    assert forced >= MONITORING_KINDS
    disabled = {
        obj["kind"]
        for obj in helm.render(
            api_versions=[MONITORING_API], settings=["monitoring.prometheusOperator=disabled"]
        )
    }
    assert not disabled & MONITORING_KINDS


def test_full_values_reach_the_manifests(helm: Helm) -> None:
    objects = helm.render(values=[FULL_VALUES])
    full = yaml.safe_load(FULL_VALUES.read_text())
    operator = one(objects, "Deployment", "kiln-operator")
    assert operator["spec"]["replicas"] == 3
    container = operator["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"registry.example.com/kiln/kiln@{full['operator']['image']['digest']}"
    assert "--resync-seconds=30" in container["args"]
    assert f"--engine-image={full['operator']['engineImage']}" in container["args"]
    autoscaler = one(objects, "Deployment", "kiln-autoscaler")["spec"]["template"]["spec"]["containers"][0]
    assert autoscaler["image"] == "registry.example.com/kiln/kiln:0.1.0-rc.1"
    assert "--prometheus-url=http://prometheus-operated.monitoring.svc:9090" in autoscaler["args"]
    agent = one(objects, "DaemonSet", "kiln-topology-agent")["spec"]["template"]["spec"]
    assert agent["nodeSelector"] == {"feature.node.kubernetes.io/pci-10de.present": "true"}
    # placement values reach each component's pods
    for component in ("operator", "autoscaler", "topologyAgent"):
        name = "kiln-topology-agent" if component == "topologyAgent" else f"kiln-{component}"
        kind = "DaemonSet" if component == "topologyAgent" else "Deployment"
        spec = one(objects, kind, name)["spec"]["template"]["spec"]
        for key in ("nodeSelector", "tolerations", "affinity"):
            if key in full[component]:
                expected = full[component][key]
                if key == "nodeSelector":
                    expected = {k: v for k, v in expected.items() if v is not None}
                assert spec[key] == expected, (component, key)
    assert one(objects, "ConfigMap", "kiln-dashboard")["metadata"]["namespace"] == "monitoring"
    for kind in MONITORING_KINDS:
        assert by_kind(objects, kind)[0]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert one(objects, "PodMonitor", "kiln-engines")["spec"]["namespaceSelector"] == {
        "matchNames": ["team-a"]
    }
    assert all(obj["metadata"]["labels"]["cost-center"] == "ml-platform" for obj in objects)


INVALID_VALUES = [
    ("operator.replicas=two", "operator.replicas"),
    ("operator.replicas=0", "operator.replicas"),
    ("operator.replica=2", "replica"),
    ("image.pullPolicy=Sometimes", "image.pullPolicy"),
    ("monitoring.prometheusOperator=maybe", "monitoring.prometheusOperator"),
    ("autoscaler.metricsSource=graphite", "autoscaler.metricsSource"),
    ("logLevel=verbose", "logLevel"),
    ("watchNamespaces={Team_A}", "watchNamespaces"),
    ("operator.image.digest=latest", "operator.image.digest"),
    ("monitoring.interval=30", "monitoring.interval"),
    ("operator.resources.requests=null", "operator.resources"),
    ("networkPolicy.apiServer.cidrs={}", "networkPolicy.apiServer.cidrs"),
    ("topologyAgent.nodeSelector=null", "topologyAgent.nodeSelector"),
    ("operator.leaderElection.enabled=false", "operator.leaderElection.enabled"),
    ("autoscaler.metricsSource=prometheus", "autoscaler.prometheus.url"),
    ("operator.leaderElection.renewDeadline=20", "operator.leaderElection.leaseDuration"),
    ("operator.serviceAccount.create=false", "operator.serviceAccount.name"),
    ("operator.engineImage=Not An Image", "operator.engineImage"),
    ("autoscaler.nodeSelector.zone=1", "autoscaler.nodeSelector"),
    ("autoscaler.tolerations=oops", "autoscaler.tolerations"),
]


def names_value(error: str, dotted: str) -> bool:
    """Helm names a value by its dotted path (template checks, older helm) or as a JSON pointer."""
    return dotted in error or "/" + dotted.replace(".", "/") in error


@pytest.mark.parametrize(("setting", "named"), INVALID_VALUES, ids=[s for s, _ in INVALID_VALUES])
def test_invalid_values_fail_with_a_message_naming_the_value(helm: Helm, setting: str, named: str) -> None:
    error = helm.render_error(settings=[setting])
    assert names_value(error, named), error


def test_slo_threshold_must_be_a_histogram_bucket(helm: Helm, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        "monitoring:\n  rules:\n    ttftSLO:\n      thresholdSeconds: 0.8\n      objective: 0.99\n"
    )
    error = helm.render_error(values=[values])
    assert names_value(error, "monitoring.rules.ttftSLO.thresholdSeconds"), error


def test_slo_threshold_choices_are_the_engine_buckets() -> None:
    from kiln_engine import metric_names

    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    slo = schema["properties"]["monitoring"]["properties"]["rules"]["properties"]["ttftSLO"]
    assert tuple(slo["properties"]["thresholdSeconds"]["enum"]) == metric_names.LATENCY_BUCKETS


def test_chart_ships_the_generated_crds_unchanged() -> None:
    """charts/kiln/crds/ is a copy of crds/ (`kiln crds generate` output); any drift fails here."""
    generated = {p.name: p.read_bytes() for p in sorted((ROOT / "crds").glob("*.yaml"))}
    shipped = {p.name: p.read_bytes() for p in sorted((CHART / "crds").glob("*.yaml"))}
    assert generated, "crds/ is empty: run `kiln crds generate`"
    assert shipped.keys() == generated.keys(), "copy crds/*.yaml to charts/kiln/crds/"
    for name, content in generated.items():
        assert shipped[name] == content, f"charts/kiln/crds/{name} differs from crds/{name}: copy it again"


def test_clusters_older_than_the_objects_need_are_refused_by_helm(helm: Helm) -> None:
    """The chart renders admissionregistration.k8s.io/v1 ValidatingAdmissionPolicies (GA in 1.30)."""
    args = helm.template_args()
    version = args.index("--kube-version") + 1
    kinds = {(obj["apiVersion"], obj["kind"]) for obj in helm.render()}
    assert ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") in kinds
    args[version] = "v1.29.9"
    refused = helm.run(*args, check=False)
    assert refused.returncode != 0 and "kubeVersion" in refused.stderr, refused.stderr
    args[version] = "v1.30.0"
    assert helm.run(*args).returncode == 0
