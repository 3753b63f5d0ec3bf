"""Host time of one engine step at 4,096 running sequences, without a model (issue 18).

A step's host work, each part timed on its own: the scheduler's decision (`Scheduler.schedule`,
block allocation included), building the batch's inputs (the decode-graph path's host side,
`DecodeGraphs.run` up to the model, which is what a decode step runs on a GPU; tensors stay on the
CPU here), and `Scheduler.complete_step` (the prefix cache's bookkeeping). Sequences decode with
prompts of `--prompt-len` tokens on a cache big enough that nothing is preempted, the way the
offline benchmark runs them.

`--baseline REV` runs the same measurement on the engine as of git revision REV (extracted to a
temporary directory, in a subprocess) and prints both side by side, so a change is measured against
the code before it in one run on one machine.

    PYTHONPATH=engine-image python bench/scheduler_step.py --baseline HEAD~1 \
        --out bench/results-committed/scheduler_step-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from kiln_engine.block_manager import BlockManager
from kiln_engine.config import EngineConfig
from kiln_engine.interface import SamplingParams
from kiln_engine.model_runner import DecodeGraphs, capture_sizes
from kiln_engine.scheduler import Scheduler
from kiln_engine.sequence import Sequence

ROOT = Path(__file__).resolve().parent.parent


class HostOnlyGraphs(DecodeGraphs):
    """`DecodeGraphs` whose model call is skipped: `run` does all of a decode step's host work."""

    def _forward(self, bs: int, lora: bool = True) -> torch.Tensor:
        return self.input_ids[:bs]


def measure(num_seqs: int, prompt_len: int, steps: int, block_size: int) -> dict[str, Any]:
    max_len = prompt_len + steps + 64
    num_blocks = num_seqs * -(-max_len // block_size) + 16
    config = EngineConfig(
        max_num_seqs=num_seqs,
        max_tokens_per_step=max(16384, num_seqs),
        block_size=block_size,
        num_kv_blocks=num_blocks,
        max_model_len=max_len,
    )
    sched = Scheduler(config, BlockManager(num_blocks, block_size, config.prefix_caching))
    runner = SimpleNamespace(  # what DecodeGraphs reads of a ModelRunner
        device=torch.device("cpu"),
        block_size=block_size,
        max_model_len=max_len,
        num_blocks=num_blocks,
        lora=None,
    )
    graphs = HostOnlyGraphs(runner, capture_sizes(num_seqs))  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for i in range(num_seqs):  # distinct prompts: no prefix sharing
        sched.add(Sequence(f"r{i}", [(i * 7919 + j) % 32000 for j in range(prompt_len)], params))
    while any(s.num_uncomputed_tokens > 1 for s in sched.running) or sched.waiting:  # prefill, untimed
        out = sched.schedule()
        sched.complete_step(out)
        for c in out.chunks:
            if c.samples:
                c.seq.append_token(1)
    phases: dict[str, list[float]] = {"schedule": [], "build_inputs": [], "complete_step": []}
    totals = []
    for step in range(steps):
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        graphs.run(out.chunks)
        t2 = time.perf_counter()
        sched.complete_step(out)
        t3 = time.perf_counter()
        assert len(out.chunks) == num_seqs and not out.preempted, (len(out.chunks), len(out.preempted))
        for c in out.chunks:  # the sampled token (the engine's bookkeeping, not timed)
            c.seq.append_token(step % 32000)
        phases["schedule"].append(t1 - t0)
        phases["build_inputs"].append(t2 - t1)
        phases["complete_step"].append(t3 - t2)
        totals.append(t3 - t0)
    ms = {k: statistics.median(v) * 1e3 for k, v in phases.items()}
    return {
        "num_seqs": num_seqs,
        "prompt_len": prompt_len,
        "steps": steps,
        "block_size": block_size,
        "median_ms": ms,
        "total_ms_median": statistics.median(totals) * 1e3,
        "total_ms_p90": sorted(totals)[int(0.9 * (len(totals) - 1))] * 1e3,
    }


def run_baseline(rev: str, argv: list[str]) -> dict[str, Any]:
    """The same measurement on the engine at `rev`, in a subprocess with that tree on its path."""
    with tempfile.TemporaryDirectory(prefix="kiln-sched-base-") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev, "engine-image/kiln_engine"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        out = Path(tmp) / "base.json"
        env = {**os.environ, "PYTHONPATH": str(Path(tmp) / "engine-image")}
        subprocess.run([sys.executable, __file__, *argv, "--out", str(out)], env=env, check=True)
        return dict(json.loads(out.read_text())["current"])


def table(rows: dict[str, dict[str, Any]]) -> str:
    names = list(rows)
    lines = [f"{'ms per step (median)':24}" + "".join(f"{n:>16}" for n in names)]
    for phase in ("schedule", "build_inputs", "complete_step"):
        lines.append(f"{phase:24}" + "".join(f"{rows[n]['median_ms'][phase]:16.2f}" for n in names))
    lines.append(f"{'total (median)':24}" + "".join(f"{rows[n]['total_ms_median']:16.2f}" for n in names))
    lines.append(f"{'total (p90)':24}" + "".join(f"{rows[n]['total_ms_p90']:16.2f}" for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-seqs", type=int, default=4096)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--baseline", metavar="REV", help="also measure the engine at this git revision")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    shape = ["--num-seqs", str(args.num_seqs), "--prompt-len", str(args.prompt_len)]
    shape += ["--steps", str(args.steps), "--block-size", str(args.block_size)]
    result: dict[str, Any] = {
        "what": "host time per engine step (schedule, decode-graph inputs, complete_step), no model",
        "argv": sys.argv[1:] if argv is None else argv,
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rows: dict[str, dict[str, Any]] = {}
    if args.baseline:
        rows[f"baseline {args.baseline}"] = result["baseline"] = run_baseline(args.baseline, shape)
        result["baseline_rev"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", args.baseline], capture_output=True, text=True, check=True
        ).stdout.strip()
    rows["this tree"] = result["current"] = measure(
        args.num_seqs, args.prompt_len, args.steps, args.block_size
    )
    result["load_average_1m_after"] = os.getloadavg()[0]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(f"{args.num_seqs} running sequences, prompts {args.prompt_len}, {args.steps} decode steps")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
