"""`kiln local`: build, start, inspect and stop the local control plane."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from kiln.local import build as build_module
from kiln.local import cluster, monitoring, netpol, nodeimages, realnode, topology

DIR_OPTION = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cluster folder (state, kubeconfig, logs); default: .kiln/local in the checkout.",
)


def _echo(line: str) -> None:
    click.echo(line)


def _monitoring_toolsets() -> tuple[build_module.Toolset, ...]:
    try:
        return monitoring.toolsets(_echo)
    except monitoring.MonitoringError as error:
        raise click.ClickException(str(error)) from error


def _binaries(real_node: bool = False, with_monitoring: bool = False) -> None:
    """Build whatever binary is missing (a no-op when the cache is warm)."""
    toolsets = (
        build_module.CONTROL_PLANE,
        *(build_module.NODE_TOOLSETS if real_node else ()),
        *(_monitoring_toolsets() if with_monitoring else ()),
    )
    for toolset in toolsets:
        if build_module.missing(build_module.bin_dir(toolset), toolset.binaries):
            try:
                build_module.build(progress=_echo, toolset=toolset)
            except build_module.BuildError as error:
                raise click.ClickException(str(error)) from error


@click.group()
def local() -> None:
    """A local control plane (etcd, kube-apiserver, controller-manager, scheduler, KWOK)."""


@local.command()
@click.option(
    "--real-node", is_flag=True, help="Also build the real node's containerd, CNI plugins, CoreDNS, crictl."
)
@click.option(
    "--monitoring",
    "with_monitoring",
    is_flag=True,
    help="Also build the Prometheus Operator, its config reloader and Prometheus.",
)
@click.option("--s3", "with_s3", is_flag=True, help="Also build MinIO, the S3 server of the S3 tests.")
@click.option(
    "--netpol", "with_netpol", is_flag=True, help="Also build cyclonus, which evaluates NetworkPolicies."
)
def build(real_node: bool, with_monitoring: bool, with_s3: bool, with_netpol: bool) -> None:
    """Build (or reuse) the control-plane binaries from the pinned Go module."""
    try:
        directory = build_module.build(progress=_echo)
        if real_node:
            for toolset in build_module.NODE_TOOLSETS:
                build_module.build(progress=_echo, toolset=toolset)
        if with_monitoring:
            for toolset in _monitoring_toolsets():
                build_module.build(progress=_echo, toolset=toolset)
        if with_s3:
            build_module.build(progress=_echo, toolset=build_module.MINIO)
        if with_netpol:
            build_module.build(progress=_echo, toolset=netpol.TOOLSET)
    except build_module.BuildError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"export PATH={directory}:$PATH   # to run helm, etcd, kwok, ... directly")


@local.command()
@click.option(
    "--topology",
    "topology_name",
    default="mixed",
    show_default=True,
    help=f"Shipped topology ({', '.join(topology.topology_names())}) or a topology YAML file.",
)
@DIR_OPTION
@click.option(
    "--crds",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of CRD YAML files to install; default: Kiln's generated crds/.",
)
@click.option("--timeout", default=90.0, show_default=True, help="Seconds to wait for each component.")
@click.option(
    "--real-node",
    is_flag=True,
    help="Also start a real node (containerd, kubelet, kube-proxy) and cluster DNS; needs root.",
)
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="An oci-archive to import into the real node's containerd (repeatable; needs --real-node).",
)
@click.option(
    "--monitoring",
    "with_monitoring",
    is_flag=True,
    help="Also run the Prometheus Operator and a Prometheus on the real node (needs --real-node).",
)
def up(
    topology_name: str,
    directory: Path | None,
    crds: Path | None,
    timeout: float,
    real_node: bool,
    images: tuple[Path, ...],
    with_monitoring: bool,
) -> None:
    """Start the control plane and create the topology's simulated nodes."""
    started = time.monotonic()
    try:
        topology.read_topology(topology_name)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    if images and not real_node:
        raise click.ClickException("--image needs --real-node: only the real node runs images")
    if with_monitoring and not real_node:
        raise click.ClickException("--monitoring needs --real-node: Prometheus runs there")
    if real_node and os.geteuid() != 0:
        raise click.ClickException("--real-node needs root (it runs containerd and creates network links)")
    _binaries(real_node, with_monitoring)
    local_cluster = cluster.Cluster(directory, topology_name, crds, real_node=real_node)
    try:
        state = local_cluster.start(progress=_echo, timeout=timeout)
        if images:
            try:
                realnode.import_images(local_cluster.directory, list(images))
            except nodeimages.ImageError:
                local_cluster.stop()  # an `up` that fails leaves nothing running
                raise
            _echo(f"imported {len(images)} image archive(s) into the real node")
        if with_monitoring:
            try:
                monitoring.install(
                    local_cluster.directory, state.kubeconfig, progress=_echo, timeout=timeout * 2
                )
            except (monitoring.MonitoringError, nodeimages.ImageError):
                local_cluster.stop()
                raise
            _echo(f"  in-cluster Prometheus (autoscaler.prometheus.url): {monitoring.PROMETHEUS_SERVICE_URL}")
    except (
        cluster.StartError,
        build_module.BuildError,
        realnode.NodeError,
        nodeimages.ImageError,
        monitoring.MonitoringError,
    ) as error:
        raise click.ClickException(str(error)) from error
    click.echo(
        f"\nlocal cluster up in {time.monotonic() - started:.1f} s; logs in {Path(state.directory) / 'logs'}"
    )
    click.echo(f"  export KUBECONFIG={state.kubeconfig}")
    click.echo("  kubectl get nodes -L nvidia.com/gpu.product,nvidia.com/gpu.count")
    click.echo(f"  kiln local down{'' if directory is None else f' --dir {directory}'}")


@local.command()
@DIR_OPTION
def down(directory: Path | None) -> None:
    """Stop every component of the local cluster."""
    local_cluster = cluster.Cluster(directory)
    state = cluster.read_state(local_cluster.directory)
    if state is None:
        click.echo(f"no local cluster recorded in {local_cluster.directory}")
        return
    stopped = [name for name, is_alive in cluster.alive(state).items() if is_alive]
    local_cluster.stop()
    click.echo(f"stopped {', '.join(stopped) if stopped else 'nothing (already stopped)'}")


@local.command()
@DIR_OPTION
def status(directory: Path | None) -> None:
    """Show each component's process, port and log, and the kubeconfig."""
    folder = (directory or cluster.default_dir()).resolve()
    state = cluster.read_state(folder)
    if state is None:
        click.echo(f"no local cluster in {folder}")
        raise SystemExit(1)
    running = cluster.alive(state)
    for name in [
        *cluster.COMPONENTS,
        *(name for name in cluster.REAL_NODE_COMPONENTS if name in state.pids),
    ]:
        pid = state.pids.get(name)
        word = "running" if running.get(name) else "stopped"
        click.echo(f"{name:24} {word:8} pid {pid}  port {state.ports.get(name)}  log {state.log(name)}")
    click.echo(f"topology {state.topology}; export KUBECONFIG={state.kubeconfig}")
    if not all(running.get(name) for name in cluster.COMPONENTS):
        raise SystemExit(1)
    with cluster.admin_client(folder) as client:
        response = client.get(f"{state.server}/api/v1/nodes")
    if response.is_success:
        for line in topology.node_summary(response.json()["items"]):
            click.echo(line)
    else:
        click.echo(f"cannot list nodes: {cluster.api_error(response)}")
