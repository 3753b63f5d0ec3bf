"""`kiln topology-agent`: the DaemonSet program that publishes its node's NVLink islands on the Node."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import click

from kiln.topology.discovery import Discovery
from kiln.topology.publish import dry_run_report, node_patch

log = logging.getLogger("kiln.topology.agent")


def _load_discovery(path: Path | None) -> Discovery:
    if path is not None:
        data = json.loads(path.read_text())
        return Discovery.model_validate(data.get("discovery", data))
    from kiln.topology.nvml import NvmlUnavailable, discover

    try:
        return discover()
    except NvmlUnavailable as error:
        raise click.ClickException(str(error)) from error


def _core_api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CoreV1Api()


def publish(api: Any, node_name: str, discovery: Discovery) -> dict[str, Any]:
    """Patch the Node with what the discovery says; returns the patch sent."""
    node = api.read_node(node_name)
    patch = node_patch(discovery, node.metadata.labels or {})
    api.patch_node(node_name, patch)
    return patch


@click.command("topology-agent")
@click.option("--once", is_flag=True, help="Discover and publish once, then exit.")
@click.option(
    "--interval",
    type=click.FloatRange(min=1.0),
    default=300.0,
    show_default=True,
    help="Seconds between discoveries when running as a DaemonSet.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the full discovery (GPUs, NVLink matrix, islands) and the patch as JSON; touch no cluster.",
)
@click.option(
    "--node-name",
    envvar="NODE_NAME",
    help="The Node to patch (default: $NODE_NAME, set from spec.nodeName by the DaemonSet).",
)
@click.option(
    "--discovery",
    "discovery_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Publish a discovery recorded with --dry-run instead of reading NVML (replay, simulated nodes).",
)
def topology_agent(
    once: bool, interval: float, dry_run: bool, node_name: str | None, discovery_file: Path | None
) -> None:
    """Read this node's GPUs through NVML and publish its NVLink islands as kiln.dev/ labels."""
    logging.basicConfig(level=os.environ.get("KILN_LOG_LEVEL", "INFO"), format="%(asctime)s %(message)s")
    if dry_run:
        click.echo(json.dumps(dry_run_report(_load_discovery(discovery_file)), indent=2))
        return
    if not node_name:
        raise click.ClickException(
            "no node to patch: set NODE_NAME (the DaemonSet's spec.nodeName) or --node-name"
        )
    api = _core_api()
    last: dict[str, Any] | None = None
    while True:
        discovery = _load_discovery(discovery_file)
        try:
            patch = publish(api, node_name, discovery)
        except Exception as error:
            if once:
                raise click.ClickException(f"could not patch node {node_name}: {error}") from error
            # A DaemonSet keeps going: the API server may be briefly unavailable; try next round.
            log.warning("could not patch node %s (retrying in %.0f s): %s", node_name, interval, error)
        else:
            if patch != last:
                log.info("node %s: %s", node_name, json.dumps(patch["metadata"], sort_keys=True))
                last = patch
        if once:
            return
        time.sleep(interval)
