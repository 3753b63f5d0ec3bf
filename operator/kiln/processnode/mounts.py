"""Volumes as host folders, and the path rewriting that stands in for a container's mount namespace.

A process on the process node sees the host's file system, so every `volumeMount` becomes a
mapping mountPath -> host folder, and arguments, env values and the working directory that name a
path under a mountPath are rewritten to the host folder. `/dev/termination-log` (the container's
`terminationMessagePath`) maps to a per-container file the same way. All pure.
"""

from __future__ import annotations

import base64
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.processnode.envvars import EnvError, PodFacts, field_value

DEFAULT_TERMINATION_PATH = "/dev/termination-log"
DEFAULT_MODE = 0o644
# Kiln's engine finds `pvc://claim/path` at `$KILN_PVC_ROOT/claim` (default /mnt/pvc), a path it
# builds itself, so no argument names it: the process node points KILN_PVC_ROOT at the container's
# link tree when claims are mounted there.
PVC_ROOT_ENV = "KILN_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"


@dataclass(frozen=True)
class Mount:
    """One path of the container's view (`container_path`) and where it lives on the host."""

    container_path: str
    host_path: Path


def volume_host_path(
    volume: Mapping[str, Any],
    run_dir: Path,
    state_dir: Path,
    namespace: str,
    claim_paths: Mapping[str, str | None],
) -> Path:
    """The host folder that backs one pod volume.

    `claim_paths` maps a PVC name to the `hostPath`/`local` path of its bound PV (None when the
    claim is unbound or its PV has no host path: it then lives in `<state>/pvcs/<ns>/<claim>`).
    """
    name = volume["name"]
    if "hostPath" in volume:
        return Path(volume["hostPath"]["path"])
    if "persistentVolumeClaim" in volume:
        claim = volume["persistentVolumeClaim"]["claimName"]
        bound = claim_paths.get(claim)
        return Path(bound) if bound else state_dir / "pvcs" / namespace / claim
    # emptyDir, configMap, secret, downwardAPI, projected, ephemeral, ...: a folder of the pod.
    return run_dir / "volumes" / name


def _items(
    data: Mapping[str, bytes], items: Sequence[Mapping[str, Any]] | None, optional: bool, what: str
) -> dict[str, bytes]:
    if not items:
        return dict(data)
    files: dict[str, bytes] = {}
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise EnvError(f"{what}: key {item['key']!r} not found")
        files[item["path"]] = data[item["key"]]
    return files


def _downward_files(items: Sequence[Mapping[str, Any]], facts: PodFacts) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for item in items:
        if "fieldRef" in item:
            files[item["path"]] = field_value(item["fieldRef"]["fieldPath"], facts).encode()
    return files


def volume_files(
    volume: Mapping[str, Any],
    facts: PodFacts,
    config_maps: Mapping[str, Mapping[str, bytes]],
    secrets: Mapping[str, Mapping[str, bytes]],
    tokens: Mapping[str, str] | None = None,
) -> dict[str, bytes] | None:
    """The files a configMap/secret/downwardAPI/projected volume holds (relative path -> bytes).

    None for volumes that are plain folders. `tokens` maps a projected serviceAccountToken's path
    to a token the adapter requested; a token it could not get is left out.
    """

    def source_files(kind: str, source: Mapping[str, Any], name: str) -> dict[str, bytes]:
        objects = config_maps if kind == "configMap" else secrets
        optional = bool(source.get("optional"))
        data = objects.get(name)
        if data is None:
            if optional:
                return {}
            raise EnvError(f'{kind} "{name}" not found in namespace {facts.namespace}')
        return _items(data, source.get("items"), optional, f"{kind} {name}")

    if "configMap" in volume:
        return source_files("configMap", volume["configMap"], volume["configMap"]["name"])
    if "secret" in volume:
        return source_files("secret", volume["secret"], volume["secret"]["secretName"])
    if "downwardAPI" in volume:
        return _downward_files(volume["downwardAPI"].get("items") or [], facts)
    if "projected" in volume:
        files: dict[str, bytes] = {}
        for source in volume["projected"].get("sources") or []:
            if "configMap" in source:
                files.update(source_files("configMap", source["configMap"], source["configMap"]["name"]))
            elif "secret" in source:
                files.update(source_files("secret", source["secret"], source["secret"]["name"]))
            elif "downwardAPI" in source:
                files.update(_downward_files(source["downwardAPI"].get("items") or [], facts))
            elif "serviceAccountToken" in source:
                path = source["serviceAccountToken"]["path"]
                if tokens and path in tokens:
                    files[path] = tokens[path].encode()
        return files
    return None


def file_modes(volume: Mapping[str, Any]) -> tuple[int, dict[str, int]]:
    """The default mode of a volume's files and the per-path modes its `items` ask for."""
    default = DEFAULT_MODE
    modes: dict[str, int] = {}
    for kind in ("configMap", "secret", "downwardAPI", "projected"):
        source = volume.get(kind)
        if not source:
            continue
        if source.get("defaultMode") is not None:
            default = int(source["defaultMode"])
        parts = [source, *((s.get(k) or {}) for s in source.get("sources") or [] for k in s)]
        for part in parts:
            for item in part.get("items") or []:
                if item.get("mode") is not None:
                    modes[item["path"]] = int(item["mode"])
    return default, modes


def decode_data(obj: Mapping[str, Any]) -> dict[str, bytes]:
    """A ConfigMap's or Secret's data as bytes (Secret `data` and `binaryData` are base64)."""
    out: dict[str, bytes] = {}
    is_secret = obj.get("kind") == "Secret" or "type" in obj
    for key, value in (obj.get("data") or {}).items():
        out[key] = base64.b64decode(value) if is_secret else str(value).encode()
    for key, value in (obj.get("stringData") or {}).items():
        out[key] = str(value).encode()
    for key, value in (obj.get("binaryData") or {}).items():
        out[key] = base64.b64decode(value)
    return out


def container_mounts(
    container: Mapping[str, Any], volume_paths: Mapping[str, Path], termination_file: Path
) -> list[Mount]:
    """The container's mounts (subPath applied) plus its termination-message file."""
    mounts = []
    for mount in container.get("volumeMounts") or []:
        base = volume_paths.get(mount["name"])
        if base is None:
            raise EnvError(f"volumeMount {mount['name']!r} names no volume of the pod")
        sub_path = mount.get("subPath") or mount.get("subPathExpr") or ""
        host = base / sub_path if sub_path else base
        mounts.append(Mount(posixpath.normpath(mount["mountPath"]), host))
    path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
    mounts.append(Mount(posixpath.normpath(path), termination_file))
    return mounts


def rewrite_path(value: str, mounts: Sequence[Mount], rootfs: Path | None = None) -> str:
    """`value` with a leading container path replaced by its host path (longest mountPath wins).

    Handles a bare path (`/models/x`) and an option's value (`--model=/models/x`). A folder that
    only holds mounts (`/mnt/pvc` for a mount at `/mnt/pvc/cache`) maps into `rootfs`, the
    container's tree of links to its mounts (see `rootfs_links`), when one is given.
    """
    prefix = ""
    path = value
    if not value.startswith("/") and "=" in value:
        head, _, tail = value.partition("=")
        if tail.startswith("/"):
            prefix, path = head + "=", tail
    if not path.startswith("/"):
        return value
    for mount in sorted(mounts, key=lambda m: len(m.container_path), reverse=True):
        root = mount.container_path
        if path == root:
            return prefix + str(mount.host_path)
        if path.startswith(root.rstrip("/") + "/"):
            return prefix + str(mount.host_path / path[len(root.rstrip("/")) + 1 :])
    if rootfs is not None and path != "/":
        folder = path.rstrip("/") + "/"
        if any(mount.container_path.startswith(folder) for mount in mounts):
            return prefix + str(rootfs / path.strip("/"))
    return value


def rootfs_links(mounts: Sequence[Mount], rootfs: Path) -> dict[Path, Path]:
    """The links that make `rootfs` look like the container's file system: link -> host path.

    A mount inside another mount gets no link (it would land inside the outer mount's host folder).
    """
    links = {}
    for mount in mounts:
        inner = any(
            other.container_path != mount.container_path
            and mount.container_path.startswith(other.container_path.rstrip("/") + "/")
            for other in mounts
        )
        if not inner:
            links[rootfs / mount.container_path.strip("/")] = mount.host_path
    return links


def pvc_root_env(env: Mapping[str, str], mounts: Sequence[Mount]) -> dict[str, str]:
    """KILN_PVC_ROOT for a container that mounts claims under the default root and does not set it."""
    if PVC_ROOT_ENV in env:
        return {}
    if any(m.container_path.startswith(DEFAULT_PVC_ROOT + "/") for m in mounts):
        return {PVC_ROOT_ENV: DEFAULT_PVC_ROOT}
    return {}


def rewrite_argv(argv: Sequence[str], mounts: Sequence[Mount], rootfs: Path | None = None) -> list[str]:
    return [rewrite_path(arg, mounts, rootfs) for arg in argv]


def rewrite_env(
    env: Mapping[str, str], mounts: Sequence[Mount], rootfs: Path | None = None
) -> dict[str, str]:
    return {name: rewrite_path(value, mounts, rootfs) for name, value in env.items()}
