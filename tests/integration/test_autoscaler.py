"""The autoscaler end to end on this machine: real API server, real Prometheus, real engine processes.

A harness plays the serving workload's part (what the operator's Deployment does in a cluster):
it keeps one `kiln-engine serve` process per `.spec.replicas` of an LLMDeployment, publishes them
to Prometheus (Debian's `prometheus`, file service discovery with the `namespace` and
`llmdeployment` labels the PodMonitor sets), reports ready replicas in status, and on a scale-down
takes the newest process out of routing and SIGTERMs it, so it drains. `kiln autoscaler run` (a
subprocess, Prometheus source) does the scaling by server-side apply of `spec.replicas`.

Story: load raises TTFT past the target -> the autoscaler scales up (event, status, field
manager) -> the load drops to a trickle -> after the scale-down window it scales down, the drained
replicas finish what they were serving, and no request anywhere fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import debian_prometheus
import httpx
import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from kiln.local.testing import LocalCluster, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.engine, pytest.mark.slow]

GROUP, VERSION, PLURAL = "kiln.dev", "v1alpha1", "llmdeployments"
NAME = "tiny"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kiln_engine.testing.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-model") / "tiny")


@dataclass
class Replica:
    """One engine process and what the harness's router has in flight on it."""

    port: int
    process: subprocess.Popen[bytes]
    ready: bool = False
    routable: bool = True
    in_flight: int = 0
    drained_with_in_flight: int = 0


@dataclass
class Fleet:
    """The stand-in for the serving workload: engine processes following `.spec.replicas`."""

    model: Path
    directory: Path
    namespace: str
    custom: client.CustomObjectsApi
    targets_file: Path
    replicas: list[Replica] = field(default_factory=list)
    draining: list[Replica] = field(default_factory=list)
    drained: list[Replica] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    history: list[int] = field(default_factory=list)

    def start_replica(self) -> Replica:
        port = free_port()
        log = (self.directory / f"engine-{port}.log").open("wb")
        process = subprocess.Popen(
            [str(BIN / "kiln-engine"), "serve", "--model", str(self.model), "--served-model-name", NAME,
             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--max-num-seqs", "2",
             "--drain-timeout", "30"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        return Replica(port, process)

    def publish(self) -> None:
        """Prometheus targets and LLMDeployment status, as a PodMonitor and the operator would."""
        with self.lock:
            ready = [r for r in self.replicas if r.ready]
            groups = [{
                "targets": [f"127.0.0.1:{r.port}" for r in ready + self.draining],
                "labels": {"namespace": self.namespace, "llmdeployment": NAME},
            }]  # fmt: skip
            counts = (len(self.replicas), len(ready))
        temporary = self.targets_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(groups))
        temporary.replace(self.targets_file)
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, PLURAL, NAME,
            {"status": {"replicas": counts[0], "readyReplicas": counts[1],
                        "selector": f"kiln.dev/deployment={NAME}"}},
        )  # fmt: skip

    def drain(self, replica: Replica) -> None:
        """Take the replica out of routing once it serves something, then SIGTERM it (graceful drain)."""
        deadline = time.monotonic() + 10
        while replica.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        with self.lock:
            replica.routable = False
            replica.drained_with_in_flight = replica.in_flight
            self.draining.append(replica)
        # A client that picked this replica just before may not have sent its request yet; a draining
        # engine answers such a late request 503 (ci-run of e8ba99f, 2026-12-08). Kubernetes leaves the
        # same gap between endpoint removal and SIGTERM, covered there by a preStop pause: so here.
        time.sleep(0.5)
        replica.process.send_signal(signal.SIGTERM)
        replica.process.wait(timeout=60)
        with self.lock:
            self.draining.remove(replica)
            self.drained.append(replica)
        self.publish()

    def follow(self) -> None:
        """Keep as many processes as `.spec.replicas` asks for (the harness's reconcile loop)."""
        while not self.stop.is_set():
            obj: Any = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, NAME)
            wanted = int(obj["spec"]["replicas"])
            if not self.history or self.history[-1] != wanted:
                self.history.append(wanted)
            with self.lock:
                while len(self.replicas) < wanted:
                    self.replicas.append(self.start_replica())
                surplus = self.replicas[wanted:]
                self.replicas = self.replicas[:wanted]
            for replica in surplus:
                threading.Thread(target=self.drain, args=(replica,), daemon=True).start()
            for replica in list(self.replicas):
                if not replica.ready:
                    with contextlib.suppress(httpx.HTTPError):
                        replica.ready = httpx.get(
                            f"http://127.0.0.1:{replica.port}/ready", timeout=1
                        ).is_success
            self.publish()
            self.stop.wait(0.5)

    def pick(self) -> Replica | None:
        """The routable ready replica with the fewest requests in flight (a Service with least-request)."""
        with self.lock:
            choices = [r for r in self.replicas if r.ready and r.routable]
            if not choices:
                return None
            best = min(choices, key=lambda r: r.in_flight)
            best.in_flight += 1
            return best

    def shutdown(self) -> None:
        self.stop.set()
        for replica in self.replicas + self.draining:
            if replica.process.poll() is None:
                replica.process.kill()
                replica.process.wait(timeout=10)


@dataclass
class Load:
    """Clients sending completions through the fleet's router; every outcome is kept."""

    fleet: Fleet
    workers: int
    max_tokens: int = 32
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def work(self) -> None:
        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                replica = self.fleet.pick()
                if replica is None:
                    time.sleep(0.05)
                    continue
                try:
                    response = http.post(
                        f"http://127.0.0.1:{replica.port}/v1/completions",
                        json={"model": NAME, "prompt": "hello world " * 20, "max_tokens": self.max_tokens,
                              "ignore_eos": True},
                    )  # fmt: skip
                    if response.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(
                            f"{replica.port}: HTTP {response.status_code} {response.text[:200]}"
                        )
                except httpx.HTTPError as error:
                    self.failures.append(f"{replica.port}: {error!r}")
                finally:
                    with self.fleet.lock:
                        replica.in_flight -= 1

    def start(self) -> Load:
        self.threads = [threading.Thread(target=self.work, daemon=True) for _ in range(self.workers)]
        for thread in self.threads:
            thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    try:  # fetched when absent, and a failure, never a skip: CI must run this test
        binary = debian_prometheus.find_or_fetch("prometheus")
    except RuntimeError as error:
        pytest.fail(str(error))
    targets = tmp_path / "targets.json"
    targets.write_text("[]")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: kiln-engines\n"
        "    scrape_interval: 1s\n"
        f"    file_sd_configs: [{{files: ['{targets}'], refresh_interval: 1s}}]\n"
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [str(binary), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ok(f"{url}/-/ready"), timeout=60, what="prometheus to be ready")
        yield url, targets
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).is_success
    except httpx.HTTPError:
        return False


def deployment(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMDeployment",
        "metadata": {"name": NAME, "namespace": namespace},
        "spec": {
            "model": {"source": "pvc://kiln-models/tiny", "servedName": NAME},
            "engine": {"backend": "torch", "quantization": "none", "maxBatchSize": 2,
                       "maxSequenceLength": 512, "maxTokensPerStep": 512},
            "replicas": 1,
            "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3, "ttftP50TargetMs": 60,
                            "scaleUpWindowSeconds": 0, "scaleDownWindowSeconds": 15},
        },
    }  # fmt: skip


def test_scales_up_on_ttft_and_down_after_the_window_without_losing_requests(
    local_cluster: LocalCluster,
    namespace: str,
    core_v1: client.CoreV1Api,
    prometheus: tuple[str, Path],
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    prometheus_url, targets = prometheus
    custom = client.CustomObjectsApi(local_cluster.api_client)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, deployment(namespace))
    fleet = Fleet(tiny_model, tmp_path, namespace, custom, targets)
    follower = threading.Thread(target=fleet.follow, daemon=True)
    follower.start()
    log = (tmp_path / "autoscaler.log").open("wb")
    metrics_port = free_port()
    autoscaler = subprocess.Popen(
        [str(BIN / "kiln"), "autoscaler", "run", "--metrics-source=prometheus",
         f"--prometheus-url={prometheus_url}", "--prometheus-window=10s", "--interval=2",
         f"--namespace={namespace}",
         f"--kubeconfig={local_cluster.kubeconfig}", f"--metrics-port={metrics_port}",
         f"--health-port={free_port()}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    heavy: Load | None = None
    trickle: Load | None = None
    try:
        wait_for(lambda: fleet.replicas and fleet.replicas[0].ready, timeout=120, what="the first engine")

        # Load: 8 clients against max-num-seqs 2 queue up, so TTFT goes far past 60 ms.
        heavy = Load(fleet, workers=8).start()

        def scaled_up() -> bool:
            obj: Any = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, NAME)
            return int(obj["spec"]["replicas"]) > 1

        wait_for(scaled_up, timeout=120, what="the autoscaler to scale up")

        def recorded() -> Any:  # the status write follows the replicas apply
            obj: Any = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, NAME)
            return obj if (obj.get("status") or {}).get("lastScaleDecision") else None

        obj = wait_for(recorded, timeout=10, what="the scale decision in status")
        decision = obj["status"]["lastScaleDecision"]
        assert decision["fromReplicas"] == 1 and decision["toReplicas"] > 1, decision
        assert "ttft" in decision["reason"], decision
        # It owns spec.replicas by an Apply on the main resource, so a user's apply naming replicas conflicts.
        applied = [
            m for m in obj["metadata"]["managedFields"]
            if (m["manager"], m["operation"], m.get("subresource")) == ("kiln-autoscaler", "Apply", None)
        ]  # fmt: skip
        assert applied and applied[0]["fieldsV1"].get("f:spec") == {"f:replicas": {}}, obj["metadata"]
        events = core_v1.list_namespaced_event(namespace, field_selector=f"involvedObject.name={NAME}").items
        assert any(e.reason == "ScaledUp" and e.reporting_component == "kiln-autoscaler" for e in events)
        scaled_at = time.monotonic()
        wait_for(lambda: sum(r.ready for r in fleet.replicas) >= 2, timeout=120, what="a second engine")

        # The load drops to a trickle that keeps requests in flight while replicas drain.
        trickle = Load(fleet, workers=2, max_tokens=64).start()
        heavy.finish()

        def scaled_down() -> bool:
            with fleet.lock:
                followed = len(fleet.replicas) == 1 and fleet.history[-1] == 1
                return followed and bool(fleet.drained) and not fleet.draining

        wait_for(scaled_down, timeout=180, what="the autoscaler to scale down to 1 and the drain to finish")
        trickle.finish()

        assert fleet.history[0] == 1 and max(fleet.history) > 1 and fleet.history[-1] == 1, fleet.history
        # not before the 15 s scale-down window had passed since the last high recommendation
        assert time.monotonic() - scaled_at >= 15
        events = core_v1.list_namespaced_event(namespace, field_selector=f"involvedObject.name={NAME}").items
        assert any(e.reason == "ScaledDown" for e in events)
        # Replicas were drained while serving, and no request anywhere failed.
        assert fleet.drained and any(r.drained_with_in_flight > 0 for r in fleet.drained)
        assert all(r.process.returncode == 0 for r in fleet.drained), [
            r.process.returncode for r in fleet.drained
        ]
        assert heavy.failures == [] and trickle.failures == [], heavy.failures + trickle.failures
        assert heavy.ok > 0 and trickle.ok > 0

        # The autoscaler's own metrics saw both decisions.
        exposition = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(exposition)
            for sample in family.samples
        }
        ours = (("llmdeployment", NAME), ("namespace", namespace))
        for direction in ("up", "down"):
            key = ("kiln_autoscaler_decisions_total", tuple(sorted((*ours, ("direction", direction)))))
            assert samples.get(key, 0) >= 1, (direction, exposition)
        assert samples[("kiln_autoscaler_desired_replicas", ours)] == 1
        assert samples[("kiln_autoscaler_leader", ())] == 1
    finally:
        for load in (heavy, trickle):
            if load is not None:
                load.finish()
        autoscaler.terminate()
        autoscaler.wait(timeout=30)
        fleet.shutdown()
        decisions = [
            line for line in (tmp_path / "autoscaler.log").read_text().splitlines() if " -> " in line
        ]
        print("\n".join(decisions))
