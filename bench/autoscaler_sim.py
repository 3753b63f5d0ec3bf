"""Autoscaler bench: Kiln's policy vs HPA-style on concurrency vs static peak, replayed on traces.

Run: `.venv/bin/python bench/autoscaler_sim.py [--out bench/results/autoscaler_sim.json] [--traces a,b]
[--azure path.csv]`. Prints a table of TTFT-SLO attainment (% requests and % minutes whose median
TTFT met the target) and replica-hours per trace, and writes the rows as JSON. Every row is also
judged by the tail targets (TTFT p95, inter-token latency p90: `minutes_*_pct`); the policy
`kiln-tail` is Kiln's policy given those targets too. `--plots DIR` draws each `--plot-traces`
trace (load, replicas, TTFT per minute for each policy) as DIR/autoscaler-<trace>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from kiln_autoscaler.baselines import HpaConcurrencyPolicy, KilnPolicy, Policy, StaticPolicy
from kiln_autoscaler.data import Signals, Targets, Tuning
from kiln_autoscaler.policy import load_in_replicas
from kiln_autoscaler.sim.simulator import ReplicaProfile, SimConfig, SimResult, simulate
from kiln_autoscaler.sim.traces import SYNTHETIC, Trace, bursty, flash_crowd, load_azure_csv

TARGETS = Targets(
    min_replicas=1,
    max_replicas=24,
    ttft_p50_target_s=0.5,
    scale_up_window_s=0.0,
    scale_down_window_s=300.0,
)
# The p50 target plus tail targets: every row is judged by these, and `kiln-tail` is given them.
TAIL_TARGETS = replace(TARGETS, ttft_p95_target_s=1.0, itl_target_s=0.025, itl_percentile=90)
PROFILE = ReplicaProfile(start_delay_s=30.0)
# `kiln-routed`: Kiln's policy with routers in front, whose in-flight count the autoscaler reads
# every second between passes (its `--wake-interval`), running a pass at once on a burst (one that
# only scales up).
ROUTER_WAKE_S = 1.0
PLOTTED_POLICIES = ("static-peak", "hpa-conc@30%", "kiln", "kiln-tail")  # more lines would not read
TARGET_UTILIZATION = 0.7  # warm starts size for the first minute at this utilization
HPA_TARGETS = (0.7, 0.5, 0.3)  # HPA target in-flight per pod, as a fraction of the measured max concurrency


def minute_loads(trace: Trace, profile: ReplicaProfile) -> list[float]:
    """Replicas' worth of measured capacity each minute of the trace needs (token work)."""
    capacity = profile.capacity()
    per_minute: dict[int, list[int]] = {}
    for request in trace.requests:
        totals = per_minute.setdefault(int(request.arrival_s // 60), [0, 0])
        totals[0] += request.prompt_tokens
        totals[1] += request.output_tokens
    loads = []
    for minute in range(max(per_minute, default=0) + 1):
        prompt, output = per_minute.get(minute, [0, 0])
        signals = Signals(observed_at=0.0, prompt_token_rate=prompt / 60, output_token_rate=output / 60)
        loads.append(load_in_replicas(signals, capacity) or 0.0)
    return loads


def static_peak_replicas(trace: Trace, profile: ReplicaProfile, utilization: float) -> int:
    """Replicas that carry the trace's busiest minute at `utilization` of measured capacity."""
    return max(1, math.ceil(max(minute_loads(trace, profile)) / utilization))


def warm_start_replicas(trace: Trace, profile: ReplicaProfile, utilization: float) -> int:
    """Replicas a scaled deployment would already have when the trace starts (its first minute)."""
    return max(1, math.ceil(minute_loads(trace, profile)[0] / utilization))


def policies_for(trace: Trace, profile: ReplicaProfile) -> list[tuple[Policy, Targets]]:
    """Each policy with the targets it is given (only `kiln-tail` reads the tail targets)."""
    return [
        (StaticPolicy(static_peak_replicas(trace, profile, Tuning().target_utilization)), TARGETS),
        *(
            (
                HpaConcurrencyPolicy(
                    target_in_flight_per_replica=share * profile.max_batch, name=f"hpa-conc@{share:.0%}"
                ),
                TARGETS,
            )
            for share in HPA_TARGETS
        ),
        (KilnPolicy(), TARGETS),
        (KilnPolicy(name="kiln-tail"), TAIL_TARGETS),
        (KilnPolicy(name="kiln-routed", router_wake_s=ROUTER_WAKE_S), TARGETS),
    ]


def run_one(
    trace: Trace, policy: Policy, targets: Targets, profile: ReplicaProfile
) -> tuple[dict, SimResult]:
    """One simulation and its row (judged by the tail targets too)."""
    t0 = time.perf_counter()
    initial = (
        policy.replicas
        if isinstance(policy, StaticPolicy)
        else warm_start_replicas(trace, profile, TARGET_UTILIZATION)
    )
    result = simulate(trace, policy, SimConfig(targets=targets, profile=profile, initial_replicas=initial))
    row = result.summary(judged_by=TAIL_TARGETS)
    row["missed_minutes"] = [m for m, ok in result.minutes().items() if not ok]
    row["sim_seconds"] = round(time.perf_counter() - t0, 2)
    return row, result


def verdicts(rows: list[dict]) -> list[str]:
    """The claims the issue asks the bench to show, checked on these rows."""
    lines = []
    by_trace: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_trace.setdefault(row["trace"], {})[row["policy"]] = row
    for trace, policies in by_trace.items():
        kiln, static = policies.get("kiln"), policies.get("static-peak")
        if not kiln or not static:
            continue
        hpa_cheaper_or_equal = [
            row
            for name, row in policies.items()
            if name.startswith("hpa") and row["replica_hours"] <= kiln["replica_hours"]
        ]
        hpa_at_or_above = [
            row
            for name, row in policies.items()
            if name.startswith("hpa") and row["replica_hours"] >= kiln["replica_hours"]
        ]
        if all(row["slo_minutes_pct"] < kiln["slo_minutes_pct"] for row in hpa_at_or_above):
            verdict = "beats"
        elif all(row["slo_minutes_pct"] <= kiln["slo_minutes_pct"] for row in hpa_at_or_above):
            verdict = "ties or beats"
        else:
            verdict = "does NOT beat"
        fewer = "fewer" if kiln["replica_hours"] < static["replica_hours"] else "NOT fewer"
        lines.append(
            f"{trace}: kiln {kiln['slo_minutes_pct']:.2f}% of minutes, {kiln['replica_hours']:.2f} rep-hours "
            f"(static {static['replica_hours']:.2f}: {fewer}); "
            f"HPA at >= kiln's replica-hours: "
            + (
                ", ".join(
                    f"{r['policy']} {r['slo_minutes_pct']:.2f}% @ {r['replica_hours']:.2f}"
                    for r in hpa_at_or_above
                )
                or "none"
            )
            + (f" -> kiln {verdict} them" if hpa_at_or_above else "")
            + (
                "; cheaper HPA: "
                + ", ".join(
                    f"{r['policy']} {r['slo_minutes_pct']:.2f}% @ {r['replica_hours']:.2f}"
                    for r in hpa_cheaper_or_equal
                )
                if hpa_cheaper_or_equal
                else ""
            )
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/autoscaler_sim.json")
    parser.add_argument("--traces", default=",".join(SYNTHETIC))
    parser.add_argument("--azure", action="append", default=[], help="Azure-format CSV to replay too")
    parser.add_argument(
        "--bursty-seeds", default="", help="also replay bursty traces with these seeds (1,2,3)"
    )
    parser.add_argument("--flash-seeds", default="", help="also replay flash-crowd traces with these seeds")
    parser.add_argument(
        "--policies",
        default="",
        help="only these policies (static-peak, hpa-conc@30%%, kiln, kiln-tail, ...)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="simulations run in parallel")
    parser.add_argument("--plots", default="", help="draw charts into this directory")
    parser.add_argument("--plot-traces", default="bursty-s7,flash-crowd-s1", help="traces to draw")
    parser.add_argument(
        "--start-delay", type=float, default=PROFILE.start_delay_s, help="replica start seconds"
    )
    args = parser.parse_args(argv)
    profile = replace(PROFILE, start_delay_s=args.start_delay)
    only = {name for name in args.policies.split(",") if name}

    traces = [SYNTHETIC[name]() for name in args.traces.split(",") if name]
    for seed in (int(text) for text in args.bursty_seeds.split(",") if text):
        trace = bursty(seed=seed)
        traces.append(replace(trace, name=f"bursty-s{seed}"))
    for seed in (int(text) for text in args.flash_seeds.split(",") if text):
        traces.append(replace(flash_crowd(seed=seed), name=f"flash-crowd-s{seed}"))
    traces += [load_azure_csv(path) for path in args.azure]
    unknown = only - {policy.name for policy, _ in policies_for(traces[0], profile)} if traces else set()
    if unknown:
        parser.error(f"unknown policies {sorted(unknown)}")
    plotted = {name for name in args.plot_traces.split(",") if name} if args.plots else set()
    started = time.perf_counter()
    work = [
        (trace, policy, targets)
        for trace in traces
        for policy, targets in policies_for(trace, profile)
        if not only or policy.name in only
    ]
    rows = []
    drawn: dict[str, list[SimResult]] = {}
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, trace, policy, targets, profile) for trace, policy, targets in work]
        for (trace, _, _), future in zip(work, futures, strict=True):
            row, result = future.result()
            rows.append(row)
            print(row, file=sys.stderr)
            if trace.name in plotted and row["policy"] in PLOTTED_POLICIES:
                drawn.setdefault(trace.name, []).append(result)
    if args.plots:
        from kiln_autoscaler.sim.plot import draw

        by_name = {trace.name: trace for trace in traces}
        for name, results in drawn.items():
            path = Path(args.plots) / f"autoscaler-{name}.png"
            print(f"drew {draw(by_name[name], results, TAIL_TARGETS, path)}")
    header = (
        f"{'trace':<14} {'policy':<13} {'requests':>8} {'SLO req %':>9} {'SLO min %':>9} "
        f"{'p95 min %':>9} {'ITL min %':>9} {'all min %':>9} "
        f"{'rep-hours':>9} {'p50 s':>7} {'p90 s':>7} {'max rep':>7} {'changes':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['trace']:<14} {row['policy']:<13} {row['requests']:>8} {row['slo_requests_pct']:>9.2f} "
            f"{row['slo_minutes_pct']:>9.2f} {row['minutes_ttft_p95_pct']:>9.2f} "
            f"{row[f'minutes_itl_p{TAIL_TARGETS.itl_percentile}_pct']:>9.2f} {row['minutes_all_pct']:>9.2f} "
            f"{row['replica_hours']:>9.2f} {row['ttft_p50_s']:>7.3f} "
            f"{row['ttft_p90_s']:>7.3f} {row['max_replicas']:>7} {row['scale_changes']:>7}"
        )
    print(f"({time.perf_counter() - started:.1f}s)")
    for line in verdicts(rows):
        print(line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "targets": TARGETS.__dict__,
                "tail_targets": TAIL_TARGETS.__dict__,
                "profile": profile.__dict__,
                "rows": rows,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
