"""Token embedding and LM head, split along the vocabulary across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln_engine.layers.linear import load_slice
from kiln_engine.layers.parallel import TPGroup


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.per_rank
        local = max(0, min(vocab_size, self.start + self.per_rank) - self.start)
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden_size, dtype=dtype), requires_grad=False)
        self.local_rows = local

    def load(self, name: str, tensor: torch.Tensor, shard: str | int | None = None) -> None:
        if self.tp.size == 1:
            load_slice(self.weight.data, tensor, 0, 0, 1, name)
            return
        rows = (
            tensor
            if tensor.shape[0] == self.local_rows
            else tensor[self.start : self.start + self.local_rows]
        )
        self.weight.data[: self.local_rows].copy_(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local >= 0) & (local < self.local_rows)
        out = F.embedding(local.clamp(0, self.per_rank - 1), self.weight) * mask.unsqueeze(-1)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits = hidden @ W^T over this rank's vocabulary slice, gathered across ranks."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, tp: TPGroup) -> None:
        super().__init__(vocab_size, hidden_size, dtype, tp)
        self.fused = False  # set by the model runner: small batches through `small_m_linear`

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor | None = None
        if self.fused:
            from kiln_engine.layers import gemv  # Triton: imported only where the fast path runs

            if gemv.streams_dense(hidden.numel() // hidden.shape[-1], self.weight):
                logits = gemv.small_m_linear(hidden, self.weight)
        if logits is None:
            logits = F.linear(hidden, self.weight)
        if self.tp.size > 1:
            logits = self.tp.all_gather_last_dim(logits)[..., : self.vocab_size]
        return logits
