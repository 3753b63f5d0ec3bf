"""Container environment and argv as the kubelet computes them: envFrom, env, valueFrom, `$(VAR)`.

Everything here is pure: the adapter fetches the ConfigMaps and Secrets that `referenced_objects`
names, and passes their decoded data in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from kubernetes.utils import parse_quantity

# Reasons as the kubelet reports them in `state.waiting.reason`.
CONFIG_ERROR = "CreateContainerConfigError"
UNKNOWN_IMAGE = "UnknownImage"

_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_FIELD_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


class EnvError(ValueError):
    """A container's environment cannot be built (missing ConfigMap, Secret or key)."""

    reason = CONFIG_ERROR


class UnknownImageError(EnvError):
    """A container without `command` whose image has no known entrypoint."""

    reason = UNKNOWN_IMAGE


@dataclass(frozen=True)
class PodFacts:
    """What the downward API can expose about a pod on this node."""

    name: str
    namespace: str
    uid: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    node_name: str = ""
    service_account: str = "default"
    pod_ip: str = ""
    host_ip: str = ""

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any], pod_ip: str, host_ip: str) -> PodFacts:
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        return cls(
            name=meta.get("name", ""),
            namespace=meta.get("namespace", "default"),
            uid=meta.get("uid", ""),
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
            node_name=spec.get("nodeName", ""),
            service_account=spec.get("serviceAccountName") or "default",
            pod_ip=pod_ip,
            host_ip=host_ip,
        )


def expand(text: str, lookup: Callable[[str], str | None]) -> str:
    """Expand `$(VAR)` references like the kubelet: `$$` escapes, unknown names stay verbatim."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "$" and i + 1 < len(text):
            following = text[i + 1]
            if following == "$":
                out.append("$")
                i += 2
                continue
            if following == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    value = lookup(name)
                    out.append(value if value is not None else text[i : end + 1])
                    i = end + 1
                    continue
        out.append(char)
        i += 1
    return "".join(out)


def referenced_objects(pod: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """Names of the ConfigMaps and Secrets the pod's env, envFrom and volumes read."""
    config_maps: set[str] = set()
    secrets: set[str] = set()
    spec = pod.get("spec") or {}
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for source in container.get("envFrom") or []:
            if "configMapRef" in source:
                config_maps.add(source["configMapRef"]["name"])
            if "secretRef" in source:
                secrets.add(source["secretRef"]["name"])
        for var in container.get("env") or []:
            value_from = var.get("valueFrom") or {}
            if "configMapKeyRef" in value_from:
                config_maps.add(value_from["configMapKeyRef"]["name"])
            if "secretKeyRef" in value_from:
                secrets.add(value_from["secretKeyRef"]["name"])
    for volume in spec.get("volumes") or []:
        if "configMap" in volume:
            config_maps.add(volume["configMap"]["name"])
        if "secret" in volume:
            secrets.add(volume["secret"]["secretName"])
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "configMap" in source:
                config_maps.add(source["configMap"]["name"])
            if "secret" in source:
                secrets.add(source["secret"]["name"])
    return config_maps, secrets


def field_value(path: str, facts: PodFacts) -> str:
    """The downward-API value of a `fieldRef.fieldPath`."""
    simple = {
        "metadata.name": facts.name,
        "metadata.namespace": facts.namespace,
        "metadata.uid": facts.uid,
        "spec.nodeName": facts.node_name,
        "spec.serviceAccountName": facts.service_account,
        "status.podIP": facts.pod_ip,
        "status.podIPs": facts.pod_ip,
        "status.hostIP": facts.host_ip,
        "status.hostIPs": facts.host_ip,
    }
    if path in simple:
        return simple[path]
    if path == "metadata.labels":
        return "\n".join(f'{k}="{v}"' for k, v in sorted(facts.labels.items()))
    if path == "metadata.annotations":
        return "\n".join(f'{k}="{v}"' for k, v in sorted(facts.annotations.items()))
    match = _FIELD_SUBSCRIPT.match(path)
    if match:
        source = facts.labels if match.group(1) == "labels" else facts.annotations
        return source.get(match.group(2), "")
    raise EnvError(f"unsupported fieldRef fieldPath {path!r}")


def resource_value(
    ref: Mapping[str, Any], container: Mapping[str, Any], node_allocatable: Mapping[str, str]
) -> str:
    """The value of a `resourceFieldRef` (limits fall back to the node's allocatable, like the kubelet)."""
    resource = ref["resource"]
    kind, _, name = resource.partition(".")
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(name)
    if raw is None and kind == "limits":
        raw = node_allocatable.get(name)
    if raw is None and kind == "requests":
        raw = "0"
    if raw is None:
        raise EnvError(f"resourceFieldRef {resource!r} has no value")
    divisor = parse_quantity(str(ref.get("divisor") or "1"))
    if divisor == 0:
        raise EnvError(f"resourceFieldRef {resource!r} has a zero divisor")
    value = parse_quantity(str(raw)) / divisor
    return str(math.ceil(Decimal(value)))


def _key_ref(
    ref: Mapping[str, Any], objects: Mapping[str, Mapping[str, str]], kind: str, namespace: str
) -> str | None:
    name, key, optional = ref["name"], ref["key"], bool(ref.get("optional"))
    data = objects.get(name)
    if data is None:
        if optional:
            return None
        raise EnvError(f'{kind} "{name}" not found in namespace {namespace}')
    if key not in data:
        if optional:
            return None
        raise EnvError(f"couldn't find key {key} in {kind} {namespace}/{name}")
    return data[key]


def container_env(
    container: Mapping[str, Any],
    facts: PodFacts,
    config_maps: Mapping[str, Mapping[str, str]],
    secrets: Mapping[str, Mapping[str, str]],
    node_allocatable: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The container's environment: envFrom first, then env in order (later `$(VAR)` see earlier)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        ref = source.get("configMapRef") or source.get("secretRef") or {}
        objects, kind = (config_maps, "configmap") if "configMapRef" in source else (secrets, "secret")
        data = objects.get(ref.get("name", ""))
        if data is None:
            if ref.get("optional"):
                continue
            raise EnvError(f'{kind} "{ref.get("name")}" not found in namespace {facts.namespace}')
        for key, text in data.items():
            if _ENV_NAME.match(prefix + key):
                env[prefix + key] = text
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value") or "", env.get)
            continue
        value_from = var["valueFrom"]
        value: str | None
        if "fieldRef" in value_from:
            value = field_value(value_from["fieldRef"]["fieldPath"], facts)
        elif "resourceFieldRef" in value_from:
            value = resource_value(value_from["resourceFieldRef"], container, node_allocatable or {})
        elif "configMapKeyRef" in value_from:
            value = _key_ref(value_from["configMapKeyRef"], config_maps, "configmap", facts.namespace)
        elif "secretKeyRef" in value_from:
            value = _key_ref(value_from["secretKeyRef"], secrets, "secret", facts.namespace)
        else:
            raise EnvError(f"env {name}: unsupported valueFrom {sorted(value_from)}")
        if value is not None:
            env[name] = value
    return env


def entrypoint(image: str) -> list[str]:
    """The entrypoint of an image on the process node: Kiln's two images are known, others are not."""
    if "kiln-engine" in image:
        return ["kiln-engine"]
    if "kiln" in image:
        return ["kiln"]
    raise UnknownImageError(f"image {image!r} has no known entrypoint on the process node; set `command`")


def container_argv(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """command + args with `$(VAR)` expanded against the container's environment."""
    command = list(container.get("command") or [])
    if not command:
        command = entrypoint(container.get("image", ""))
    else:
        command = [expand(part, env.get) for part in command]
    return command + [expand(arg, env.get) for arg in container.get("args") or []]
