"""Speculative decoding by n-gram prompt lookup: propose draft tokens, verify them in one target step.

Per step, each running sequence that speculates (`speculates`) and has its whole context computed
gets up to k draft tokens: the tokens that followed the most recent earlier
occurrence of its longest matching suffix n-gram (prompt + output), no extra model. The drafts are
appended to `token_ids` before scheduling, so the scheduler schedules 1 + k tokens for that sequence
next to ordinary decodes and prefills in the same batch. `verify` runs that batch once, takes the
target's argmax at every draft position, and keeps the drafts up to the first mismatch plus the
target's own token after them (greedy acceptance: the output equals decoding without drafts). A
sampled request accepts each draft with the target's probability of it and, at the first rejection,
draws from the target's distribution without that token (rejection sampling with a one-token draft
distribution: emitted tokens keep the target's distribution, `accept_sampled`).
`SpeculativeDecoder.settle` then removes the drafts again and rolls the KV cache back: the KV of
accepted drafts stays, rejected positions count as uncomputed, and prefix-cache entries published
for blocks that held rejected drafts are withdrawn before anyone can reuse them.

A request under a grammar (structured outputs) speculates too: each of its verify rows is masked
with what the grammar allows after the drafts before it (`GrammarState.fill_draft_masks`), so a
draft the grammar refuses is rejected (its probability is zero) and the token after the accepted
drafts is one the grammar allows, greedy or sampled from the masked distribution as without
drafts. Requests with logprobs, a seed or other logit adjustments (penalties, logit_bias,
min_tokens) never speculate: they decode one token per step in the same batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from kiln_engine import grammar
from kiln_engine.block_manager import BlockManager
from kiln_engine.interface import RequestOutput, SamplingParams, TokenLogprob
from kiln_engine.model_runner import ModelRunner
from kiln_engine.sampler import SampleRequest
from kiln_engine.scheduler import ScheduledChunk
from kiln_engine.sequence import Sequence

# Verify steps replay decode graphs where they can (`SpeculativeDecoder._forward`); bench/speculative.py
# turns it off for its eager-verify baseline.
VERIFY_IN_GRAPHS = True
MAX_NGRAM = 3  # longest suffix looked up; shorter ones are tried when it has no earlier match
MIN_NGRAM = 1

# Drafts for a batch: (context tokens, most drafts wanted) in, each context's drafts out.
Proposer = Callable[[list[tuple[list[int], int]]], list[list[int]]]
# A proposer that drafts once the step is scheduled (an EAGLE head writes its own K/V into the
# blocks the scheduler gives the drafts): (sequence, drafts wanted) in, each one's drafts out. Until
# then the sequences hold DRAFT_PLACEHOLDER in the drafts' places.
LateProposer = Callable[[list[tuple[Sequence, int]]], list[list[int]]]
DRAFT_PLACEHOLDER = 0


def propose_ngram(tokens: list[int], k: int, max_n: int = MAX_NGRAM, min_n: int = MIN_NGRAM) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of `tokens`' longest
    matching suffix (length `max_n` down to `min_n`); [] when no suffix occurred before."""
    if k <= 0:
        return []
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = tokens[size - n :]
        # latest start i < size - n whose n tokens equal the suffix and that has a continuation
        for i in range(size - n - 1, -1, -1):
            if tokens[i : i + n] == suffix:
                return tokens[i + n : i + n + k]
    return []


def accept_greedy(drafts: list[int], targets: list[int]) -> list[int]:
    """The tokens greedy decoding emits: `targets[i]` is the target's argmax after the context plus
    `drafts[:i]` (len(targets) == len(drafts) + 1); drafts are kept while they equal it."""
    if len(targets) != len(drafts) + 1:
        raise ValueError(f"{len(drafts)} drafts need {len(drafts) + 1} target tokens, got {len(targets)}")
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return targets[: accepted + 1]


def ngram_proposer(requests: list[tuple[list[int], int]]) -> list[list[int]]:
    """`propose_ngram` for each (context, budget)."""
    return [propose_ngram(tokens, budget) for tokens, budget in requests]


def accept_sampled(drafts: list[int], probs: torch.Tensor, generator: torch.Generator) -> list[int]:
    """The tokens a sampled request emits: `probs` [len(drafts) + 1, vocab] are the target's
    distributions after the context plus `drafts[:i]`. Draft i is kept with probability
    probs[i, draft]; the first rejected one is replaced by a draw from probs[i] without the draft
    token; when all are kept, one more token is drawn from the last row."""
    if probs.shape[0] != len(drafts) + 1:
        raise ValueError(f"{len(drafts)} drafts need {len(drafts) + 1} distributions, got {probs.shape[0]}")
    k = len(drafts)
    ids = torch.tensor(drafts, dtype=torch.int64, device=probs.device)
    p_draft = probs[:k].gather(1, ids[:, None]).squeeze(1)
    uniform = torch.rand(k, generator=generator, device=probs.device)
    kept = (uniform < p_draft).tolist()
    accepted = kept.index(False) if False in kept else k
    last = probs[accepted].clone()
    if accepted < k:
        last[drafts[accepted]] = 0.0  # the residual max(p - q, 0) of a draft distribution one-hot on it
    token = int(torch.multinomial(last, 1, generator=generator).item())  # multinomial renormalizes
    return [*drafts[:accepted], token]


def speculates(params: SamplingParams) -> bool:
    """Whether a request takes drafts: greedy, or plain sampling whose distribution `accept_sampled`
    can reproduce (no logprobs, no seed, no logit adjustment but a grammar's, which `verify` applies
    to the drafts' rows itself)."""
    plain = params.logprobs is None and params.seed is None
    return params.plain_greedy or (plain and (not params.adjusts_logits or params.adjusts_by_grammar_alone))


@dataclass
class Verified:
    """One verify step's result, per sampling chunk in order: the tokens it emits (1 + accepted
    drafts for a speculating sequence, 1 otherwise) and the logprob info of a non-speculating row."""

    tokens: list[list[int]]
    logprobs: list[TokenLogprob | None]


class SpeculativeDecoder:
    """Owns the drafts of the step in progress and the proposed / accepted token totals."""

    def __init__(
        self,
        num_tokens: int,
        max_model_len: int,
        proposer: Proposer = ngram_proposer,
        late_proposer: LateProposer | None = None,
    ) -> None:
        if num_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {num_tokens}")
        self.num_tokens = num_tokens
        self.max_model_len = max_model_len
        self.proposer = proposer
        self.late_proposer = late_proposer
        self.late: list[Sequence] = []  # sequences holding placeholders for the late proposer
        self.drafts: dict[str, list[int]] = {}  # request id -> drafts appended to its token_ids
        self.proposed_total = 0
        self.accepted_total = 0
        self.drafts_total = 0  # draft runs verified
        self.accepted_per_position = [0] * num_tokens  # [i]: runs whose draft i + 1 was kept
        self.graph_verifies = 0  # verify steps that replayed a decode graph (`_forward`)

    def draft_budget(self, seq: Sequence) -> int:
        """How many drafts `seq` may take: none unless it decodes plainly greedily from a fully
        computed context; never past max_tokens or the context length."""
        if not speculates(seq.params) or seq.num_uncomputed_tokens != 1:
            return 0
        left_by_tokens = seq.params.max_tokens - seq.num_output_tokens - 1
        left_by_context = self.max_model_len - seq.num_tokens - 1
        return max(0, min(self.num_tokens, left_by_tokens, left_by_context))

    def propose(self, running: list[Sequence], bm: BlockManager, step_budget: int) -> None:
        """Append drafts to the running sequences, only when the scheduler can then run every one of
        them whole this step (no preemption, no split chunk): drafts never reach a waiting queue."""
        if self.late_proposer is not None:  # places now, drafts once scheduled (`fill_late`)
            batch = [[DRAFT_PLACEHOLDER] * self.draft_budget(seq) for seq in running]
        else:  # copies of the contexts: a proposer may keep what it is given (a draft engine's do)
            batch = self.proposer([(list(seq.token_ids), self.draft_budget(seq)) for seq in running])
        proposals = {seq.request_id: d for seq, d in zip(running, batch, strict=True)}
        tokens = sum(seq.num_uncomputed_tokens + len(proposals[seq.request_id]) for seq in running)
        blocks = sum(
            bm.blocks_needed(seq, seq.num_uncomputed_tokens + len(proposals[seq.request_id]))
            for seq in running
        )
        if not any(proposals.values()) or tokens > step_budget or blocks > bm.num_free_blocks:
            return
        for seq in running:
            drafts = proposals[seq.request_id]
            if drafts:
                seq.token_ids.extend(drafts)
                self.drafts[seq.request_id] = drafts
                self.proposed_total += len(drafts)
                if self.late_proposer is not None:
                    self.late.append(seq)

    def fill_late(self) -> None:
        """Replace the scheduled placeholders with the late proposer's drafts."""
        late, self.late = self.late, []
        if self.late_proposer is None or not late:
            return
        wanted = [(seq, len(self.drafts[seq.request_id])) for seq in late]
        for (seq, k), drafts in zip(wanted, self.late_proposer(wanted), strict=True):
            if len(drafts) != k:
                raise RuntimeError(f"the late proposer made {len(drafts)} drafts for {k} places")
            seq.token_ids[-k:] = drafts
            self.drafts[seq.request_id] = drafts

    def check_scheduled(self, chunks: list[ScheduledChunk]) -> None:
        whole = {c.seq.request_id for c in chunks if c.samples}
        if not whole.issuperset(self.drafts):
            raise RuntimeError("a sequence with drafts was not scheduled whole")

    @torch.inference_mode()
    def verify(self, runner: ModelRunner, chunks: list[ScheduledChunk]) -> Verified:
        """Run `chunks` once; greedy-accept each speculating sequence's drafts, sample the others."""
        self.fill_late()
        logits_of, sample_rows, sample_reqs = self._forward(runner, chunks)
        sampling_chunks = [c for c in chunks if c.samples]
        plain = [i for i, c in enumerate(sampling_chunks) if c.seq.request_id not in self.drafts]
        result = Verified([[] for _ in sampling_chunks], [None] * len(sampling_chunks))
        if plain:
            batch = runner.sampler.prepare([sample_reqs[i] for i in plain], runner.model_config.vocab_size)
            rows = torch.tensor([sample_rows[i] for i in plain], dtype=torch.int64, device=runner.device)
            tokens, logprobs = runner.sampler.sample_async(logits_of(rows), batch).resolve()
            for i, token, lp in zip(plain, tokens, logprobs, strict=True):
                result.tokens[i] = [token]
                result.logprobs[i] = lp
        # Every speculating row's 1 + k positions go through the LM head together; greedy rows then
        # need one argmax and one device-to-host read for the whole batch.
        spans: list[tuple[int, list[int], int]] = []  # (chunk index, drafts, first logits row)
        spec_rows: list[int] = []
        for i, c in enumerate(sampling_chunks):
            drafts = self.drafts.get(c.seq.request_id)
            if drafts is not None:
                spans.append((i, drafts, len(spec_rows)))
                spec_rows.extend(range(sample_rows[i] - len(drafts), sample_rows[i] + 1))
        if not spans:
            return result
        logits = logits_of(torch.tensor(spec_rows, dtype=torch.int64, device=runner.device))
        self._constrain(runner, spans, sample_reqs, logits)
        argmax = logits.argmax(dim=-1).tolist()
        for i, drafts, first in spans:
            span = slice(first, first + len(drafts) + 1)
            params = sampling_chunks[i].seq.params
            if params.temperature <= 0:
                result.tokens[i] = accept_greedy(drafts, argmax[span])
            else:
                # The rows are masked by the grammar already (`_constrain`): sample them plainly.
                plain_req = replace(sample_reqs[i], params=replace(params, structured=None))
                batch = runner.sampler.prepare(
                    [plain_req] * (len(drafts) + 1), runner.model_config.vocab_size
                )
                probs = runner.sampler.probs(logits[span].float(), batch)
                result.tokens[i] = accept_sampled(drafts, probs, runner.sampler.generator)
            self._count(len(result.tokens[i]) - 1)
        return result

    def _count(self, accepted: int) -> None:
        self.drafts_total += 1
        self.accepted_total += accepted
        for position in range(accepted):
            self.accepted_per_position[position] += 1

    def _forward(
        self, runner: ModelRunner, chunks: list[ScheduledChunk]
    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[int], list[SampleRequest]]:
        """The step's forward pass: how to get the logits of some of its token rows, which row ends
        each sampling chunk, and those chunks' requests. A step of at most 1 + k tokens per sequence,
        every chunk ending its sequence, replays a decode graph with a row per token; others (a
        longer prefill chunk, a chunk that does not reach its sequence's end) run eagerly."""
        graphs = runner.decode_graphs if VERIFY_IN_GRAPHS else None
        short = all(c.num_tokens <= 1 + self.num_tokens for c in chunks)
        if graphs is not None and short and graphs.can_run_tails(chunks):
            logits = graphs.run_tails(chunks)
            ends = list(itertools.accumulate(c.num_tokens for c in chunks))
            rows = [end - 1 for c, end in zip(chunks, ends, strict=True) if c.samples]
            requests = [SampleRequest.of(c.seq) for c in chunks if c.samples]
            self.graph_verifies += 1
            return (lambda index: logits.index_select(0, index)), rows, requests
        input_ids, positions, meta, rows, requests = runner._prepare(chunks)
        runner.backend.prepare(meta)
        hidden = runner.model(input_ids, positions, meta)
        if runner.hidden_sink is not None:
            runner.hidden_sink.observe(chunks, runner.sink_features(hidden))
        return (lambda index: runner.model.compute_logits(hidden.index_select(0, index))), rows, requests

    @staticmethod
    def _constrain(
        runner: ModelRunner,
        spans: list[tuple[int, list[int], int]],
        requests: list[SampleRequest],
        logits: torch.Tensor,
    ) -> None:
        """Mask the verify rows of the spans whose request has a grammar, in place."""
        constrained = [(i, drafts, first) for i, drafts, first in spans if requests[i].params.structured]
        if not constrained:
            return
        bitmask = grammar.allocate_bitmask(logits.shape[0], runner.model_config.vocab_size)
        for i, drafts, first in constrained:
            req = requests[i]
            state = runner.sampler.grammar_state(req)
            state.fill_draft_masks(req.token_ids, req.num_prompt_tokens, drafts, bitmask, first)
        grammar.apply_bitmask(logits, bitmask.to(logits.device))

    def settle(self, seq: Sequence, bm: BlockManager) -> None:
        """Take `seq`'s drafts out of its tokens and roll its KV back to the last real token."""
        drafts = self.drafts.pop(seq.request_id, None)
        if drafts is None:
            return
        del seq.token_ids[-len(drafts) :]
        if not seq.is_finished:
            bm.rollback(seq, seq.num_tokens)


def merge_outputs(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """One output per request, in first-seen order: a step that accepted drafts emits several
    tokens per request, applied one at a time; their outputs join (tokens, text, logprobs appended;
    finish state and counts from the last)."""
    merged: dict[str, RequestOutput] = {}
    for out in outputs:
        prev = merged.get(out.request_id)
        if prev is None:
            merged[out.request_id] = out
            continue
        logprobs = None
        if prev.logprobs is not None or out.logprobs is not None:
            logprobs = [*(prev.logprobs or []), *(out.logprobs or [])]
        merged[out.request_id] = replace(
            out,
            new_token_ids=[*prev.new_token_ids, *out.new_token_ids],
            text=prev.text + out.text,
            logprobs=logprobs,
        )
    return list(merged.values())
