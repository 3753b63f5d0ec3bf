"""The chart's monitoring: Grafana dashboard and PrometheusRule parse as PromQL, read only metrics that
Kiln exports, and the TTFT-SLO bucket matcher matches exactly the bucket the engine writes."""

from __future__ import annotations

import json
import re
from typing import Any

import promql_parser
import pytest
import yaml
from kiln_chart import Helm, as_prometheus_sees_it, dashboard, dashboard_exprs, one
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from kiln_engine import metric_names

MONITORING_API = "monitoring.coreos.com/v1"
ENGINE_HISTOGRAMS = (metric_names.TTFT_SECONDS, metric_names.INTER_TOKEN_SECONDS, metric_names.E2E_SECONDS)
ENGINE_METRICS = (
    metric_names.QUEUE_DEPTH,
    metric_names.RUNNING_REQUESTS,
    metric_names.KV_CACHE_USAGE,
    metric_names.PROMPT_TOKENS,
    metric_names.GENERATION_TOKENS,
    metric_names.REQUESTS,
    metric_names.PREEMPTIONS,
    metric_names.PREFIX_CACHE_HIT_TOKENS,
)


def exported_series(registry: CollectorRegistry) -> set[str]:
    """Every series name a registry can expose (histograms' _bucket/_count/_sum, counters' _total)."""
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "histogram":
            names |= {f"{family.name}{suffix}" for suffix in ("_bucket", "_count", "_sum")}
        elif family.type == "counter":
            names.add(f"{family.name}_total")
        else:
            names.add(family.name)
    return names


def component_series() -> set[str]:
    """What the operator and the autoscaler export, read from their own metric registries."""
    from kiln.controller.metrics import Metrics
    from kiln_autoscaler.metrics import AutoscalerMetrics

    return exported_series(Metrics().registry) | exported_series(AutoscalerMetrics().registry)


KNOWN_SERIES = (
    {f"{h}{suffix}" for h in ENGINE_HISTOGRAMS for suffix in ("_bucket", "_count", "_sum")}
    | set(ENGINE_METRICS)
    | component_series()
)
KILN_METRIC = re.compile(r"(?<![\w:])kiln_[a-z0-9_]+")


def rules(helm: Helm, settings: list[str] | None = None) -> list[dict[str, Any]]:
    rule = one(helm.render(api_versions=[MONITORING_API], settings=settings), "PrometheusRule", "kiln")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    board = dashboard()
    titles = " | ".join(panel["title"] for panel in board["panels"]).lower()
    for wanted in (
        "time to first token",
        "inter-token",
        "throughput",
        "queue",
        "kv-cache",
        "replicas",
        "builds",
    ):
        assert wanted in titles, wanted
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "namespace", "llmdeployment"}
    assert board["uid"] == "kiln-overview"
    assert len({panel["id"] for panel in board["panels"]}) == len(board["panels"])


@pytest.mark.parametrize(("title", "expr"), dashboard_exprs(), ids=[t for t, _ in dashboard_exprs()])
def test_dashboard_query_is_valid_promql_over_kiln_metrics(title: str, expr: str) -> None:
    promql_parser.parse(as_prometheus_sees_it(expr))
    used = set(KILN_METRIC.findall(expr))
    assert used, "a panel that reads no Kiln metric"
    assert used <= KNOWN_SERIES, f"unknown metrics: {sorted(used - KNOWN_SERIES)}"
    if any(name.startswith("kiln_engine_") for name in used):
        assert 'namespace=~"$namespace"' in expr and 'llmdeployment=~"$llmdeployment"' in expr


def test_dashboard_ships_in_a_grafana_sidecar_config_map(helm: Helm) -> None:
    config_map = one(helm.render(), "ConfigMap", "kiln-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["kiln.json"]) == dashboard()


def test_rules_are_valid_promql_over_kiln_metrics(helm: Helm) -> None:
    rendered = rules(helm)
    recorded = {r["record"] for r in rendered if "record" in r}
    alerts = {r["alert"] for r in rendered if "alert" in r}
    assert {"KilnTTFTErrorBudgetBurnFast", "KilnTTFTErrorBudgetBurnSlow", "KilnEngineBuildsFailing"} <= alerts
    for rule in rendered:
        expr = rule["expr"]
        promql_parser.parse(expr)
        used = set(KILN_METRIC.findall(expr))
        assert used <= KNOWN_SERIES, (
            f"{rule.get('alert') or rule.get('record')}: {sorted(used - KNOWN_SERIES)}"
        )
        for name in re.findall(r"llmdeployment:[a-z0-9_:]+", expr):
            assert name in recorded, name
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("critical", "warning")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_build_failure_alert_counts_failed_builds(helm: Helm) -> None:
    alert = next(r for r in rules(helm) if r.get("alert") == "KilnEngineBuildsFailing")
    assert "increase(kiln_operator_builds_failed_total[1h])" in alert["expr"]
    assert alert["expr"].endswith(">= 1")


def engine_bucket_labels() -> list[str]:
    """The `le` values the engine's client library writes for the TTFT histogram."""
    registry = CollectorRegistry()
    histogram = Histogram(
        metric_names.TTFT_SECONDS, "TTFT", ["model"], buckets=metric_names.LATENCY_BUCKETS, registry=registry
    )
    histogram.labels(model="m").observe(0.2)
    text = generate_latest(registry).decode()
    return [le for le in re.findall(r'_bucket\{le="([^"]+)"', text) if le != "+Inf"]


@pytest.mark.parametrize("threshold", [0.005, 0.075, 0.5, 1.0, 10.0])
def test_slo_matcher_selects_exactly_the_threshold_bucket(
    helm: Helm, tmp_path: Any, threshold: float
) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {"monitoring": {"rules": {"ttftSLO": {"thresholdSeconds": threshold, "objective": 0.99}}}}
        )
    )
    rule = one(helm.render(values=[values], api_versions=[MONITORING_API]), "PrometheusRule", "kiln")
    record = next(
        r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("record", "").endswith("ratio_rate5m")
    )
    matcher = re.search(r'le=~"([^"]+)"', record["expr"])
    assert matcher, record["expr"]
    # PromQL unescapes the string, then anchors the regular expression at both ends.
    pattern = re.compile(matcher.group(1).encode().decode("unicode_escape"))
    written = engine_bucket_labels()
    matched = [le for le in written if pattern.fullmatch(le)]
    assert len(matched) == 1 and float(matched[0]) == threshold, (matched, written)
    # Prometheus 3 normalizes integral buckets ("1" and "1.0" alike); both spellings match.
    go_style = f"{threshold:g}"
    assert pattern.fullmatch(go_style), go_style
