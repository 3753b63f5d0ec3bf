"""The autoscaler across a control-plane restart: `kiln autoscaler run` keeps running while
kube-apiserver and etcd are restarted under it, and still scales up on TTFT afterwards. Reuses the
autoscaler integration test's harness (real engines, real Prometheus, a loop that follows replicas).
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kiln.local import cluster
from kiln.local.testing import LocalCluster, wait_for
from tests.integration.test_autoscaler import (
    BIN,
    GROUP,
    NAME,
    PLURAL,
    VERSION,
    Fleet,
    Load,
    deployment,
    free_port,
    prometheus,
    tiny_model,
)
from tests.reliability.report import Report

pytestmark = [pytest.mark.cluster, pytest.mark.engine, pytest.mark.slow]

__all__ = ["prometheus", "tiny_model"]  # fixtures, used by name


class SturdyFleet(Fleet):
    """The harness's replica loop, made to outlive the API server's absence (the autoscaler is under
    test here, not the harness)."""

    def follow(self) -> None:
        while not self.stop.is_set():
            try:
                super().follow()
            except Exception:  # the API server is away: try again shortly
                self.stop.wait(0.5)


def test_autoscaler_scales_after_api_server_and_etcd_restarts(
    local_cluster: LocalCluster,
    namespace: str,
    prometheus: tuple[str, Path],
    tiny_model: Path,
    tmp_path: Path,
    reliability_report: Report,
) -> None:
    prometheus_url, targets = prometheus
    custom = client.CustomObjectsApi(local_cluster.api_client)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, deployment(namespace))
    fleet = SturdyFleet(tiny_model, tmp_path, namespace, custom, targets)
    follower = threading.Thread(target=fleet.follow, daemon=True)
    follower.start()
    log_path = tmp_path / "autoscaler.log"
    with log_path.open("wb") as log:
        autoscaler = subprocess.Popen(
            [str(BIN / "kiln"), "autoscaler", "run", "--metrics-source=prometheus",
             f"--prometheus-url={prometheus_url}", "--prometheus-window=10s", "--interval=2",
             f"--namespace={namespace}", f"--kubeconfig={local_cluster.kubeconfig}",
             f"--metrics-port={free_port()}", f"--health-port={free_port()}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    heavy: Load | None = None
    problems: list[str] = []
    away: dict[str, float] = {}
    try:
        wait_for(lambda: fleet.replicas and fleet.replicas[0].ready, timeout=120, what="the first engine")
        time.sleep(4)  # a couple of autoscaler rounds before the fault
        for component in ("kube-apiserver", "etcd"):
            away[component] = cluster.restart_component(
                local_cluster.state, component, down_seconds=3, die_with_parent=True
            )
        if autoscaler.poll() is not None:
            problems.append(
                f"the autoscaler exited ({autoscaler.returncode}) when the control plane restarted"
            )
        heavy = Load(fleet, workers=8).start()

        def scaled_up() -> bool:
            obj: Any = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, NAME)
            return int(obj["spec"]["replicas"]) > 1

        try:
            wait_for(scaled_up, timeout=120, what="the autoscaler to scale up after the restarts")
        except AssertionError as exc:
            problems.append(str(exc))
        if autoscaler.poll() is not None:
            problems.append(f"the autoscaler exited ({autoscaler.returncode})")
    finally:
        if heavy is not None:
            heavy.finish()
        autoscaler.terminate()
        autoscaler.wait(timeout=30)
        fleet.shutdown()
    reliability_report.record(
        "autoscaler across kube-apiserver and etcd restarts",
        2,
        len(problems),
        ", ".join(f"{c} away {s:.1f} s" for c, s in away.items())
        + (f"; PROBLEMS: {problems}" if problems else "; same process, scaled up on TTFT afterwards"),
    )
    assert not problems, (problems, log_path.read_text(errors="replace")[-3000:])
