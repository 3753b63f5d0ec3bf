"""The paged KV cache's bookkeeping: which physical blocks each sequence owns, and the prefix cache.

Plain Python, no torch. A block holds `block_size` token positions of K/V in every layer. Full blocks
whose K/V is computed are registered under a SHA-256 key chained over all tokens up to and including
them, so a later request with the same prefix reuses them (ref-counted). A hit also compares the
stored parent key and tokens, so even a key collision never hands out another prefix's K/V. A block
whose ref count drops to zero keeps its key and K/V and sits in an LRU pool; it is evicted (its key
forgotten) only when a fresh block is needed and no never-cached block is left. A sequence run
with a LoRA adapter chains its keys from its adapter's name (`prefix_root`), so K/V computed under
one adapter (or the base model) is never reused under another.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from kiln_engine.sequence import Sequence

BlockKey = bytes
# What a cached block was computed from: the key of the block before it and its own tokens.
BlockOrigin = tuple[BlockKey | None, tuple[int, ...]]


def chain_hash(parent: BlockKey | None, tokens: tuple[int, ...]) -> BlockKey:
    """The prefix-cache key of a full block: SHA-256 of the previous block's key and its tokens.

    Cryptographic (as in vLLM) rather than Python's `hash()`, whose collisions are easy to find.
    """
    digest = hashlib.sha256(b"root" if parent is None else b"next" + parent)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


def prefix_root(seq: Sequence) -> BlockKey | None:
    """The key chained before `seq`'s first block: None for the base model, else its adapter's."""
    adapter = seq.params.adapter
    return None if adapter is None else b"adapter:" + adapter.encode()


class BlockManager:
    """Allocates, shares and frees KV-cache blocks for sequences."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        recompute_last_hit: bool = False,
    ) -> None:
        """`recompute_last_hit`: a prefix hit leaves its last block to compute again. An EAGLE head's
        K/V at a block's last position depends on the token after the block, which a hit's last
        block does not fix (kiln_engine.eagle); the blocks before it are fixed by the next one's."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.recompute_last_hit = recompute_last_hit
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[BlockKey | None] = [None] * num_blocks
        self.block_origin: list[BlockOrigin | None] = [None] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))  # never cached (or forgotten)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, cached: LRU first
        self.cached: dict[BlockKey, int] = {}  # key -> block id

    # -- capacity ----------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    # -- prefix cache ------------------------------------------------------------------------------
    def acquire_prefix(self, seq: Sequence) -> int:
        """Attach the cached blocks matching `seq`'s leading full blocks; returns tokens reused.

        Only for a sequence that owns no blocks yet. At least one token is always left to compute,
        so the model produces logits for the last prompt position.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        parent = prefix_root(seq)
        hits: list[int] = []
        hashes: list[BlockKey] = []
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(parent, tokens)
            block = self.cached.get(h)
            if block is None or self.block_origin[block] != (parent, tokens):
                break  # a miss, or a key collision with another prefix
            hits.append(block)
            hashes.append(h)
            parent = h
        if self.recompute_last_hit:
            del hits[-1:], hashes[-1:]
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
        seq.block_table = hits
        seq.block_hashes = hashes
        seq.num_computed_tokens = len(hits) * bs
        return seq.num_computed_tokens

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Publish `seq`'s newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        root = prefix_root(seq)
        for i in range(len(seq.block_hashes), full):
            parent = seq.block_hashes[i - 1] if i else root
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(parent, tokens)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached:  # a duplicate computed concurrently stays private
                self.cached[h] = block
                self.block_hash[block] = h
                self.block_origin[block] = (parent, tokens)

    def rollback(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Forget `seq`'s K/V past `num_computed_tokens` (rejected speculative tokens): those
        positions count as uncomputed again, and full blocks published for the prefix cache since
        are withdrawn, since their slots will be overwritten. The blocks stay in its table."""
        if num_computed_tokens > seq.num_computed_tokens:
            raise ValueError("a rollback cannot move past the computed tokens")
        seq.num_computed_tokens = num_computed_tokens
        full = num_computed_tokens // self.block_size
        for i in range(full, len(seq.block_hashes)):
            block = seq.block_table[i]
            h = seq.block_hashes[i]
            if self.cached.get(h) == block:
                del self.cached[h]
                self.block_hash[block] = None
                self.block_origin[block] = None
        del seq.block_hashes[full:]

    # -- allocation --------------------------------------------------------------------------------
    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_computed_tokens + num_new_tokens` positions.

        Returns False, changing nothing, when too few blocks are free.
        """
        need = self.blocks_needed(seq, num_new_tokens)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            block = self._take_free_block()
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def _take_free_block(self) -> int:
        if self.free_blocks:
            return self.free_blocks.popleft()
        block, _ = self.evictable.popitem(last=False)  # least recently freed cached block
        h = self.block_hash[block]
        if h is not None and self.cached.get(h) == block:
            del self.cached[h]
        self.block_hash[block] = None
        self.block_origin[block] = None
        return block

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; its cached blocks stay reusable until evicted.

        Blocks are released tail first, so under LRU eviction a shared prefix outlives the
        sequence-specific tail that followed it.
        """
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                if self.block_hash[block] is not None:
                    self.evictable[block] = None
                else:
                    self.free_blocks.append(block)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence holds."""
        for block in list(self.evictable):
            self.block_hash[block] = None
            self.block_origin[block] = None
            self.free_blocks.append(block)
        self.evictable.clear()
        self.cached = {h: b for h, b in self.cached.items() if self.ref_counts[b] > 0}
