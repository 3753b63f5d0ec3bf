"""Capacity of one replica, measured at build time: prefill and decode tokens/s, and the largest burst
of concurrent requests whose time-to-first-token at the deployment's percentile (p50, p90, ...)
stays within its target. The percentile and target are recorded with the figures, so a reader
(the autoscaler) can tell which target they hold for.

Drives any `Engine` (add_request / step) with synthetic random prompts, so prefix caching cannot
flatter the numbers. The search over burst sizes is a pure function of a `measure(c) -> Burst`
callable, tested without an engine.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from kiln_engine.build.manifest import TTFT_PERCENTILES, Capacity
from kiln_engine.interface import Engine, SamplingParams


@dataclass(frozen=True)
class Burst:
    """`concurrency` requests submitted at once: their TTFTs and the throughput they saw."""

    concurrency: int
    ttfts_s: tuple[float, ...]
    prefill_tokens_per_second: float
    output_tokens_per_second: float
    elapsed_s: float

    @classmethod
    def timed(
        cls,
        ttfts_s: tuple[float, ...],
        all_first_s: float,
        decode_tokens: int,
        prompt_tokens: int,
        elapsed_s: float,
    ) -> Burst:
        """A burst from its timings: prefill until the last first token, decode after it."""
        decode_time = elapsed_s - all_first_s
        return cls(
            concurrency=len(ttfts_s),
            ttfts_s=ttfts_s,
            prefill_tokens_per_second=len(ttfts_s) * prompt_tokens / max(all_first_s, 1e-9),
            output_tokens_per_second=decode_tokens / decode_time if decode_time > 0 else 0.0,
            elapsed_s=elapsed_s,
        )

    @property
    def ttft_p90_s(self) -> float:
        return percentile(self.ttfts_s, 0.9)

    def ttft_s(self, q: float) -> float:
        """The burst's TTFT at quantile `q` (0..1)."""
        return percentile(self.ttfts_s, q)


def percentile(values: tuple[float, ...] | list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def load_shape(max_model_len: int) -> tuple[int, int]:
    """(prompt tokens, output tokens) of the synthetic requests, fitting the context."""
    prompt = max(8, min(512, max_model_len // 4))
    output = max(2, min(64, max_model_len - prompt - 1))
    return prompt, output


def fits_budget(bursts: list[Burst], concurrency: int, left_s: float) -> bool:
    """Whether a burst of `concurrency` is expected to finish in `left_s`, scaling the largest burst
    measured so far linearly (batching makes a bigger burst cost at most proportionally more), so
    the budget is a bound and not just a point after which nothing new starts."""
    if left_s <= 0:
        return False
    if not bursts:
        return True
    largest = max(bursts, key=lambda b: b.concurrency)
    return largest.elapsed_s * concurrency / largest.concurrency <= left_s


def search_max_concurrency(
    measure: Callable[[int], Burst],
    max_concurrency: int,
    target_s: float,
    deadline: float | None = None,
    quantile: float = 0.9,
) -> tuple[int, list[Burst]]:
    """The largest concurrency in [1, max_concurrency] whose burst meets `target_s` at `quantile`
    (0 if none)."""
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile {quantile} is not in (0, 1]")
    return _search(measure, max_concurrency, target_s, deadline, quantile)


def _search(
    measure: Callable[[int], Burst],
    max_concurrency: int,
    target_s: float,
    deadline: float | None,
    quantile: float,
) -> tuple[int, list[Burst]]:
    """The search of `search_max_concurrency`.

    Doubles until a burst misses (or `max_concurrency` passes), then bisects between the last burst
    that met the target and the first that missed. Stops early, keeping what it knows, before a burst
    that would not finish by `deadline` (a `time.monotonic()` value). Returns the answer and every
    burst measured.
    """
    bursts: list[Burst] = []

    def ok(c: int) -> bool:
        b = measure(c)
        bursts.append(b)
        return b.ttft_s(quantile) <= target_s

    def out_of_time(next_c: int) -> bool:
        return deadline is not None and not fits_budget(bursts, next_c, deadline - time.monotonic())

    good, bad = 0, max_concurrency + 1
    c = 1
    while c <= max_concurrency:
        if ok(c):
            good = c
        else:
            bad = c
            break
        if c == max_concurrency or out_of_time(min(c * 2, max_concurrency)):
            return good, bursts
        c = min(c * 2, max_concurrency)
    while bad - good > 1 and not out_of_time((good + bad) // 2):
        mid = (good + bad) // 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good, bursts


class _Driver:
    """Runs bursts of synthetic requests through an engine."""

    def __init__(
        self, engine: Engine, vocab_size: int, prompt_tokens: int, output_tokens: int, seed: int
    ) -> None:
        self.engine = engine
        self.vocab_size = vocab_size
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.rng = random.Random(seed)
        self.counter = 0

    def prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(self.vocab_size) for _ in range(n)]

    def burst(self, concurrency: int, output_tokens: int | None = None) -> Burst:
        out_tokens = output_tokens or self.output_tokens
        params = SamplingParams(max_tokens=out_tokens, temperature=0.0, ignore_eos=True)
        ids = []
        for _ in range(concurrency):
            self.counter += 1
            rid = f"capacity-{self.counter}"
            ids.append(rid)
        prompts = [self.prompt(self.prompt_tokens) for _ in ids]
        start = time.perf_counter()
        for rid, prompt in zip(ids, prompts, strict=True):
            self.engine.add_request(rid, prompt, params)
        first: dict[str, float] = {}
        generated = 0
        while self.engine.has_unfinished():
            outputs = self.engine.step()
            now = time.perf_counter()
            for o in outputs:
                if o.new_token_ids and o.request_id not in first:
                    first[o.request_id] = now - start
                generated += len(o.new_token_ids)
        end = time.perf_counter()
        elapsed = end - start
        return Burst.timed(
            ttfts_s=tuple(first.get(rid, elapsed) for rid in ids),
            all_first_s=max(first.values()) if first else elapsed,
            decode_tokens=generated - len(first),
            prompt_tokens=self.prompt_tokens,
            elapsed_s=elapsed,
        )


def measure_capacity(
    engine: Engine,
    *,
    vocab_size: int,
    max_batch_size: int,
    ttft_target_ms: float,
    ttft_percentile: int = 90,
    measured_on: str = "",
    time_budget_s: float = 300.0,
    seed: int = 0,
    report: Callable[[float, str], None] | None = None,
) -> Capacity:
    """Warm up, search the largest burst within the TTFT target at `ttft_percentile`, then decode at
    a full batch."""
    prompt_tokens, output_tokens = load_shape(engine.max_model_len)
    driver = _Driver(engine, vocab_size, prompt_tokens, output_tokens, seed)
    return measure_bursts(
        driver.burst,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        max_batch_size=max_batch_size,
        ttft_target_ms=ttft_target_ms,
        ttft_percentile=ttft_percentile,
        measured_on=measured_on,
        time_budget_s=time_budget_s,
        report=report,
    )


def measure_bursts(
    burst: Callable[[int, int | None], Burst],
    *,
    prompt_tokens: int,
    output_tokens: int,
    max_batch_size: int,
    ttft_target_ms: float,
    ttft_percentile: int = 90,
    measured_on: str = "",
    time_budget_s: float = 300.0,
    report: Callable[[float, str], None] | None = None,
) -> Capacity:
    """The capacity method over any `burst(concurrency, output_tokens or None)`: an engine in this
    process (`measure_capacity`) or a serving replica over HTTP (`capacity_http`)."""
    if ttft_percentile not in TTFT_PERCENTILES:
        raise ValueError(f"ttft_percentile {ttft_percentile}: use one of {TTFT_PERCENTILES}")
    quantile = ttft_percentile / 100
    progress = report or (lambda fraction, message: None)
    started = time.monotonic()
    burst(1, 4)  # warm-up: allocations, kernels, caches
    progress(0.1, f"warm; {prompt_tokens}-token prompts, {output_tokens} output tokens")
    searches = max(1, math.ceil(math.log2(max_batch_size)) + 1)
    done: list[Burst] = []

    def measure(c: int) -> Burst:
        b = burst(c, None)
        progress(0.1 + 0.7 * min(1.0, len(done) / (2 * searches)),
                 f"{c} concurrent: p{ttft_percentile} TTFT {b.ttft_s(quantile) * 1000:.0f} ms")  # fmt: skip
        done.append(b)
        return b

    best, bursts = search_max_concurrency(
        measure, max_batch_size, ttft_target_ms / 1000.0, deadline=started + time_budget_s, quantile=quantile
    )
    full = next((b for b in bursts if b.concurrency == max_batch_size), None)
    if full is None and fits_budget(bursts, max_batch_size, started + time_budget_s - time.monotonic()):
        full = burst(max_batch_size, None)
        bursts.append(full)
    largest = full or max(bursts, key=lambda b: b.concurrency)
    at_best = next((b for b in bursts if b.concurrency == best), None)
    progress(
        1.0, f"{largest.output_tokens_per_second:.0f} output tokens/s at {largest.concurrency} concurrent"
    )
    return Capacity(
        output_tokens_per_second=round(largest.output_tokens_per_second, 2),
        prefill_tokens_per_second=round(max(b.prefill_tokens_per_second for b in bursts), 2),
        max_concurrency_at_ttft_target=best,
        ttft_target_ms=ttft_target_ms,
        ttft_percentile=ttft_percentile,
        ttft_ms_at_max_concurrency=round(at_best.ttft_s(quantile) * 1000, 2) if at_best else None,
        ttft_p90_ms_at_max_concurrency=round(at_best.ttft_p90_s * 1000, 2) if at_best else None,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        measured_on=measured_on,
        duration_s=round(time.monotonic() - started, 2),
    )
