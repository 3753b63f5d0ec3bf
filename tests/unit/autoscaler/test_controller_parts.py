"""The controller's pure edges: which objects it owns, the status it writes, the event it names."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kiln.render.status import FOREIGN_DEPLOYMENT_FIELDS
from kiln_autoscaler.controller import event_reason
from kiln_autoscaler.data import Capacity, Decision, Signals, capacity_from_api, targets_from_api
from kiln_autoscaler.kube import decision_status, scaled_from_object

ROOT = Path(__file__).resolve().parents[3]


def deployment(autoscaling: dict, replicas: int = 2, ready: int = 1) -> dict:
    return {
        "metadata": {"namespace": "prod", "name": "llama", "uid": "u-1"},
        "spec": {"replicas": replicas, "autoscaling": autoscaling},
        "status": {
            "readyReplicas": ready,
            "selector": "kiln.dev/deployment=llama",
            "engine": {"name": "e1", "key": "k"},
        },
    }


def test_only_deployments_with_autoscaling_enabled_are_scaled() -> None:
    assert scaled_from_object(deployment({"enabled": False})) is None
    assert scaled_from_object(deployment({})) is None
    scaled = scaled_from_object(
        deployment(
            {
                "enabled": True,
                "minReplicas": 1,
                "maxReplicas": 8,
                "ttftP50TargetMs": 250,
                "ttftP90TargetMs": 900,
            }
        )
    )
    assert scaled is not None
    assert (scaled.namespace, scaled.name, scaled.engine) == ("prod", "llama", "e1")
    assert scaled.replicas.current == 2 and scaled.replicas.ready == 1
    assert scaled.targets.ttft_p50_target_s == 0.25 and scaled.targets.ttft_p90_target_s == 0.9
    assert scaled.targets.max_replicas == 8 and scaled.targets.scale_down_window_s == 300


def test_api_mapping_takes_the_api_defaults_and_capacity_figures() -> None:
    targets = targets_from_api({"enabled": True})
    assert (
        targets.ttft_p50_target_s == 0.5
        and targets.min_replicas == 1
        and targets.idle_seconds_before_zero == 900
    )
    assert capacity_from_api(None) == Capacity()
    capacity = capacity_from_api(
        {"outputTokensPerSecond": 900.0, "prefillTokensPerSecond": 9000.0, "maxConcurrencyAtTtftTarget": 24}
    )
    assert capacity.known and capacity.max_concurrency_at_ttft_target == 24.0


def test_api_mapping_reads_the_p95_and_inter_token_targets_and_refuses_a_bad_percentile() -> None:
    targets = targets_from_api({"ttftP95TargetMs": 1200, "itlTargetMs": 40, "itlPercentile": 95})
    assert targets.ttft_p95_target_s == 1.2 and targets.itl_target_s == 0.04 and targets.itl_percentile == 95
    plain = targets_from_api({})
    assert plain.ttft_p95_target_s is None and plain.itl_target_s is None and plain.itl_percentile == 50
    with pytest.raises(ValidationError, match="itlPercentile"):
        targets_from_api({"itlTargetMs": 40, "itlPercentile": 99})


def test_status_patch_records_changes_and_observed_ttft() -> None:
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    signals = Signals(observed_at=0.0, ttft_p50_s=0.1234, ttft_p90_s=None)
    changed = decision_status(Decision(4, "burst", 4), 2, signals, now)["status"]
    assert changed["lastScaleDecision"] == {
        "time": "2026-01-02T03:04:05Z", "fromReplicas": 2, "toReplicas": 4, "reason": "burst",
    }  # fmt: skip
    assert changed["ttftP50Ms"] == 123.4 and changed["ttftP90Ms"] is None
    held = decision_status(Decision(2, "steady", 2), 2, None, now)["status"]
    assert held == {}


def test_every_status_field_the_autoscaler_writes_is_in_the_crd_and_left_alone_by_the_operator() -> None:
    # A status field the CRD's schema lacks is pruned by the API server without a word.
    crd = yaml.safe_load((ROOT / "crds" / "kiln.dev_llmdeployments.yaml").read_text())
    [version] = crd["spec"]["versions"]
    status_schema = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    signals = Signals(
        observed_at=0.0, ttft_p50_s=0.1, ttft_p90_s=0.2, ttft_p95_s=0.3, itl_p50_s=0.01, itl_p95_s=0.02
    )
    written = decision_status(Decision(3, "up", 3), 2, signals, dt.datetime.now(dt.UTC))["status"]
    assert written["ttftP95Ms"] == 300.0 and written["itlP95Ms"] == 20.0
    assert set(written) <= set(status_schema)
    assert set(written) <= set(FOREIGN_DEPLOYMENT_FIELDS)


def test_event_reasons() -> None:
    assert event_reason(2, 4) == "ScaledUp"
    assert event_reason(4, 2) == "ScaledDown"
    assert event_reason(1, 0) == "ScaledToZero"
    assert event_reason(0, 1) == "ScaledFromZero"


def _autoscaling_rule_failures(autoscaling: dict) -> list[str]:
    """Messages of the generated CRD's autoscaling CEL rules that `autoscaling` breaks."""
    import celpy
    import yaml

    crd = yaml.safe_load(
        (Path(__file__).resolve().parents[3] / "crds" / "kiln.dev_llmdeployments.yaml").read_text()
    )
    [version] = crd["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["autoscaling"]
    env = celpy.Environment()
    value = {"minReplicas": 1, "maxReplicas": 4, "ttftP50TargetMs": 500, "scaleToZero": False} | autoscaling
    return [
        rule["message"]
        for rule in schema["x-kubernetes-validations"]
        if not bool(env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)}))
    ]


def test_cel_orders_the_percentile_targets() -> None:
    assert _autoscaling_rule_failures({}) == []
    assert _autoscaling_rule_failures({"ttftP95TargetMs": 800}) == []
    assert (
        _autoscaling_rule_failures({"ttftP90TargetMs": 700, "ttftP95TargetMs": 800, "itlTargetMs": 30}) == []
    )
    assert _autoscaling_rule_failures({"ttftP95TargetMs": 400}) == [
        "ttftP95TargetMs must be >= ttftP50TargetMs"
    ]
    assert _autoscaling_rule_failures({"ttftP90TargetMs": 900, "ttftP95TargetMs": 800}) == [
        "ttftP95TargetMs must be >= ttftP90TargetMs"
    ]
