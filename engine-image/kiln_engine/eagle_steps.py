"""An EAGLE head's draft steps after the first, all of one drafting call in one CUDA graph per padded
batch size (eager, on the same buffers, off a GPU or without graphs).

Drafting k tokens runs the head once over the catch-up positions (varying lengths: eager, in
kiln_engine.eagle) and then k - 1 times over one token per sequence. Those k - 1 steps are the same
every call but for their inputs: each sequence's first draft, the head's state after it, the
position of its next draft, how many drafts it wants and its block table. Run eagerly, each step is
dozens of small launches against a target step replayed from a graph; on an H100 that made
tiny-chat 0.35x slower with its head than without (bench/results-committed/eagle-h100.json).

Here every step of a call is captured once per batch size: step j writes the head's K/V of each
sequence at position end + j - 1 (end: the first draft's position) and reads draft j + 1 from the
head's output. A sequence wanting fewer drafts than the others, and padding rows, take position 0
with a context of one token and write their K/V into the scratch block, which the block manager never
hands out; their extra drafts are dropped. Block table columns past a sequence's blocks hold stale
ids, masked by its context length, as in the target's decode graphs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kiln_engine.model_runner import ModelRunner, decode_metas

if TYPE_CHECKING:
    from kiln_engine.eagle import _Head


class DraftSteps:
    """Draft steps 2..k of a drafting call for up to `sizes[-1]` sequences."""

    def __init__(self, head: _Head, runner: ModelRunner, sizes: list[int], steps: int, capture: bool) -> None:
        """`steps`: k - 1 for k drafts per sequence; `capture`: record CUDA graphs (a GPU whose
        attention backend is graph-safe)."""
        self.head, self.runner = head, runner
        self.sizes = sorted(set(sizes))
        self.steps = steps
        dev, max_bs = runner.device, self.sizes[-1]
        self.block_size = runner.block_size
        self.max_blocks = -(-runner.max_model_len // runner.block_size)
        self.scratch_slot = runner.num_blocks * runner.block_size
        i64, i32 = torch.int64, torch.int32
        # Inputs, written before each run.
        self.first = torch.zeros(max_bs, dtype=i64, device=dev)  # each sequence's first draft
        self.state = torch.zeros(max_bs, runner.model_config.hidden_size, dtype=runner.dtype, device=dev)
        self.end = torch.zeros(max_bs, dtype=i64, device=dev)  # the first draft's position
        self.wanted = torch.zeros(max_bs, dtype=i64, device=dev)  # drafts it wants; 0: padding
        self.block_tables = torch.full((max_bs, self.max_blocks), runner.num_blocks, dtype=i32, device=dev)
        # What the steps derive and write.
        self.positions = torch.zeros(max_bs, dtype=i64, device=dev)
        self.slot_mapping = torch.full((max_bs,), self.scratch_slot, dtype=i64, device=dev)
        self.seq_lens = torch.ones(max_bs, dtype=i32, device=dev)
        self.drafts = torch.zeros(max_bs, steps + 1, dtype=i64, device=dev)
        self.rows = torch.arange(max_bs, device=dev)
        self.metas = decode_metas(
            self.sizes, self.slot_mapping, self.seq_lens, self.block_tables, self.block_size
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if capture and steps > 0:
            self._capture()

    def _forward(self, bs: int) -> None:
        meta, model = self.metas[bs], self.runner.model
        tokens, state = self.first[:bs], self.state[:bs]
        self.drafts[:bs, 0].copy_(tokens)
        for j in range(1, self.steps + 1):
            live = self.wanted[:bs] > j  # the sequence wants draft j + 1
            pos = torch.where(live, self.end[:bs] + (j - 1), 0)
            block = self.block_tables[:bs][self.rows[:bs], pos // self.block_size].long()
            slot = torch.where(live, block * self.block_size + pos % self.block_size, self.scratch_slot)
            self.positions[:bs].copy_(pos)
            self.seq_lens[:bs].copy_(pos + 1)
            self.slot_mapping[:bs].copy_(slot)
            self.runner.backend.prepare(meta)
            out, state = self.head(model.model.embed_tokens(tokens), state, self.positions[:bs], meta)
            tokens = self.head.draft_tokens(out, model)
            self.drafts[:bs, j].copy_(tokens)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            self._forward(bs)  # warm-up: kernel compilation, library workspaces
            torch.cuda.synchronize(self.runner.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph

    def padded(self, n: int) -> int:
        """The batch size n sequences run at."""
        return next(b for b in self.sizes if b >= n)

    def run(
        self,
        first: torch.Tensor,
        state: torch.Tensor,
        ends: torch.Tensor,
        wanted: torch.Tensor,
        tables: torch.Tensor,
    ) -> torch.Tensor:
        """Drafts [n, steps + 1] of n sequences (row i's first `wanted[i]` are its drafts), given each
        one's `first` draft [n] and the head's `state` [n, hidden] after it, its first draft's
        position `ends[i]` and its block table (`tables` [n, width]), all on the device; `ends` and
        `wanted` padded to `padded(n)` (padding rows want 0 drafts)."""
        n, bs = first.shape[0], ends.shape[0]
        self.end[:bs].copy_(ends)
        self.wanted[:bs].copy_(wanted)
        self.first[:n].copy_(first)
        self.state[:n].copy_(state)
        self.block_tables[:n, : tables.shape[1]].copy_(tables)
        graph = self.graphs.get(bs)
        if graph is None:
            self._forward(bs)
        else:
            graph.replay()
        return self.drafts[:n]
