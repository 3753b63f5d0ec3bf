"""What the demo creates besides Kiln itself, as pure functions: volumes, Helm values, requests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MODELS_CLAIM = "kiln-models"  # examples/tiny-cpu.yaml reads pvc://kiln-models/tiny-chat
CACHE_CLAIM = "kiln-engine-cache"  # ... and writes its engine to pvc://kiln-engine-cache
STORAGE_CLASS = "kiln-local"  # no provisioner: the demo's PVs are pre-bound by name


def host_volume(
    name: str, claim: str, namespace: str, path: Path, *, read_only: bool, size: str = "1Gi"
) -> list[dict[str, Any]]:
    """A hostPath PersistentVolume and the claim pre-bound to it (both ways, so nothing else binds)."""
    mode = "ReadOnlyMany" if read_only else "ReadWriteMany"
    volume: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "kiln-demo"}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": [mode],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": STORAGE_CLASS,
            "hostPath": {"path": str(path), "type": "Directory"},
            "claimRef": {"namespace": namespace, "name": claim},
        },
    }
    claim_object: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "namespace": namespace},
        "spec": {
            "accessModes": [mode],
            "storageClassName": STORAGE_CLASS,
            "volumeName": name,
            "resources": {"requests": {"storage": size}},
        },
    }
    return [volume, claim_object]


def demo_volumes(namespace: str, examples: Path, cache: Path) -> list[dict[str, Any]]:
    """The model claim (the checkout's examples/ folder) and the engine cache claim."""
    suffix = "" if namespace == "default" else f"-{namespace}"
    return [
        *host_volume(f"kiln-demo-models{suffix}", MODELS_CLAIM, namespace, examples, read_only=True),
        *host_volume(f"kiln-demo-cache{suffix}", CACHE_CLAIM, namespace, cache, read_only=False),
    ]


def real_node_values(node_selector: dict[str, str]) -> dict[str, Any]:
    """Helm values for the local cluster: the chart's defaults (NetworkPolicy and monitoring as
    shipped, two operator replicas with leader election, ...) plus what this cluster needs.

    The images keep the chart's and the operator's default references: `kiln images build` tags
    them so and the real node has them imported. `pullPolicy: Never` because no registry is
    reachable: a missing import then fails at once (ErrImageNeverPull) instead of retrying a pull.
    The node selector puts the operator and autoscaler on the real node (the KWOK nodes beside it
    run nothing). Storage is the demo's pre-bound volumes (`demo_volumes`), not a value.
    """
    return {
        "image": {"pullPolicy": "Never"},
        "operator": {"nodeSelector": dict(node_selector)},
        "autoscaler": {"nodeSelector": dict(node_selector)},
    }


def api_server_values(server: str) -> dict[str, Any]:
    """NetworkPolicy values letting Kiln's pods reach this cluster's API server: the chart's ports
    (443, 6443) plus the one the local API server listens on (policies see the port after NAT)."""
    port = urlsplit(server).port or 443
    return {"networkPolicy": {"apiServer": {"ports": sorted({443, 6443, port})}}}


def client_pod(name: str, namespace: str, image: str, node_selector: dict[str, str]) -> dict[str, Any]:
    """A pod that idles so that `kubectl exec` can ask the model from inside the cluster."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "kiln-demo"},
        },
        "spec": {
            "nodeSelector": dict(node_selector),
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "client",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["/bin/sleep", "86400"],
                }
            ],
        },
    }


def in_cluster_completion(url: str, body: dict[str, Any]) -> list[str]:
    """The command a busybox pod runs to POST `body` to `url` and print the answer."""
    return [
        "/bin/wget",
        "-q",
        "-O",
        "-",
        "--header",
        "Content-Type: application/json",
        "--post-data",
        json.dumps(body),
        url,
    ]


def service_url(service: str, namespace: str, port: int, path: str) -> str:
    """The Service's in-cluster URL by its DNS name."""
    return f"http://{service}.{namespace}.svc.cluster.local:{port}{path}"


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` merged into a copy of `base`, maps recursively (as Helm merges values files)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def retention_args(seconds: float) -> list[str]:
    """`kiln operator run` flags that delete unused LLMEngines after `seconds` (tests): the
    operator collects engines when it reconciles them, so it also resyncs that often."""
    return [f"--engine-retention={seconds:g}", f"--resync-seconds={max(1.0, seconds):g}"]


def retention_values(seconds: float) -> dict[str, Any]:
    """The same as Helm values for the chart's operator."""
    return {"operator": {"extraArgs": retention_args(seconds)}}


def chat_prompt(question: str) -> str:
    """tiny-chat's chat template applied to one user turn (see examples/tiny-chat/train.py)."""
    return f"<|bos|><|user|>\n{question}<|end|>\n<|assistant|>\n"


def completion_request(model: str, question: str, max_tokens: int = 48) -> dict[str, Any]:
    """An OpenAI /v1/completions body that asks tiny-chat one question, greedily."""
    return {
        "model": model,
        "prompt": chat_prompt(question),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stop": ["<|end|>"],
    }


def service_proxy_path(namespace: str, service: str, port: int | str, path: str) -> str:
    """The API server's proxy path to a Service port (`path` starts with /)."""
    return f"/api/v1/namespaces/{namespace}/services/{service}:{port}/proxy{path}"
