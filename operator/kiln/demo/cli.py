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
        with progress.step(f"Apply {manifest.name}"):
            story = Story(stack, manifest)
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

    teardown = teardown_command(stack, directory)
    if keep:
        click.echo(f"\n--keep: everything is still running. Tear down with:\n  {teardown}")
    else:
        try:
            with progress.step("Tear down"):
                leftovers = stack.stop()
                if leftovers:
                    progress.info(f"killed {len(leftovers)} processes that outlived SIGTERM: {leftovers}")
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
    """Shell lines that ask the model what the demo asked, the way the demo reached it."""
    body = (
        f'{{"model": "{story.served_name}", "prompt": "<|bos|><|user|>\\nWhat is Kiln?<|end|>\\n'
        f'<|assistant|>\\n", "max_tokens": 48, "stop": ["<|end|>"]}}'
    )
    pod = story.endpoints[0] if story.endpoints else None
    if story.route != "service-proxy" and pod:
        return [f"curl -s {pod}/v1/completions -H 'Content-Type: application/json' -d '{body}'"]
    path = f"/api/v1/namespaces/{story.namespace}/services/{story.service}:{story.port}/proxy/v1/completions"
    lines = [
        f"export KUBECONFIG={folder / 'kubeconfig'} PATH={bin_dir()}:$PATH",
        "kubectl proxy --port=8001 &",
        f"curl -s http://127.0.0.1:8001{path} -H 'Content-Type: application/json' -d '{body}'",
    ]
    if pod:
        lines.append(f"# or straight to a serving pod: {pod}/v1/completions")
    return lines


def teardown_command(stack: Stack, directory: Path | None) -> str:
    """`kiln local down` when it stops everything, else `kiln demo --down` (it also stops the
    processes the demo started itself)."""
    where = "" if directory is None else f" --dir {stack.directory}"
    own = stack.controllers_mode == "local" or not stack.node_in_cluster
    return f"kiln demo --down{where}" if own else f"kiln local down{where}"
