"""`kiln operator run`: the operator process (kopf, leader election, metrics, health, JSON logs)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import click

from kiln import __version__

log = logging.getLogger("kiln.operator")

# Fields of a LogRecord that are not extras worth printing.
_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any extras (kopf adds the object)."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                try:
                    json.dumps(value)
                except (TypeError, ValueError):
                    value = str(value)
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def configure_logging(log_format: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("urllib3", "kubernetes", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kopf reports every handled watch event at INFO ("Handler ... succeeded"); the reconcilers log
    # and record (as Events) each step themselves.
    logging.getLogger("kopf.objects").setLevel(max(logging.WARNING, root.level))


class Health:
    """Liveness for the kubelet: /healthz answers 200 while the operator's background loop turns."""

    STALE_SECONDS = 120.0

    def __init__(self) -> None:
        self.last_beat = time.monotonic()

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    @property
    def problem(self) -> str | None:
        idle = time.monotonic() - self.last_beat
        return f"background loop idle for {idle:.0f} s" if idle > self.STALE_SECONDS else None

    def serve(self, port: int, address: str = "0.0.0.0") -> ThreadingHTTPServer:
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/healthz", "/livez", "/readyz"):
                    self.send_error(404)
                    return
                ok = health.problem is None
                body = b"ok\n" if ok else f"{health.problem}\n".encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer((address, port), Handler)
        threading.Thread(target=server.serve_forever, name="kiln-health", daemon=True).start()
        return server


@click.group("operator")
def operator_command() -> None:
    """The Kiln operator: turns LLMDeployments into built engines and serving pods."""


@operator_command.command("run")
@click.option("--namespace", "-n", "namespaces", multiple=True, help="Namespace to serve (repeatable).")
@click.option("--all-namespaces", "-A", is_flag=True, help="Serve every namespace.")
@click.option(
    "--metrics-port", type=int, default=8080, show_default=True, help="Prometheus /metrics; 0: off."
)
@click.option("--health-port", type=int, default=8081, show_default=True, help="/healthz; 0: off.")
@click.option(
    "--bind-address",
    default=lambda: os.environ.get("KILN_BIND_ADDRESS", "0.0.0.0"),
    help="Address of the metrics and health servers [default: 0.0.0.0, or $KILN_BIND_ADDRESS].",
)
@click.option("--leader-election/--no-leader-election", default=False, show_default=True)
@click.option(
    "--leader-election-namespace",
    default=lambda: os.environ.get("POD_NAMESPACE", "kiln-system"),
    help="Namespace of the Lease (default: $POD_NAMESPACE, else kiln-system).",
)
@click.option("--leader-election-lease", default="kiln-operator", show_default=True)
@click.option("--engine-image", default=None, help="Engine image for the torch backend.")
@click.option("--engine-image-tensorrt-llm", default=None, help="Engine image for the tensorrt-llm backend.")
@click.option(
    "--router-image", default=None, help="Image of the Kiln routers [default: the control-plane image]."
)
@click.option(
    "--router-cluster-role",
    default=None,
    help="ClusterRole bound to each deployment's router ServiceAccount, installed by the chart "
    "[default: kiln.render.common.ROUTER_CLUSTER_ROLE].",
)
@click.option(
    "--engine-retention",
    type=float,
    default=lambda: float(os.environ.get("KILN_ENGINE_RETENTION_SECONDS", 24 * 3600)),
    help="Seconds an unused LLMEngine is kept before it is deleted [default: 86400, or "
    "$KILN_ENGINE_RETENTION_SECONDS].",
)
@click.option(
    "--resync-seconds",
    type=float,
    default=600.0,
    show_default=True,
    help="Full resync period (watches keep things current in between).",
)
@click.option(
    "--build-poll-seconds",
    type=click.FloatRange(1.0),
    default=5.0,
    show_default=True,
    help="While a build Job runs, how often its engine is reconciled and its log tail read for progress.",
)
@click.option(
    "--workers", type=click.IntRange(1, 64), default=16, show_default=True, help="Reconcile workers."
)
@click.option(
    "--log-format",
    type=click.Choice(["json", "plain"]),
    default=lambda: os.environ.get("KILN_LOG_FORMAT", "json"),
    help="[default: json, or $KILN_LOG_FORMAT]",
)
@click.option("--log-level", default=lambda: os.environ.get("KILN_LOG_LEVEL", "INFO"), help="[default: INFO]")
def run(
    namespaces: tuple[str, ...],
    all_namespaces: bool,
    metrics_port: int,
    health_port: int,
    bind_address: str,
    leader_election: bool,
    leader_election_namespace: str,
    leader_election_lease: str,
    engine_image: str | None,
    engine_image_tensorrt_llm: str | None,
    router_image: str | None,
    router_cluster_role: str | None,
    engine_retention: float,
    resync_seconds: float,
    build_poll_seconds: float,
    workers: int,
    log_format: str,
    log_level: str,
) -> None:
    """Run the operator until SIGTERM (or, with leader election, until leadership is lost)."""
    if bool(namespaces) == all_namespaces:
        raise click.UsageError("give --namespace (one or more) or --all-namespaces")
    configure_logging(log_format, log_level)

    import kopf
    from kubernetes import client, config

    from kiln.controller import handlers  # noqa: F401  (registers the kopf handlers)
    from kiln.controller.kube import Kube
    from kiln.controller.metrics import Metrics
    from kiln.controller.reconcile import Options, Reconciler
    from kiln.render.common import Settings

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = 32
    api_client = client.ApiClient(configuration)

    metrics = Metrics()
    if metrics_port:
        metrics.serve(metrics_port, bind_address)
    health = Health()
    if health_port:
        health.serve(health_port, bind_address)

    stop = threading.Event()
    exit_code = 0

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    elector = None
    if leader_election:
        from kiln.common.leader import LeaseElector

        identity = f"{os.environ.get('POD_NAME') or socket.gethostname()}-{os.getpid()}"
        elector = LeaseElector(
            api_client,
            leader_election_namespace,
            leader_election_lease,
            identity,
            lease_duration_s=float(os.environ.get("KILN_LEADER_ELECTION_LEASE_DURATION", 15)),
            renew_deadline_s=float(os.environ.get("KILN_LEADER_ELECTION_RENEW_DEADLINE", 10)),
            retry_period_s=float(os.environ.get("KILN_LEADER_ELECTION_RETRY_PERIOD", 2)),
        )
        elector.start()
        log.info(
            "waiting to lead (Lease %s/%s as %s)", leader_election_namespace, leader_election_lease, identity
        )
        while not elector.is_leader and not stop.is_set():
            health.beat()
            stop.wait(0.5)
        if stop.is_set():
            elector.stop()
            return
        log.info("leading: starting the operator")
    metrics.leader.set(1)

    kube = Kube(api_client, metrics)
    settings = Settings(
        runtime_version=__version__,
        engine_image=engine_image,
        engine_image_tensorrt_llm=engine_image_tensorrt_llm,
        router_image=router_image,
    )
    if router_cluster_role:
        settings = dataclasses.replace(settings, router_cluster_role=router_cluster_role)
    options = Options(
        namespaces=tuple(namespaces),
        engine_retention_seconds=engine_retention,
        resync_seconds=resync_seconds,
        workers=workers,
        build_poll_seconds=build_poll_seconds,
    )
    reconciler = Reconciler(kube, settings, options, metrics)

    def background() -> None:
        """Retries, build progress, leadership checks and the periodic full resync."""
        nonlocal exit_code
        next_resync = time.monotonic()
        next_building = time.monotonic() + build_poll_seconds
        while not stop.is_set():
            try:
                if elector is not None and not elector.is_leader:
                    log.error("lost the leader Lease: exiting so a fresh replica can stand by")
                    exit_code = 1
                    stop.set()
                    return
                now = time.monotonic()
                if now >= next_resync:
                    next_resync = now + resync_seconds
                    reconciler.resync()
                if now >= next_building:
                    next_building = now + build_poll_seconds
                    reconciler.poll_building()
                health.beat()
            except Exception as error:  # the API may be briefly unreachable; keep going
                log.warning("background pass failed: %s", error)
            stop.wait(1.0)

    reconciler.start()
    worker = threading.Thread(target=background, name="kiln-resync", daemon=True)
    worker.start()
    log.info(
        "kiln operator %s serving %s",
        __version__,
        "all namespaces" if all_namespaces else ", ".join(namespaces),
    )
    try:
        kopf.run(
            clusterwide=all_namespaces,
            namespaces=list(namespaces),
            standalone=True,
            stop_flag=stop,
            memo=kopf.Memo(reconciler=reconciler),
        )
    finally:
        stop.set()
        worker.join(timeout=5)
        reconciler.stop()
        if elector is not None:
            elector.stop()
        metrics.leader.set(0)
    sys.exit(exit_code)
