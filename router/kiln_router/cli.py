"""`kiln-router serve`: run one router in front of a deployment's replicas (a Service's ready
endpoints in a cluster, or a fixed list of URLs)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import click
from aiohttp import web

from kiln_router.discovery import EndpointSliceWatch, parse_endpoints
from kiln_router.pick import Policy
from kiln_router.replicas import Replicas
from kiln_router.server import Router, Settings

# The router's knobs: (flag, type, default, help), each shown with its default in --help.
TUNING: tuple[tuple[str, click.ParamType, float, str], ...] = (
    ("--block-chars", click.IntRange(min=1), Policy.block_chars, "Characters per prompt block hash."),
    (
        "--affinity-blocks",
        click.IntRange(min=1),
        Policy.affinity_blocks,
        "Leading blocks that decide the replica (the affinity prefix).",
    ),
    (
        "--max-queue",
        click.FloatRange(min=0),
        Policy.max_queue,
        "Engine queue depth over which a replica is overloaded.",
    ),
    (
        "--max-kv-usage",
        click.FloatRange(0, 1, min_open=True),
        Policy.max_kv_usage,
        "Engine KV-cache usage over which a replica is overloaded.",
    ),
    (
        "--load-factor",
        click.FloatRange(min=1),
        Policy.load_factor,
        "Requests in flight on a replica over this times the mean (plus slack) overload it.",
    ),
    (
        "--max-attempts",
        click.IntRange(min=1),
        Settings.max_attempts,
        "Replicas one request may try before it fails.",
    ),
    (
        "--scrape-interval",
        click.FloatRange(min=0.05),
        1.0,
        "Seconds between scrapes of the replicas' /metrics.",
    ),
    (
        "--drain-timeout",
        click.FloatRange(min=0),
        25.0,
        "Seconds requests in flight get to finish after SIGTERM.",
    ),
    (
        "--hold-timeout",
        click.FloatRange(min=0),
        Settings.hold_timeout_s,
        "Seconds a request waits for a ready replica when there is none (0: a 503 at once).",
    ),
    ("--max-held", click.IntRange(min=0), Settings.max_held, "Requests that may wait for a replica at once."),
)


def tuning_options(command: Callable[..., None]) -> Callable[..., None]:
    """`command` with an option for each row of TUNING."""
    for flag, kind, default, text in reversed(TUNING):
        command = click.option(flag, type=kind, default=default, show_default=True, help=text)(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Kiln's router: prompt-prefix-affine, load-aware routing over an OpenAI-compatible API."""


@main.command()
@click.option("--service", help="Route to the ready endpoints of this Service (its EndpointSlices).")
@click.option("--namespace", help="The Service's namespace.")
@click.option("--port-name", default="http", show_default=True, help="The Service port to route to.")
@click.option("--endpoints", help="Route to these replicas instead: http://host:port,... (tests, benches).")
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@tuning_options
@click.option("--log-level", default="info", show_default=True)
def serve(
    service: str | None,
    namespace: str | None,
    port_name: str,
    endpoints: str | None,
    host: str,
    port: int,
    block_chars: int,
    affinity_blocks: int,
    max_queue: float,
    max_kv_usage: float,
    load_factor: float,
    max_attempts: int,
    scrape_interval: float,
    drain_timeout: float,
    hold_timeout: float,
    max_held: int,
    log_level: str,
) -> None:
    """Serve /v1/completions, /v1/chat/completions, /v1/models, /health, /ready and /metrics."""
    if bool(endpoints) == bool(service):
        raise click.UsageError("give either --service (with --namespace) or --endpoints")
    if service and not namespace:
        raise click.UsageError("--service needs --namespace")
    try:
        urls = parse_endpoints(endpoints) if endpoints else []
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--endpoints") from e
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    policy = Policy(
        block_chars=block_chars,
        affinity_blocks=affinity_blocks,
        max_queue=max_queue,
        max_kv_usage=max_kv_usage,
        load_factor=load_factor,
    )
    replicas = Replicas(interval=scrape_interval)
    replicas.set_endpoints(urls)
    settings = Settings(
        policy=policy, max_attempts=max_attempts, hold_timeout_s=hold_timeout, max_held=max_held
    )
    router = Router(replicas, settings)
    app = router.app()
    if service:
        assert namespace is not None
        app.on_startup.append(_watch(service, namespace, port_name, replicas))
    web.run_app(app, host=host, port=port, shutdown_timeout=drain_timeout, access_log=None, print=None)


def _watch(service: str, namespace: str, port_name: str, replicas: Replicas):  # type: ignore[no-untyped-def]
    """An on_startup hook that follows the Service's EndpointSlices into the replica set."""

    async def start(app: web.Application) -> None:
        loop = asyncio.get_running_loop()

        def publish(urls: set[str]) -> None:
            loop.call_soon_threadsafe(replicas.set_endpoints, urls)

        watch = EndpointSliceWatch(service, namespace, port_name, publish)
        watch.start()
        app.on_cleanup.append(lambda _: _stop(watch))

    return start


async def _stop(watch: EndpointSliceWatch) -> None:
    watch.stop()


if __name__ == "__main__":
    main()
