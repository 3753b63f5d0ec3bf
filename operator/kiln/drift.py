"""Drift of the children Kiln applies: the fields of Kiln's rendering that another field manager
(a hand edit with kubectl, another controller) now owns, read from the live object's managedFields.

Server-side apply moves a field to whoever last set it with an update; so a field Kiln renders that
appears in another manager's field set was changed behind Kiln's back, and the next forced apply
takes it back. Fields Kiln does not render (a restart annotation, a label someone adds) are not
drift: Kiln has no value to put back. Pure functions over the live object and the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

Path = tuple[str, ...]  # fieldsV1 keys from the root: ("f:spec", "f:template", ..., 'k:{"name":"engine"}')


@dataclass(frozen=True)
class Drift:
    """Fields of Kiln's rendering that `manager` set (with `operation`, via `subresource` if any)."""

    manager: str
    operation: str
    fields: tuple[str, ...]

    def describe(self) -> str:
        return f"{', '.join(self.fields)} (set by {self.manager})"


def leaf_paths(fields: Mapping[str, Any], prefix: Path = ()) -> Iterator[Path]:
    """Every owned leaf in a fieldsV1 tree ("." marks the node itself and is not a leaf of its own)."""
    for key, child in fields.items():
        if key == ".":
            continue
        path = (*prefix, key)
        if isinstance(child, Mapping) and any(k != "." for k in child):
            yield from leaf_paths(child, path)
        else:
            yield path


def _matches(item: Any, keys: Mapping[str, Any]) -> bool:
    if not isinstance(item, Mapping):
        return False
    # Kubernetes defaults a port's protocol to TCP; a rendering may leave it out.
    return all(item.get(k, "TCP" if k == "protocol" else None) == v for k, v in keys.items())


def resolves(manifest: Any, path: Path) -> bool:
    """Whether a fieldsV1 path names a value the manifest sets."""
    node = manifest
    for key in path:
        kind, _, rest = key.partition(":")
        if kind == "f" and isinstance(node, Mapping) and rest in node:
            node = node[rest]
        elif kind == "k" and isinstance(node, list):
            keys = json.loads(rest)
            node = next((item for item in node if _matches(item, keys)), None)
            if node is None:
                return False
        elif kind == "v" and isinstance(node, list):
            return json.loads(rest) in node
        elif kind == "i" and isinstance(node, list) and rest.isdigit() and int(rest) < len(node):
            node = node[int(rest)]
        else:
            return False
    return True


def readable(path: Path) -> str:
    """`spec.template.spec.containers[name=engine].image` for a fieldsV1 path."""
    parts: list[str] = []
    for key in path:
        kind, _, rest = key.partition(":")
        if kind == "f":
            parts.append(rest)
        elif kind == "k":
            selector = ",".join(f"{k}={v}" for k, v in json.loads(rest).items())
            parts[-1] = f"{parts[-1]}[{selector}]" if parts else f"[{selector}]"
        else:
            parts[-1] = f"{parts[-1]}[{rest}]" if parts else f"[{rest}]"
    return ".".join(parts)


def drifted(live: Mapping[str, Any], manifest: Mapping[str, Any], own_manager: str) -> list[Drift]:
    """What other managers own of the fields `manifest` sets, per manager (status writers aside)."""
    found: list[Drift] = []
    for entry in (live.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") == own_manager or entry.get("subresource") == "status":
            continue
        paths = [p for p in leaf_paths(entry.get("fieldsV1") or {}) if resolves(manifest, p)]
        if paths:
            fields = tuple(dict.fromkeys(readable(p) for p in paths))
            found.append(Drift(str(entry.get("manager")), str(entry.get("operation")), fields))
    return found
