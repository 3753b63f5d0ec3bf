"""Prometheus metric names the engine exports and the autoscaler, dashboards and alerts read.

One place so the producer and every consumer agree. All carry the label `model` (served name).
"""

from __future__ import annotations

TTFT_SECONDS = "kiln_engine_time_to_first_token_seconds"  # histogram
INTER_TOKEN_SECONDS = "kiln_engine_inter_token_latency_seconds"  # histogram
E2E_SECONDS = "kiln_engine_e2e_request_latency_seconds"  # histogram
QUEUE_DEPTH = "kiln_engine_queue_depth"  # gauge: requests waiting for admission
RUNNING_REQUESTS = "kiln_engine_running_requests"  # gauge: requests in the running batch
KV_CACHE_USAGE = "kiln_engine_kv_cache_usage_ratio"  # gauge: used / total KV blocks, 0..1
PROMPT_TOKENS = "kiln_engine_prompt_tokens_total"  # counter
GENERATION_TOKENS = "kiln_engine_generation_tokens_total"  # counter
REQUESTS = "kiln_engine_requests_total"  # counter, label `status`: ok | error | aborted
PREEMPTIONS = "kiln_engine_preemptions_total"  # counter
PREFIX_CACHE_HIT_TOKENS = "kiln_engine_prefix_cache_hit_tokens_total"  # counter
SPEC_PROPOSED_TOKENS = "kiln_engine_spec_decode_proposed_tokens_total"  # counter: draft tokens proposed
SPEC_ACCEPTED_TOKENS = "kiln_engine_spec_decode_accepted_tokens_total"  # counter: drafts the target kept
# counter: draft runs verified (one per speculating request per verify step); the mean acceptance
# length, tokens a request gains per verify step, is 1 + accepted / drafts
SPEC_DRAFTS = "kiln_engine_spec_decode_drafts_total"
# counter, label `position` (1..k): draft runs whose draft at that position was kept
SPEC_ACCEPTED_PER_POSITION = "kiln_engine_spec_decode_accepted_per_position_total"
LORA_REQUESTS = "kiln_engine_lora_requests_total"  # counter, label `adapter`: requests admitted per adapter

# Histogram buckets (seconds) shared by TTFT and end-to-end latency.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
INTER_TOKEN_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
)
