"""One scrape of an engine pod's /metrics: the series the autoscaler and the demo read, parsed."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from kiln_engine import metric_names as names


@dataclass
class PodSample:
    """What one scrape of one pod's /metrics held (only the series the autoscaler reads)."""

    time: float
    ttft_buckets: dict[float, float] = field(default_factory=dict)
    itl_buckets: dict[float, float] = field(default_factory=dict)  # inter-token latency histogram
    counters: dict[str, float] = field(default_factory=dict)  # requests, prompt and generation tokens
    gauges: dict[str, float] = field(default_factory=dict)  # queue, running, kv


COUNTERS = (names.REQUESTS, names.PROMPT_TOKENS, names.GENERATION_TOKENS)
GAUGES = (names.QUEUE_DEPTH, names.RUNNING_REQUESTS, names.KV_CACHE_USAGE)


def parse_metrics(text: str, now: float) -> PodSample:
    """The autoscaler's series from a Prometheus text exposition (summed over label sets)."""
    sample = PodSample(time=now)
    for family in text_string_to_metric_families(text):
        for item in family.samples:
            if item.name == f"{names.TTFT_SECONDS}_bucket":
                bound = float(item.labels["le"])
                sample.ttft_buckets[bound] = sample.ttft_buckets.get(bound, 0.0) + item.value
            elif item.name == f"{names.INTER_TOKEN_SECONDS}_bucket":
                bound = float(item.labels["le"])
                sample.itl_buckets[bound] = sample.itl_buckets.get(bound, 0.0) + item.value
            elif item.name in COUNTERS:
                sample.counters[item.name] = sample.counters.get(item.name, 0.0) + item.value
            elif item.name in GAUGES:
                sample.gauges[item.name] = sample.gauges.get(item.name, 0.0) + item.value
    return sample
