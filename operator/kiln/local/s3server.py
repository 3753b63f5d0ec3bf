"""A real S3 server on loopback: MinIO built from its pinned Go module (`gotools-minio/`), one data
folder, one root account, an optional virtual-host domain and a region. Tests and local clusters
store model sources and engine caches on it; nothing here imitates S3.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kiln.local import build

STARTUP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class S3Server:
    """A running S3 server: where it listens and the root account's keys."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    domain: str | None

    def credentials_env(self) -> dict[str, str]:
        """The environment a client needs (the keys a Kiln cache Secret carries)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_REGION": self.region,
        }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def minio_command(binary: Path, data: Path, port: int, console_port: int) -> list[str]:
    """`minio server` on loopback only, with its console on a port of its own."""
    return [
        str(binary),
        "server",
        "--quiet",
        "--address",
        f"127.0.0.1:{port}",
        "--console-address",
        f"127.0.0.1:{console_port}",
        str(data),
    ]


def minio_env(access_key: str, secret_key: str, region: str, domain: str | None) -> dict[str, str]:
    """MinIO's settings: root keys, region, virtual-host domain; no update checks or telemetry."""
    env = {
        "MINIO_ROOT_USER": access_key,
        "MINIO_ROOT_PASSWORD": secret_key,
        "MINIO_REGION": region,
        "MINIO_UPDATE": "off",
        "MINIO_CALLHOME_ENABLE": "off",
        "MINIO_BROWSER": "off",
        "HOME": os.environ.get("HOME", "/tmp"),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }
    if domain:
        env["MINIO_DOMAIN"] = domain
    return env


def wait_ready(
    endpoint: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = STARTUP_TIMEOUT_S
) -> None:
    """Until MinIO's readiness probe answers 200; raises with its log if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"minio exited with {process.returncode}:\n{output}")
        try:
            with urllib.request.urlopen(f"{endpoint}/minio/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"minio at {endpoint} not ready after {timeout_s:.0f} s")


@contextmanager
def running(data: Path, region: str = "us-east-1", domain: str | None = None) -> Iterator[S3Server]:
    """Start MinIO (built first if missing) over `data`, yield it, stop it on exit."""
    binary = build.build(lambda line: None, build.MINIO) / "minio"
    port, console_port = free_port(), free_port()
    access_key, secret_key = "kiln-" + secrets.token_hex(4), secrets.token_urlsafe(24)
    data.mkdir(parents=True, exist_ok=True)
    log_path = data.parent / f"{data.name}.minio.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            minio_command(binary, data, port, console_port),
            env=minio_env(access_key, secret_key, region, domain),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_ready(endpoint, process, log_path)
        yield S3Server(endpoint, access_key, secret_key, region, domain)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
