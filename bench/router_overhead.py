"""Router bench: what the router adds to a streamed request, against the same upstream reached directly.

Run: `.venv/bin/python bench/router_overhead.py [--out bench/results/router_overhead-cpu.json]`.

A fake engine (a raw asyncio server that streams a fixed SSE response, chunk by chunk) stands in for
the replicas so that the router, not the engine, is the bottleneck. In one run it measures:
* latency: one request at a time, direct vs through the router: p50/p99 of time to the first byte
  and to the end of the stream, and the difference (what the router adds);
* throughput: many concurrent streams through one router process pinned to one core (when the
  machine has more than one): completed requests/s, and the router's own CPU seconds, so that
  requests per router CPU-second is reported too (honest on a machine shared with other work);
* decision time of the pure choice (prompt text + block hashes + ranking) at 16 replicas and
  2k-character chat prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import string
import subprocess
import sys
import time
from pathlib import Path

import httpx

from kiln_router.pick import Policy, ReplicaState, pick
from kiln_router.prompt import chat_prompt

ENGINE_METRICS = (
    b'kiln_engine_queue_depth{model="fake"} 0.0\n'
    b'kiln_engine_running_requests{model="fake"} 0.0\n'
    b'kiln_engine_kv_cache_usage_ratio{model="fake"} 0.0\n'
)


# ------------------------------------------------------------------------------- the fake engine


class FakeEngine(asyncio.Protocol):
    """HTTP/1.1 keep-alive: POST streams `chunks` SSE events `interval` s apart; GET answers /metrics."""

    chunks = 32
    interval = 0.002

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            method, path = head.split(" ", 2)[:2]
            if method == "GET":
                body = ENGINE_METRICS if path == "/metrics" else b'{"object":"list","data":[]}'
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(body), body)
                )
            else:
                asyncio.get_running_loop().create_task(self.stream())

    async def stream(self) -> None:
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        for i in range(self.chunks):
            event = b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"text":"tok%d"}]}\n\n' % i
            self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))
            await asyncio.sleep(self.interval)
        done = b"data: [DONE]\n\n"
        self.transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))


async def serve_fake_engine(port: int, chunks: int, interval: float) -> None:
    FakeEngine.chunks, FakeEngine.interval = chunks, interval
    server = await asyncio.get_running_loop().create_server(FakeEngine, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


# ------------------------------------------------------------------------------- the load generator

END = b"\n\r\n0\r\n\r\n"  # the last SSE event's blank line, its chunk's CRLF, then the last chunk


def request_bytes(port: int, prompt: str) -> bytes:
    body = json.dumps({"model": "fake", "prompt": prompt, "max_tokens": 32, "stream": True}).encode()
    return (
        b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (port, len(body), body)
    )


async def one_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[float, float]:
    """Send one request on a kept-alive connection; (time to the first event, to the end) in seconds."""
    start = time.perf_counter()
    writer.write(request)
    data = await reader.read(65536)
    while b"data: " not in data:  # the first event, not just the headers (the router waits for it)
        more = await reader.read(65536)
        if not more:
            raise RuntimeError(f"connection closed before the first event: {data[:200]!r}")
        data += more
    first = time.perf_counter() - start
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"upstream answered {data[:200]!r}")
    while not data.endswith(END):
        more = await reader.read(65536)
        if not more:
            raise RuntimeError("connection closed mid-stream")
        data += more
    return first, time.perf_counter() - start


def prompts(n: int, chars: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(string.ascii_letters + " ") for _ in range(chars)) for _ in range(n)]


async def sequential(port: int, count: int, chars: int) -> dict[str, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    firsts, totals = [], []
    for p in prompts(count, chars):
        first, total = await one_stream(reader, writer, request_bytes(port, p))
        firsts.append(first)
        totals.append(total)
    writer.close()
    return {
        "ttfb_p50_ms": pct(firsts, 50),
        "ttfb_p99_ms": pct(firsts, 99),
        "total_p50_ms": pct(totals, 50),
        "total_p99_ms": pct(totals, 99),
    }


async def saturate(port: int, concurrency: int, seconds: float, chars: int) -> dict[str, float]:
    requests = [request_bytes(port, p) for p in prompts(64, chars)]
    done, errors = 0, 0
    stop = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal done, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop:
            try:
                await one_stream(reader, writer, requests[(i + done) % len(requests)])
                done += 1
            except (RuntimeError, ConnectionError):
                errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return {"requests": done, "errors": errors, "seconds": time.perf_counter() - start}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))], 3)


# ------------------------------------------------------------------------------- a stack to compare


def serve_starlette_proxy(port: int, upstream: str) -> None:
    """The same streaming passthrough on uvicorn + starlette + httpx, minimal (no choice, no retry)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    client = httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None))

    async def completions(request: Request) -> StreamingResponse:
        sent = client.build_request(
            "POST",
            upstream + request.url.path,
            content=await request.body(),
            headers={"content-type": "application/json"},
        )
        response = await client.send(sent, stream=True)
        return StreamingResponse(
            response.aiter_raw(),
            status_code=response.status_code,
            media_type=response.headers.get("content-type"),
            background=BackgroundTask(response.aclose),
        )

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ------------------------------------------------------------------------------- the run


def decision_times(replicas: int, prompt_chars: int, samples: int) -> dict[str, float]:
    """p50/p99 of the router's whole choice (chat prompt text + block hashes + ranking), in ms."""
    states = {
        f"10.0.{i // 250}.{i % 250}:8000": ReplicaState(queue_depth=i % 3, in_flight=i % 5)
        for i in range(replicas)
    }
    system = prompts(1, prompt_chars * 3 // 4, seed=1)[0]
    bodies = [
        {"messages": [{"role": "system", "content": system}, {"role": "user", "content": p}]}
        for p in prompts(200, prompt_chars // 4, seed=2)
    ]
    policy, times = Policy(), []
    for i in range(samples):
        start = time.perf_counter()
        prompt = chat_prompt(bodies[i % len(bodies)])
        pick(prompt.text, states, policy, prompt.conversation_chars)
        times.append(time.perf_counter() - start)
    return {"p50_ms": pct(times, 50), "p99_ms": pct(times, 99)}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: list[str], port: int, cpus: set[int] | None, nice: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    os.setpriority(os.PRIO_PROCESS, proc.pid, nice)
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except httpx.TransportError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{args} did not start") from None
            time.sleep(0.2)


def measure(name: str, port: int, pid: int | None, opts: argparse.Namespace) -> dict[str, object]:
    asyncio.run(sequential(port, 50, opts.prompt_chars))  # warm up connections and code paths
    row: dict[str, object] = {
        "path": name,
        **asyncio.run(sequential(port, opts.sequential, opts.prompt_chars)),
    }
    cpu_before = cpu_seconds(pid) if pid else 0.0
    result = asyncio.run(saturate(port, opts.concurrency, opts.seconds, opts.prompt_chars))
    row["streamed_requests_per_s"] = round(result["requests"] / result["seconds"], 1)
    row["errors"] = result["errors"]
    if pid:
        cpu = cpu_seconds(pid) - cpu_before
        row["proxy_cpu_utilization"] = round(cpu / result["seconds"], 2)
        row["streamed_requests_per_proxy_cpu_s"] = round(result["requests"] / cpu, 1) if cpu else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--chunks", type=int, default=32, help="SSE events per response")
    parser.add_argument("--chunk-interval-ms", type=float, default=2.0)
    parser.add_argument("--prompt-chars", type=int, default=2000)
    parser.add_argument("--sequential", type=int, default=300, help="requests for the latency rows")
    parser.add_argument("--concurrency", type=int, default=64, help="streams at once for throughput")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--replicas", type=int, default=16, help="for the decision time")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="scheduling priority of the bench's processes (root may go below 0)",
    )
    parser.add_argument(
        "--compare-starlette",
        action="store_true",
        help="also measure a minimal uvicorn + starlette + httpx proxy",
    )
    parser.add_argument("--serve-fake-engine", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-starlette-proxy", nargs=2, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.serve_fake_engine:
        asyncio.run(serve_fake_engine(opts.serve_fake_engine, opts.chunks, opts.chunk_interval_ms / 1000))
        return
    if opts.serve_starlette_proxy:
        serve_starlette_proxy(int(opts.serve_starlette_proxy[0]), opts.serve_starlette_proxy[1])
        return

    cpus = sorted(os.sched_getaffinity(0))
    router_cpus = {cpus[0]} if len(cpus) > 1 else None  # the router alone on one core
    other_cpus = set(cpus[1:]) if len(cpus) > 1 else None
    if other_cpus:
        os.sched_setaffinity(0, other_cpus)
    os.setpriority(os.PRIO_PROCESS, 0, opts.nice)
    load_before = os.getloadavg()
    decision = decision_times(opts.replicas, opts.prompt_chars, 5000)
    engine_port, router_port = free_port(), free_port()
    fake = [
        sys.executable,
        __file__,
        "--chunks",
        str(opts.chunks),
        "--chunk-interval-ms",
        str(opts.chunk_interval_ms),
    ]
    engine = start([*fake, "--serve-fake-engine", str(engine_port)], engine_port, other_cpus, opts.nice)
    procs = [engine]
    try:
        serve = [
            sys.executable,
            "-m",
            "kiln_router.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--log-level",
            "warning",
        ]
        upstream = f"127.0.0.1:{engine_port}"
        args = [*serve, "--port", str(router_port), "--endpoints", upstream]
        router = start(args, router_port, router_cpus, opts.nice)
        procs.append(router)
        rows = [
            measure("direct", engine_port, None, opts),
            measure("kiln-router", router_port, router.pid, opts),
        ]
        if opts.compare_starlette:
            port = free_port()
            args = [sys.executable, __file__, "--serve-starlette-proxy", str(port), f"http://{upstream}"]
            proxy = start(args, port, router_cpus, opts.nice)
            procs.append(proxy)
            rows.append(measure("starlette+httpx (minimal proxy)", port, proxy.pid, opts))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    direct = rows[0]
    for row in rows[1:]:
        for key in ("ttfb_p50_ms", "ttfb_p99_ms", "total_p50_ms", "total_p99_ms"):
            row[f"added_{key}"] = round(float(row[key]) - float(direct[key]), 3)  # type: ignore[arg-type]
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": {
            "cpus": len(cpus),
            "router_pinned_to": sorted(router_cpus or []),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "workload": {
            "chunks_per_response": opts.chunks,
            "chunk_interval_ms": opts.chunk_interval_ms,
            "prompt_chars": opts.prompt_chars,
            "concurrency": opts.concurrency,
            "seconds": opts.seconds,
        },
        "decision": {"replicas": opts.replicas, "prompt_chars": opts.prompt_chars, **decision},
        "rows": rows,
    }
    print(json.dumps(result, indent=2))
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
