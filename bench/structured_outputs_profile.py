"""Where a constrained step's host time goes (issue #20): bench/structured_outputs.py's batch of
128 requests x 128 tokens, unconstrained and 100% constrained, with the grammar path's functions
timed (the mask fill, xgrammar's batch calls, the bitmask's apply, the wait for a lookahead step's
token), and the device's busy time (the sum of its kernels' durations, from CUPTI) beside the wall
time: a constrained run whose device time grows costs on the GPU (mask kernels), one whose wall time
grows alone leaves the GPU idle while the host catches up.

    PYTHONPATH=engine-image:bench python bench/structured_outputs_profile.py   # on a CUDA device
    PYTHONPATH=engine-image:bench python bench/structured_outputs_profile.py --model llama3-8b-shape
"""

from __future__ import annotations

import argparse
import collections
import functools
import time
from collections.abc import Callable
from typing import Any

import structured_outputs as so
import torch
import xgrammar as xgr
from host import host_info

from kiln_engine import grammar, logits_adjust

SPENT: dict[str, float] = collections.defaultdict(float)
CALLS: collections.Counter[str] = collections.Counter()


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - start
            CALLS[name] += 1

    return wrapper


def instrument() -> None:
    fill = logits_adjust.GrammarMasks.fill

    def timed_fill(self: logits_adjust.GrammarMasks) -> Any:
        if self.pending is not None:
            self.pending = timed("pending(wait token)", self.pending)
        return timed("GrammarMasks.fill total", fill)(self)

    logits_adjust.GrammarMasks.fill = timed_fill  # type: ignore[method-assign]
    grammar.allocate_bitmask = timed("allocate_bitmask", grammar.allocate_bitmask)
    grammar.apply_bitmask = timed("apply_bitmask", grammar.apply_bitmask)
    batch = xgr.BatchGrammarMatcher
    batch.batch_fill_next_token_bitmask = timed("xgr batch_fill", batch.batch_fill_next_token_bitmask)  # type: ignore[method-assign]
    batch.batch_accept_token = staticmethod(timed("xgr batch_accept", batch.batch_accept_token))  # type: ignore[method-assign]
    logits_adjust.LogitsAdjustment.apply = timed(  # type: ignore[method-assign]
        "LogitsAdjustment.apply", logits_adjust.LogitsAdjustment.apply
    )


def device_busy_ms(run: Callable[[], Any]) -> tuple[Any, float]:
    """`run()`'s result and the summed duration of the kernels and copies it put on the device."""
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        result = run()
        torch.cuda.synchronize()
    busy_us = sum(e.self_device_time_total for e in prof.key_averages())
    return result, busy_us / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("tiny", "llama3-8b-shape"), default="tiny")
    args = parser.parse_args()
    print(f"host: {host_info()}")
    instrument()
    engine = so.engine_for("cuda", args.model)
    so.throughput(engine, 0.0, "cuda", 128, 128, 1)  # warm-up
    for share in (0.0, 1.0):
        so.throughput(engine, share, "cuda", 128, 128, 1)  # a run of this share first: its compiles
        SPENT.clear()
        CALLS.clear()
        start = time.perf_counter()
        rate = so.throughput(engine, share, "cuda", 128, 128, 1)
        print(f"share {share}: {rate:.0f} tok/s, wall {(time.perf_counter() - start) * 1e3:.0f} ms")
        for name in sorted(SPENT, key=SPENT.__getitem__, reverse=True):
            per_call = SPENT[name] / max(CALLS[name], 1) * 1e6
            print(
                f"  {name:28s} {SPENT[name] * 1e3:8.1f} ms  {CALLS[name]:5d} calls  {per_call:8.1f} us/call"
            )
        start = time.perf_counter()
        rate, busy = device_busy_ms(functools.partial(so.throughput, engine, share, "cuda", 128, 128, 1))
        wall = (time.perf_counter() - start) * 1e3
        print(
            f"  profiled again: {rate:.0f} tok/s, wall {wall:.0f} ms,"
            f" device busy {busy:.0f} ms ({busy / wall:.0%})"
        )


if __name__ == "__main__":
    main()
