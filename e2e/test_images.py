"""`kiln images build --check` for real: buildah builds the control-plane and engine images from
this checkout, each entrypoint answers --help in a pod-like container, each image runs as the pods'
runAsUser, the engine image compiles a C extension against Python.h, and each image archive names
its image by the tag the chart and operator pull, so a containerd node can import it.

Shares ~/.cache/kiln/images and containers-storage with `kiln demo`: a warm run rebuilds only what
changed (about a minute after a source edit; a cold one downloads torch and takes far longer)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from kiln.images.build import cache_dir, repo_images

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KILN = Path(sys.executable).parent / "kiln"


def archive_repo_tags(archive: Path) -> list[str]:
    """The names a docker-archive gives its images (what `ctr images import` names them by)."""
    with tarfile.open(archive) as tar:
        manifest_file = tar.extractfile("manifest.json")
        assert manifest_file is not None, f"{archive} has no manifest.json"
        manifest = json.load(manifest_file)
    return [tag for entry in manifest for tag in entry["RepoTags"]]


def test_images_build_and_check() -> None:
    missing = [tool for tool in ("buildah", "podman", "mmdebstrap") if shutil.which(tool) is None]
    assert not missing, f"{missing} not installed: run `bash e2e/system-packages.sh` as root"
    done = subprocess.run(
        [str(KILN), "images", "build", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=3600
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    for image in repo_images(ROOT):
        assert image.tag in done.stdout  # the size table lists every image
        archive = cache_dir() / image.archive_name
        assert archive_repo_tags(archive) == [image.tag]
