"""Builds Kiln's images on this machine with buildah (no Docker): the mmdebstrap base once per input
change, each Dockerfile with cached layers, then an image archive per image for containerd nodes."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kiln.images import plan
from kiln.render.common import Settings

Say = Callable[[str], None]


class ImageError(Exception):
    """A build or check step failed; the message says which and why."""


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/kiln/images` (default `~/.cache/kiln/images`), or `$KILN_IMAGES_CACHE` when set."""
    override = os.environ.get("KILN_IMAGES_CACHE")
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kiln" / "images"


def repo_images(root: Path) -> list[plan.Image]:
    """The images this checkout's chart and operator reference."""
    chart = root / "charts" / "kiln"
    chart_yaml = yaml.safe_load((chart / "Chart.yaml").read_text())
    values = yaml.safe_load((chart / "values.yaml").read_text())
    return plan.images(chart_yaml, values, Settings().image_for("torch"))


def host_ca_bundle() -> Path | None:
    """The CA bundle this host's own pip trusts (it may include a TLS-intercepting proxy's CA)."""
    for candidate in (
        os.environ.get("PIP_CERT"),
        os.environ.get("SSL_CERT_FILE"),
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def stream(command: list[str], say: Say, env: dict[str, str] | None = None) -> None:
    """Run a command, echoing each output line with the seconds elapsed; raise with its tail on failure."""
    started = time.monotonic()
    tail: list[str] = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            tail = [*tail[-30:], line]
            say(f"  [{time.monotonic() - started:6.0f}s] {line}")
    if process.returncode != 0:
        raise ImageError(f"`{' '.join(command[:4])} ...` exited {process.returncode}:\n" + "\n".join(tail))


def capture(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ImageError(f"`{' '.join(command)}` exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def image_exists(tag: str, storage: Path | None) -> bool:
    command = ["buildah", *plan.storage_flags(storage), "inspect", "--type=image", tag]
    return subprocess.run(command, capture_output=True, check=False).returncode == 0


def image_id(tag: str, storage: Path | None) -> str:
    command = [
        "buildah",
        *plan.storage_flags(storage),
        "inspect",
        "--type=image",
        "--format={{.FromImageID}}",
        tag,
    ]
    return capture(command).strip()


def ensure_base(base: plan.Base, cache: Path, storage: Path | None, say: Say) -> None:
    """The base image in containers-storage: kept if there, else imported from the cached rootfs,
    else made by mmdebstrap (about 2 minutes)."""
    if image_exists(base.tag, storage):
        say(f"base {base.tag}: present")
        return
    tarball = cache / base.tarball_name
    if not tarball.is_file():
        if shutil.which("mmdebstrap") is None:
            raise ImageError("mmdebstrap is not installed: run `bash e2e/system-packages.sh` as root")
        say(f"base: mmdebstrap {base.suite} ({base.variant}) -> {tarball}")
        partial = tarball.with_suffix(".partial")
        stream(base.mmdebstrap_command(partial), say)
        partial.rename(tarball)
    say(f"base: importing {tarball.name} as {base.tag}")
    capture(["podman", *plan.storage_flags(storage), "import", str(tarball), base.tag])


@dataclass(frozen=True)
class Built:
    """One image built: its tag, image id, archive and how long its build and archive took."""

    image: plan.Image
    image_id: str
    archive: Path
    build_seconds: float
    archive_seconds: float

    def report(self) -> dict[str, Any]:
        return {
            "tag": self.image.tag,
            "image_id": self.image_id,
            "archive": str(self.archive),
            "archive_bytes": self.archive.stat().st_size,
            "build_seconds": round(self.build_seconds, 1),
            "archive_seconds": round(self.archive_seconds, 1),
        }


def build_image(
    image: plan.Image, root: Path, base: plan.Base, cache: Path, storage: Path | None, say: Say
) -> Built:
    """Build one image with buildah, then (re)write its archive unless it already holds this image."""
    if shutil.which("buildah") is None:
        raise ImageError("buildah is not installed: run `bash e2e/system-packages.sh` as root")
    # buildah keeps RUN --mount=type=cache folders (pip's downloads) under $TMPDIR: keep them in the cache.
    env = {**os.environ, "TMPDIR": str(cache / "tmp")}
    (cache / "tmp").mkdir(parents=True, exist_ok=True)
    say(f"{image.name}: buildah build -f {image.dockerfile} -t {image.tag}")
    started = time.monotonic()
    stream(plan.build_command(image, base.tag, root, storage, host_ca_bundle()), say, env)
    build_seconds = time.monotonic() - started
    built_id = image_id(image.tag, storage)
    archive = cache / image.archive_name
    stamp = archive.with_suffix(".id")
    started = time.monotonic()
    if archive.is_file() and stamp.is_file() and stamp.read_text() == built_id:
        say(f"{image.name}: {archive} is current")
    else:
        say(f"{image.name}: writing {archive}")
        partial = archive.with_suffix(".partial")
        # The old archive goes first: keeping it while the new one is written doubled the peak disk
        # use (the engine's is 6.7 GB), and a CI run ran out of space in that write.
        for stale in (partial, archive, stamp):
            stale.unlink(missing_ok=True)
        stream(plan.archive_command(image, partial, storage), say, env)
        partial.rename(archive)
        stamp.write_text(built_id)
    return Built(image, built_id, archive, build_seconds, time.monotonic() - started)


def build_all(
    root: Path, names: tuple[str, ...], cache: Path, storage: Path | None, say: Say
) -> tuple[list[Built], float]:
    """The base, then each selected image; returns what was built and the base's seconds.

    Concurrent builds (tests/run.sh's background build and a test that needs the images) take
    turns on a lock file; the second one then finds every layer cached.
    """
    selected = plan.select(repo_images(root), names)
    cache.mkdir(parents=True, exist_ok=True)
    base = plan.Base()
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.monotonic()
        ensure_base(base, cache, storage, say)
        base_seconds = time.monotonic() - started
        return [build_image(image, root, base, cache, storage, say) for image in selected], base_seconds


def write_report(path: Path, built: list[Built], base_seconds: float, total_seconds: float) -> None:
    report = {
        "command": " ".join(["kiln", *sys.argv[1:]]),
        "base_seconds": round(base_seconds, 1),
        "total_seconds": round(total_seconds, 1),
        "images": {item.image.name: item.report() for item in built},
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
