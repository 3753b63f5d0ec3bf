"""Thin adapters to the cluster: `kubectl` and `helm` as subprocesses, and the API server over HTTPS."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from kiln.demo.steps import DemoError
from kiln.local import build, pki

T = TypeVar("T")


class CommandError(DemoError):
    """A kubectl or helm command exited non-zero; the message holds the command and its stderr."""


def tool(name: str) -> Path:
    """A control-plane binary (kubectl, helm, ...) from `kiln local build`'s cache folder."""
    path = build.binary_paths()[name]
    if not os.access(path, os.X_OK):
        raise DemoError(f"{path} is missing: run `kiln local build` (or `bash e2e/setup.sh`) first")
    return path


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll `check` until it returns something truthy; raise DemoError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Kubectl:
    """`kubectl` against one kubeconfig."""

    def __init__(self, kubeconfig: Path, binary: Path | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.binary = binary or tool("kubectl")

    def command(self, *args: str) -> list[str]:
        return [str(self.binary), f"--kubeconfig={self.kubeconfig}", *args]

    def run(
        self, *args: str, input: str | None = None, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*args), input=input, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise CommandError(f"kubectl {' '.join(args)} failed: {result.stderr.strip() or result.stdout}")
        return result

    def __call__(self, *args: str, input: str | None = None, timeout: float = 120.0) -> str:
        """Run kubectl and return its stdout (raises CommandError on failure)."""
        return self.run(*args, input=input, timeout=timeout).stdout

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json"))

    def items(self, *args: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.json("get", *args).get("items", [])
        return items

    def apply(self, documents: Sequence[dict[str, Any]], *extra: str) -> str:
        return self("apply", "-f", "-", *extra, input=yaml.safe_dump_all(list(documents)))


class Helm:
    """`helm` against one kubeconfig, its caches kept inside the cluster folder."""

    def __init__(self, kubeconfig: Path, home: Path, binary: Path | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.binary = binary or tool("helm")
        self.env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def __call__(self, *args: str, timeout: float = 300.0) -> str:
        result = subprocess.run(
            [str(self.binary), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise CommandError(f"helm {' '.join(args)} failed: {result.stderr.strip() or result.stdout}")
        return result.stdout


class Api:
    """Raw HTTPS to the API server as the cluster admin (for the service proxy)."""

    def __init__(self, directory: Path, server: str) -> None:
        self.server = server
        keys = pki.Pki(directory / "pki")
        self.ssl_context = ssl.create_default_context(cafile=str(keys.ca_cert))
        self.ssl_context.load_cert_chain(str(keys.client_cert(pki.ADMIN)), str(keys.client_key(pki.ADMIN)))
        self.client = httpx.Client(verify=self.ssl_context, timeout=30.0)

    def post(self, path: str, body: dict[str, Any], timeout: float = 60.0) -> httpx.Response:
        return self.client.post(f"{self.server}{path}", json=body, timeout=timeout)

    def get(self, path: str, timeout: float = 30.0) -> httpx.Response:
        return self.client.get(f"{self.server}{path}", timeout=timeout)

    def close(self) -> None:
        self.client.close()


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The status condition of type `kind`, if any."""
    for item in (obj.get("status") or {}).get("conditions") or []:
        if item.get("type") == kind:
            return dict(item)
    return None


def is_true(obj: dict[str, Any], kind: str) -> bool:
    found = condition(obj, kind)
    return bool(found and found.get("status") == "True")


def pod_ready(pod: dict[str, Any]) -> bool:
    return pod.get("metadata", {}).get("deletionTimestamp") is None and is_true(pod, "Ready")


def ready_endpoints(pods: Sequence[dict[str, Any]], port: int) -> list[str]:
    """http://IP:port of each ready pod (the Service's endpoints, as a client would dial them)."""
    return [
        f"http://{pod['status']['podIP']}:{port}"
        for pod in pods
        if pod_ready(pod) and pod.get("status", {}).get("podIP")
    ]
