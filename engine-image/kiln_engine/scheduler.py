"""Continuous batching policy: which sequences run this step, with how many tokens, and who is preempted.

Plain Python, no torch. Each step has a token budget (`max_tokens_per_step`). Running sequences are
served first, oldest first: a decoding sequence needs one token, one still in prefill gets the
rest of its prompt or as much as the budget allows (chunked prefill). When the KV cache cannot
grow, the newest running sequence is preempted (its blocks freed, to be recomputed later, mostly
from the prefix cache) and goes back to the front of the queue. Waiting sequences are admitted in
arrival order while budget, sequence slots and blocks remain, and, for a sequence with a LoRA
adapter, while a device slot for its adapter can be pinned (`LoraSlots`).
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

from kiln_engine.block_manager import BlockManager
from kiln_engine.config import EngineConfig
from kiln_engine.lora_slots import LoraSlots
from kiln_engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)  # thousands per step: slots make them cheaper to build and read
class ScheduledChunk:
    """`num_tokens` tokens of `seq`, starting at position `start`, go through the model this step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's last token, so its logits pick the next one."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    """Owns the waiting queue and the running list; drives the block manager."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions_total = 0
        self.prefix_hit_tokens_total = 0  # tokens admitted sequences took from the prefix cache
        # Keep a few blocks spare at admission so new arrivals do not immediately force preemptions.
        self.watermark_blocks = max(0, int(0.01 * block_manager.num_blocks))
        self.lora_slots = LoraSlots(config.max_loras) if config.max_loras else None

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_tokens_per_step
        bm = self.block_manager

        # 1. Running sequences, oldest first; preempt from the newest end when blocks run out.
        #    A sequence whose prompt is only partly computed got the last of a step's budget when
        #    admitted, so it is always the newest: decodes come before it and are never stalled.
        #    This loop runs once per sequence per step (4,096 of them in a full batch), so it reads
        #    fields, not properties, and asks the block manager only when a sequence needs a block.
        i = 0
        running, chunks, chunked = self.running, out.chunks, self.config.chunked_prefill
        block_size = bm.block_size
        while i < len(running) and budget > 0:
            seq = running[i]
            computed = seq.num_computed_tokens
            uncomputed = len(seq.token_ids) - computed
            n = uncomputed if uncomputed < budget else budget
            if n < uncomputed and not chunked:
                i += 1
                continue
            if computed + n > len(seq.block_table) * block_size:  # it needs blocks: allocate them
                scheduled = True
                while not bm.allocate_slots(seq, n):
                    victim = running.pop()
                    self._preempt(victim)
                    out.preempted.append(victim)
                    if victim is seq:
                        scheduled = False
                        break
                if not scheduled:
                    break
            chunks.append(ScheduledChunk(seq, computed, n))
            budget -= n
            i += 1

        # 2. Admit waiting sequences (preempted ones are at the front), unless we just preempted.
        while (
            self.waiting and not out.preempted and budget > 0 and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            if not self._pin_adapter(seq):
                break
            hit = bm.acquire_prefix(seq)
            n = seq.num_uncomputed_tokens
            if n > budget:
                if not self.config.chunked_prefill:
                    bm.free(seq)
                    self._unpin_adapter(seq)
                    break
                n = budget
            watermark = self.watermark_blocks if self.running else 0
            if bm.blocks_needed(seq, n) + watermark > bm.num_free_blocks or not bm.allocate_slots(seq, n):
                bm.free(seq)
                self._unpin_adapter(seq)
                break
            self.waiting.popleft()
            self.prefix_hit_tokens_total += hit
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = hit
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
        return out

    def _pin_adapter(self, seq: Sequence) -> bool:
        """Pin a device slot for `seq`'s LoRA adapter; False when every slot is pinned by others."""
        adapter = seq.params.adapter
        if adapter is None:
            return True
        if self.lora_slots is None:
            raise ValueError(f"request for LoRA adapter {adapter!r}, but this engine serves no adapters")
        slot = self.lora_slots.acquire(adapter)
        if slot is None:
            return False
        seq.lora_slot = slot
        return True

    def _unpin_adapter(self, seq: Sequence) -> None:
        if seq.lora_slot >= 0 and self.lora_slots is not None:
            self.lora_slots.release(seq.lora_slot)
            seq.lora_slot = -1

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        self._unpin_adapter(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.preemptions_total += 1
        self.waiting.appendleft(seq)

    def complete_step(self, out: SchedulerOutput) -> None:
        """Record that the scheduled chunks' K/V is now written; publish full blocks for reuse."""
        bm = self.block_manager
        caching, block_size, finished = bm.enable_prefix_caching, bm.block_size, SequenceStatus.FINISHED
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.status is finished:  # aborted, or stopped while a lookahead step ran for it
                continue
            seq.num_computed_tokens = computed = chunk.start + chunk.num_tokens
            # Most steps complete no block of a sequence: then the call would do nothing.
            if caching and computed // block_size > len(seq.block_hashes):
                bm.register_computed_blocks(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take `seq` out of the queues and release its blocks."""
        if seq.status == SequenceStatus.FINISHED:
            return
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        self.block_manager.free(seq)
        self._unpin_adapter(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
