"""The contract between the serving core (scheduler, model runner) and its callers (HTTP server, bench).

The core is synchronous and single-threaded: callers add requests, call `step()` in a loop and
read back per-request outputs. The HTTP server drives it from one background thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs to return per generated token


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the top alternatives at that position."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class RequestOutput:
    """What one `step()` produced for one request: tokens appended since the last step."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    text: str = ""  # detokenized text added since the last step (stop strings already cut off)


@dataclass
class EngineStats:
    """Gauges and counters the server exports as Prometheus metrics."""

    waiting: int = 0
    running: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    preemptions_total: int = 0
    prefix_cache_hit_tokens_total: int = 0


class Engine(Protocol):
    """A serving core: continuous batching over a paged KV cache."""

    @property
    def max_model_len(self) -> int: ...

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> EngineStats: ...
