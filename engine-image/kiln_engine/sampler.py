"""Picks each sequence's next token from its logits: greedy, temperature, top-k, top-p, seeds, logprobs,
after the logit adjustments some requests ask for (penalties, logit_bias, min_tokens: logits_adjust).

Batched over rows with per-row parameters as tensors; sampling uses the exponential-race trick
(argmax of p / Exp(1) noise), which needs no host sync. A request with a seed draws its noise from
its own stream, so its tokens do not depend on what else is in the batch: on CUDA a counter-based
one (seeded_noise: every seeded row of a step in one kernel), elsewhere a generator per request.
The only host transfer is the final `.tolist()` of chosen tokens (and logprobs when asked for),
which `sample_async` leaves to the caller, so the next step can be enqueued before this one's
tokens are read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kiln_engine import seeded_noise
from kiln_engine.grammar import Grammars, GrammarState
from kiln_engine.interface import SamplingParams, TokenLogprob
from kiln_engine.logits_adjust import AdjustRow, LogitsAdjustment, build

if TYPE_CHECKING:
    from kiln_engine.sequence import Sequence as EngineSequence


@dataclass
class SampleRequest:
    """One row of the batch to sample: whose it is and how to sample it."""

    request_id: str
    params: SamplingParams
    token_ids: Sequence[int] = ()  # prompt + generated so far; read only when params adjust logits
    num_prompt_tokens: int = 0

    @classmethod
    def of(cls, seq: EngineSequence) -> SampleRequest:
        """The request of a scheduler Sequence (request_id, params, token_ids, num_prompt_tokens)."""
        return cls(seq.request_id, seq.params, seq.token_ids, seq.num_prompt_tokens)


@dataclass
class SamplingBatch:
    """One step's sampling parameters, prepared before the forward pass."""

    num_rows: int
    all_greedy: bool
    needs_filter: bool
    logprobs: list[int | None]  # per row; empty when no row wants logprobs
    max_logprobs: int
    seeded: list[tuple[int, torch.Generator]] = field(default_factory=list)  # (row, its generator)
    seeded_rows: torch.Tensor | None = None  # counter-based instead (CUDA): the rows and their keys
    seed_keys: torch.Tensor | None = None
    temperatures: torch.Tensor | None = None
    greedy_mask: torch.Tensor | None = None
    top_ks: torch.Tensor | None = None
    top_ps: torch.Tensor | None = None
    adjustment: LogitsAdjustment | None = None


@dataclass
class SampledTokens:
    """One step's sampled tokens, still on the device (`tokens` [rows] int64) until `resolve()`.

    A deferred one (`later`) has its sampling enqueued only by `finish()`: until then `tokens` and
    `packed` hold nothing, so every reader here finishes it first."""

    tokens: torch.Tensor
    packed: torch.Tensor | None  # token, its logprob, top values, top ids per row, when logprobs are wanted
    batch: SamplingBatch
    host: tuple[torch.Tensor, torch.Tensor | None, torch.cuda.Event] | None = None
    later: Callable[[], SampledTokens] | None = None

    def finish(self) -> None:
        """Enqueue the sampling a deferred step left for later (nothing once done)."""
        if self.later is None:
            return
        later, self.later = self.later, None
        with torch.inference_mode():
            done = later()
        self.tokens, self.packed = done.tokens, done.packed

    def copy_to_host(self) -> None:
        """Enqueue the copies to the host now, right behind the sampling kernels.

        `resolve()` then waits for these copies only. Without them it reads with `.tolist()`, which
        waits for everything enqueued on the stream so far, including a step enqueued after this one.
        """
        self.finish()
        if self.host is not None or not self.tokens.is_cuda:
            return
        tokens = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
        tokens.copy_(self.tokens, non_blocking=True)
        packed = None
        if self.packed is not None:
            packed = torch.empty(self.packed.shape, dtype=self.packed.dtype, pin_memory=True)
            packed.copy_(self.packed, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.host = (tokens, packed, done)

    def resolve(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """Wait for the device and return (token per row, logprob info per row or None)."""
        self.finish()
        tokens, packed = self.tokens, self.packed
        if self.host is not None:
            tokens, packed, done = self.host
            done.synchronize()
        if packed is None:
            return tokens.tolist(), [None] * self.batch.num_rows
        k = self.batch.max_logprobs
        token_list: list[int] = []
        infos: list[TokenLogprob | None] = []
        for row, w in zip(packed.tolist(), self.batch.logprobs, strict=True):
            tok = int(row[0])
            token_list.append(tok)
            if w is None:
                infos.append(None)
                continue
            vals, ids = row[2 : 2 + k], row[2 + k : 2 + 2 * k]
            infos.append(
                TokenLogprob(tok, row[1], {int(i): v for i, v in zip(ids[:w], vals[:w], strict=True)})
            )
        return token_list, infos


class Sampler:
    def __init__(
        self, device: torch.device, seed: int = 0, eos_token_ids: frozenset[int] = frozenset()
    ) -> None:
        self.device = device
        self.eos_token_ids = eos_token_ids  # what min_tokens blocks (the engine sets the tokenizer's)
        self.grammars: Grammars | None = None  # set by the engine when it serves structured outputs
        self.grammar_states: dict[str, GrammarState] = {}
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.seeded: dict[str, torch.Generator] = {}
        self.counter_noise = seeded_noise.available(device)
        self.draws: dict[str, int] = {}  # rows each seeded request has drawn (counter-based noise)
        # The thread of deferred steps' grammar fills, made on first use.
        self._mask_filler: ThreadPoolExecutor | None = None

    def release(self, request_id: str) -> None:
        self.seeded.pop(request_id, None)
        self.draws.pop(request_id, None)
        self.grammar_states.pop(request_id, None)

    def grammar_state(self, req: SampleRequest) -> GrammarState:
        """The grammar state of a structured request, made on its first use."""
        state = self.grammar_states.get(req.request_id)
        if state is None:
            assert self.grammars is not None and req.params.structured is not None
            state = self.grammars.state(req.params.structured)
            self.grammar_states[req.request_id] = state
        return state

    def _generator(self, req: SampleRequest) -> torch.Generator:
        g = self.seeded.get(req.request_id)
        if g is None:
            assert req.params.seed is not None
            g = torch.Generator(device=self.device).manual_seed(req.params.seed)
            self.seeded[req.request_id] = g
        return g

    def _seed_key(self, req: SampleRequest) -> int:
        draw = self.draws.get(req.request_id, 0)
        self.draws[req.request_id] = draw + 1
        assert req.params.seed is not None
        return seeded_noise.draw_key(req.params.seed, draw)

    def _seed_streams(self, batch: SamplingBatch, requests: list[SampleRequest]) -> None:
        """Give each seeded row its own noise stream: keys for the counter-based kernel, or generators."""
        rows = [i for i, r in enumerate(requests) if r.params.seed is not None]
        if not rows:
            return
        if self.counter_noise:
            batch.seeded_rows = self._to_device(rows, torch.int64)
            batch.seed_keys = self._to_device([self._seed_key(requests[i]) for i in rows], torch.int64)
        else:
            batch.seeded = [(i, self._generator(requests[i])) for i in rows]

    def prepare(
        self, requests: list[SampleRequest], vocab_size: int, follows: SampledTokens | None = None
    ) -> SamplingBatch:
        """Per-row parameters as device tensors, built before the forward pass (async copies).

        `follows`: for a lookahead step, the step before, whose tokens (placeholders in the rows'
        token_ids, one per row) grammar masks read once they are filled (when sampling)."""
        params = [r.params for r in requests]
        # The common case (every row greedy, no logprobs, no seed, no logit adjustment) costs one
        # pass over the distinct parameter objects, not five passes over the rows.
        distinct = {id(p): p for p in params}.values()
        if all(p.plain_greedy for p in distinct):
            return SamplingBatch(
                num_rows=len(requests), all_greedy=True, needs_filter=False, logprobs=[], max_logprobs=0
            )
        greedy = [p.temperature <= 0.0 for p in params]
        top_ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        top_ps = [p.top_p for p in params]
        want = [p.logprobs for p in params]
        batch = SamplingBatch(
            num_rows=len(requests),
            all_greedy=all(greedy),
            needs_filter=any(k < vocab_size for k in top_ks) or any(p < 1.0 for p in top_ps),
            logprobs=want,
            max_logprobs=max(0, *(w or 0 for w in want)) if want else 0,
        )
        self._seed_streams(batch, requests)
        if any(p.adjusts_logits for p in distinct):
            adjusted = [
                AdjustRow(i, r.params, r.token_ids, r.num_prompt_tokens)
                for i, r in enumerate(requests)
                if r.params.adjusts_logits
            ]
            states = {a.row: self.grammar_state(requests[a.row]) for a in adjusted if a.params.structured}
            pending = (lambda: follows.resolve()[0]) if follows is not None and states else None
            batch.adjustment = build(
                adjusted, vocab_size, self.eos_token_ids, self._to_device, states, pending
            )
        if not batch.all_greedy:
            batch.temperatures = self._to_device(
                [p.temperature if p.temperature > 0 else 1.0 for p in params], torch.float32
            )
            batch.greedy_mask = self._to_device(greedy, torch.bool)
            if batch.needs_filter:
                batch.top_ks = self._to_device(top_ks, torch.int64)
                batch.top_ps = self._to_device(top_ps, torch.float32)
        return batch

    def _to_device(
        self,
        values: list[float] | list[int] | list[bool] | list[list[int]] | torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        t = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    @torch.no_grad()
    def sample(
        self, logits: torch.Tensor, batch: SamplingBatch
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [N, V] float32 -> (token per row, logprob info per row or None). One host transfer."""
        return self.sample_async(logits, batch).resolve()

    @torch.no_grad()
    def sample_async(
        self, logits: torch.Tensor, batch: SamplingBatch, defer_masks: bool = False
    ) -> SampledTokens:
        """Enqueue the sampling of every row; nothing waits for the device until `resolve()`.

        Everything that reads `logits` is enqueued here, so the caller may reuse their memory (a
        decode graph's output buffer) for the next step right away. Unless `defer_masks` and the
        batch has grammar masks: then their fill starts on the sampler's fill thread and the sampling
        is enqueued by the returned tokens' `finish()`, so the caller's host work in between overlaps
        the fill; `logits` must stay as they are until then.
        """
        masks = batch.adjustment.grammar if batch.adjustment is not None else None
        if defer_masks and masks is not None:
            if self._mask_filler is None:
                self._mask_filler = ThreadPoolExecutor(1, thread_name_prefix="kiln-grammar-fill")
            masks.start(self._mask_filler)
            nothing_yet = torch.empty(0, dtype=torch.int64, device=logits.device)
            return SampledTokens(nothing_yet, None, batch, later=lambda: self._enqueue(logits, batch))
        return self._enqueue(logits, batch)

    def _enqueue(self, logits: torch.Tensor, batch: SamplingBatch) -> SampledTokens:
        if batch.adjustment is not None:
            logits = batch.adjustment.apply(logits)
        tokens = logits.argmax(dim=-1)
        if not batch.all_greedy:
            tokens = self._sample(logits, batch, tokens)
        if not any(w is not None for w in batch.logprobs):
            return SampledTokens(tokens, None, batch)
        logprobs = torch.log_softmax(logits, dim=-1)
        k = batch.max_logprobs
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
        top_vals, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], tokens[:, None][:, :0])
        packed = torch.cat(
            [tokens[:, None].double(), chosen[:, None].double(), top_vals.double(), top_ids.double()], dim=1
        )
        return SampledTokens(tokens, packed, batch)

    def __call__(
        self, logits: torch.Tensor, requests: list[SampleRequest]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        return self.sample(logits, self.prepare(requests, logits.shape[1]))

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch, greedy: torch.Tensor) -> torch.Tensor:
        assert batch.greedy_mask is not None
        probs = self.probs(logits, batch)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        if batch.seeded_rows is not None and batch.seed_keys is not None:
            seeded_noise.fill_rows(noise, batch.seeded_rows, batch.seed_keys)
        for row, g in batch.seeded:  # its own stream, independent of the batch
            noise[row].exponential_(generator=g)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(batch.greedy_mask, greedy, sampled)

    def probs(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The distribution each sampled row draws from: temperature, then top-k and top-p."""
        assert batch.temperatures is not None
        vocab = logits.shape[1]
        scaled = logits / batch.temperatures[:, None]
        if batch.needs_filter:
            assert batch.top_ks is not None and batch.top_ps is not None
            sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab, device=logits.device)[None, :]
            remove = ranks >= batch.top_ks[:, None]
            probs = sorted_logits.softmax(dim=-1)
            cum = probs.cumsum(dim=-1) - probs  # mass strictly before each token; the top token always stays
            remove |= cum >= batch.top_ps[:, None]
            sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
            scaled = torch.empty_like(scaled).scatter_(1, sorted_idx, sorted_logits)
        return scaled.softmax(dim=-1)
