"""Block manager: allocation, ref-counted sharing, prefix-cache hits, LRU eviction. No tensors."""

from __future__ import annotations

import pytest

from kiln_engine import block_manager
from kiln_engine.block_manager import BlockManager
from kiln_engine.interface import SamplingParams
from kiln_engine.sequence import Sequence


def seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams())


def compute_all(bm: BlockManager, s: Sequence) -> None:
    """Pretend the model wrote K/V for every token of `s` (allocating what is missing)."""
    assert bm.allocate_slots(s, s.num_uncomputed_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.register_computed_blocks(s)


def test_allocate_grows_block_table_and_fails_without_side_effects() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(list(range(10)))
    assert bm.allocate_slots(s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 1
    s.num_computed_tokens = 10
    assert bm.allocate_slots(s, 2)  # positions 10, 11 still fit in block 3
    assert len(s.block_table) == 3
    big = seq(list(range(9)), "big")
    assert not bm.allocate_slots(big, 9)  # needs 3, only 1 free
    assert big.block_table == [] and bm.num_free_blocks == 1


def test_free_returns_blocks_and_detects_double_free() -> None:
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    s = seq(list(range(8)))
    assert bm.allocate_slots(s, 8)
    table = list(s.block_table)
    bm.free(s)
    assert bm.num_free_blocks == 4 and s.block_table == [] and s.num_computed_tokens == 0
    s.block_table = table
    with pytest.raises(AssertionError):
        bm.free(s)


def test_prefix_hit_reuses_blocks_of_a_finished_request() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(list(range(13)), "a")  # 3 full blocks + 1 token
    compute_all(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 8  # cached blocks count as free (evictable)
    b = seq([*range(12), 99, 100], "b")
    assert bm.acquire_prefix(b) == 12
    assert b.block_table == a_blocks[:3]
    assert b.num_computed_tokens == 12
    assert all(bm.ref_counts[x] == 1 for x in b.block_table)
    assert bm.num_free_blocks == 5


def test_prefix_hit_always_leaves_a_token_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(list(range(8)), "a")
    compute_all(bm, a)
    b = seq(list(range(8)), "b")  # identical, block aligned
    assert bm.acquire_prefix(b) == 4  # the last block is recomputed for its logits
    assert b.num_uncomputed_tokens == 4


def test_shared_blocks_are_ref_counted() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(list(range(9)), "a")
    compute_all(bm, a)
    b = seq(list(range(9)), "b")
    bm.acquire_prefix(b)
    shared = b.block_table[:2]
    assert [bm.ref_counts[x] for x in shared] == [2, 2]
    bm.free(a)
    assert [bm.ref_counts[x] for x in shared] == [1, 1]
    assert not any(x in bm.evictable for x in shared)  # still held by b
    bm.free(b)
    assert all(x in bm.evictable for x in shared)


def test_hash_chain_depends_on_the_whole_prefix() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = seq([1, 2, 3, 4, 5], "a")
    compute_all(bm, a)
    b = seq([9, 9, 3, 4, 5], "b")  # second block equal, first differs
    assert bm.acquire_prefix(b) == 0


def test_lru_eviction_prefers_oldest_and_forgets_hashes() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3], "a")
    compute_all(bm, a)  # block with [1, 2] cached, plus a partial block
    bm.free(a)
    c = seq([7, 8, 9], "c")
    compute_all(bm, c)  # [7, 8] cached
    bm.free(c)
    # Two never-cached blocks are handed out first, then the least recently freed cached block.
    d = seq(list(range(100, 106)), "d")
    assert bm.allocate_slots(d, 6)
    assert bm.acquire_prefix(seq([1, 2, 0], "a2")) == 0  # [1, 2] was evicted first
    e = seq([7, 8, 0], "e")
    assert bm.acquire_prefix(e) == 2  # [7, 8] survived


def test_disabled_prefix_caching_never_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = seq([1, 2, 3, 4, 5], "a")
    compute_all(bm, a)
    bm.free(a)
    assert bm.acquire_prefix(seq([1, 2, 3, 4, 5], "b")) == 0
    assert bm.num_free_blocks == 8 and not bm.evictable


def test_reset_prefix_cache_keeps_blocks_in_use() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = seq([1, 2, 3, 4, 5], "a")
    compute_all(bm, a)
    b = seq([6, 7, 8], "b")
    compute_all(bm, b)
    bm.free(b)
    bm.reset_prefix_cache()
    assert not bm.evictable
    assert bm.acquire_prefix(seq([6, 7, 0], "x")) == 0
    assert bm.acquire_prefix(seq([1, 2, 3, 4, 0], "y")) == 4


def _key_of_tokens_only(parent: bytes | None, tokens: tuple[int, ...]) -> bytes:
    """A deliberately weak key that collides whenever two blocks hold the same tokens."""
    return repr(tokens).encode()


def test_colliding_key_with_another_prefix_is_a_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_manager, "chain_hash", _key_of_tokens_only)
    bm = BlockManager(num_blocks=16, block_size=2)
    compute_all(bm, seq([1, 1, 5, 5, 0], "a"))  # [5, 5] computed after [1, 1]
    compute_all(bm, seq([2, 2, 6, 6, 0], "c"))  # [2, 2] cached
    b = seq([2, 2, 5, 5, 0], "b")  # its key for [5, 5] collides with a's block, parent differs
    assert bm.acquire_prefix(b) == 2  # [2, 2] is a real hit; a's [5, 5] must not be reused


def test_colliding_key_with_other_tokens_is_a_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_manager, "chain_hash", lambda parent, tokens: b"same")
    bm = BlockManager(num_blocks=16, block_size=2)
    a = seq([1, 2, 3], "a")
    compute_all(bm, a)
    b = seq([7, 8, 9], "b")
    assert bm.acquire_prefix(b) == 0
    assert not set(b.block_table) & set(a.block_table)
    assert bm.acquire_prefix(seq([1, 2, 0], "a2")) == 2  # the real prefix is still reused


def test_prefix_key_is_a_digest_stable_across_processes() -> None:
    """Keys are cryptographic digests of parent key + token ids, not Python's salted hash()."""
    first = block_manager.chain_hash(None, (1, 2))
    assert first == block_manager.chain_hash(None, (1, 2))
    assert len(first) >= 32
    assert block_manager.chain_hash(first, (3, 4)) != block_manager.chain_hash(None, (3, 4))
    assert block_manager.chain_hash(None, (1, 2)) != block_manager.chain_hash(None, (2, 1))
