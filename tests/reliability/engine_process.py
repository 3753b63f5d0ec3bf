"""A real `kiln-engine serve` process on a free loopback port: start, wait until ready, scrape, stop.

Tests talk to it over HTTP like any client would; its stdout and stderr go to a log file the test
can read (for secrets that must not appear there).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
TINY_CHAT = REPO / "examples" / "tiny-chat"
KILN_ENGINE = Path(sys.executable).parent / "kiln-engine"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EngineProcess:
    """`kiln-engine serve ...` as a child process, its output in `log`."""

    def __init__(
        self, args: Sequence[str], log: Path, env: dict[str, str] | None = None, ready_timeout: float = 120
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.args = [str(KILN_ENGINE), "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        # One torch thread: the CI box has two cores, and the load client needs the other.
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> EngineProcess:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                self.args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
            )
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"kiln-engine exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"kiln-engine not ready after {self.ready_timeout} s:\n{self.output()}")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 30) -> int | None:
        """SIGTERM (the server drains), then SIGKILL after `grace` seconds; the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name (the one served model's labels dropped; statuses kept)."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                status = sample.labels.get("status")
                out[f"{sample.name}{{{status}}}" if status else sample.name] = sample.value
        return out


def run_cli(
    args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`kiln-engine <args>` to completion, output captured."""
    return subprocess.run(
        [str(KILN_ENGINE), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        check=False,
    )
