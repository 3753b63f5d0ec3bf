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


def test_run_serves_health_and_metrics_on_the_bind_address_only(tmp_path: Path) -> None:
    """`--bind-address` (the chart passes the pod IP) is where both servers listen, and nowhere else."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    # An API server nobody listens on: the loop's passes fail, the servers still run.
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "x",
            "clusters": [{"name": "x", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],
            "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}],
            "users": [{"name": "x", "user": {"token": "t"}}],
        })
    )  # fmt: skip
    metrics, health = free_port(), free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "kiln"), "autoscaler", "run", f"--kubeconfig={kubeconfig}",
         "--bind-address=127.0.0.2", f"--metrics-port={metrics}", f"--health-port={health}",
         "--interval=60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert httpx.get(f"http://127.0.0.2:{health}/healthz", timeout=2).status_code == 200
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, (
                    "the health server never came up"
                )
                time.sleep(0.2)
        assert "kiln_autoscaler_leader" in httpx.get(f"http://127.0.0.2:{metrics}/metrics", timeout=2).text
        for port in (metrics, health):
            with socket.socket() as sock:
                assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} also answers on 127.0.0.1"
    finally:
        process.terminate()
        process.wait(timeout=30)
