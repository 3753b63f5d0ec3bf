"""Pipeline-parallel execution of one engine step: the step's chunks split into micro-batches that
flow through the stages, so stage s runs micro-batch m while stage s-1 runs micro-batch m+1.

Every rank runs the same scheduler in lockstep (server/lockstep.py), so each rank knows every
micro-batch's shape without being told: stage 0 embeds tokens, each stage runs its decoder layers
and sends the residual stream [tokens, hidden] to the same tensor-parallel rank of the next stage,
the last stage computes logits and samples, and the sampled tokens (with logprobs) are broadcast
to every rank, whose scheduler appends them as one rank would. Inside a stage, tensor parallelism
works as without pipelining. The paged KV cache of each rank holds its own layers only.

Stages overlap within a step (a fill/drain pipeline: the bubble is (pp - 1) / (microbatches +
pp - 1) of the step); a step with a single sequence is one micro-batch and does not overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from kiln_engine.interface import TokenLogprob
from kiln_engine.layers.parallel import global_rank
from kiln_engine.sampler import SampledTokens, SampleRequest, SamplingBatch
from kiln_engine.scheduler import ScheduledChunk

if TYPE_CHECKING:
    from kiln_engine.model_runner import ModelRunner


def split_microbatches(chunks: list[ScheduledChunk], count: int) -> list[list[ScheduledChunk]]:
    """At most `count` contiguous, non-empty groups of `chunks` with about equal token counts.

    Contiguous, so the sampled rows come back in the chunks' order.
    """
    n = min(count, len(chunks))
    if n <= 1:
        return [chunks] if chunks else []
    total = sum(c.num_tokens for c in chunks)
    groups: list[list[ScheduledChunk]] = []
    current: list[ScheduledChunk] = []
    tokens = 0
    for i, chunk in enumerate(chunks):
        current.append(chunk)
        tokens += chunk.num_tokens
        groups_left = n - len(groups) - 1
        chunks_left = len(chunks) - i - 1
        if groups_left and (tokens * n >= total * (len(groups) + 1) or chunks_left == groups_left):
            groups.append(current)
            current = []
    groups.append(current)
    return groups


@dataclass
class BroadcastTokens(SampledTokens):
    """A step's tokens as the last stage sampled and broadcast them: already on the host."""

    token_list: list[int] = field(default_factory=list)
    logprob_list: list[TokenLogprob | None] = field(default_factory=list)

    def copy_to_host(self) -> None:
        return None

    def resolve(self) -> tuple[list[int], list[TokenLogprob | None]]:
        return self.token_list, self.logprob_list


class PipelineExecutor:
    """Runs the model runner's steps as this rank's pipeline stage (created on every rank, in order)."""

    def __init__(self, runner: ModelRunner) -> None:
        cfg = runner.config
        tp, pp, stage = cfg.tensor_parallel_size, cfg.pipeline_parallel_size, cfg.pipeline_parallel_rank
        self.runner = runner
        self.is_first, self.is_last = stage == 0, stage == pp - 1
        self.prev = global_rank(stage - 1, cfg.tensor_parallel_rank, tp)
        self.next = global_rank(stage + 1, cfg.tensor_parallel_rank, tp)
        self.source = global_rank(pp - 1, 0, tp)  # the last stage's first rank announces the tokens
        self.microbatches = cfg.pipeline_microbatches or pp
        self.hidden_size = runner.model_config.hidden_size
        # Tokens travel as Python objects (with logprobs) over gloo, also between GPUs.
        self.results: Any = dist.new_group(backend="gloo")

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> SampledTokens:
        runner = self.runner
        sends: list[tuple[Any, torch.Tensor]] = []
        rows: list[torch.Tensor] = []
        reqs: list[SampleRequest] = []
        for group in split_microbatches(chunks, self.microbatches):
            input_ids, positions, meta, sample_rows, sample_reqs = runner._prepare(group)
            runner.backend.prepare(meta)
            hidden_in = None
            if not self.is_first:
                hidden_in = torch.empty(
                    input_ids.shape[0], self.hidden_size, dtype=runner.dtype, device=runner.device
                )
                dist.recv(hidden_in, src=self.prev)
            hidden = runner.model(input_ids, positions, meta, hidden_in)
            if not self.is_last:
                hidden = hidden.contiguous()
                sends.append((dist.isend(hidden, dst=self.next), hidden))
            elif sample_rows:
                rows.append(hidden.index_select(0, runner._to_device(sample_rows, torch.int64)))
                reqs.extend(sample_reqs)
        result: tuple[list[int], list[TokenLogprob | None]] | None = None
        if self.is_last:
            result = ([], [])
            if reqs:
                logits = runner.model.compute_logits(torch.cat(rows))
                sampling = runner.sampler.prepare(reqs, runner.model_config.vocab_size)
                result = runner.sampler.sample_async(logits, sampling).resolve()
        for work, _ in sends:
            work.wait()
        box: list[Any] = [result]
        dist.broadcast_object_list(box, src=self.source, group=self.results)
        tokens, logprobs = box[0]
        empty = SamplingBatch(
            num_rows=len(tokens), all_greedy=True, needs_filter=False, logprobs=[], max_logprobs=0
        )
        return BroadcastTokens(
            tokens=torch.empty(0, dtype=torch.int64),
            packed=None,
            batch=empty,
            token_list=tokens,
            logprob_list=logprobs,
        )
