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
import time
from pathlib import Path

import pytest

from kiln.images import plan
from kiln.images.build import cache_dir, repo_images
from kiln.local import build
from kiln.local.nodeimages import import_archives
from kiln.local.realnode import remove_if_only_sockets

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KILN = Path(sys.executable).parent / "kiln"
HOST_STATE = Path("/run/containerd")


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


def test_control_plane_archive_imports_into_containerd_by_its_tag(tmp_path: Path) -> None:
    """The real node's containerd (a private instance here) names the imported image by the tag the
    chart pulls. Runs after the build above; the engine's archive is the same format, 13x larger."""
    try:
        binaries = build.node_binary_paths()
    except build.BuildError as error:
        pytest.skip(f"the real node's containerd is not built: {error}")
    (image,) = [image for image in repo_images(ROOT) if image.name == plan.CONTROL_PLANE]
    socket = tmp_path / "containerd.sock"
    config = tmp_path / "config.toml"
    config.write_text(
        f'version = 3\nroot = "{tmp_path}/root"\nstate = "{tmp_path}/state"\n[grpc]\naddress = "{socket}"\n'
    )
    ctr = [str(binaries["ctr"]), f"--address={socket}", "--namespace=k8s.io", "images"]
    host_folder_there = HOST_STATE.exists()
    with (tmp_path / "containerd.log").open("w") as log:
        containerd = subprocess.Popen(
            [str(binaries["containerd"]), f"--config={config}"], stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            assert containerd.poll() is None and time.monotonic() < deadline, (
                tmp_path / "containerd.log"
            ).read_text()
            time.sleep(0.2)
        # The node's own import (overlayfs, layer blobs discarded once unpacked): the native
        # snapshotter this test used before left 3 GB per run in pytest's kept temp folders.
        import_archives(binaries["ctr"], socket, [cache_dir() / image.archive_name])
        names = subprocess.run([*ctr, "ls", "-q"], check=True, capture_output=True, text=True).stdout.split()
        assert image.tag in names
    finally:
        containerd.terminate()
        containerd.wait(timeout=30)
        shutil.rmtree(tmp_path / "root", ignore_errors=True)
        if not host_folder_there:  # containerd makes it whatever its config says; the real node's
            remove_if_only_sockets(HOST_STATE)  # teardown test counts what is left there
