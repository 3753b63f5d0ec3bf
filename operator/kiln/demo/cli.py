"""`kiln demo`: local cluster, Kiln from its Helm chart, the tiny model built, served and autoscaled."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType

import click

from kiln.demo.manifests import service_url
from kiln.demo.stack import CLIENT_POD, NODE, Stack, repo_root
from kiln.demo.steps import DemoError, Progress, StepFailed, clock
from kiln.demo.story import (
    Story,
    apply_example,
    ask_in_cluster,
    autoscale,
    fmt_ms,
    show_resources,
    wait_serving,
    watch_engine_build,
)
from kiln.local import cluster
from kiln.local.build import bin_dir

STEPS = 12


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM: tear down exactly as on Ctrl-C


@click.command()
@click.option("--keep", is_flag=True, help="Leave the cluster and the model running at the end.")
@click.option("--down", is_flag=True, help="Stop a demo left running by --keep, then exit.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cluster folder; default: the local cluster's (.kiln/local), so `kiln local status` sees it.",
)
@click.option(
    "--manifest",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="LLMDeployment to apply; default: examples/tiny-cpu.yaml.",
)
@click.option(
    "--rebuild-images",
    is_flag=True,
    help="Run `kiln images build` even when the image archives exist (a warm build redoes only what "
    "changed in the checkout); by default it runs only when one is missing.",
)
@click.option("--concurrency", default=32, show_default=True, help="Concurrent clients in the burst.")
@click.option("--no-load", is_flag=True, help="Skip the autoscaling act.")
def demo(
    keep: bool,
    down: bool,
    directory: Path | None,
    manifest: Path | None,
    rebuild_images: bool,
    concurrency: int,
    no_load: bool,
) -> None:
    """Show Kiln end to end on this machine (no GPU needed): build, serve, answer, autoscale."""
    folder = (directory or cluster.default_dir()).resolve()
    if down:
        stopped = Stack(folder).stop_recorded()
        click.echo(f"stopped {', '.join(stopped) if stopped else 'nothing (no demo running)'} in {folder}")
        return
    if os.geteuid() != 0:
        raise click.ClickException(
            "kiln demo needs root: its real node runs containerd and creates network links"
        )
    try:
        manifest = manifest or repo_root() / "examples" / "tiny-cpu.yaml"
    except DemoError as error:
        raise click.ClickException(str(error)) from error
    signal.signal(signal.SIGTERM, _terminate)
    progress = Progress(total=STEPS if keep else STEPS + 1, echo=click.echo)
    stack = Stack(folder, progress.info)
    failed: StepFailed | None = None
    result = None
    story: Story | None = None
    try:
        with progress.step(
            "Build or reuse the local cluster's binaries (control plane, kubelet, containerd, ...)"
        ):
            progress.info(f"in {stack.build_binaries()}")
        with progress.step("Build or reuse Kiln's images (control plane, engine)"):
            archives = stack.build_images(always=rebuild_images)
            for archive in archives:
                progress.info(f"{archive} ({archive.stat().st_size / 1e9:.2f} GB)")
        with progress.step(f"Start the local cluster with its real node ({NODE}: kubelet, containerd, runc)"):
            state = stack.start_cluster()
            progress.info(f"export KUBECONFIG={state.kubeconfig}")
        with progress.step(f"Import the images into {NODE}'s containerd"):
            imported = stack.import_images(archives)
            progress.info(
                f"imported {len(imported)}; the others were there already: {stack.node.containerd_root}"
            )
        with progress.step("Create the model and engine-cache volumes"):
            stack.create_volumes()
            progress.info(f"PVC kiln-models -> {repo_root() / 'examples'} (hostPath PV)")
            progress.info(f"PVC kiln-engine-cache -> {stack.cache_dir} (hostPath PV)")
        with progress.step(
            "Install Kiln with its Helm chart (operator and autoscaler pods on the real node)"
        ):
            for line in stack.install_kiln():
                progress.info(line)
        with progress.step(f"Apply {manifest.name}"):
            story = Story(stack, manifest)
            apply_example(story, progress)
        with progress.step(f"Build the engine (LLMEngine → build Job in the engine image on {NODE})"):
            watch_engine_build(story, progress)
        with progress.step("Wait for the serving pod"):
            wait_serving(story, progress)
        with progress.step("Ask the model through its Service by DNS name, from a pod in the cluster"):
            ask_in_cluster(story, progress)
        with progress.step("kubectl get llmdeployments"):
            show_resources(story, progress)
        with progress.step("Burst of load: the autoscaler adds a replica, TTFT falls back"):
            if no_load:
                progress.info("skipped (--no-load)")
            else:
                result = autoscale(story, progress, concurrency=concurrency)
    except StepFailed as error:
        failed = error
    except KeyboardInterrupt:
        failed = StepFailed(progress.number, progress.current or "between steps", "interrupted (Ctrl-C)")

    if failed is not None:
        click.echo(f"\nFAILED at step {failed.number} ({failed.step}):\n{failed.detail}", err=True)
        tails = stack.log_tails()
        if tails:
            click.echo(f"\n{tails}", err=True)
    elif story is not None:
        _summary(story, result, folder, keep)

    teardown = teardown_command(directory)
    if keep:
        click.echo(f"\n--keep: everything is still running. Tear down with:\n  {teardown}")
    else:
        try:
            with progress.step("Tear down"):
                leftovers = stack.stop()
                if leftovers:
                    progress.info(f"killed {len(leftovers)} container processes the node left: {leftovers}")
        except StepFailed as error:
            click.echo(f"tear down failed: {error.detail}; try: {teardown}", err=True)
            failed = failed or error
        if failed is None:
            click.echo(f"\n(after `bash e2e/demo.sh --keep`, tear down with: {teardown})")
    click.echo(f"\ntotal wall time {clock(progress.elapsed())} ({progress.elapsed():.0f} s)")
    if failed is not None:
        sys.exit(1)


def _summary(story: Story, result: object, folder: Path, keep: bool) -> None:
    from kiln.demo.story import AutoscaleResult

    click.echo("\n=== Kiln demo: done")
    click.echo(f"model answer: {story.answer!r}")
    if isinstance(result, AutoscaleResult):
        target = story.ttft_target_ms
        click.echo(
            f"TTFT p50 (engine metrics; target {target:.0f} ms): "
            f"before {fmt_ms(result.ttft_before_ms)}"
            f" | during burst {fmt_ms(result.ttft_during_ms)} | after scale-up "
            f"{fmt_ms(result.ttft_after_ms)}"
        )
        click.echo(
            f"replicas {result.replicas_before} -> {result.replicas_after} after "
            f"{result.scaled_after_s or 0:.0f} s of load; {result.stats.ok} requests answered, "
            f"{result.stats.failed} failed"
        )
        if result.ttft_after_ms is not None and result.ttft_after_ms > target:
            click.echo(
                "note: TTFT p50 stayed above target after scale-up (this machine is busy; "
                "try --concurrency lower)"
            )
    click.echo(
        "\nTalk to the model" + ("" if keep else " (run `bash e2e/demo.sh --keep` to leave it up)") + ":"
    )
    for line in talk_lines(story, folder):
        click.echo(f"  {line}")


def talk_lines(story: Story, folder: Path) -> list[str]:
    """Shell lines that ask the model what the demo asked, from a pod and from this machine."""
    body = (
        f'{{"model": "{story.served_name}", "prompt": "<|bos|><|user|>\\nWhat is Kiln?<|end|>\\n'
        f'<|assistant|>\\n", "max_tokens": 48, "stop": ["<|end|>"]}}'
    )
    url = service_url(story.service, story.namespace, story.port, "/v1/completions")
    lines = [
        f"export KUBECONFIG={folder / 'kubeconfig'} PATH={bin_dir()}:$PATH",
        "# from a pod in the cluster, by the Service's DNS name:",
        f"kubectl exec {CLIENT_POD} -- wget -q -O - --header 'Content-Type: application/json' "
        f"--post-data '{body}' {url}",
    ]
    if story.cluster_ip:
        lines += [
            "# from this machine, through kube-proxy's rules for the Service's ClusterIP:",
            f"curl -s http://{story.cluster_ip}:{story.port}/v1/completions "
            f"-H 'Content-Type: application/json' -d '{body}'",
        ]
    return lines


def teardown_command(directory: Path | None) -> str:
    """`kiln local down`: it stops the node's pods through its runtime, then everything else."""
    return "kiln local down" + ("" if directory is None else f" --dir {directory.resolve()}")
