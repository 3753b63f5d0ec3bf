"""One request's token state inside the engine: tokens, how many have KV computed, its block table.

Plain Python, no torch. The scheduler moves sequences between waiting and running; the block manager
fills `block_table`; the model runner reads `token_ids[num_computed_tokens:...]` for the next chunk.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kiln_engine.interface import SamplingParams, TokenLogprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """A request's prompt + generated tokens and where their KV lives.

    Invariant: the first `num_computed_tokens` tokens have their K/V written in the blocks of
    `block_table`; the rest (the prompt's unprocessed part, or the last sampled token) still need a
    forward pass. `block_hashes[i]` is the prefix-cache key of full block i once it is registered.
    """

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    num_prompt_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at (first) admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_preemptions: int = 0
    lora_slot: int = -1  # the device slot of its LoRA adapter while admitted (LoraSlots); -1: none
    finish_reason: str | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet returned by step()

    def __post_init__(self) -> None:
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
