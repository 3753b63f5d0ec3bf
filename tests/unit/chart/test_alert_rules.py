"""The chart's alert rules evaluated by Prometheus' own rule engine (`promtool test rules`): a
deployment slower than its TTFT SLO fires the burn-rate alerts, a healthy one fires nothing, and a
failed engine build fires KilnEngineBuildsFailing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import debian_prometheus
import pytest
import yaml
from kiln_chart import Helm, as_prometheus_sees_it, dashboard_exprs, one

MONITORING_API = "monitoring.coreos.com/v1"
DEPLOYMENT = 'namespace="serving", llmdeployment="llama", pod="llama-0", model="llama"'


@pytest.fixture(scope="module")
def promtool() -> str:
    """$KILN_PROMTOOL, else promtool from PATH or Debian's prometheus package (fetched when absent)."""
    override = os.environ.get("KILN_PROMTOOL")
    if override:
        return override
    try:
        return str(debian_prometheus.find_or_fetch("promtool"))
    except RuntimeError as error:
        pytest.fail(str(error))


def rule_file(helm: Helm, directory: Path) -> Path:
    rule = one(helm.render(api_versions=[MONITORING_API]), "PrometheusRule", "kiln")
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return path


def ttft_series(good_per_minute: int, total_per_minute: int) -> list[dict[str, str]]:
    """Cumulative TTFT histogram series of one pod over 3 hours, one sample a minute."""
    series = []
    for le, per_minute in (
        ("0.5", good_per_minute // 2),
        ("1.0", good_per_minute),
        ("+Inf", total_per_minute),
    ):
        series.append(
            {
                "series": f'kiln_engine_time_to_first_token_seconds_bucket{{{DEPLOYMENT}, le="{le}"}}',
                "values": f"0+{per_minute}x180",
            }
        )
    series.append(
        {
            "series": f"kiln_engine_time_to_first_token_seconds_count{{{DEPLOYMENT}}}",
            "values": f"0+{total_per_minute}x180",
        }
    )
    return series


def firing(alert: str, at: str, labels: dict[str, str] | None) -> dict[str, Any]:
    samples = [] if labels is None else [{"labels": _labels(alert, labels), "value": 1}]
    return {
        "expr": f'ALERTS{{alertname="{alert}", alertstate="firing"}}',
        "eval_time": at,
        "exp_samples": samples,
    }


def _labels(alert: str, labels: dict[str, str]) -> str:
    inner = ", ".join(f'{k}="{v}"' for k, v in {"alertname": alert, "alertstate": "firing", **labels}.items())
    return f"ALERTS{{{inner}}}"


def run_promtool(promtool: str, directory: Path, rules: Path, tests: list[dict[str, Any]]) -> None:
    test_file = directory / "tests.yaml"
    test_file.write_text(
        yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m", "tests": tests})
    )
    checked = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    done = subprocess.run(
        [promtool, "test", "rules", test_file.name],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_slow_first_tokens_burn_the_error_budget(helm: Helm, promtool: str, tmp_path: Path) -> None:
    # 20% of requests over 1 s against a 99% objective: 20x the budget, above both burn thresholds.
    slow = {"severity": "critical", "namespace": "serving", "llmdeployment": "llama"}
    tests = [
        {
            "interval": "1m",
            "input_series": ttft_series(good_per_minute=80, total_per_minute=100),
            "promql_expr_test": [
                firing("KilnTTFTErrorBudgetBurnFast", "90m", slow),
                firing("KilnTTFTErrorBudgetBurnSlow", "170m", {**slow, "severity": "warning"}),
            ],
        },
        {
            "interval": "1m",
            "input_series": ttft_series(good_per_minute=100, total_per_minute=100),
            "promql_expr_test": [
                firing("KilnTTFTErrorBudgetBurnFast", "170m", None),
                firing("KilnTTFTErrorBudgetBurnSlow", "170m", None),
            ],
        },
    ]
    run_promtool(promtool, tmp_path, rule_file(helm, tmp_path), tests)


def test_a_failed_build_fires_the_build_alert(helm: Helm, promtool: str, tmp_path: Path) -> None:
    tests = [
        {
            "interval": "1m",
            "input_series": [
                {
                    "series": 'kiln_operator_builds_failed_total{namespace="serving"}',
                    "values": "0 0 0 1 1 1 1",
                },
                {
                    "series": 'kiln_operator_builds_succeeded_total{namespace="serving"}',
                    "values": "0+1x6",
                },
            ],
            "promql_expr_test": [
                firing("KilnEngineBuildsFailing", "5m", {"severity": "warning", "namespace": "serving"}),
            ],
        }
    ]
    run_promtool(promtool, tmp_path, rule_file(helm, tmp_path), tests)


def test_dashboard_queries_parse_in_prometheus(promtool: str, tmp_path: Path) -> None:
    """Prometheus' own parser reads every dashboard query (Grafana's variables substituted)."""
    rules = [
        {"record": f"kiln:dashboard_query_{index}", "expr": as_prometheus_sees_it(expr)}
        for index, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(rules)} rules found" in checked.stdout
