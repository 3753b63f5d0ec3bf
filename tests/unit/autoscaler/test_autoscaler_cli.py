"""`kiln autoscaler` subcommands wired through the real `kiln` entry point."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from kiln.cli import main
from kiln_autoscaler.sim.traces import load_azure_csv


def test_trace_writes_an_azure_csv_the_loader_reads(tmp_path: Path) -> None:
    out = tmp_path / "step.csv"
    result = CliRunner().invoke(main, ["autoscaler", "trace", "step", str(out)])
    assert result.exit_code == 0, result.output
    assert len(load_azure_csv(out).requests) > 10_000


def test_simulate_replays_a_csv_and_prints_the_summary(tmp_path: Path) -> None:
    sample = Path(__file__).resolve().parents[3] / "autoscaler" / "traces" / "azure_sample.csv"
    result = CliRunner().invoke(main, ["autoscaler", "simulate", "--azure", str(sample), "--policy", "kiln"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)
    assert row["policy"] == "kiln" and row["requests"] == len(load_azure_csv(sample).requests)
    assert 0 <= row["slo_minutes_pct"] <= 100 and row["replica_hours"] > 0


def test_run_refuses_prometheus_without_a_url() -> None:
    result = CliRunner().invoke(main, ["autoscaler", "run", "--metrics-source", "prometheus", "--once"])
    assert result.exit_code != 0
    assert "--prometheus-url" in result.output
