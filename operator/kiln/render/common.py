"""Pieces every renderer shares: settings, labels, owner references, security contexts, storage URIs."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kiln import __version__, labels
from kiln.api.v1alpha1 import API_VERSION

Manifest = dict[str, Any]

PVC_ROOT = "/mnt/pvc"  # the engine maps pvc://claim/path to $KILN_PVC_ROOT/claim/path
TMP_MOUNT = "/tmp"
RUN_AS_USER = 65532  # the engine image's non-root user (distroless "nonroot")
ENGINE_CONTAINER = "engine"
BUILD_CONTAINER = "build"
HTTP_PORT_NAME = "http"  # the autoscaler finds pods' /metrics by this port name
SERVING_COMPONENT = "serving"
BUILD_COMPONENT = "build"
ENGINE_REGISTRY = "ghcr.io/kiln-dev/kiln-engine"
CONTROL_PLANE_REGISTRY = "ghcr.io/kiln-dev/kiln"  # operator, autoscaler, topology agent, router
ROUTER_CLUSTER_ROLE = "kiln-router"  # the chart's ClusterRole for routers (EndpointSlice reads)


@dataclass(frozen=True)
class Settings:
    """Operator-wide choices the renderers need (from `kiln operator run` flags)."""

    runtime_version: str = __version__
    engine_image: str | None = None  # torch backend; default ghcr.io/kiln-dev/kiln-engine:<version>-torch
    engine_image_tensorrt_llm: str | None = None
    pvc_root: str = PVC_ROOT
    lws_installed: bool = False
    router_image: str | None = None  # default ghcr.io/kiln-dev/kiln:<version>, the control-plane image
    router_cluster_role: str = ROUTER_CLUSTER_ROLE

    def image_for(self, backend: str, override: str | None = None) -> str:
        """The engine image for a backend: the spec's override, else the operator's setting."""
        if override:
            return override
        if backend == "tensorrt-llm":
            return self.engine_image_tensorrt_llm or f"{ENGINE_REGISTRY}:{self.runtime_version}-tensorrt-llm"
        return self.engine_image or f"{ENGINE_REGISTRY}:{self.runtime_version}-torch"

    def router_image_name(self) -> str:
        """The image the routers run: the operator's setting, else the control-plane image."""
        return self.router_image or f"{CONTROL_PLANE_REGISTRY}:{self.runtime_version}"


def managed_labels(component: str, **extra: str) -> dict[str, str]:
    """Labels on everything Kiln creates (and that selectors and kopf filters look for)."""
    return {labels.MANAGED_BY: labels.MANAGED_BY_VALUE, labels.COMPONENT_LABEL: component, **extra}


def owner_reference(owner: Mapping[str, Any], controller: bool = True) -> dict[str, Any]:
    """An ownerReference to a Kiln object, so the garbage collector deletes children with it."""
    metadata = owner.get("metadata") or {}
    return {
        "apiVersion": owner.get("apiVersion", API_VERSION),
        "kind": owner["kind"],
        "name": metadata["name"],
        "uid": metadata["uid"],
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def pod_security_context() -> dict[str, Any]:
    """The pod half of the `restricted` Pod Security Standard."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """The container half of the `restricted` Pod Security Standard, with a read-only root."""
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def gpu_toleration() -> dict[str, Any]:
    """GPU nodes carry `nvidia.com/gpu:NoSchedule` (GPU Operator convention, and the local cluster's)."""
    return {"key": labels.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


@dataclass(frozen=True)
class PVCPath:
    """A `pvc://claim/sub/path` location and where a pod sees it."""

    claim: str
    subpath: str
    root: str = PVC_ROOT

    @property
    def mount_path(self) -> str:
        return f"{self.root}/{self.claim}"

    @property
    def local_path(self) -> str:
        return f"{self.mount_path}/{self.subpath}" if self.subpath else self.mount_path

    @property
    def volume_name(self) -> str:
        return f"pvc-{self.claim}"[:63].rstrip("-")


def parse_pvc(uri: str, root: str = PVC_ROOT) -> PVCPath | None:
    """The claim and path of a pvc:// URI; None for other schemes."""
    if not uri.startswith("pvc://"):
        return None
    claim, _, rest = uri.removeprefix("pvc://").partition("/")
    return PVCPath(claim=claim, subpath=rest.strip("/"), root=root)


def join_uri(base: str, *parts: str) -> str:
    """`base` (a pvc:// or s3:// prefix) with path parts appended, one slash between each."""
    return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts if part)])


def pvc_volumes(
    uris: Mapping[str, bool], root: str = PVC_ROOT
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts for the claims behind pvc:// `uris` (uri -> read-only), one per claim.

    A claim named twice is mounted once, writable when any use needs it writable.
    """
    claims: dict[str, bool] = {}
    for uri, read_only in uris.items():
        location = parse_pvc(uri, root)
        if location is not None:
            claims[location.claim] = claims.get(location.claim, True) and read_only
    volumes, mounts = [], []
    for claim, read_only in sorted(claims.items()):
        location = PVCPath(claim, "", root)
        volumes.append(
            {
                "name": location.volume_name,
                "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only},
            }
        )
        mounts.append({"name": location.volume_name, "mountPath": location.mount_path, "readOnly": read_only})
    return volumes, mounts


def local_uri(uri: str, root: str = PVC_ROOT) -> str:
    """What a pod passes on its command line for `uri`: the mounted path for pvc://, else the URI."""
    location = parse_pvc(uri, root)
    return location.local_path if location is not None else uri


def credentials_env(secret: Any | None, source: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """env and envFrom exposing a credentials Secret (a SecretKeyRef model) to a container."""
    if secret is None:
        return [], []
    if secret.key is None:
        return [], [{"secretRef": {"name": secret.name}}]
    name = "HF_TOKEN" if source.startswith("hf://") else secret.key
    return [{"name": name, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}}], []


def deep_merge(base: Any, override: Any) -> Any:
    """`override` merged over `base`: dicts merge key by key; lists of named items (containers,
    env, volumes, ports) merge by name; anything else in `override` replaces `base`."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for key, value in override.items():
            merged[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(override, list) and _named(base) and _named(override):
        by_name = {item["name"]: item for item in base}
        result = [copy.deepcopy(item) for item in base]
        index = {item["name"]: i for i, item in enumerate(result)}
        for item in override:
            if item["name"] in by_name:
                result[index[item["name"]]] = deep_merge(by_name[item["name"]], item)
            else:
                result.append(copy.deepcopy(item))
        return result
    return copy.deepcopy(override)


def _named(items: list[Any]) -> bool:
    return all(isinstance(item, dict) and "name" in item for item in items)


def merge_env(base: list[dict[str, Any]], extra: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Container env with `extra` (the user's) winning over Kiln's for the same name."""
    result: list[dict[str, Any]] = deep_merge(base, list(extra or []))
    return result
