"""How the operator scales: N LLMDeployments on a local cluster of many fake (KWOK) GPU nodes.

Starts a fresh local control plane whose topology is `--nodes` 8-GPU H100 nodes (NVSwitch, one
island), starts `kiln operator run --all-namespaces`, creates `--deployments` LLMDeployments (each
with its own model, so each builds its own engine; `--shared` makes them share one), and reports:

* seconds from the first create until every LLMDeployment is Ready;
* API requests the operator's reconcilers sent, per deployment (kopf's watch streams excluded);
* the operator's peak resident memory (VmHWM);
* CPU seconds (user + system) per deployment of the operator and of the API server, from the
  first create until all are Ready (and the operator's CPU seconds before it, at start).

    .venv/bin/python bench/operator_scale.py --nodes 2000 --deployments 100
    .venv/bin/python bench/operator_scale.py --nodes 2000 --deployments 1000

`--memray FILE` runs the operator under memray, for where its memory goes.

Results are printed as JSON and written to bench/results/operator_scale-<nodes>-<n>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
GROUP, VERSION = "kiln.dev", "v1alpha1"
PRODUCT = "NVIDIA-H100-80GB-HBM3"


def topology(nodes: int) -> dict[str, Any]:
    return {
        "name": f"bench-{nodes}",
        "description": f"{nodes} 8-GPU H100 nodes for the operator scale benchmark",
        "pools": [
            {"name": "system", "count": 1, "cpu": "8", "memory": "32Gi"},
            {
                "name": "h100",
                "count": nodes,
                "cpu": "192",
                "memory": "2048Gi",
                "machine": "DGX-H100",
                "gpu": {"model": "H100-SXM5-80GB", "count": 8, "islands": [[0, 1, 2, 3, 4, 5, 6, 7]]},
                "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
            },
        ],
    }


def deployment(index: int, shared: bool) -> dict[str, Any]:
    model = "bench-model" if shared else f"bench-model-{index}"
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMDeployment",
        "metadata": {"name": f"llm-{index:04d}"},
        "spec": {
            "model": {"source": f"hf://kiln-bench/{model}@0123456789abcdef"},
            "engine": {"quantization": "fp8"},
            "gpu": {"product": PRODUCT},
            "replicas": 1,
            "build": {"cache": "s3://kiln-bench/engines"},
        },
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (its own threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def api_request_counts(metrics_port: int) -> dict[str, float]:
    """The operator's API requests so far, by `verb resource`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("kiln_operator_api_requests_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        counts[f"{labels.get('verb')} {labels.get('resource')}"] = float(line.rsplit(" ", 1)[1])
    return counts


def api_requests(metrics_port: int) -> float:
    return sum(api_request_counts(metrics_port).values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--deployments", type=int, default=100)
    parser.add_argument("--shared", action="store_true", help="all deployments share one engine")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument(
        "--memray",
        type=Path,
        help="run the operator under memray (pip install memray), writing its capture here; "
        "`memray stats FILE` then names the allocations at the peak (the peak RSS includes memray's own)",
    )
    args = parser.parse_args()

    from kubernetes import client, config

    from kiln.local.cluster import Cluster

    work = Path(tempfile.mkdtemp(prefix="kiln-bench-operator-"))
    topo = work / "topology.yaml"
    topo.write_text(yaml.safe_dump(topology(args.nodes)))
    cluster = Cluster(work / "cluster", str(topo), die_with_parent=True)
    started = time.monotonic()
    operator: subprocess.Popen[bytes] | None = None
    try:
        # KWOK marks nodes Ready a few at a time: give a big fleet the time it needs.
        cluster.start(
            progress=lambda line: print(f"[cluster] {line}", file=sys.stderr),
            timeout=max(90.0, args.nodes * 0.5),
        )
        print(f"[bench] {args.nodes} GPU nodes up in {time.monotonic() - started:.0f} s", file=sys.stderr)
        api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        custom = client.CustomObjectsApi(api)
        core = client.CoreV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="bench")))
        metrics_port = free_port()
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
        log = (work / "operator.log").open("wb")
        profiler = [str(Path(sys.executable).parent / "memray"), "run", "-q", "-o", str(args.memray)]
        operator = subprocess.Popen(
            [*(profiler if args.memray else []), str(Path(sys.executable).parent / "kiln"), "operator", "run",
             "--all-namespaces",
             f"--metrics-port={metrics_port}", "--health-port=0", "--log-format=json", "--log-level=INFO"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:  # the operator serves /metrics once it has started
            try:
                baseline = api_requests(metrics_port)
                break
            except OSError:
                if time.monotonic() > deadline or operator.poll() is not None:
                    raise
                time.sleep(0.5)

        assert cluster.state is not None
        apiserver = cluster.state.pids["kube-apiserver"]
        cpu_at_start = {"operator": cpu_seconds(operator.pid), "apiserver": cpu_seconds(apiserver)}
        first = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda i: custom.create_namespaced_custom_object(
                        GROUP, VERSION, "bench", "llmdeployments", deployment(i, args.shared)
                    ),
                    range(args.deployments),
                )
            )
        created = time.monotonic() - first
        ready = 0
        while True:
            listed: Any = custom.list_namespaced_custom_object(GROUP, VERSION, "bench", "llmdeployments")
            items = listed["items"]
            ready = sum((item.get("status") or {}).get("phase") == "Ready" for item in items)
            if ready == args.deployments:
                break
            if time.monotonic() - first > args.timeout:
                break
            if operator.poll() is not None:
                raise SystemExit(
                    f"the operator exited with {operator.returncode}; see {work / 'operator.log'}"
                )
            time.sleep(1)
        elapsed = time.monotonic() - first
        cpu_used = {
            "operator": cpu_seconds(operator.pid) - cpu_at_start["operator"],
            "apiserver": cpu_seconds(apiserver) - cpu_at_start["apiserver"],
        }
        requests = api_requests(metrics_port) - baseline
        result = {
            "nodes": args.nodes,
            "deployments": args.deployments,
            "shared_engine": args.shared,
            "ready": ready,
            "seconds_to_create": round(created, 1),
            "seconds_to_all_ready": round(elapsed, 1) if ready == args.deployments else None,
            "api_requests_per_deployment": round(requests / args.deployments, 1),
            "api_requests_per_deployment_by_kind": {
                key: round(value / args.deployments, 1)
                for key, value in sorted(api_request_counts(metrics_port).items())
            },
            "operator_peak_rss_mib": round(peak_rss_mib(operator.pid), 1),
            "operator_cpu_seconds_at_start": round(cpu_at_start["operator"], 1),
            "operator_cpu_seconds_per_deployment": round(cpu_used["operator"] / args.deployments, 3),
            "apiserver_cpu_seconds_per_deployment": round(cpu_used["apiserver"] / args.deployments, 3),
            "load_average_at_end": os.getloadavg()[0],
            "operator_log": str(work / "operator.log"),
        }
        print(json.dumps(result, indent=2))
        out = ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"operator_scale-{args.nodes}-{args.deployments}.json").write_text(
            json.dumps(result, indent=2)
        )
    finally:
        if operator is not None and operator.poll() is None:
            operator.send_signal(signal.SIGTERM)
            try:
                operator.wait(20)
            except subprocess.TimeoutExpired:
                operator.kill()
        cluster.stop()


if __name__ == "__main__":
    main()
