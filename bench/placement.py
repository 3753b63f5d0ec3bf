"""Placement benchmark: a random mix of TP 1/2/4/8 replicas filling a mixed GPU cluster, placed with
and without Kiln's NVLink-aware affinity; reports how many replicas keep their GPUs on one NVLink island
and how many free GPUs end up stranded.

Two engines place the pods:
* `--scheduler cluster`: the real kube-scheduler of a local control plane (a fresh one the benchmark
  starts and stops, or `--cluster-dir` of a running `kiln local up`) binds real pods on KWOK GPU
  nodes. Pods are created one at a time and each decision (bound or Unschedulable) is awaited, so
  the order of allocations is the order of submission. A second
  kube-scheduler with GPU bin-packing (NodeResourcesFit MostAllocated on nvidia.com/gpu) serves the
  `kiln+pack` arm.
* `--scheduler sim`: a pure model of the same decisions (filter: node affinity, free GPUs; score:
  NodeAffinity x2 plus the GPU packing score where configured; ties broken at random, as the scheduler's
  selectHost does), for machines without the control plane.

Neither kube-scheduler nor KWOK pick GPU indices. Which GPUs a pod gets on its node is modelled after
NVIDIA's device plugin (go-gpuallocator best-effort policy, `kiln.placement.simulate.allocate_gpus`):
the best-connected free set, a lone GPU at the lowest free index, allocated in binding order.

    python bench/placement.py --scheduler sim --trials 50
    python bench/placement.py --scheduler cluster --trials 5     # starts and stops its own cluster
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kiln import labels
from kiln.local.topology import load_topology
from kiln.placement import NodeTopology, ReplicaShape, plan
from kiln.placement.simulate import SimCluster, stranded_gpus, within_one_island

SHAPES = (1, 2, 4, 8)
ARMS = ("default", "islands-only", "kiln", "kiln+pack")
PACKING_SCHEDULER = "kiln-bench-packing"
NAMESPACE = "kiln-bench"
GPU_TOLERATION = {"key": labels.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


@dataclass
class Outcome:
    tp: int
    node: str | None = None
    gpus: tuple[int, ...] = ()


def workload(nodes: Sequence[NodeTopology], fill: float, rng: random.Random) -> list[int]:
    """Random TP sizes (uniform over 1/2/4/8) until they request `fill` of the cluster's GPUs."""
    budget = int(fill * sum(node.gpus for node in nodes))
    sizes: list[int] = []
    while True:
        fitting = [tp for tp in SHAPES if sum(sizes) + tp <= budget]
        if not fitting:
            return sizes
        sizes.append(rng.choice(fitting))


def affinity_for(arm: str, tp: int, nodes: Sequence[NodeTopology]) -> dict[str, Any]:
    if arm == "default":
        return {}
    placement = plan(ReplicaShape(tensor=tp), nodes, "Required")
    if not placement.feasible:
        raise RuntimeError(placement.reason)
    if arm == "islands-only":  # Kiln's island requirement without its best-fit preferences
        node_affinity = dict(placement.affinity.get("nodeAffinity", {}))
        node_affinity.pop("preferredDuringSchedulingIgnoredDuringExecution", None)
        return {"nodeAffinity": node_affinity} if node_affinity else {}
    return placement.affinity


# --- the pure scheduler model -------------------------------------------------------------------


def simulate(
    arm: str, sizes: Sequence[int], nodes: Sequence[NodeTopology], rng: random.Random
) -> list[Outcome]:
    cluster = SimCluster(nodes)
    outcomes = []
    for tp in sizes:
        bound = cluster.schedule(affinity_for(arm, tp, nodes), tp, rng=rng, pack_gpus=arm == "kiln+pack")
        outcomes.append(Outcome(tp) if bound is None else Outcome(tp, *bound))
    return outcomes


# --- the real scheduler --------------------------------------------------------------------------


class RealScheduler:
    """Pods on the local cluster (`kiln local up`), placed by its kube-scheduler."""

    def __init__(self, kubeconfig: Path, cluster_dir: Path) -> None:
        from kubernetes import config

        self.api_client = config.new_client_from_config(str(kubeconfig))
        self.host = self.api_client.configuration.host
        self.cluster_dir = cluster_dir
        self.packer: subprocess.Popen[bytes] | None = None

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Plain JSON against the API server (pods carry the planner's affinity byte for byte)."""
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        response = self.api_client.call_api(method, f"{self.host}{path}", headers, body)
        data = response.read()
        if response.status >= 400 and not (method == "POST" and response.status == 409):
            raise RuntimeError(f"{method} {path}: {response.status} {data!r}")
        result: dict[str, Any] = json.loads(data)
        return result

    def nodes(self) -> list[NodeTopology]:
        """The cluster's nodes, once the node lifecycle controller has lifted its not-ready taints."""
        deadline = time.monotonic() + 60
        while True:
            items = self.request("GET", "/api/v1/nodes")["items"]
            tainted = [
                node["metadata"]["name"]
                for node in items
                if any(t["key"].startswith("node.kubernetes.io/") for t in node["spec"].get("taints", []))
            ]
            if not tainted:
                return [NodeTopology.from_node(node) for node in items]
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes still not ready: {', '.join(tainted)}")
            time.sleep(0.5)

    def start_packing_scheduler(self, binary: Path) -> None:
        """A second kube-scheduler that bin-packs GPUs (MostAllocated on nvidia.com/gpu)."""
        config = {
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "leaderElection": {"leaderElect": False},
            "clientConnection": {"kubeconfig": str(self.cluster_dir / "scheduler.kubeconfig")},
            "profiles": [
                {
                    "schedulerName": PACKING_SCHEDULER,
                    "pluginConfig": [
                        {
                            "name": "NodeResourcesFit",
                            "args": {
                                "scoringStrategy": {
                                    "type": "MostAllocated",
                                    "resources": [{"name": labels.GPU_RESOURCE, "weight": 1}],
                                }
                            },
                        }
                    ],
                }
            ],
        }
        path = Path(tempfile.mkdtemp(prefix="kiln-bench-")) / "scheduler.yaml"
        path.write_text(yaml.safe_dump(config))
        log = open(path.with_suffix(".log"), "wb")  # noqa: SIM115 - lives as long as the process
        self.packer = subprocess.Popen(
            [str(binary), f"--config={path}", "--secure-port=0", "--v=1"], stdout=log, stderr=log
        )

    def stop(self) -> None:
        if self.packer is not None:
            self.packer.terminate()
            self.packer.wait(timeout=30)

    def ensure_namespace(self) -> None:
        self.request("POST", "/api/v1/namespaces", {"metadata": {"name": NAMESPACE}})

    def clear(self) -> None:
        pods = f"/api/v1/namespaces/{NAMESPACE}/pods"
        self.request("DELETE", f"{pods}?gracePeriodSeconds=0")
        deadline = time.monotonic() + 60
        while self.request("GET", pods)["items"]:
            if time.monotonic() > deadline:
                raise TimeoutError("bench pods did not go away")
            time.sleep(0.2)

    def place(self, name: str, tp: int, affinity: dict[str, Any], scheduler: str | None) -> str | None:
        """Create one pod and wait for the scheduler's verdict: its node, or None when Unschedulable."""
        container = {
            "name": "main",
            "image": "registry.k8s.io/pause:3.10",
            "resources": {"limits": {labels.GPU_RESOURCE: str(tp)}},
        }
        spec: dict[str, Any] = {
            "containers": [container],
            "tolerations": [GPU_TOLERATION],
            "affinity": affinity,
        }
        if scheduler:
            spec["schedulerName"] = scheduler
        pods = f"/api/v1/namespaces/{NAMESPACE}/pods"
        self.request("POST", pods, {"metadata": {"name": name}, "spec": spec})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pod = self.request("GET", f"{pods}/{name}")
            if pod["spec"].get("nodeName"):
                return str(pod["spec"]["nodeName"])
            for condition in pod.get("status", {}).get("conditions", []):
                if condition["type"] == "PodScheduled" and condition["status"] == "False":
                    return None
            time.sleep(0.05)
        raise TimeoutError(f"pod {name} got no scheduling decision in 30s")

    def run(self, arm: str, sizes: Sequence[int], nodes: Sequence[NodeTopology], trial: int) -> list[Outcome]:
        self.clear()
        state = SimCluster(nodes)
        scheduler = PACKING_SCHEDULER if arm == "kiln+pack" else None
        outcomes = []
        for index, tp in enumerate(sizes):
            pod = f"{arm.replace('+', '-')}-{trial}-{index}"
            node = self.place(pod, tp, affinity_for(arm, tp, nodes), scheduler)
            outcomes.append(Outcome(tp) if node is None else Outcome(tp, node, state.bind(node, tp)))
        return outcomes


# --- metrics ---------------------------------------------------------------------------------------


def summarize(outcomes: Sequence[Outcome], nodes: Sequence[NodeTopology]) -> dict[str, float]:
    by_name = {node.name: node for node in nodes}
    placed = [o for o in outcomes if o.node]
    multi = [o for o in placed if o.tp > 1]
    local = [o for o in multi if within_one_island(by_name[o.node].islands or (), o.gpus)]  # type: ignore[index]
    used: dict[str, set[int]] = {name: set() for name, node in by_name.items() if node.gpus}
    for outcome in placed:
        used[outcome.node].update(outcome.gpus)  # type: ignore[index]
    waiting = [o.tp for o in outcomes if not o.node]

    def stranded(group: int) -> int:
        """Free GPUs on nodes with an island of `group` that no NVLink-whole group of that size can use."""
        return sum(
            stranded_gpus(by_name[name].islands or [], set(range(by_name[name].gpus)) - gpus, group)
            for name, gpus in used.items()
            if by_name[name].max_island >= group
        )

    total_free = sum(by_name[name].gpus - len(gpus) for name, gpus in used.items())
    return {
        "replicas": len(outcomes),
        "placed": len(placed),
        "pending": len(waiting),
        "pending_gpus": sum(waiting),
        "island_local_share": 1.0 if not multi else len(local) / len(multi),
        "island_local_share_all": (len(placed) - len(multi) + len(local)) / max(1, len(placed)),
        "free_gpus": total_free,
        # Fragmentation: free GPUs on nodes that could host the smallest waiting replica inside one
        # island, which no such replica can use now (0 when nothing waits).
        "stranded_for_waiting": stranded(min(waiting)) if waiting else 0,
        "stranded_tp2": stranded(2),
        "stranded_tp4": stranded(4),
        "stranded_tp8": stranded(8),
    }


def aggregate(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.fmean(row[key] for row in rows), 4) for key in rows[0]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--topology", default="mixed")
    parser.add_argument("--fill", type=float, default=0.9)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--scheduler", choices=("cluster", "sim"), default="sim")
    parser.add_argument(
        "--cluster-dir",
        type=Path,
        help="use this running `kiln local up` cluster (default: start a fresh one)",
    )
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    arms = [arm for arm in args.arms.split(",") if arm]
    rng = random.Random(args.seed)

    real: RealScheduler | None = None
    own_cluster: Any = None
    if args.scheduler == "cluster":
        from kiln.local import build, cluster

        if args.cluster_dir:
            state = cluster.read_state(args.cluster_dir)
            if state is None:
                print(f"no local cluster in {args.cluster_dir} (`kiln local up`)", file=sys.stderr)
                return 2
            directory = args.cluster_dir
        else:  # a throwaway control plane of its own, on its own ports
            build.build(progress=lambda line: None)
            directory = Path(tempfile.mkdtemp(prefix="kiln-bench-cluster-"))
            own_cluster = cluster.Cluster(directory, args.topology)
            state = own_cluster.start(progress=lambda line: print(line, file=sys.stderr))
        real = RealScheduler(state.kubeconfig, Path(directory))
        nodes = real.nodes()
        real.ensure_namespace()
        if "kiln+pack" in arms:
            real.start_packing_scheduler(build.binary_paths()["kube-scheduler"])
    else:
        nodes = [NodeTopology.from_node(node) for node in load_topology(args.topology)]

    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}

    def run(arm: str, sizes: list[int], trial: int) -> list[Outcome]:
        if real is not None:
            return real.run(arm, sizes, nodes, trial)
        return simulate(arm, sizes, nodes, random.Random(f"{args.seed}-{arm}-{trial}"))

    started = time.monotonic()
    try:
        for trial in range(args.trials):
            sizes = workload(nodes, args.fill, rng)
            for arm in arms:
                results[arm].append(summarize(run(arm, sizes, trial), nodes))
    finally:
        if real is not None:
            real.stop()
        if own_cluster is not None:
            own_cluster.stop()
    report = {
        "topology": args.topology,
        "gpus": sum(node.gpus for node in nodes),
        "fill": args.fill,
        "trials": args.trials,
        "scheduler": args.scheduler,
        "seconds": round(time.monotonic() - started, 1),
        "arms": {arm: aggregate(rows) for arm, rows in results.items()},
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
