"""What clients see when one pod of a two-pod replica goes away: `kiln-engine serve` twice on loopback
(the multi-pod contract, TP1 x PP2 of examples/tiny-chat), two clients asking back to back, then pod 1
gets SIGTERM (its pod deleted) or SIGKILL (it died). Counts answers, requests never admitted
(connection refused, a draining 503: a load balancer sends those again) and requests lost (admitted,
then an error or a dropped connection), until pod 0 has exited.

    python bench/multi_node_leave.py --end leave --out /tmp/leave.json

Run it with PYTHONPATH pointing at an older engine-image/ to measure that engine instead. A pod 1 still
running `GRACE_S` after SIGTERM is SIGKILLed, as the kubelet does. The pods' heartbeat timeout is the
engine tests' 4 s (KILN_GROUP_HEARTBEAT_TIMEOUT; 20 s by default).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kiln_engine.build.pipeline import BuildOptions, run_build  # noqa: E402
from kiln_engine.build.progress import Progress  # noqa: E402
from tests.engine.test_pipeline_parallel_server import start_pod, wait_status  # noqa: E402
from tests.engine.test_server import free_port  # noqa: E402

CLIENTS = 2
GRACE_S = 30.0  # examples/tiny-cpu-pp2.yaml's terminationGracePeriodSeconds


def ask_loop(url: str, tally: dict[str, Any], lock: threading.Lock, halt: threading.Event) -> None:
    body = {"model": "tiny-llama", "prompt": "What is Kiln?", "max_tokens": 32, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    with httpx.Client(timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        while not halt.is_set():
            try:
                response = client.post(url, json=body)
                kind = "answered" if response.status_code == 200 else (
                    "not_admitted" if response.status_code == 503 else "lost")  # fmt: skip
                why = f"HTTP {response.status_code}"
            except httpx.ConnectError:
                kind, why = "not_admitted", "connection refused"
                time.sleep(0.1)
            except httpx.HTTPError as error:
                kind, why = "lost", type(error).__name__
            with lock:
                tally[kind] += 1
                if kind != "answered":
                    tally["why"][f"{kind}: {why}"] = tally["why"].get(f"{kind}: {why}", 0) + 1


def run(end: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        model = str(ROOT / "examples" / "tiny-chat")
        opts = BuildOptions(model=model, output=f"{tmp}/art", tensor_parallel_size=1,
                            pipeline_parallel_size=2, measure_capacity=False)  # fmt: skip
        artifact = run_build(opts, Progress(out=io.StringIO(), bar=False))
        api, health, rendezvous = free_port(), free_port(), free_port()
        pods = [start_pod(artifact, 1, health, rendezvous)]
        try:
            wait_status(f"http://127.0.0.1:{health}/health", 503, pods)
            pods.insert(0, start_pod(artifact, 0, api, rendezvous))
            wait_status(f"http://127.0.0.1:{api}/ready", 200, pods)
            tally: dict[str, Any] = {"answered": 0, "not_admitted": 0, "lost": 0, "why": {}}
            lock, halt = threading.Lock(), threading.Event()
            url = f"http://127.0.0.1:{api}/v1/completions"
            args = (url, tally, lock, halt)
            threads = [threading.Thread(target=ask_loop, args=args) for _ in range(CLIENTS)]
            for thread in threads:
                thread.start()
            time.sleep(3.0)
            with lock:
                before = tally["answered"]
            started = time.monotonic()
            os.killpg(pods[1].pid, signal.SIGTERM if end == "leave" else signal.SIGKILL)
            killed_after_grace = False
            try:
                if end == "leave":
                    try:
                        pods[1].wait(GRACE_S)
                    except subprocess.TimeoutExpired:  # what the kubelet does after the grace period
                        os.killpg(pods[1].pid, signal.SIGKILL)
                        killed_after_grace = True
                pods[0].wait(90)
            finally:
                exited = time.monotonic() - started
                time.sleep(1.0)
                halt.set()
                for thread in threads:
                    thread.join(70)
            return {
                "end": end,
                "clients": CLIENTS,
                "answered_before": before,
                "answered_after_signal": tally["answered"] - before,
                "not_admitted": tally["not_admitted"],
                "lost": tally["lost"],
                "why": tally["why"],
                "pod0_exit_status": pods[0].returncode,
                "pod1_exit_status": pods[1].poll(),
                "pod0_exited_after_s": round(exited, 2),
                "pod1_killed_after_grace": killed_after_grace,
            }
        finally:
            for p in pods:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--end", choices=["leave", "kill"], required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run(args.end)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
