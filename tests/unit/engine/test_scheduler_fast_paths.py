"""The scheduler's per-sequence fast paths (issue 18: host time at 4,096 sequences) change no decision.

`Scheduler.schedule` asks the block manager only when a running sequence needs a block, and
`complete_step` calls `register_computed_blocks` only when a block completed. The reference here is
the scheduler before those fast paths (it asked for every sequence, every step); random workloads
with preemption, chunked prefill on and off, shared prefixes and aborts must give the same plans,
the same preemptions and the same block-manager state at every step.
"""

from __future__ import annotations

import random

import pytest

from kiln_engine.block_manager import BlockManager
from kiln_engine.config import EngineConfig
from kiln_engine.interface import SamplingParams
from kiln_engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from kiln_engine.sequence import Sequence, SequenceStatus


class ReferenceScheduler(Scheduler):
    """Running sequences and step completion as they were decided before the fast paths."""

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_tokens_per_step
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if n < seq.num_uncomputed_tokens and not self.config.chunked_prefill:
                i += 1
                continue
            scheduled = True
            while not bm.allocate_slots(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    scheduled = False
                    break
            if not scheduled:
                break
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
            i += 1
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

    def complete_step(self, out: SchedulerOutput) -> None:
        for chunk in out.chunks:
            if chunk.seq.is_finished:
                continue
            chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens
            self.block_manager.register_computed_blocks(chunk.seq)


def state(s: Scheduler) -> tuple[object, ...]:
    bm = s.block_manager
    seqs = sorted([*s.running, *s.waiting], key=lambda q: q.request_id)
    return (
        [(q.request_id, q.status, q.num_computed_tokens, q.block_table, q.block_hashes) for q in seqs],
        [q.request_id for q in s.running],
        [q.request_id for q in s.waiting],
        bm.ref_counts,
        list(bm.free_blocks),
        list(bm.evictable),
        bm.cached,
        s.preemptions_total,
        s.prefix_hit_tokens_total,
    )


def drive(cls: type[Scheduler], seed: int, chunked: bool, caching: bool) -> list[tuple[object, ...]]:
    rng = random.Random(seed)
    block_size = 4
    cfg = EngineConfig(
        block_size=block_size,
        num_kv_blocks=24,
        max_num_seqs=rng.choice([3, 6, 64]),
        max_tokens_per_step=rng.choice([8, 24, 64]) if chunked else 64,
        max_model_len=64,
        chunked_prefill=chunked,
        prefix_caching=caching,
    )
    s = cls(cfg, BlockManager(24, block_size, caching))
    prefixes = [[rng.randrange(50) for _ in range(8)] for _ in range(3)]
    trace = []
    live: list[Sequence] = []
    for step in range(120):
        if rng.random() < 0.3:
            prompt = rng.choice(prefixes)[: rng.randrange(9)] + [
                rng.randrange(50) for _ in range(rng.randrange(1, 20))
            ]
            seq = Sequence(f"r{step}", prompt, SamplingParams())
            s.add(seq)
            live.append(seq)
        out = s.schedule()
        s.complete_step(out)
        plan = [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks]
        for c in out.chunks:
            if c.samples:
                c.seq.append_token(rng.randrange(50))
        for seq in list(live):  # finish some: length reached, or an abort
            if seq.num_output_tokens >= 12 or rng.random() < 0.02:
                s.finish(seq, "length")
                live.remove(seq)
        trace.append((plan, [q.request_id for q in out.preempted], state(s)))
    return trace


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(("chunked", "caching"), [(True, True), (False, True), (True, False)])
def test_fast_paths_decide_what_the_reference_decides(seed: int, chunked: bool, caching: bool) -> None:
    fast = drive(Scheduler, seed, chunked, caching)
    ref = drive(ReferenceScheduler, seed, chunked, caching)
    assert fast == ref


def test_the_workloads_exercise_preemption_and_prefix_hits() -> None:
    traces = [drive(ReferenceScheduler, seed, True, True) for seed in range(12)]
    assert sum(any(preempted for _, preempted, _ in t) for t in traces) >= 6
    assert all(t[-1][2][-1] > 0 for t in traces)  # prefix_hit_tokens_total
