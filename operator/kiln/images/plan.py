"""Pure decisions of the image builds: which images, their tags, the base image's cache key, the
buildah and podman command lines, and what the checks conclude from what they observed."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONTROL_PLANE = "kiln"
ENGINE = "kiln-engine"
# Workload kinds whose pod template the chart renders.
WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "Job"}


@dataclass(frozen=True)
class Image:
    """One image to build: its short name, Dockerfile (relative to the repo root) and full tag."""

    name: str
    dockerfile: str
    tag: str

    @property
    def file_stem(self) -> str:
        """The tag with path and tag separators made file-safe."""
        return re.sub(r"[/:@]", "_", self.tag)

    @property
    def archive_name(self) -> str:
        """The image archive's file name (what `ctr images import` reads)."""
        return self.file_stem + ".docker.tar"


@dataclass(frozen=True)
class Base:
    """The Debian rootfs every image starts from, made by mmdebstrap (stands in for debian:bookworm-slim)."""

    suite: str = "bookworm"
    variant: str = "minbase"
    mirrors: tuple[str, ...] = (
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    )

    @property
    def key(self) -> str:
        """Changes whenever an input of mmdebstrap does, so a cached rootfs is reused only if still right."""
        inputs = json.dumps([self.suite, self.variant, list(self.mirrors)])
        return hashlib.sha256(inputs.encode()).hexdigest()[:12]

    @property
    def tag(self) -> str:
        return f"localhost/kiln-base:{self.suite}-{self.key}"

    @property
    def tarball_name(self) -> str:
        return f"base-{self.suite}-{self.key}.tar"

    def mmdebstrap_command(self, output: Path) -> list[str]:
        return [
            "mmdebstrap",
            f"--variant={self.variant}",
            "--format=tar",
            self.suite,
            str(output),
            *self.mirrors,
        ]


def images(chart_yaml: Mapping[str, Any], chart_values: Mapping[str, Any], engine_image: str) -> list[Image]:
    """The images the chart and the operator reference, tagged exactly as they reference them.

    The control-plane tag is the chart's default (`image.repository:appVersion`); the engine's is the
    operator's default for the torch backend.
    """
    repository = chart_values.get("image", {}).get("repository")
    app_version = chart_yaml.get("appVersion")
    if not repository or not app_version:
        raise ValueError("charts/kiln: values.yaml needs image.repository and Chart.yaml needs appVersion")
    return [
        Image(CONTROL_PLANE, "Dockerfile", f"{repository}:{app_version}"),
        Image(ENGINE, "engine-image/Dockerfile.torch", engine_image),
    ]


def select(all_images: list[Image], names: Iterable[str]) -> list[Image]:
    """The images named (all when none are); an unknown name is an error that lists the known ones."""
    wanted = list(names)
    known = {image.name: image for image in all_images}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ValueError(f"unknown image {', '.join(unknown)}: choose from {', '.join(known)}")
    return [known[name] for name in wanted] if wanted else list(all_images)


def storage_flags(storage: Path | None) -> list[str]:
    """buildah/podman global flags for a separate containers-storage (None: the system's)."""
    if storage is None:
        return []
    return ["--root", str(storage / "root"), "--runroot", str(storage / "run")]


# Where the build's RUN steps see the host's CA bundle (pip trusts it through PIP_CERT).
BUILD_CA_PATH = "/run/kiln-build-ca.pem"


def build_command(
    image: Image, base_tag: str, context: Path, storage: Path | None, ca_bundle: Path | None
) -> list[str]:
    """`buildah build` for one image: cached layers, host network (apt and PyPI), the base as an ARG."""
    command = [
        "buildah",
        *storage_flags(storage),
        "build",
        "--layers",
        "--pull=false",
        "--network=host",
        f"--file={context / image.dockerfile}",
        f"--tag={image.tag}",
        f"--build-arg=BASE_IMAGE={base_tag}",
    ]
    if ca_bundle is not None:
        command += [f"--volume={ca_bundle}:{BUILD_CA_PATH}:ro", f"--build-arg=PIP_CERT={BUILD_CA_PATH}"]
    return [*command, str(context)]


def archive_command(image: Image, archive: Path, storage: Path | None) -> list[str]:
    """Write the image as a docker-archive named by its tag. Its layers are plain tars: writing one
    takes seconds where buildah 1.28 gzips every layer of an oci-archive again (minutes for the
    engine's 5 GiB torch layer), and `ctr images import` names the image by its RepoTags."""
    return ["buildah", *storage_flags(storage), "push", image.tag, f"docker-archive:{archive}:{image.tag}"]


def run_command(tag: str, storage: Path | None, args: list[str], entrypoint: str | None = None) -> list[str]:
    """`podman run` the way the pods run it: no network, read-only root, /tmp a tmpfs, the image's user."""
    command = [
        "podman",
        *storage_flags(storage),
        "run",
        "--rm",
        "--network=none",
        "--read-only",
        "--tmpfs=/tmp",
    ]
    if entrypoint is not None:
        command.append(f"--entrypoint={entrypoint}")
    return [*command, tag, *args]


def image_uid(user: str) -> int:
    """The uid of an image's USER; only a numeric uid lets the kubelet verify runAsNonRoot."""
    uid = user.split(":", 1)[0]
    if not uid.isdigit():
        raise ValueError(f"image USER {user!r} is not a numeric uid (the kubelet cannot verify runAsNonRoot)")
    return int(uid)


@dataclass(frozen=True)
class PodUser:
    """One container of a rendered workload: its image and the uid its pod runs it as."""

    workload: str
    image: str
    run_as_user: int | None


def pod_users(manifests: Iterable[Mapping[str, Any] | None]) -> list[PodUser]:
    """Every container of every workload in rendered manifests, with its effective runAsUser."""
    found = []
    for manifest in manifests:
        if not manifest or manifest.get("kind") not in WORKLOAD_KINDS:
            continue
        spec = manifest["spec"]
        pod = (spec.get("jobTemplate", {}).get("spec", spec))["template"]["spec"]
        pod_uid = (pod.get("securityContext") or {}).get("runAsUser")
        for container in pod.get("initContainers", []) + pod["containers"]:
            uid = (container.get("securityContext") or {}).get("runAsUser", pod_uid)
            workload = f"{manifest['kind']}/{manifest['metadata']['name']}/{container['name']}"
            found.append(PodUser(workload, container["image"], uid))
    return found


def user_problems(image: Image, uid: int, expected_uid: int, chart: list[PodUser]) -> list[str]:
    """What disagrees between an image's user, the operator's runAsUser and the chart's pods."""
    problems = []
    if uid == 0:
        problems.append(f"{image.tag} runs as root")
    if uid != expected_uid:
        problems.append(f"{image.tag} runs as uid {uid}, the operator's pods as runAsUser {expected_uid}")
    for pod in chart:
        if pod.image == image.tag and pod.run_as_user != uid:
            problems.append(
                f"chart {pod.workload} runs {image.tag} as runAsUser {pod.run_as_user}, image uid {uid}"
            )
    return problems


def chart_image_problems(chart: list[PodUser], built: Iterable[Image]) -> list[str]:
    """Chart containers whose image is not one of the images built (the chart would deploy something else)."""
    tags = {image.tag for image in built}
    return [
        f"chart {pod.workload} uses {pod.image}, which is not built" for pod in chart if pod.image not in tags
    ]


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def table(rows: list[list[str]]) -> str:
    """Left-aligned columns, the first row a header."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )
