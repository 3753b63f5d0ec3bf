"""Draft-model proposals for speculative decoding: a smaller model with the target's tokenizer
proposes each speculating sequence's next tokens greedily, and the target verifies them
(kiln_engine.speculative).

The draft runs in its own `LLMEngine` on the same device, with its own paged KV cache and prefix
caching on: each step submits every speculating sequence's whole context at once, and the prefix
cache still holds that context's KV from the step before, so a step recomputes only the context's
last partial block and the tokens accepted since. A draft's proposals are greedy, a point mass, so
`accept_sampled`'s rejection rule keeps a sampled request's distribution the target's.

On a GPU the draft is loaded first, its weights and cache within `draft_gpu_memory_utilization` of
the card, and the target then sizes its own cache around it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from kiln_engine.config import EngineConfig
from kiln_engine.interface import SamplingParams
from kiln_engine.tokenizer import Tokenizer

DRAFT_DIR = "draft"  # an artifact's draft model, as `kiln-engine build --draft-model` carried it


class DraftModel:
    """A draft engine and the proposals it makes for a batch of contexts."""

    def __init__(self, config: EngineConfig) -> None:
        from kiln_engine.engine import LLMEngine  # the draft is an engine of its own

        if config.draft_model is None:
            raise ValueError("speculative decoding with a draft model needs draft_model")
        self.path = Path(config.draft_model)
        draft_config = replace(
            config,
            speculative=None,
            draft_model=None,
            lora_modules=[],
            max_loras=0,
            prefix_caching=True,
            gpu_memory_utilization=config.draft_gpu_memory_utilization,
        )
        self.engine = LLMEngine(self.path, draft_config)
        self.target_vocab_size = 0  # set by check_matches

    def check_matches(self, target_tokenizer: Tokenizer | None, target_vocab_size: int) -> None:
        """Refuse a draft whose tokens would mean other text than the target's: its tokenizer must
        be the target's (vocabularies equal), or without tokenizers its vocabulary size."""
        draft_tokenizer = self.engine.tokenizer
        if draft_tokenizer is not None and target_tokenizer is not None:
            draft_vocab = draft_tokenizer.tk.get_vocab(with_added_tokens=True)
            target_vocab = target_tokenizer.tk.get_vocab(with_added_tokens=True)
            if draft_vocab != target_vocab:
                raise ValueError(
                    f"draft model {self.path}: its tokenizer differs from the target's "
                    f"({len(draft_vocab)} vs {len(target_vocab)} tokens); a draft must share the tokenizer"
                )
        elif self.engine.model_config.vocab_size != target_vocab_size:
            raise ValueError(
                f"draft model {self.path}: vocabulary of {self.engine.model_config.vocab_size} tokens, "
                f"the target's has {target_vocab_size}"
            )
        self.target_vocab_size = target_vocab_size

    def propose(self, requests: list[tuple[list[int], int]]) -> list[list[int]]:
        """Up to `budget` greedy draft tokens after each (context, budget); [] where the budget is 0
        or the context does not fit the draft engine."""
        limit = self.engine.max_model_len
        wanted = [
            (i, context, min(budget, limit - len(context)))
            for i, (context, budget) in enumerate(requests)
            if budget > 0 and len(context) < limit
        ]
        drafts: list[list[int]] = [[] for _ in requests]
        if not wanted:
            return drafts
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, _, n in wanted]
        outputs = self.engine.generate([context for _, context, _ in wanted], params)
        for (i, _, _), tokens in zip(wanted, outputs, strict=True):
            drafts[i] = self._in_target_vocab(tokens)
        return drafts

    def _in_target_vocab(self, tokens: list[int]) -> list[int]:
        """The drafts up to the first id the target has no embedding for (a draft's padded rows)."""
        for j, token in enumerate(tokens):
            if token >= self.target_vocab_size:
                return tokens[:j]
        return tokens
