"""Request traces for the simulator: seeded synthetic shapes and the Azure LLM inference trace CSV format.

A trace is a list of requests (arrival second, prompt tokens, output tokens). Synthetic traces
draw arrivals from a non-homogeneous Poisson process (thinning) whose rate follows the shape,
and token counts from log-normal distributions; the same seed gives the same trace.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True)
class Request:
    """One request of a trace."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Trace:
    """A named, time-ordered request list covering [0, duration_s)."""

    name: str
    requests: tuple[Request, ...]
    duration_s: float

    def peak_rate(self, window_s: float = 60.0) -> float:
        """Highest request rate over any aligned window (requests per second)."""
        counts: dict[int, int] = {}
        for request in self.requests:
            bucket = int(request.arrival_s // window_s)
            counts[bucket] = counts.get(bucket, 0) + 1
        return max(counts.values(), default=0) / window_s


@dataclass(frozen=True)
class TokenShape:
    """Log-normal prompt and output lengths (median and sigma), clipped to sane bounds."""

    prompt_median: float = 800.0
    prompt_sigma: float = 0.8
    output_median: float = 120.0
    output_sigma: float = 0.7
    max_prompt: int = 8192
    max_output: int = 1024

    def draw(self, rng: random.Random) -> tuple[int, int]:
        """One (prompt, output) pair."""
        prompt = int(rng.lognormvariate(math.log(self.prompt_median), self.prompt_sigma))
        output = int(rng.lognormvariate(math.log(self.output_median), self.output_sigma))
        return max(1, min(prompt, self.max_prompt)), max(1, min(output, self.max_output))


RateFn = Callable[[float], float]


def from_rate(
    name: str, rate: RateFn, peak: float, duration_s: float, seed: int, tokens: TokenShape = TokenShape()
) -> Trace:
    """A trace whose arrivals follow `rate(t)` (requests/s, never above `peak`) by Poisson thinning."""
    rng = random.Random(seed)
    requests: list[Request] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration_s:
            break
        if rng.random() * peak <= rate(t):
            prompt, output = tokens.draw(rng)
            requests.append(Request(t, prompt, output))
    return Trace(name, tuple(requests), duration_s)


def steady(rate: float = 8.0, duration_s: float = 3600.0, seed: int = 1) -> Trace:
    """Constant Poisson arrivals."""
    return from_rate("steady", lambda _t: rate, rate, duration_s, seed)


def diurnal(
    low: float = 2.0,
    high: float = 16.0,
    duration_s: float = 3600.0,
    period_s: float | None = None,
    seed: int = 2,
) -> Trace:
    """One day compressed into the trace: a smooth rise from `low` to `high` and back."""
    period = period_s or duration_s

    def rate(t: float) -> float:
        return low + (high - low) * (1 - math.cos(2 * math.pi * t / period)) / 2

    return from_rate("diurnal", rate, high, duration_s, seed)


def step(low: float = 5.0, high: float = 15.0, duration_s: float = 3600.0, seed: int = 3) -> Trace:
    """`low`, then `high` for the middle third, then `low` again: instant changes."""

    def rate(t: float) -> float:
        return high if duration_s / 3 <= t < 2 * duration_s / 3 else low

    return from_rate("step", rate, high, duration_s, seed)


def bursty(
    base: float = 8.0,
    duration_s: float = 7200.0,
    mean_gap_s: float = 480.0,
    mean_burst_s: float = 90.0,
    multiplier: tuple[float, float] = (1.5, 2.5),
    seed: int = 4,
) -> Trace:
    """A slowly wandering base rate with sudden bursts (Markov-modulated Poisson).

    Bursts start after exponential gaps (mean `mean_gap_s`), last an exponential time (mean
    `mean_burst_s`, clipped to 30..300 s) and multiply the rate by a uniform factor in
    `multiplier`, with instant onset and end.
    """
    rng = random.Random(seed)
    bursts: list[tuple[float, float, float]] = []
    t = rng.expovariate(1 / mean_gap_s)
    while t < duration_s:
        length = min(300.0, max(30.0, rng.expovariate(1 / mean_burst_s)))
        bursts.append((t, t + length, rng.uniform(*multiplier)))
        t += length + rng.expovariate(1 / mean_gap_s)
    phase = rng.uniform(0, 2 * math.pi)

    def rate(t: float) -> float:
        level = base * (1 + 0.25 * math.sin(2 * math.pi * t / 1800.0 + phase))
        for start, end, factor in bursts:
            if start <= t < end:
                return level * factor
        return level

    peak = base * 1.25 * multiplier[1]
    return from_rate("bursty", rate, peak, duration_s, seed + 1000)


@dataclass(frozen=True)
class Crowd:
    """One flash crowd: the rate multiplier rises linearly to `factor` over `rise_s`, holds for
    `hold_s`, then decays back exponentially with time constant `decay_s`."""

    start_s: float
    factor: float
    rise_s: float
    hold_s: float
    decay_s: float

    def multiplier(self, t: float) -> float:
        """The factor this crowd multiplies the base rate by at `t` (1 outside it)."""
        since = t - self.start_s
        if since < 0:
            return 1.0
        if since < self.rise_s:
            return 1.0 + (self.factor - 1.0) * since / self.rise_s
        if since < self.rise_s + self.hold_s:
            return self.factor
        tail = since - self.rise_s - self.hold_s
        return 1.0 + (self.factor - 1.0) * math.exp(-tail / self.decay_s)


def flash_crowds(
    duration_s: float,
    seed: int,
    mean_gap_s: float = 1200.0,
    first_after_s: float = 300.0,
    factor: tuple[float, float] = (5.0, 10.0),
    rise_s: float = 10.0,
    hold_s: tuple[float, float] = (60.0, 180.0),
    decay_s: float = 120.0,
) -> list[Crowd]:
    """Crowds at exponential gaps (mean `mean_gap_s`, never before `first_after_s` nor before the
    previous one has decayed to a tenth of its excess), each 5-10x with a 60-180 s plateau."""
    rng = random.Random(seed)
    crowds: list[Crowd] = []
    t = first_after_s + rng.expovariate(1 / mean_gap_s)
    while t < duration_s:
        crowd = Crowd(t, rng.uniform(*factor), rise_s, rng.uniform(*hold_s), decay_s)
        crowds.append(crowd)
        settled = t + rise_s + crowd.hold_s + decay_s * math.log(10)
        t = settled + rng.expovariate(1 / mean_gap_s)
    return crowds


def flash_crowd(
    base: float = 3.0,
    duration_s: float = 7200.0,
    seed: int = 1,
    crowds: list[Crowd] | None = None,
) -> Trace:
    """A calm base rate (±10 % slow drift) hit by flash crowds (`flash_crowds`): the rate jumps
    5-10x within 10 s, stays there 1-3 minutes and decays over a few minutes, like a link
    shared on a busy site. Unlike `bursty`, the jumps are far above anything headroom covers."""
    chosen = crowds if crowds is not None else flash_crowds(duration_s, seed)
    phase = random.Random(seed + 7).uniform(0, 2 * math.pi)

    def rate(t: float) -> float:
        level = base * (1 + 0.1 * math.sin(2 * math.pi * t / 2400.0 + phase))
        return level * max((crowd.multiplier(t) for crowd in chosen), default=1.0)

    peak = base * 1.1 * max((crowd.factor for crowd in chosen), default=1.0)
    return from_rate("flash-crowd", rate, peak, duration_s, seed + 2000)


SYNTHETIC: dict[str, Callable[[], Trace]] = {
    "steady": steady,
    "diurnal": diurnal,
    "step": step,
    "bursty": bursty,
    "flash-crowd": flash_crowd,
}


def _parse_timestamp(value: str) -> float:
    """Seconds from a number or an Azure timestamp like `2023-11-16 18:15:46.6805900`."""
    try:
        return float(value)
    except ValueError:
        pass
    text = value.strip()
    if "." in text:
        head, fraction = text.split(".", 1)
        digits = "".join(ch for ch in fraction if ch.isdigit())
        tail = fraction[len(digits) :]
        text = f"{head}.{digits[:6].ljust(6, '0')}{tail}"
    return datetime.fromisoformat(text).timestamp()


def load_azure_csv(path: str | Path, name: str | None = None, time_scale: float = 1.0) -> Trace:
    """A trace from the Azure LLM inference trace format: `TIMESTAMP,ContextTokens,GeneratedTokens`.

    Timestamps may be ISO dates (as published) or seconds; they are shifted to start at 0 and
    divided by `time_scale` (2.0 replays twice as fast).
    """
    path = Path(path)
    rows: list[tuple[float, int, int]] = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not an Azure LLM trace, missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                rows.append(
                    (
                        _parse_timestamp(row["TIMESTAMP"]),
                        max(1, int(row["ContextTokens"])),
                        max(1, int(row["GeneratedTokens"])),
                    )
                )
            except (TypeError, ValueError) as error:
                raise ValueError(f"{path}:{line}: {error}") from error
    if not rows:
        raise ValueError(f"{path}: no requests")
    rows.sort()
    start = rows[0][0]
    requests = tuple(Request((t - start) / time_scale, p, o) for t, p, o in rows)
    duration = requests[-1].arrival_s + 1.0
    return Trace(name or path.stem, requests, duration)


def write_azure_csv(trace: Trace, path: str | Path, epoch: datetime | None = None) -> None:
    """Write `trace` in the Azure format (ISO timestamps from `epoch`, default 2023-11-16 00:00)."""
    start = (epoch or datetime(2023, 11, 16)).timestamp()
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
        for request in trace.requests:
            stamp = datetime.fromtimestamp(start + request.arrival_s).strftime("%Y-%m-%d %H:%M:%S.%f")
            writer.writerow([stamp + "0", request.prompt_tokens, request.output_tokens])


def concat(name: str, traces: Iterable[Trace]) -> Trace:
    """Traces played one after another."""
    requests: list[Request] = []
    offset = 0.0
    for trace in traces:
        requests.extend(
            Request(r.arrival_s + offset, r.prompt_tokens, r.output_tokens) for r in trace.requests
        )
        offset += trace.duration_s
    return Trace(name, tuple(requests), offset)
