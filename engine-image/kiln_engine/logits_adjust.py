"""Per-request changes to the logits before a token is picked: repetition, presence and frequency
penalties, logit_bias, min_tokens and grammar masks (structured outputs), as a few batched tensor
ops over the rows that ask for them.

`build` runs on the host before the forward pass and only copies small tensors to the device
(asynchronously); `apply` enqueues the ops. Grammar masks are the exception: they are filled in
`apply`, which the sampler calls once the forward pass is enqueued, so the host walks the grammars
while the device computes the logits. A lookahead step's are filled on the sampler's fill thread
(`GrammarMasks.start`) once the tokens of the step before are read, while the engine's thread does
that step's bookkeeping. A step whose rows ask for none of this never builds one, so the greedy
fast path and plain sampling keep their cost. The order follows the usual semantics: penalties act
on the model's raw logits, then logit_bias is added, then min_tokens masks the stop
tokens of rows that have not generated enough yet, then the grammar keeps only the tokens it allows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

import torch

from kiln_engine import grammar
from kiln_engine.grammar import GrammarState
from kiln_engine.interface import SamplingParams

ToDevice = Callable[
    [list[float] | list[int] | list[bool] | list[list[int]] | torch.Tensor, torch.dtype], torch.Tensor
]


@dataclass(frozen=True)
class AdjustRow:
    """One row of the batch that samples: its parameters and the tokens its sequence holds."""

    row: int
    params: SamplingParams
    token_ids: Sequence[int]  # prompt + generated so far (not copied)
    num_prompt_tokens: int


@dataclass
class LogitsAdjustment:
    """One step's adjustments, as device tensors over the R adjusted rows of an [N, V] logits batch."""

    rows: torch.Tensor  # [R] int64: which rows of the batch
    context_ids: torch.Tensor | None = None  # [R, L] prompt+output ids, padded with V (repetition)
    repetition: torch.Tensor | None = None  # [R]
    output_ids: torch.Tensor | None = None  # [R, L] output ids, padded with V (presence/frequency)
    presence: torch.Tensor | None = None  # [R]
    frequency: torch.Tensor | None = None  # [R]
    bias_at: tuple[torch.Tensor, torch.Tensor] | None = None  # (adjusted-row index, token id)
    bias: torch.Tensor | None = None
    blocked_at: tuple[torch.Tensor, torch.Tensor] | None = None  # (adjusted-row index, token id) -> -inf
    grammar: GrammarMasks | None = None  # the rows under a grammar, masked when applied

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """New logits with the adjusted rows changed; `logits` itself is left as it was."""
        allowed = self.grammar.fill() if self.grammar is not None else None  # host work, device busy
        x = logits.index_select(0, self.rows)
        vocab = x.shape[1]
        if self.context_ids is not None and self.repetition is not None:
            seen = torch.zeros(x.shape[0], vocab + 1, dtype=torch.bool, device=x.device)
            seen = seen.scatter_(1, self.context_ids, True)[:, :vocab]
            penalty = self.repetition[:, None]
            x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
        if self.output_ids is not None and self.presence is not None and self.frequency is not None:
            counts = torch.zeros(x.shape[0], vocab + 1, dtype=x.dtype, device=x.device)
            counts = counts.scatter_add_(1, self.output_ids, torch.ones_like(self.output_ids, dtype=x.dtype))
            counts = counts[:, :vocab]
            x = x - self.frequency[:, None] * counts - self.presence[:, None] * (counts > 0).to(x.dtype)
        if self.bias_at is not None and self.bias is not None:
            x = x.index_put(self.bias_at, self.bias.to(x.dtype), accumulate=True)
        if self.blocked_at is not None:
            x = x.index_put(self.blocked_at, torch.tensor(float("-inf"), dtype=x.dtype, device=x.device))
        if allowed is not None:
            grammar.apply_bitmask(x, allowed)
        return logits.index_copy(0, self.rows, x)


@dataclass
class GrammarMasks:
    """The grammar-constrained rows of one step, whose token bitmask is filled on demand."""

    states: list[tuple[int, AdjustRow, GrammarState]]  # (adjusted-row index, row, its grammar state)
    num_rows: int  # adjusted rows (the bitmask's height; rows without a grammar allow every token)
    vocab_size: int
    to_device: ToDevice
    # A lookahead step's: the tokens of the step before, by batch row, which its rows' token_ids
    # hold as placeholders (reading them waits for that step's sampling only).
    pending: Callable[[], list[int]] | None = None

    _host: Future[torch.Tensor] | None = field(default=None, init=False, repr=False)

    def start(self, executor: Executor) -> None:
        """Fill the host bitmask on `executor`'s thread, so the calling thread goes on meanwhile
        (xgrammar's fill does not hold the GIL); `fill` then waits for it. Host work only there: the
        copy to the device is enqueued by the thread that calls `fill`, on its stream."""
        self._host = executor.submit(self._fill_host)

    def fill(self) -> torch.Tensor:
        """The [R, ceil(V/32)] int32 bitmask of allowed tokens, on the logits' device."""
        host = self._host.result() if self._host is not None else self._fill_host()
        return self.to_device(host, torch.int32)

    def _fill_host(self) -> torch.Tensor:
        bitmask = grammar.allocate_bitmask(self.num_rows, self.vocab_size)
        pending = self.pending() if self.pending is not None else None
        grammar.fill_masks(
            [(i, state) for i, _, state in self.states],
            bitmask,
            [(r.token_ids, r.num_prompt_tokens, pending[r.row] if pending is not None else None)
             for _, r, _ in self.states],
        )  # fmt: skip
        return bitmask


def build(
    rows: list[AdjustRow],
    vocab_size: int,
    eos_token_ids: frozenset[int],
    to_device: ToDevice,
    grammars: dict[int, GrammarState] | None = None,
    pending: Callable[[], list[int]] | None = None,
) -> LogitsAdjustment | None:
    """The adjustments of these rows (those whose params adjust logits), or None if none applies now.

    Rows that ask for one adjustment get the neutral value of the others (penalty 1 or 0, no ids,
    every token allowed). `grammars`: the grammar state of each constrained row, by row. `pending`:
    for a lookahead step, the tokens of the step before (see GrammarMasks).
    """
    blocked = {r.row: ids for r in rows if (ids := _min_tokens_blocked(r, eos_token_ids))}
    chosen = [r for r in rows if r.params.uses_history or r.params.logit_bias or r.row in blocked]
    if not chosen:
        return None
    pad = vocab_size  # a column past the vocabulary, dropped after the scatter
    out = LogitsAdjustment(rows=to_device([r.row for r in chosen], torch.int64))
    if any(r.params.repetition_penalty != 1.0 for r in chosen):
        context = [list(r.token_ids) if r.params.repetition_penalty != 1.0 else [] for r in chosen]
        out.context_ids = to_device(_padded(context, pad), torch.int64)
        out.repetition = to_device([r.params.repetition_penalty for r in chosen], torch.float32)
    if any(r.params.presence_penalty or r.params.frequency_penalty for r in chosen):
        generated = [
            list(r.token_ids[r.num_prompt_tokens :])
            if r.params.presence_penalty or r.params.frequency_penalty
            else []
            for r in chosen
        ]
        out.output_ids = to_device(_padded(generated, pad), torch.int64)
        out.presence = to_device([r.params.presence_penalty for r in chosen], torch.float32)
        out.frequency = to_device([r.params.frequency_penalty for r in chosen], torch.float32)
    biases = [(i, tok, bias) for i, r in enumerate(chosen) for tok, bias in r.params.logit_bias]
    if biases:
        rows_b = to_device([i for i, _, _ in biases], torch.int64)
        out.bias_at = (rows_b, to_device([tok for _, tok, _ in biases], torch.int64))
        out.bias = to_device([bias for _, _, bias in biases], torch.float32)
    if grammars:
        states = [(i, r, grammars[r.row]) for i, r in enumerate(chosen) if r.row in grammars]
        out.grammar = GrammarMasks(states, len(chosen), vocab_size, to_device, pending)
    masked = [(i, tok) for i, r in enumerate(chosen) for tok in sorted(blocked.get(r.row, ()))]
    if masked:
        out.blocked_at = (
            to_device([i for i, _ in masked], torch.int64),
            to_device([tok for _, tok in masked], torch.int64),
        )
    return out


def _min_tokens_blocked(r: AdjustRow, eos_token_ids: frozenset[int]) -> set[int]:
    """The tokens this row may not pick yet: EOS (unless ignored) and its stop token ids."""
    p = r.params
    if len(r.token_ids) - r.num_prompt_tokens >= p.min_tokens:
        return set()
    return set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))


def _padded(lists: list[list[int]], pad: int) -> list[list[int]]:
    width = max(1, max(len(x) for x in lists))
    return [x + [pad] * (width - len(x)) for x in lists]
