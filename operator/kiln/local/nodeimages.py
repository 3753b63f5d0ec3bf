"""Tiny images for the real node (sandbox, CoreDNS, an HTTP test server), built with buildah from
Debian's static busybox into oci-archive files, and their import into the node's containerd.

Each image is busybox plus a few files; an archive is cached under `~/.cache/kiln/images/node/`
by a hash of its contents, so a second `up` builds nothing. buildah runs with a throwaway storage
root (vfs driver), so nothing of it stays in /var/lib/containers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static (e2e/system-packages.sh)
# The busybox applets linked into every image: a shell for `kubectl exec`, and the tools tests use.
APPLETS = ("sh", "sleep", "cat", "ls", "echo", "wget", "nslookup", "httpd", "hostname", "env", "ps")
PAUSE_REF = "localhost/kiln/pause:busybox"
TEST_HTTP_PORT = 8080
# containerd's `native` snapshotter copies the whole root file system for every layer: 27 GB for
# the 6.75 GB engine image. overlayfs stores each layer once.
SNAPSHOTTER = "overlayfs"
IMAGE_ID_LABEL = "kiln.dev/image-id"  # on imported images: the archive's image id (see import_archives)


class ImageError(RuntimeError):
    """An image could not be built or imported; the message carries the failing tool's output."""


@dataclass(frozen=True)
class ImageSpec:
    """An image: busybox plus `files` (path in the image -> path on this machine), and its command."""

    ref: str
    entrypoint: tuple[str, ...]
    files: Mapping[str, Path] = field(default_factory=dict)
    # Text files written into the image (path in the image -> content).
    texts: Mapping[str, str] = field(default_factory=dict)


def pause_image() -> ImageSpec:
    """The sandbox image: a process that waits (runc kills it when the pod goes)."""
    return ImageSpec(PAUSE_REF, ("/bin/sleep", "2147483647"))


def coredns_image(coredns: Path) -> ImageSpec:
    """CoreDNS (built by `kiln local build`) on busybox; its Corefile comes from a ConfigMap."""
    return ImageSpec(
        "localhost/kiln/coredns:local", ("/coredns", "-conf", "/etc/coredns/Corefile"), {"coredns": coredns}
    )


def test_http_image() -> ImageSpec:
    """busybox httpd serving /www on TEST_HTTP_PORT: the real node's test workload."""
    return ImageSpec(
        "localhost/kiln/httpd:test",
        ("/bin/httpd", "-f", "-v", "-p", str(TEST_HTTP_PORT), "-h", "/www"),
        texts={"www/index.html": "kiln real node\n"},
    )


def kubectl_image(kubectl: Path) -> ImageSpec:
    """kubectl (built by `kiln local build`) on busybox: an in-cluster API client for tests."""
    return ImageSpec("localhost/kiln/kubectl:local", ("/kubectl",), {"kubectl": kubectl})


def archive_key(spec: ImageSpec) -> str:
    """A hash of everything that goes into the image (file contents included)."""
    digest = hashlib.sha256()
    parts: list[bytes] = [spec.ref.encode(), json.dumps(spec.entrypoint).encode(), BUSYBOX.read_bytes()]
    parts += [*(name.encode() for name in APPLETS)]
    for name, path in sorted(spec.files.items()):
        parts += [name.encode(), path.read_bytes()]
    for name, text in sorted(spec.texts.items()):
        parts += [name.encode(), text.encode()]
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """Where the archives are kept (next to the binary cache)."""
    from kiln.local import build

    return build.cache_root().parent / "images" / "node"


def archive(spec: ImageSpec) -> Path:
    """The oci-archive of `spec`, built with buildah unless already cached."""
    name = spec.ref.rsplit("/", 1)[1].replace(":", "-")
    path = cache_dir() / f"{name}-{archive_key(spec)}.tar"
    if path.exists():
        return path
    if shutil.which("buildah") is None:
        raise ImageError("buildah is not installed (e2e/system-packages.sh installs it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-image-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        _stage(spec, rootfs)
        partial = path.with_suffix(f".partial{path.suffix}")
        _buildah_build(Path(scratch), rootfs, spec, partial)
        partial.replace(path)
    return path


def _stage(spec: ImageSpec, rootfs: Path) -> None:
    """Lay out the image's files in a folder: busybox and its applet links, then the extra files."""
    (rootfs / "bin").mkdir(parents=True)
    for folder in ("etc", "www"):
        (rootfs / folder).mkdir()
    (rootfs / "tmp").mkdir(mode=0o1777)
    (rootfs / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    for name, source in spec.files.items():
        (rootfs / name).parent.mkdir(parents=True, exist_ok=True)  # e.g. a library's folder
        shutil.copy2(source, rootfs / name)
    for name, text in spec.texts.items():
        target = rootfs / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def _buildah_build(scratch: Path, rootfs: Path, spec: ImageSpec, output: Path) -> None:
    buildah = [
        "buildah",
        "--root",
        str(scratch / "storage"),
        "--runroot",
        str(scratch / "run"),
        "--storage-driver",
        "vfs",
    ]
    container = _run([*buildah, "from", "scratch"]).strip()
    try:
        _run([*buildah, "copy", container, f"{rootfs}/", "/"])
        _run([*buildah, "config", "--entrypoint", json.dumps(list(spec.entrypoint)), "--cmd", "", container])
        _run([*buildah, "commit", "--quiet", container, spec.ref])
        _run([*buildah, "push", "--quiet", spec.ref, f"oci-archive:{output}:{spec.ref}"])
    finally:
        subprocess.run([*buildah, "rm", container], capture_output=True, check=False)
        subprocess.run([*buildah, "rmi", "--all", "--force"], capture_output=True, check=False)


def archive_image(path: Path) -> tuple[list[str], str] | None:
    """(tags, image id) of the image a docker-archive holds (`kiln images build` writes those), from
    its manifest.json; None for other archives (the node's own oci-archives)."""
    with contextlib.suppress(tarfile.TarError, KeyError, OSError, ValueError), tarfile.open(path) as tar:
        member = tar.extractfile("manifest.json")
        if member is not None:
            (entry,) = json.load(member)
            return list(entry["RepoTags"]), Path(entry["Config"]).name.removesuffix(".json")
    return None


def image_labels(ctr_ls: str) -> dict[str, str]:
    """Image name -> its IMAGE_ID_LABEL, from `ctr images ls` output (names without it left out)."""
    found = {}
    for line in ctr_ls.splitlines()[1:]:
        fields = line.split()
        for label in fields[-1].split(",") if fields else []:
            key, _, value = label.partition("=")
            if key == IMAGE_ID_LABEL:
                found[fields[0]] = value
    return found


def import_archives(ctr: Path, address: Path, archives: Sequence[Path]) -> list[Path]:
    """Import image archives into containerd's `k8s.io` namespace (the CRI's), unpacked for
    SNAPSHOTTER; the layer blobs go once unpacked. A docker-archive whose image (same tags, same
    id) is already there is skipped; one with a new id replaces the old image. Returns the archives
    imported."""
    ctr_command = [str(ctr), f"--address={address}", "--namespace=k8s.io", "images"]
    present = image_labels(_run([*ctr_command, "ls"]))
    imported = []
    for path in archives:
        image = archive_image(path)
        if image is not None and image[0] and all(present.get(tag) == image[1] for tag in image[0]):
            continue
        label = [f"--label={IMAGE_ID_LABEL}={image[1]}"] if image is not None else []
        if image is not None:
            # The image these tags named before (and the CRI's `sha256:<id>` name for it) would
            # otherwise stay: gigabytes per rebuild of the engine.
            stale = [ref for tag in image[0] if present.get(tag) for ref in (tag, f"sha256:{present[tag]}")]
            if stale:
                subprocess.run([*ctr_command, "rm", *stale], capture_output=True, check=False)
        _run(
            [
                *ctr_command,
                "import",
                "--local",
                f"--snapshotter={SNAPSHOTTER}",
                "--discard-unpacked-layers",
                *label,
                str(path),
            ]
        )
        imported.append(path)
    return imported


def _run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ImageError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return result.stdout
