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
    # Logit adjustments before the token is picked (greedy included); see kiln_engine.logits_adjust.
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence among the generated tokens
    repetition_penalty: float = 1.0  # divides (or multiplies, if negative) logits of prompt+output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # EOS and stop_token_ids are blocked (and stop strings ignored) before this many
    # Structured output: (kind, JSON schema text), kinds in kiln_engine.grammar; None: free text.
    structured: tuple[str, str] | None = None
    adapter: str | None = None  # the LoRA adapter to run (kiln_engine.lora); None: the base model

    # Derived once here, because the engine's hot loops ask per sequence per step.
    adjusts_logits: bool = field(init=False, repr=False, compare=False)  # logits change before picking
    uses_history: bool = field(init=False, repr=False, compare=False)  # the change reads generated tokens
    plain_greedy: bool = field(init=False, repr=False, compare=False)  # argmax alone: the fast path
    # A grammar is the only change (speculative decoding masks the drafts' rows with it itself).
    adjusts_by_grammar_alone: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        penalties = bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
        # The grammar state advances with each generated token, as penalties read them.
        history = penalties or bool(self.structured)
        besides_grammar = penalties or bool(self.logit_bias or self.min_tokens)
        adjusts = history or besides_grammar
        plain = self.temperature <= 0.0 and self.logprobs is None and self.seed is None and not adjusts
        object.__setattr__(self, "uses_history", history)
        object.__setattr__(self, "adjusts_logits", adjusts)
        object.__setattr__(self, "plain_greedy", plain)
        object.__setattr__(self, "adjusts_by_grammar_alone", bool(self.structured) and not besides_grammar)


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
    spec_proposed_tokens_total: int = 0  # draft tokens proposed by speculative decoding
    spec_accepted_tokens_total: int = 0  # of those, accepted by the target model
    spec_drafts_total: int = 0  # draft runs verified (one per speculating request per verify step)
    spec_accepted_per_position: tuple[int, ...] = ()  # [i]: draft runs whose draft i + 1 was kept


class Engine(Protocol):
    """A serving core: continuous batching over a paged KV cache."""

    @property
    def max_model_len(self) -> int: ...

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> EngineStats: ...
