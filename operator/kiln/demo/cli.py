"""`kiln demo`: local cluster, Kiln from its Helm chart, the tiny model built, served and autoscaled."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType

import click

from kiln.demo.stack import Controllers, Stack, repo_root
from kiln.demo.steps import DemoError, Progress, StepFailed, clock
from kiln.demo.story import (
    Story,
    apply_example,
    ask,
    autoscale,
    fmt_ms,
    show_resources,
    wait_serving,
    watch_engine_build,
)
from kiln.local import cluster
from kiln.local.build import bin_dir

STEPS = 11


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
    "--controllers",
    type=click.Choice(["auto", "chart", "local"]),
    default="auto",
    show_default=True,
    help="Where the operator and autoscaler run: the chart's pods, local subprocesses, or the "
    "chart's pods with a fallback to subprocesses.",
)
@click.option("--concurrency", default=32, show_default=True, help="Concurrent clients in the burst.")
@click.option("--no-load", is_flag=True, help="Skip the autoscaling act.")
def demo(
    keep: bool,
    down: bool,
    directory: Path | None,
    manifest: Path | None,
    controllers: Controllers,
    concurrency: int,
    no_load: bool,
) -> None:
    """Show Kiln end to end on this machine (no GPU needed): build, serve, answer, autoscale."""
    folder = (directory or cluster.default_dir()).resolve()
    if down:
        stopped = Stack(folder).stop_recorded()
        click.echo(f"stopped {', '.join(stopped) if stopped else 'nothing (no demo running)'} in {folder}")
        return
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
        with progress.step("Build or reuse the control-plane binaries (etcd, kube-apiserver, ..., helm)"):
            progress.info(f"in {stack.build_binaries()}")
        with progress.step("Start the local cluster (etcd, kube-apiserver, controller-manager, scheduler)"):
            state = stack.start_cluster()
            progress.info(f"export KUBECONFIG={state.kubeconfig}")
        with progress.step("Start the process node (its pods run as local processes)"):
            progress.info(f"node {stack.start_process_node()} Ready; log {stack.log('process-node')}")
        with progress.step("Create the model and engine-cache volumes"):
            stack.create_volumes()
            progress.info(f"PVC kiln-models -> {repo_root() / 'examples'} (hostPath PV)")
            progress.info(f"PVC kiln-engine-cache -> {stack.cache_dir} (hostPath PV)")
        with progress.step("Install Kiln with its Helm chart"):
            mode = stack.install_kiln(controllers)
            where = "as pods of the chart" if mode == "chart" else "as local subprocesses (fallback)"
            progress.info(f"operator and autoscaler running {where}")
        story = Story(stack, manifest)
        with progress.step(f"Apply {manifest.name}"):
            apply_example(story, progress)
        with progress.step("Build the engine (LLMEngine → build Job on the process node)"):
            watch_engine_build(story, progress)
        with progress.step("Wait for the serving pod"):
            wait_serving(story, progress)
        with progress.step("Ask the model through its Service"):
            ask(story, progress)
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

    if keep:
        click.echo(
            f"\n--keep: the cluster is still up. Tear down with: kiln demo --down"
            f"{'' if directory is None else f' --dir {folder}'}"
        )
    else:
        with progress.step("Tear down"):
            leftovers = stack.stop()
            if leftovers:
                progress.info(f"killed {len(leftovers)} processes that outlived SIGTERM: {leftovers}")
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
    if keep:
        kubeconfig = folder / "kubeconfig"
        path = (
            f"/api/v1/namespaces/{story.namespace}/services/{story.service}:{story.port}/proxy/v1/completions"
        )
        click.echo("\nTalk to the model:")
        click.echo(f"  export KUBECONFIG={kubeconfig}")
        click.echo(f"  export PATH={bin_dir()}:$PATH   # kubectl, helm")
        click.echo("  kubectl proxy --port=8001 &")
        click.echo(
            f"  curl -s http://127.0.0.1:8001{path} -H 'Content-Type: application/json' -d "
            f'\'{{"model": "{story.served_name}", "prompt": "<|bos|><|user|>\\nWhat is Kiln?<|end|>\\n'
            f'<|assistant|>\\n", "max_tokens": 48, "stop": ["<|end|>"]}}\''
        )
        if story.endpoints:
            click.echo(f"  (or straight to a pod: {story.endpoints[0]}/v1/completions)")
    else:
        click.echo(
            "\nRun `bash e2e/demo.sh --keep` to leave the model up and talk to it "
            "(`kiln demo --down` tears it down)."
        )
