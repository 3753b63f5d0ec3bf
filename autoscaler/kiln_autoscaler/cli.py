"""`kiln autoscaler`: run the control loop, replay a trace through the simulator, write synthetic traces."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import click


@click.group()
def autoscaler() -> None:
    """Scale LLMDeployments on time to first token."""


def _serve_health(address: str, port: int, healthy: Any) -> HTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path in ("/healthz", "/readyz") and healthy()
            self.send_response(200 if ok else 503)
            self.end_headers()
            self.wfile.write(b"ok\n" if ok else b"unhealthy\n")

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = HTTPServer((address, port), Handler)
    threading.Thread(target=server.serve_forever, name="kiln-autoscaler-health", daemon=True).start()
    return server


@autoscaler.command("run")
@click.option("--interval", type=float, default=15.0, show_default=True, help="Seconds between passes.")
@click.option(
    "--wake-interval",
    type=float,
    default=1.0,
    show_default=True,
    help="Seconds between asks, between passes, whether the routers of a deployment at zero hold requests.",
)
@click.option(
    "--metrics-source", type=click.Choice(["pods", "prometheus"]), default="pods", show_default=True
)
@click.option(
    "--prometheus-url", default=None, help="Prometheus base URL (with --metrics-source=prometheus)."
)
@click.option("--prometheus-window", default="1m", show_default=True, help="Rate window of the PromQL.")
@click.option("--deployment-label", default="llmdeployment", show_default=True, help="Prometheus label.")
@click.option("--pod-port", default="http", show_default=True, help="Engine metrics port (name or number).")
@click.option("--namespace", "namespaces", multiple=True, help="Watch only these namespaces (repeatable).")
@click.option("--metrics-port", type=int, default=8080, show_default=True)
@click.option("--health-port", type=int, default=8081, show_default=True)
@click.option(
    "--bind-address",
    default=lambda: os.environ.get("KILN_BIND_ADDRESS", "0.0.0.0"),
    help="Address of the metrics and health servers [default: 0.0.0.0, or $KILN_BIND_ADDRESS].",
)
@click.option("--leader-election/--no-leader-election", default=False, show_default=True)
@click.option("--leader-election-namespace", default="kiln-system", show_default=True)
@click.option("--leader-election-lease", default="kiln-autoscaler", show_default=True)
@click.option(
    "--kubeconfig", default=None, help="Kubeconfig file (default: in-cluster, then ~/.kube/config)."
)
@click.option("--once", is_flag=True, help="One pass, print the decisions as JSON, exit.")
def run(
    interval: float,
    wake_interval: float,
    metrics_source: str,
    prometheus_url: str | None,
    prometheus_window: str,
    deployment_label: str,
    pod_port: str,
    namespaces: tuple[str, ...],
    metrics_port: int,
    health_port: int,
    bind_address: str,
    leader_election: bool,
    leader_election_namespace: str,
    leader_election_lease: str,
    kubeconfig: str | None,
    once: bool,
) -> None:
    """Run the control loop against the cluster."""
    from kubernetes import client, config
    from prometheus_client import start_http_server

    from kiln.common.leader import LeaseElector
    from kiln_autoscaler.controller import Controller, SignalSource
    from kiln_autoscaler.kube import Kube
    from kiln_autoscaler.metrics import AutoscalerMetrics
    from kiln_autoscaler.sources import PodScrapeSource, PrometheusSource

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per query otherwise
    if metrics_source == "prometheus" and not prometheus_url:
        raise click.UsageError("--metrics-source=prometheus needs --prometheus-url")
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig)
    else:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
    api_client = client.ApiClient()
    source: SignalSource
    if metrics_source == "prometheus":
        assert prometheus_url is not None
        source = PrometheusSource(prometheus_url, prometheus_window, deployment_label)
    else:
        source = PodScrapeSource()
    metrics = AutoscalerMetrics()
    port: int | str = int(pod_port) if pod_port.isdigit() else pod_port
    controller = Controller(
        Kube(api_client), source, metrics, namespaces=namespaces, pod_port=port,
        scrape_pods=metrics_source == "pods",
    )  # fmt: skip
    if once:
        outcomes = controller.tick()
        click.echo(json.dumps([
            {"namespace": o.namespace, "name": o.name, "from": o.current, "to": o.decision.desired,
             "reason": o.decision.reason} for o in outcomes
        ], indent=2))  # fmt: skip
        return

    elector: LeaseElector | None = None
    if leader_election:
        elector = LeaseElector(
            api_client,
            leader_election_namespace,
            leader_election_lease,
            identity=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
            lease_duration_s=float(os.environ.get("KILN_LEADER_ELECTION_LEASE_DURATION", 15)),
            renew_deadline_s=float(os.environ.get("KILN_LEADER_ELECTION_RENEW_DEADLINE", 10)),
            retry_period_s=float(os.environ.get("KILN_LEADER_ELECTION_RETRY_PERIOD", 2)),
        )
        elector.start()

    def healthy() -> bool:
        if elector is not None and not elector.is_leader:
            return True  # a standby is healthy
        return controller.last_pass is None or time.time() - controller.last_pass < 4 * interval + 30

    start_http_server(metrics_port, addr=bind_address, registry=metrics.registry)
    _serve_health(bind_address, health_port, healthy)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    was_leader = False
    while not stop.is_set():
        leading = elector is None or elector.is_leader
        metrics.leader.set(1 if leading else 0)
        if leading:
            if not was_leader:
                controller.histories.clear()  # a new term starts with a cautious memory
                logging.getLogger(__name__).info("leading: scaling autoscaled LLMDeployments")
            controller.tick()
        was_leader = leading
        next_pass = time.monotonic() + interval
        # Between passes, a routed deployment whose routers hold requests at zero, or have taken a
        # burst, gets a pass at once (one that only scales up): it should not wait out the interval.
        while not stop.wait(max(0.0, min(wake_interval, next_pass - time.monotonic()))):
            if time.monotonic() >= next_pass:
                break
            if leading and (woken := controller.woken()):
                controller.wake(woken)
    if elector is not None:
        elector.stop()


@autoscaler.command("simulate")
@click.option(
    "--trace",
    "trace_name",
    default="bursty",
    show_default=True,
    help="steady|diurnal|step|bursty|flash-crowd",
)
@click.option("--azure", type=click.Path(exists=True, dir_okay=False), help="Replay an Azure-format CSV.")
@click.option("--policy", "policy_name", type=click.Choice(["kiln", "hpa", "static"]), default="kiln")
@click.option("--replicas", type=int, default=8, show_default=True, help="Static count (--policy static).")
@click.option("--ttft-target-ms", type=float, default=500.0, show_default=True)
@click.option("--max-replicas", type=int, default=24, show_default=True)
@click.option("--start-delay", type=float, default=30.0, show_default=True, help="Replica start seconds.")
def simulate_command(
    trace_name: str,
    azure: str | None,
    policy_name: str,
    replicas: int,
    ttft_target_ms: float,
    max_replicas: int,
    start_delay: float,
) -> None:
    """Replay a trace through the simulator under one policy and print the summary as JSON."""
    from kiln_autoscaler.baselines import HpaConcurrencyPolicy, KilnPolicy, Policy, StaticPolicy
    from kiln_autoscaler.data import Targets
    from kiln_autoscaler.sim.simulator import ReplicaProfile, SimConfig, simulate
    from kiln_autoscaler.sim.traces import SYNTHETIC, load_azure_csv

    if azure:
        trace = load_azure_csv(azure)
    elif trace_name in SYNTHETIC:
        trace = SYNTHETIC[trace_name]()
    else:
        raise click.BadParameter(f"unknown trace {trace_name!r}; one of {sorted(SYNTHETIC)}")
    profile = ReplicaProfile(start_delay_s=start_delay)
    policy: Policy
    if policy_name == "static":
        policy = StaticPolicy(replicas)
    elif policy_name == "hpa":
        policy = HpaConcurrencyPolicy(target_in_flight_per_replica=0.7 * profile.max_batch)
    else:
        policy = KilnPolicy()
    targets = Targets(min_replicas=1, max_replicas=max_replicas, ttft_p50_target_s=ttft_target_ms / 1000)
    result = simulate(trace, policy, SimConfig(targets=targets, profile=profile))
    click.echo(json.dumps(result.summary(), indent=2))


@autoscaler.command("trace")
@click.argument("name", type=click.Choice(["steady", "diurnal", "step", "bursty"]))
@click.argument("path", type=click.Path(dir_okay=False, writable=True))
def trace_command(name: str, path: str) -> None:
    """Write a synthetic trace as an Azure-format CSV (TIMESTAMP,ContextTokens,GeneratedTokens)."""
    from kiln_autoscaler.sim.traces import SYNTHETIC, write_azure_csv

    trace = SYNTHETIC[name]()
    write_azure_csv(trace, path)
    click.echo(f"{len(trace.requests)} requests over {trace.duration_s:.0f}s -> {path}")
