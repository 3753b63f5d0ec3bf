"""Charts of simulator runs: per trace, load, replicas and TTFT over time for each policy (PNG).

Matplotlib (the dev extra) is imported only here, so the autoscaler itself never needs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from kiln_autoscaler.data import Targets
from kiln_autoscaler.sim.simulator import SimResult
from kiln_autoscaler.sim.traces import Trace


def minute_rates(trace: Trace) -> list[float]:
    """Requests per second arriving in each minute of the trace."""
    counts = [0] * math.ceil(trace.duration_s / 60)
    for request in trace.requests:
        counts[int(request.arrival_s // 60)] += 1
    return [count / 60 for count in counts]


def draw(trace: Trace, results: Sequence[SimResult], judged_by: Targets, path: str | Path) -> Path:
    """Three stacked panels sharing the time axis: arrivals, replicas asked for, and per-minute
    TTFT p50 (solid) and p95 (dotted) of each policy with the targets as grey lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (load, replicas, ttft) = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True, dpi=90)
    rates = minute_rates(trace)
    load.step([minute for minute in range(len(rates))], rates, where="post", color="black")
    load.set_ylabel("arrivals (req/s)")
    load.set_title(f"{trace.name}: {len(trace.requests)} requests over {trace.duration_s / 3600:.1f} h")
    for result in results:
        times = [entry[0] / 60 for entry in result.timeline]
        line = replicas.step(
            times, [entry[1] for entry in result.timeline], where="post", label=result.policy
        )
        colour = line[0].get_color()
        p50 = result.minute_medians()
        ttft.plot(list(p50), list(p50.values()), color=colour, linewidth=1.2, label=f"{result.policy} p50")
        if judged_by.ttft_p95_target_s is not None:
            p95 = result.per_minute(0.95)
            ttft.plot(list(p95), list(p95.values()), color=colour, linewidth=0.8, linestyle=":")
    replicas.set_ylabel("replicas asked for")
    replicas.legend(loc="upper left", fontsize=8, ncol=len(results))
    ttft.axhline(judged_by.ttft_p50_target_s, color="grey", linewidth=1, label="p50 target")
    if judged_by.ttft_p95_target_s is not None:
        ttft.axhline(
            judged_by.ttft_p95_target_s, color="grey", linewidth=1, linestyle="--", label="p95 target"
        )
    ttft.set_yscale("log")
    ttft.set_ylabel("TTFT per minute (s)\nsolid p50, dotted p95")
    ttft.set_xlabel("minute")
    ttft.legend(loc="upper left", fontsize=7, ncol=3)
    figure.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    return out
