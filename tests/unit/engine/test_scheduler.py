"""Scheduler policy without tensors: admission, token budget, chunked prefill, preemption, resume, abort."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kiln_engine.block_manager import BlockManager
from kiln_engine.config import EngineConfig
from kiln_engine.interface import SamplingParams
from kiln_engine.scheduler import Scheduler, SchedulerOutput
from kiln_engine.sequence import Sequence, SequenceStatus


def make(num_blocks: int = 64, block_size: int = 4, **cfg: object) -> Scheduler:
    config = EngineConfig(block_size=block_size, num_kv_blocks=num_blocks, **cfg)  # type: ignore[arg-type]
    config.validate()
    return Scheduler(config, BlockManager(num_blocks, block_size, config.prefix_caching))


def add(s: Scheduler, rid: str, n: int, first: int = 0) -> Sequence:
    seq = Sequence(rid, list(range(first, first + n)), SamplingParams())
    s.add(seq)
    return seq


def step(s: Scheduler, token: int = 7) -> SchedulerOutput:
    """One engine step with a fake model: every sampling chunk appends `token`."""
    out = s.schedule()
    s.complete_step(out)
    for c in out.chunks:
        if c.samples:
            c.seq.append_token(token)
    return out


def plan(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks]


def test_core_modules_do_not_import_torch() -> None:
    code = (
        "import sys, kiln_engine.scheduler, kiln_engine.block_manager, kiln_engine.sequence;"
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_admits_in_arrival_order_within_seq_limit() -> None:
    s = make(max_num_seqs=2)
    for rid in "abc":
        add(s, rid, 5)
    out = step(s)
    assert plan(out) == [("a", 0, 5), ("b", 0, 5)]
    assert [q.request_id for q in s.waiting] == ["c"]
    out = step(s)
    assert plan(out) == [("a", 5, 1), ("b", 5, 1)]  # decodes, c still waits for a slot


def test_chunked_prefill_respects_budget_and_keeps_decodes_going() -> None:
    s = make(max_tokens_per_step=8)
    add(s, "short", 3)
    step(s)  # short prefilled, now decoding
    add(s, "long", 20)
    out = step(s)
    assert plan(out) == [("short", 3, 1), ("long", 0, 7)]
    out = step(s)
    assert plan(out) == [("short", 4, 1), ("long", 7, 7)]
    assert s.running[1].num_output_tokens == 0  # mid-prompt chunks sample nothing
    out = step(s)
    assert plan(out) == [("short", 5, 1), ("long", 14, 6)]
    assert out.chunks[1].seq.num_output_tokens == 1  # the last chunk produced the first token


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget() -> None:
    s = make(max_tokens_per_step=16, chunked_prefill=False, max_model_len=16)
    add(s, "a", 10)
    add(s, "b", 10, first=100)
    out = step(s)
    assert plan(out) == [("a", 0, 10)]  # b does not fit in the 6 tokens left
    out = step(s)
    assert plan(out) == [("a", 10, 1), ("b", 0, 10)]


def test_config_rejects_budget_smaller_than_context_without_chunking() -> None:
    with pytest.raises(ValueError, match="chunked prefill"):
        EngineConfig(max_tokens_per_step=8, chunked_prefill=False, max_model_len=16).validate()


def test_preempts_newest_under_kv_pressure_and_resumes_it() -> None:
    # 6 blocks of 4 slots; two sequences of 8 tokens take 2 blocks each and grow by one per step.
    s = make(num_blocks=6, block_size=4, prefix_caching=False)
    a = add(s, "a", 8)
    b = add(s, "b", 8, first=100)
    step(s)
    assert a.num_tokens == 9 and b.num_tokens == 9
    preempted_at = None
    for i in range(8):
        out = step(s)
        if out.preempted:
            preempted_at = i
            break
    assert preempted_at is not None
    assert out.preempted == [b]  # the newest goes, the oldest keeps running
    assert b.status == SequenceStatus.WAITING and s.waiting[0] is b
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert s.preemptions_total == 1
    generated_before = b.num_output_tokens
    # a finishes; b is re-admitted and recomputes prompt + generated tokens in one chunk.
    s.finish(a, "length")
    out = step(s)
    assert plan(out) == [("b", 0, b.num_tokens - 1)]
    assert b.num_output_tokens == generated_before + 1
    assert s.block_manager.num_used_blocks == len(b.block_table)


def test_no_admission_in_a_step_that_preempted() -> None:
    s = make(num_blocks=4, block_size=4, prefix_caching=False)
    add(s, "a", 7)
    add(s, "b", 7, first=50)
    step(s)
    add(s, "c", 2, first=90)
    while True:
        out = step(s)
        if out.preempted:
            break
    assert "c" not in [c.seq.request_id for c in out.chunks]


def test_prefix_hit_at_admission_skips_cached_tokens() -> None:
    s = make(block_size=4)
    a = add(s, "a", 13)
    step(s)
    s.finish(a, "stop")
    b = add(s, "b", 14)  # same first 13 tokens
    out = step(s)
    assert plan(out) == [("b", 12, 2)]
    assert b.num_cached_tokens == 12


def test_abort_frees_blocks_of_running_and_waiting() -> None:
    s = make(num_blocks=8, max_num_seqs=1)
    a = add(s, "a", 9)
    b = add(s, "b", 3)
    step(s)
    assert s.block_manager.num_used_blocks == 3
    s.finish(a, "abort")
    s.finish(b, "abort")
    assert s.block_manager.num_used_blocks == 0
    assert not s.has_unfinished()
    assert a.finish_reason == "abort" and b.is_finished
    s.finish(a, "abort")  # idempotent


def test_budget_is_never_exceeded_under_random_load() -> None:
    import random

    rng = random.Random(0)
    s = make(num_blocks=24, block_size=4, max_tokens_per_step=10, max_num_seqs=4)
    seqs = [add(s, f"r{i}", rng.randint(1, 30), first=rng.randint(0, 3) * 1000) for i in range(12)]
    for _ in range(400):
        if not s.has_unfinished():
            break
        out = step(s)
        assert out.num_tokens <= 10
        assert len(s.running) <= 4
        for seq in list(s.running):
            if seq.num_output_tokens >= 5:
                s.finish(seq, "length")
        used = sum(len(x.block_table) for x in s.running)
        assert s.block_manager.num_used_blocks <= used  # shared blocks counted once
    assert not s.has_unfinished()
    assert all(x.num_output_tokens == 5 for x in seqs)
    assert s.block_manager.num_used_blocks == 0


def test_watermark_never_blocks_a_lone_request() -> None:
    s = make(num_blocks=200, block_size=4)
    assert s.watermark_blocks > 0
    add(s, "big", 199 * 4)  # needs more than the free blocks minus the watermark
    out = step(s)
    assert plan(out) == [("big", 0, 199 * 4)]


def test_prefix_hits_are_counted_once_per_admission() -> None:
    s = make(num_blocks=8, block_size=4, max_num_seqs=8)
    a = add(s, "a", 13)
    step(s)
    s.finish(a, "stop")
    hog = add(s, "hog", 20, first=500)  # takes 5 blocks (+1 while it grows)
    step(s)
    b = add(s, "b", 14)  # its prefix is cached, but it needs blocks the hog holds
    for _ in range(3):
        out = step(s)
        assert b.request_id not in [c.seq.request_id for c in out.chunks]
    assert s.prefix_hit_tokens_total == 0  # failed admissions count nothing
    s.finish(hog, "stop")
    step(s)
    # The hog's growth evicted a's cached tail block (freed tail first, so evicted first).
    assert b.num_cached_tokens == 8 and s.prefix_hit_tokens_total == 8
