"""`kiln process-node`: run the process-node agent until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

import click

from kiln import paths
from kiln.processnode import restarts
from kiln.processnode.agent import AgentConfig, host_memory, run_agent

DEFAULT_NAME = "kiln-process-node"


def default_state_dir(node_name: str) -> Path:
    return paths.state_dir() / "process-node" / node_name


@click.command("process-node")
@click.option(
    "--kubeconfig",
    envvar="KUBECONFIG",
    default=None,
    help="Kubeconfig (default: $KUBECONFIG, ~/.kube/config).",
)
@click.option(
    "--name", "node_name", default=DEFAULT_NAME, show_default=True, help="Name of the Node to register."
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Pod logs, volumes and certificates; default: .kiln/process-node/<name> in the checkout.",
)
@click.option("--cpu", default=None, help="CPU capacity to report (default: this host's cores).")
@click.option("--memory", default=None, help="Memory capacity to report (default: this host's memory).")
@click.option("--pods", default=110, show_default=True, help="Pod capacity to report.")
@click.option(
    "--kubelet-port",
    default=0,
    show_default=True,
    help="Port of the HTTPS log endpoint (`kubectl logs`); 0 picks a free one, -1 serves none.",
)
@click.option(
    "--pod-cidr",
    default=None,
    help="Pod IP range (default: 10.244.255.0/24 routed to lo when possible, else 127.0.0.0/24).",
)
@click.option(
    "--backoff", default=2.0, show_default=True, help="First crash-loop back-off, seconds (doubles)."
)
@click.option("--backoff-cap", default=60.0, show_default=True, help="Longest crash-loop back-off, seconds.")
@click.option(
    "--shutdown-grace",
    default=8.0,
    show_default=True,
    help="On SIGTERM, longest wait for a pod's processes before SIGKILL.",
)
def process_node(
    kubeconfig: str | None,
    node_name: str,
    state_dir: Path | None,
    cpu: str | None,
    memory: str | None,
    pods: int,
    kubelet_port: int,
    pod_cidr: str | None,
    backoff: float,
    backoff_cap: float,
    shutdown_grace: float,
) -> None:
    """A Node whose pods run as local processes (CPU only; label kiln.dev/process-node=true)."""
    logging.basicConfig(
        level=os.environ.get("KILN_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {node_name} %(levelname)s %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = AgentConfig(
        node_name=node_name,
        state_dir=(state_dir or default_state_dir(node_name)).resolve(),
        kubeconfig=kubeconfig,
        cpu=cpu or str(os.cpu_count() or 1),
        memory=memory or host_memory(),
        pods=pods,
        kubelet_port=kubelet_port,
        pod_cidr=pod_cidr,
        backoff=restarts.Backoff(initial=backoff, cap=backoff_cap),
        shutdown_grace=shutdown_grace,
    )
    click.echo(f"process node {node_name} on {socket.gethostname()}; state in {config.state_dir}", err=True)
    if not asyncio.run(run_agent(config)):
        raise SystemExit(1)
