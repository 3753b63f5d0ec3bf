"""`kiln images`: build Kiln's container images with buildah and check them (development tooling)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from kiln import paths
from kiln.images import build, check

NAMES = click.Choice(["kiln", "kiln-engine"])
STORAGE_HELP = "A separate containers-storage folder (default: the system's, /var/lib/containers)."


def _root() -> Path:
    root = paths.repo_root()
    if root is None:
        raise click.ClickException(
            "`kiln images` builds from a source checkout; this kiln is installed from a wheel"
        )
    return root


@click.group()
def images() -> None:
    """Build and check Kiln's container images (buildah; no Docker)."""


@images.command("build")
@click.option(
    "--image", "names", type=NAMES, multiple=True, help="Only this image (repeatable; default: all)."
)
@click.option("--check", "then_check", is_flag=True, help="Then run `kiln images check` on them.")
@click.option(
    "--cache-dir", type=click.Path(path_type=Path), default=None, help="Default: ~/.cache/kiln/images."
)
@click.option("--storage", type=click.Path(path_type=Path), default=None, help=STORAGE_HELP)
@click.option(
    "--report", type=click.Path(path_type=Path), default=None, help="Write timings and sizes as JSON."
)
def build_command(
    names: tuple[str, ...],
    then_check: bool,
    cache_dir: Path | None,
    storage: Path | None,
    report: Path | None,
) -> None:
    """Build the control-plane and engine images, tagged as the chart and operator expect, into
    containers-storage and as docker-archives under the cache folder (for `ctr images import`)."""
    root, cache = _root(), cache_dir or build.cache_dir()
    started = time.monotonic()
    try:
        built, base_seconds = build.build_all(root, names, cache, storage, click.echo)
        for item in built:
            click.echo(f"{item.image.tag}: built in {item.build_seconds:.0f} s -> {item.archive}")
        if then_check:
            check.check_all(root, names, cache, storage, click.echo)
    except (build.ImageError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    if report is not None:
        build.write_report(report, built, base_seconds, time.monotonic() - started)


@images.command("check")
@click.option(
    "--image", "names", type=NAMES, multiple=True, help="Only this image (repeatable; default: all)."
)
@click.option(
    "--cache-dir", type=click.Path(path_type=Path), default=None, help="Default: ~/.cache/kiln/images."
)
@click.option("--storage", type=click.Path(path_type=Path), default=None, help=STORAGE_HELP)
def check_command(names: tuple[str, ...], cache_dir: Path | None, storage: Path | None) -> None:
    """Run each image's entrypoint with --help (podman, no network, read-only root), check its user
    against the pods' runAsUser, and compile a C extension in the engine image; print sizes."""
    try:
        check.check_all(_root(), names, cache_dir or build.cache_dir(), storage, click.echo)
    except (build.ImageError, ValueError) as error:
        raise click.ClickException(str(error)) from error
