"""The serving core: `LLMEngine` ties scheduler, block manager and model runner into the `Engine` protocol.

Callers add requests and call `step()` in a loop. Each step schedules a batch, runs it, appends
sampled tokens, applies stop conditions (eos / stop token ids, stop strings on incrementally
detokenized text, max tokens, context length) and returns what each request produced.

    engine = LLMEngine("path/to/checkpoint-or-artifact", EngineConfig(device="cpu"))
    ids = engine.tokenizer.encode("Hello")
    engine.add_request("r1", ids, SamplingParams(max_tokens=8, temperature=0))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.request_id, out.new_token_ids, repr(out.text), out.finish_reason)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from kiln_engine import grammar
from kiln_engine.block_manager import BlockManager
from kiln_engine.config import EngineConfig, ModelConfig
from kiln_engine.draft import DraftModel
from kiln_engine.eagle import EagleProposer, prepare_head
from kiln_engine.grammar import Grammars
from kiln_engine.interface import EngineStats, RequestOutput, SamplingParams, TokenLogprob
from kiln_engine.model_runner import ModelRunner
from kiln_engine.sampler import SampledTokens
from kiln_engine.scheduler import Scheduler, SchedulerOutput
from kiln_engine.sequence import Sequence
from kiln_engine.speculative import SpeculativeDecoder, merge_outputs
from kiln_engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class _TextState:
    """A request's decoded output text and how much of it has been returned."""

    detok: IncrementalDetokenizer
    text: str = ""
    emitted: int = 0
    prev_len: int = 0  # length of `text` before this step's token


_PENDING_TOKEN = -1  # stands for a token the device has sampled and the host has not read yet
# A lookahead step's grammar masks are filled on the sampler's fill thread while this thread does the
# bookkeeping of the step before (Sampler.sample_async); bench/structured_outputs.py turns it off for
# its baseline row, the fill then runs on this thread before that bookkeeping.
DEFER_GRAMMAR_MASKS = True


@dataclass
class _Flight:
    """A step enqueued on the device whose tokens the host has not read yet."""

    sched: SchedulerOutput
    sampling: list[Sequence]  # the sequences whose next token it samples, in row order
    sampled: SampledTokens


def validate_params(params: SamplingParams) -> None:
    """Reject sampling parameters that have no meaning (the server turns these into HTTP 400)."""
    if params.max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {params.max_tokens}")
    if params.temperature < 0:
        raise ValueError(f"temperature must be non-negative, got {params.temperature}")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be non-negative (0 disables it), got {params.top_k}")
    if params.logprobs is not None and not 0 <= params.logprobs <= 20:
        raise ValueError(f"logprobs must be between 0 and 20, got {params.logprobs}")
    if any(not s for s in params.stop):
        raise ValueError("stop strings must be non-empty")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= getattr(params, name) <= 2.0:
            raise ValueError(f"{name} must be between -2 and 2, got {getattr(params, name)}")
    if not 0.0 < params.repetition_penalty <= 2.0:
        raise ValueError(f"repetition_penalty must be in (0, 2], got {params.repetition_penalty}")
    if any(not -100.0 <= bias <= 100.0 for _, bias in params.logit_bias):
        raise ValueError("logit_bias values must be between -100 and 100")
    if not 0 <= params.min_tokens <= params.max_tokens:
        raise ValueError(f"min_tokens must be between 0 and max_tokens, got {params.min_tokens}")
    if params.structured is not None and (params.ignore_eos or params.min_tokens):
        # a grammar ends its output with EOS: holding EOS back could leave no token allowed
        raise ValueError("a structured output cannot be combined with ignore_eos or min_tokens")


def stop_holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could still grow into a stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class LLMEngine:
    """Continuous batching over a paged KV cache, for one model on one device (one TP rank)."""

    def __init__(self, model_path: str | Path, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.config.validate()
        # A draft model or EAGLE head loads first, so that the target's cache is sized around it.
        draft = DraftModel(self.config) if self.config.speculative == "draft" else None
        head, head_block_bytes, aux_layers = None, 0, tuple[int, ...]()
        if self.config.speculative == "eagle":
            head, head_block_bytes, aux_layers = prepare_head(model_path, self.config)
        self.runner = ModelRunner(model_path, self.config, head_block_bytes, aux_layers)
        self.model_config: ModelConfig = self.runner.model_config
        self.block_manager = BlockManager(
            self.runner.num_blocks, self.config.block_size, self.config.prefix_caching, head is not None
        )
        self.scheduler = Scheduler(self.config, self.block_manager)
        # A sequence never outgrows the whole cache, so one running alone always fits; without chunked
        # prefill it must also fit one step's budget, or it could never be (re)computed.
        limits = [self.runner.max_model_len, self.runner.num_blocks * self.config.block_size]
        if not self.config.chunked_prefill:
            limits.append(self.config.max_tokens_per_step)
        self._max_model_len = min(limits)
        self.tokenizer: Tokenizer | None = None
        if (Path(model_path) / "tokenizer.json").exists():
            self.tokenizer = Tokenizer.from_dir(model_path, self.model_config.eos_token_ids)
        eos = self.tokenizer.eos_token_ids if self.tokenizer else self.model_config.eos_token_ids
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.runner.sampler.eos_token_ids = self.eos_token_ids  # what min_tokens holds back
        # Structured outputs need the tokenizer's vocabulary and xgrammar.
        self.grammars: Grammars | None = None
        if self.tokenizer is not None and grammar.available():
            self.grammars = Grammars(
                self.tokenizer.tk, self.model_config.vocab_size, sorted(self.eos_token_ids)
            )
        self.runner.sampler.grammars = self.grammars
        self.seqs: dict[str, Sequence] = {}
        self.texts: dict[str, _TextState] = {}
        self.pending: list[RequestOutput] = []  # aborts to report on the next step
        self.in_flight: _Flight | None = None  # a lookahead step enqueued by the last step()
        self.speculator: SpeculativeDecoder | None = None
        if self.config.speculative == "ngram":
            self.speculator = SpeculativeDecoder(self.config.num_speculative_tokens, self._max_model_len)
        if head is not None:
            eagle = EagleProposer(head, self.runner, self.config.num_speculative_tokens)
            self.runner.hidden_sink = eagle
            self.speculator = SpeculativeDecoder(
                self.config.num_speculative_tokens, self._max_model_len, late_proposer=eagle
            )
        self.draft = draft
        if draft is not None:
            draft.check_matches(self.tokenizer, self.model_config.vocab_size)
            self.speculator = SpeculativeDecoder(
                self.config.num_speculative_tokens, self._max_model_len, proposer=draft.propose
            )

    # -- Engine protocol ---------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def adapters(self) -> list[str]:
        """The LoRA adapters this engine serves, by name."""
        lora = self.runner.lora
        return [] if lora is None else list(lora.adapters)

    @property
    def failed_adapters(self) -> dict[str, str]:
        """LoRA adapters given to this engine that it cannot serve, with the reason."""
        lora = self.runner.lora
        return {} if lora is None else dict(lora.failed)

    def set_adapters(self, modules: list[tuple[str, str]]) -> dict[str, str]:
        """Serve exactly these LoRA adapters (name, local directory) from the next step on; requests
        in flight finish on the version they started with. Returns the adapters that failed to load,
        with the reason (the others are served)."""
        lora = self.runner.lora
        if lora is None:
            raise ValueError("this engine was started without LoRA adapter slots (max_loras 0)")
        in_flight = {seq.params.adapter for seq in self.seqs.values() if seq.params.adapter is not None}
        lora.set_adapters(modules, keep=in_flight)
        return dict(lora.failed)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        validate_params(params)
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens but this model's context is "
                f"{self.max_model_len} tokens (including at least one generated token)"
            )
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in (*params.stop_token_ids, *(t for t, _ in params.logit_bias))):
            raise ValueError(f"stop_token_ids and logit_bias token ids must be in [0, {vocab})")
        if params.adapter in self.failed_adapters:
            reason = self.failed_adapters[params.adapter]
            raise ValueError(f"LoRA adapter {params.adapter!r} failed to load: {reason}")
        if params.adapter is not None and params.adapter not in self.adapters:
            served = ", ".join(sorted(self.adapters)) or "none"
            raise ValueError(f"unknown LoRA adapter {params.adapter!r}; this engine serves: {served}")
        if params.adapter is not None and self.runner.lora is not None:  # the version served now
            params = replace(params, adapter=self.runner.lora.key_of[params.adapter])
        if params.structured is not None:
            if self.grammars is None:
                raise ValueError("structured outputs need the model's tokenizer and xgrammar")
            self.grammars.compile(params.structured)  # raises on a bad schema; cached for sampling
        seq = Sequence(request_id, list(prompt_token_ids), params)
        self.seqs[request_id] = seq
        if self.tokenizer is not None:
            self.texts[request_id] = _TextState(IncrementalDetokenizer(self.tokenizer, prompt_token_ids))
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        seq = self.seqs.get(request_id)
        if seq is None or seq.is_finished:
            return
        self.scheduler.finish(seq, "abort")
        self.pending.append(self._output(seq, []))
        self._forget(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.pending)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            waiting=len(self.scheduler.waiting),
            running=len(self.scheduler.running),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used_blocks,
            preemptions_total=self.scheduler.preemptions_total,
            prefix_cache_hit_tokens_total=self.scheduler.prefix_hit_tokens_total,
            spec_proposed_tokens_total=self.speculator.proposed_total if self.speculator else 0,
            spec_accepted_tokens_total=self.speculator.accepted_total if self.speculator else 0,
            spec_drafts_total=self.speculator.drafts_total if self.speculator else 0,
            spec_accepted_per_position=tuple(self.speculator.accepted_per_position)
            if self.speculator
            else (),
        )

    def step(self) -> list[RequestOutput]:
        """Resolve one step: its sampled tokens, stop checks and outputs.

        Usually that step is enqueued here first. In steady decoding (see `_lookahead`) the step
        after it is enqueued before its tokens are read, so the device runs that one while the host
        does this one's bookkeeping; the next call then starts from it.
        """
        outputs, self.pending = self.pending, []
        flight = self.in_flight
        if flight is not None and all(seq.is_finished for seq in flight.sampling):
            flight = None  # everyone it ran for stopped meanwhile: its tokens are not wanted
        if flight is None:
            if self.speculator is not None:
                self.speculator.propose(
                    self.scheduler.running, self.block_manager, self.config.max_tokens_per_step
                )
            sched = self.scheduler.schedule()
            if sched.is_empty:
                self.in_flight = None
                return outputs
            if self.speculator is not None and self.speculator.drafts:
                return outputs + self._speculative_step(sched, self.speculator)
            flight = _Flight(sched, self._sampling_seqs(sched), self.runner.execute_async(sched.chunks))
        # The flight's input tokens are all known now (a lookahead's were resolved by the call that
        # launched it), so its blocks can be published to the prefix cache.
        self.scheduler.complete_step(flight.sched)
        self.in_flight = self._lookahead(flight)
        tokens, logprobs = flight.sampled.resolve()
        outputs.extend(self._apply(flight.sampling, tokens, logprobs))
        if self.in_flight is not None:
            self.in_flight.sampled.finish()  # its grammar masks were filled during the _apply above
        return outputs

    def _speculative_step(self, sched: SchedulerOutput, spec: SpeculativeDecoder) -> list[RequestOutput]:
        """Verify the drafts in `sched` in one forward pass; apply each sequence's emitted tokens
        one at a time (so stops cut them short), then roll its KV back to match."""
        spec.check_scheduled(sched.chunks)
        verified = spec.verify(self.runner, sched.chunks)
        self.scheduler.complete_step(sched)
        seqs = self._sampling_seqs(sched)
        for seq in seqs:
            spec.settle(seq, self.block_manager)
        outputs: list[RequestOutput] = []
        for j in range(max(map(len, verified.tokens), default=0)):
            rows = [
                (seq, toks[j], verified.logprobs[i] if j == 0 else None)
                for i, (seq, toks) in enumerate(zip(seqs, verified.tokens, strict=True))
                if j < len(toks) and not seq.is_finished
            ]
            outputs.extend(self._apply([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]))
        for seq in seqs:
            if not seq.is_finished:
                seq.num_computed_tokens = seq.num_tokens - 1  # the last emitted token has no K/V yet
        return merge_outputs(outputs)

    def _sampling_seqs(self, sched: SchedulerOutput) -> list[Sequence]:
        return [c.seq for c in sched.chunks if c.samples]

    def _lookahead(self, flight: _Flight) -> _Flight | None:
        """Enqueue the decode step after `flight` before its tokens are known, when that step is
        certain to be every running sequence decoding one more token: nothing waits for admission,
        no sequence can finish by length, blocks cannot run out (no preemption), and the flight was
        itself such a decode step. A sequence that stops on a token value (EOS, stop string) wastes
        its row of the lookahead step. Tensor-parallel ranks never look ahead."""
        sched = self.scheduler
        running = sched.running
        if (
            not self.config.lookahead_decode
            or self.runner.decode_graphs is None
            or self.speculator is not None
            or self.config.tensor_parallel_size > 1
            or sched.waiting
            or len(flight.sampling) != len(running)
            or len(flight.sched.chunks) != len(running)
            or self.block_manager.num_free_blocks < len(running)
            or not self.runner.decode_graphs.can_run(flight.sched.chunks)
        ):
            return None
        for seq in running:
            after = seq.num_tokens + 1  # with the flight's token
            if after + 1 > self.max_model_len or after - seq.num_prompt_tokens >= seq.params.max_tokens:
                return None
            p = seq.params
            if p.uses_history and (p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0):
                # penalties read every generated token when the step is prepared; the flight's is not
                # known yet (grammar masks are filled later, once it is: GrammarMasks.pending)
                return None
        for seq in flight.sampling:
            seq.token_ids.append(_PENDING_TOKEN)
        nxt = sched.schedule()
        if [c.seq for c in nxt.chunks] != flight.sampling or nxt.preempted:
            raise RuntimeError("lookahead decode step does not match the step it follows")
        flight.sampled.copy_to_host()  # before the next step is enqueued, so reading waits for this one only
        sampled = self.runner.execute_async(
            nxt.chunks, inputs_from=flight.sampled, defer_masks=DEFER_GRAMMAR_MASKS
        )
        return _Flight(nxt, list(flight.sampling), sampled)

    def _apply(
        self, sampling: list[Sequence], tokens: list[int], logprobs: list[TokenLogprob | None]
    ) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        # Per-sequence work below runs for every decoding sequence every step (a thousand at a
        # time), so it stays lean: no text state without a tokenizer, one loop, few lookups.
        live = [
            (seq, token, lp)
            for seq, token, lp in zip(sampling, tokens, logprobs, strict=True)
            if not seq.is_finished  # aborted while the step ran
        ]
        followed = self.in_flight is not None  # a lookahead step already holds a placeholder
        for seq, token, lp in live:
            if followed:
                seq.token_ids[-1] = token
            else:
                seq.token_ids.append(token)
            if lp is not None:
                seq.pending_logprobs.append(lp)
        if self.texts:
            self._detokenize([s for s, _, _ in live], [t for _, t, _ in live])
        for seq, token, _ in live:
            reason = self._check_stop(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                outputs.append(self._output(seq, [token]))
                self._forget(seq)
            elif not self.texts and not seq.pending_logprobs:
                outputs.append(
                    RequestOutput(
                        request_id=seq.request_id,
                        new_token_ids=[token],
                        prompt_tokens=seq.num_prompt_tokens,
                        completion_tokens=seq.num_output_tokens,
                        cached_prompt_tokens=seq.num_cached_tokens,
                    )
                )
            else:
                outputs.append(self._output(seq, [token]))
        return outputs

    # -- helpers -----------------------------------------------------------------------------------
    def _detokenize(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """Extend each sequence's text by its new token."""
        for seq, token in zip(seqs, tokens, strict=True):
            state = self.texts.get(seq.request_id)
            if state is not None:
                state.prev_len = len(state.text)
                state.text += state.detok.add(token)

    def _check_stop(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if seq.num_output_tokens < p.min_tokens:  # the sampler kept EOS and stop tokens out meanwhile
            return "length" if seq.num_tokens >= self.max_model_len else None
        if not p.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if p.stop_token_ids and token in p.stop_token_ids:
            return "stop"
        state = self.texts.get(seq.request_id) if p.stop else None
        if state is not None:
            prev_len = state.prev_len
            for s in p.stop:
                idx = state.text.find(s, max(0, prev_len - len(s) + 1))
                if idx >= 0:
                    state.text = state.text[:idx]
                    return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, seq: Sequence, new_tokens: list[int]) -> RequestOutput:
        text = ""
        state = self.texts.get(seq.request_id)
        if state is not None:
            end = len(state.text)
            if not seq.is_finished and seq.params.stop:
                end -= stop_holdback(state.text, seq.params.stop)
            end = max(end, state.emitted)
            text = state.text[state.emitted : end]
            state.emitted = end
        lps = seq.pending_logprobs if seq.params.logprobs is not None else None
        seq.pending_logprobs = []
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_tokens,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            logprobs=lps,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_output_tokens,
            cached_prompt_tokens=seq.num_cached_tokens,
            text=text,
        )

    def _forget(self, seq: Sequence) -> None:
        self.seqs.pop(seq.request_id, None)
        self.texts.pop(seq.request_id, None)
        self.runner.release(seq.request_id)

    # -- offline convenience -----------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[list[int]]:
        """Run prompts to completion (all admitted at once); returns each one's generated token ids."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{id(self)}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, plist, strict=True):
            self.add_request(rid, prompt, p)
        result: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.request_id in result:
                    result[out.request_id].extend(out.new_token_ids)
        return [result[rid] for rid in ids]
