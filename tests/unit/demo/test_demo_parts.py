"""The demo's pure parts: step progress, volume manifests, Helm values, TTFT windows, and the load."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kiln.demo import manifests
from kiln.demo.kube import wait_for
from kiln.demo.load import Load, ttft_window
from kiln.demo.stack import cmdline, descendants, engine_processes, is_engine_server
from kiln.demo.steps import DemoError, Progress, StepFailed, clock
from kiln.local import realnode

ROOT = Path(__file__).resolve().parents[3]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_clock_formats_minutes_and_hours() -> None:
    assert clock(0) == "0:00"
    assert clock(75.9) == "1:15"
    assert clock(3725) == "1:02:05"


def test_progress_numbers_steps_and_times_them() -> None:
    lines: list[str] = []
    now = FakeClock()
    progress = Progress(total=2, echo=lines.append, now=now)
    with progress.step("first"):
        now.now += 61.5
        progress.info("detail\nsecond line")
    assert lines == [
        "[   0:00] 1/2 first ...",
        "           detail",
        "           second line",
        "[   1:01] 1/2 first: done in 61.5 s",
    ]
    assert progress.current is None


def test_a_failing_step_names_itself_and_keeps_the_message() -> None:
    lines: list[str] = []
    progress = Progress(total=3, echo=lines.append, now=FakeClock())
    with progress.step("ok"):
        pass
    with pytest.raises(StepFailed) as failure, progress.step("install"):
        raise DemoError("helm failed: boom")
    assert (failure.value.number, failure.value.step, failure.value.detail) == (
        2,
        "install",
        "helm failed: boom",
    )
    assert lines[-1] == "[   0:00] 2/3 install: FAILED after 0.0 s"
    with pytest.raises(StepFailed) as unexpected, progress.step("third"):
        raise KeyError("x")
    assert unexpected.value.detail == "KeyError: 'x'"  # unexpected errors carry their type


def test_ctrl_c_inside_a_step_is_a_failure_of_that_step() -> None:
    progress = Progress(total=1, echo=lambda line: None, now=FakeClock())
    with pytest.raises(StepFailed) as failure, progress.step("build"):
        raise KeyboardInterrupt
    assert failure.value.detail == "interrupted (Ctrl-C)"


def test_volumes_are_prebound_both_ways(tmp_path: Path) -> None:
    documents = manifests.demo_volumes("default", tmp_path / "examples", tmp_path / "cache")
    volumes = {d["metadata"]["name"]: d for d in documents if d["kind"] == "PersistentVolume"}
    claims = {d["metadata"]["name"]: d for d in documents if d["kind"] == "PersistentVolumeClaim"}
    assert set(claims) == {"kiln-models", "kiln-engine-cache"}
    for name, volume in volumes.items():
        claim = claims[volume["spec"]["claimRef"]["name"]]
        assert claim["spec"]["volumeName"] == name
        assert claim["spec"]["storageClassName"] == volume["spec"]["storageClassName"]
        assert claim["spec"]["accessModes"] == volume["spec"]["accessModes"]
    assert volumes["kiln-demo-models"]["spec"]["hostPath"]["path"] == str(tmp_path / "examples")
    assert volumes["kiln-demo-models"]["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert volumes["kiln-demo-cache"]["spec"]["hostPath"]["path"] == str(tmp_path / "cache")
    other = manifests.demo_volumes("team-a", tmp_path, tmp_path)
    assert {d["metadata"]["name"] for d in other if d["kind"] == "PersistentVolume"} == {
        "kiln-demo-models-team-a",
        "kiln-demo-cache-team-a",
    }


def _schema_keys(schema: dict, values: dict, path: str = "") -> list[str]:
    """Keys of `values` that the chart's schema does not declare (the schema forbids extras)."""
    unknown = []
    properties = schema.get("properties", {})
    for key, value in values.items():
        if key not in properties:
            unknown.append(f"{path}{key}")
        elif isinstance(value, dict) and "properties" in properties[key]:
            unknown += _schema_keys(properties[key], value, f"{path}{key}.")
    return unknown


def test_real_node_values_only_place_and_pull_the_images_and_use_keys_the_chart_declares() -> None:
    schema = json.loads((ROOT / "charts" / "kiln" / "values.schema.json").read_text())
    on_node = {"kiln.dev/real-node": "true"}
    values = manifests.real_node_values(on_node)
    assert _schema_keys(schema, values) == []
    # Everything else (NetworkPolicy, monitoring, replicas, image references) stays the chart's.
    assert values == {
        "image": {"pullPolicy": "Never"},
        "operator": {"nodeSelector": on_node},
        "autoscaler": {"nodeSelector": on_node},
    }


def test_a_pod_asks_the_service_with_busybox_wget(tmp_path: Path) -> None:
    """The command the demo's client pod runs, run here by the same busybox against a local server."""
    received: list[tuple[str, str, bytes]] = []

    class Echo(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            received.append((self.path, self.headers["Content-Type"], self.rfile.read(length)))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"choices": [{"text": "ok"}]}')

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        body = manifests.completion_request("tiny-chat", "What is Kiln?")
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/completions"
        command = manifests.in_cluster_completion(url, body)
        assert command[0] == "/bin/wget"  # an applet of the node's busybox image
        done = subprocess.run(["busybox", "wget", *command[1:]], capture_output=True, text=True, timeout=30)
    finally:
        httpd.shutdown()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"choices": [{"text": "ok"}]}
    assert received == [("/v1/completions", "application/json", json.dumps(body).encode())]
    assert manifests.service_url("tiny-chat", "default", 8000, "/v1") == (
        "http://tiny-chat.default.svc.cluster.local:8000/v1"
    )


def test_completion_request_applies_the_chat_template() -> None:
    body = manifests.completion_request("tiny-chat", "What is Kiln?")
    assert body["prompt"] == "<|bos|><|user|>\nWhat is Kiln?<|end|>\n<|assistant|>\n"
    assert body["temperature"] == 0 and body["stop"] == ["<|end|>"]
    path = manifests.service_proxy_path("default", "tiny-chat", 8000, "/v1/completions")
    assert path == "/api/v1/namespaces/default/services/tiny-chat:8000/proxy/v1/completions"


INF = math.inf


def test_ttft_window_sums_pods_and_counts_new_ones_from_zero() -> None:
    before = {"a": {0.1: 10.0, 0.5: 10.0, INF: 10.0}}
    after = {
        "a": {0.1: 10.0, 0.5: 14.0, INF: 14.0},  # 4 new requests in (0.1, 0.5]
        "b": {0.1: 0.0, 0.5: 0.0, INF: 4.0},  # a new pod: 4 requests above 0.5 s
    }
    p50, count = ttft_window(after, before)
    assert count == 8
    assert p50 == pytest.approx(500.0)  # rank 4 of 8 falls at the top of the (0.1, 0.5] bucket


def test_ttft_window_leaves_out_restarted_pods_and_empty_windows() -> None:
    before = {"a": {0.1: 5.0, INF: 9.0}}
    assert ttft_window({"a": {0.1: 1.0, INF: 1.0}}, before) == (None, 0)
    assert ttft_window(before, before) == (None, 0)
    p50, count = ttft_window({"a": {0.1: 7.0, INF: 11.0}}, before)
    assert count == 2 and p50 == pytest.approx(50.0)  # both in [0, 0.1]: interpolated to the middle


@pytest.fixture
def server() -> Iterator[str]:
    """A real HTTP server: 200 on /ok, 503 on /busy."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200 if self.path == "/ok" else 503)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: object) -> None:
            return

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


async def _run_load(urls: list[str], enough: int = 12) -> Load:
    """Run 4 clients until `enough` requests were answered or failed (10 s at most)."""
    load = Load(lambda: urls, {"prompt": "x"}, concurrency=4)
    task = asyncio.create_task(load.run())
    for _ in range(200):
        if load.stats.ok + load.stats.failed >= enough:
            break
        await asyncio.sleep(0.05)
    load.stop()
    await task
    return load


def test_load_sends_a_request_a_draining_replica_refused_to_the_next_one(server: str) -> None:
    load = asyncio.run(_run_load([f"{server}/ok", f"{server}/busy"]))
    assert load.stats.ok > 5 and load.stats.failed == 0
    assert load.stats.retried > 2  # every request that went to /busy first


def test_load_counts_failures_when_no_other_replica_answers(server: str) -> None:
    load = asyncio.run(_run_load([f"{server}/busy"]))
    assert load.stats.ok == 0 and load.stats.failed > 5 and load.stats.retried == 0
    assert load.stats.errors[0].startswith("HTTP 503")
    assert len(load.stats.errors) == 5  # only the first few are kept


def test_engine_servers_are_recognised_by_their_command_line() -> None:
    assert is_engine_server(["/venv/bin/kiln-engine", "serve", "--artifact", "x"])
    assert is_engine_server(["/venv/bin/python3", "/venv/bin/kiln-engine", "serve"])
    assert not is_engine_server(["/venv/bin/kiln-engine", "build", "--model", "serve"])
    assert not is_engine_server(["sh", "-c", "kiln-engine serve"])


def test_engine_processes_are_found_among_the_node_s_container_processes(tmp_path: Path) -> None:
    node = realnode.Layout(tmp_path / "node")
    engine = tmp_path / "kiln-engine"
    engine.write_text("#!/bin/sh\nsleep 30\n")
    engine.chmod(0o755)
    # A stand-in for the node's shim (its name, an argument in the node's folder) and, below it,
    # the container's engine; another shim's engine belongs to another node.
    shim = tmp_path / "containerd-shim-runc-v2"
    shim.symlink_to("/bin/bash")
    ours = subprocess.Popen([str(shim), "-c", f"{engine} serve --port 1; true", f"{node.root}/state/x"])
    theirs = subprocess.Popen([str(shim), "-c", f"{engine} serve --port 2; true", "/elsewhere/node/x"])
    try:
        found = wait_for(lambda: engine_processes(node), 10, "the engine-like child")
        assert len(found) == 1 and found[0] in descendants(ours.pid)
        assert f"{engine} serve --port 1" in cmdline(found[0])
    finally:
        for process in (ours, theirs):
            for pid in descendants(process.pid):
                os.kill(pid, 9)
            process.kill()
            process.wait()
    assert wait_for(lambda: engine_processes(node) == [], 10, "the engine to go")


def test_test_overrides_merge_into_the_values_like_helm_values_files() -> None:
    on_node = {"kiln.dev/real-node": "true"}
    merged = manifests.merge(manifests.real_node_values(on_node), manifests.retention_values(5))
    assert merged["operator"] == {
        "nodeSelector": on_node,
        "extraArgs": ["--engine-retention=5", "--resync-seconds=5"],
    }
    schema = json.loads((ROOT / "charts" / "kiln" / "values.schema.json").read_text())
    assert _schema_keys(schema, merged) == []


def test_demo_down_without_a_demo_says_so(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kiln.demo import demo

    result = CliRunner().invoke(demo, ["--down", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"stopped nothing (no demo running) in {tmp_path.resolve()}"
